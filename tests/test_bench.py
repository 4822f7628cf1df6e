"""jacgraph.bench (peak memory in a fresh process, the per-op profile) and examples/bench_suite.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jacgraph.bench import format_profile, peak_memory, profile


def expand_then_sum(n):
    """y = ReduceSum(Expand(x, [n, n])): the run materialises an n x n float32 intermediate."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [n, n])
    nodes = [helper.make_node("Expand", ["x", "shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_peak_memory_grows_with_what_the_run_allocates():
    feeds = {"x": np.ones((1, 1), np.float32)}
    ballast = np.ones(400 * 2**20 // 8)  # this process peaks higher than the probe: its peak must not leak in
    small = peak_memory(expand_then_sum(16), feeds, threads=1, runs=1)
    big = peak_memory(expand_then_sum(4096), feeds, threads=1, runs=1)  # a 64 MiB intermediate
    growth_mb = lambda m: (m["peak_kb"] - m["loaded_kb"]) / 1024  # noqa: E731
    assert growth_mb(small) < 16
    assert growth_mb(big) > 48  # 64 MiB allocated; RSS counts what is touched, all of it here
    del ballast


def test_profile_totals_per_op_type_of_the_runs_after_warmup():
    model = expand_then_sum(512)
    feeds = {"x": np.ones((1, 1), np.float32)}
    ops = profile(model, feeds, threads=1, runs=4, warmup=2)
    assert set(ops) == {"Expand", "ReduceSum"}
    assert all(entry["nodes"] == 1 and entry["ms"] > 0 for entry in ops.values())
    table = format_profile(ops, profile(expand_then_sum(16), feeds, threads=1, runs=2))
    assert "Expand" in table and "ReduceSum" in table and "kernel total" in table


def test_format_profile_adds_columns_and_the_time_beyond_twice_the_forward():
    forward = {"Conv": {"ms": 1.0, "nodes": 2}}
    after = {"Conv": {"ms": 2.25, "nodes": 4}, "Mul": {"ms": 0.5, "nodes": 2}}
    before = {"Conv": {"ms": 2.0, "nodes": 4}, "Where": {"ms": 1.0, "nodes": 2}}
    lines = format_profile(forward, after, others={"before": before}).splitlines()
    assert "before ms, nodes" in lines[0]
    assert [line.split()[0] for line in lines[1:4]] == ["Conv", "Where", "Mul"]  # costliest in any column first
    assert lines[-1].split() == ["beyond", "2", "x", "forward", "0.750", "ms", "1.000", "ms"]


def test_cli_bench_profile_prints_both_graphs_per_op(tmp_path, capsys):
    from jacgraph.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(expand_then_sum(64), path)
    assert main(["bench", str(path), "--runs", "3", "--threads", "1", "--no-memory", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "per-op kernel time" in out and "Expand" in out and "ReduceSum" in out


def _positive_finite(row, keys):
    for key in keys:
        assert key in row, f"{row['name']}: no {key} ({row.get('error') or row})"
        assert np.isfinite(row[key]) and row[key] > 0, f"{row['name']}: {key} = {row[key]}"


def test_bench_suite_jvp_one_model_per_suite(tmp_path, capsys):
    """examples/bench_suite.py on a small model of each suite, one timed round: every column filled (peak
    memory, a fresh process per graph, is left to the VJP test to keep this one short)."""
    from examples import bench_suite

    out = tmp_path / "jvp.json"
    bench_suite.main(["--models", "mlp,squeezenet,bert", "--runs", "1", "--threads", "1", "--no-memory",
                      "--json", str(out)])
    printed = capsys.readouterr().out
    for column in bench_suite.JVP_COLUMNS:
        assert column in printed
    result = json.loads(out.read_text())
    assert result["settings"]["mode"] == "jvp"
    rows = {r["suite"]: r for r in result["rows"]}
    assert [rows[s]["name"] for s in ("archs", "zoo", "transformers")] == ["mlp", "squeezenet", "bert"]
    timed = ["forward_ms", "auto_ms", "auto_ratio", "onnx_ad_ms", "onnx_ad_ratio", "onnx_ad_over_jvp"]
    for suite, row in rows.items():
        assert row["runs"] == 1
        _positive_finite(row, timed + (["torch_jvp_ms", "torch_over_jvp"] if suite != "zoo" else []))
        assert row["onnx_ad_difference"] < 1e-3  # onnx-ad's graph computes the same J v
    assert "torch_jvp_ms" not in rows["zoo"]  # no PyTorch module for a zoo file


def test_bench_suite_vjp(tmp_path, capsys):
    from examples import bench_suite

    out = tmp_path / "vjp.json"
    bench_suite.main(["--mode", "vjp", "--models", "mlp", "--runs", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert all(column in printed for column in bench_suite.VJP_COLUMNS)
    (row,) = json.loads(out.read_text())["rows"]
    _positive_finite(row, ["forward_ms", "vjp_x_ms", "vjp_params_ms", "onnx_ad_x_ms", "onnx_ad_params_ms",
                           "torch_x_ms", "torch_fwd_bwd_ms", "vjp_x_ratio", "forward_peak_mb", "vjp_x_peak_mb",
                           "vjp_params_peak_mb", "onnx_ad_x_over_vjp", "onnx_ad_params_over_vjp",
                           "torch_fwd_bwd_over_vjp"])
    assert row["onnx_ad_params_over_vjp"] == row["onnx_ad_params_ms"] / row["vjp_params_ms"]
    assert "onnx-ad x / jacgraph" in printed and "PyTorch fwd+bwd / jacgraph params" in printed  # the medians
    assert row["onnx_ad_x_difference"] < 1e-3 and row["onnx_ad_params_difference"] < 1e-3


def test_zoo_model_has_random_weights_in_place_of_the_fills():
    from examples import bench_suite

    model, x = bench_suite.zoo_model("squeezenet")
    assert [i.name for i in model.graph.input] == ["data_0"] and x.shape == (1, 3, 224, 224)
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv1 = weights["conv1_w_0"]  # He-normal: std sqrt(2 / fan_in), fan_in = 3 * 3 * 3
    assert conv1.shape == (64, 3, 3, 3) and abs(conv1.std() / np.sqrt(2 / 27) - 1) < 0.15
    again, _ = bench_suite.zoo_model("squeezenet")  # seed fixed: the same weights
    assert np.array_equal(onnx.numpy_helper.to_array(again.graph.initializer[-1]),
                          weights[again.graph.initializer[-1].name])


def gemm_softmax(w, c):
    """y = Softmax(x w + 2 c), x of shape [1, 8]: a zoo-style classifier head (Gemm with beta 2 -> Softmax)."""
    w, c = helper.make_tensor("w", TensorProto.FLOAT, [8, 10], w), helper.make_tensor("c", TensorProto.FLOAT, [10], c)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["logits"], beta=2.0),
             helper.make_node("Softmax", ["logits"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w, c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_zoo_classifier_is_scaled_off_softmax_saturation():
    """bench_suite._unsaturate: a Gemm -> Softmax head whose logits spread by ~1e3 (a saturated Softmax: J v = 0)
    gets alpha and beta scaled so that its logits at x have standard deviation 1; the Softmax is then not 0/1."""
    from examples import bench_suite
    from jacgraph import runtime

    rng = np.random.default_rng(0)
    w, c = 1e3 * rng.standard_normal(80), rng.standard_normal(10)
    model = gemm_softmax(w, c)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    before = runtime.run(model, {"x": x})["y"]
    bench_suite._unsaturate(model, x)  # pylint: disable=protected-access
    alpha, beta = (next(a.f for a in model.graph.node[0].attribute if a.name == k) for k in ("alpha", "beta"))
    logits = alpha * x.astype(np.float64) @ w.reshape(8, 10).astype(np.float32) + beta * c.astype(np.float32)
    after = runtime.run(model, {"x": x})["y"]
    assert before.max() == 1.0 and abs(logits.std() - 1) < 1e-4 and abs(beta / alpha / 2.0 - 1) < 1e-6
    assert 0 < after.min() and after.max() < 1
    assert not model.metadata_props  # rescaled: nothing to note


@pytest.mark.parametrize("bias", [0.0, 3.0, float("nan")])
def test_zoo_classifier_with_logits_of_no_spread_is_left_unchanged(bias):
    """bench_suite._unsaturate on logits that are all equal (zero weights), or NaN: there is no spread to divide
    by (it divided by zero before). The graph is left exactly as it was, and the model's metadata says why."""
    from examples import bench_suite

    model = gemm_softmax(np.zeros(80), np.full(10, bias))
    graph_before = model.graph.SerializeToString()
    bench_suite._unsaturate(model, np.ones((1, 8), np.float32))  # pylint: disable=protected-access
    assert model.graph.SerializeToString() == graph_before
    (note,) = [p.value for p in model.metadata_props if p.key == bench_suite.NOTE_KEY]
    assert note.startswith("classifier not rescaled")


def test_bench_suite_row_notes_a_classifier_left_unrescaled(tmp_path, capsys, monkeypatch):
    """A suite model whose classifier _unsaturate left alone: the run goes on, and its row and table say so."""
    from examples import bench_suite

    def load(_name, _folder):
        model, x = gemm_softmax(np.zeros(80), np.zeros(10)), np.ones((1, 8), np.float32)
        bench_suite._unsaturate(model, x)  # pylint: disable=protected-access
        return model, x, None

    monkeypatch.setitem(bench_suite.SUITES, "head", (["zero_head"], load))
    out = tmp_path / "vjp.json"
    bench_suite.main(["--mode", "vjp", "--suite", "head", "--runs", "1", "--no-memory", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["note"].startswith("classifier not rescaled") and "error" not in row
    table_row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| zero_head |")]
    assert len(table_row) == 1 and "classifier not rescaled" in table_row[0]


def test_bench_jvp_and_vjp_tables_say_why_a_comparison_failed(monkeypatch, capsys):
    """examples/bench_jvp.py and bench_vjp.py: when torch.func, onnx-ad or a memory probe fails for a model, its
    row says why in a notes cell ('—' where the number would be) instead of the table raising KeyError."""
    import torch

    from examples import bench_jvp, bench_vjp

    def untraceable(*args, **kwargs):
        raise RuntimeError("this module cannot be traced")

    def no_onnx_ad():
        raise ImportError("onnx-ad is not installed here")

    def probe_died(*args, **kwargs):
        raise MemoryError("the probe process was killed")

    monkeypatch.setattr(torch.func, "jvp", untraceable)
    monkeypatch.setattr(torch.func, "vjp", untraceable)
    monkeypatch.setattr(bench_jvp, "onnx_ad_module", no_onnx_ad)
    monkeypatch.setattr(bench_vjp, "onnx_ad_module", no_onnx_ad)
    monkeypatch.setattr(bench_jvp, "peak_memory", probe_died)
    for bench in (bench_jvp, bench_vjp):
        bench.main(["--only", "mlp", "--runs", "1", "--threads", "1", "--onnx-ad"])
        row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mlp |")][-1]  # the table
        assert "torch: RuntimeError: this module cannot be traced" in row, row
        assert "ImportError: onnx-ad is not installed here" in row and "—" in row, row
        if bench is bench_jvp:
            assert "forward_peak: MemoryError: the probe process was killed" in row, row


def test_bench_vjp_profile_puts_each_graphs_op_times_side_by_side(capsys):
    """examples/bench_vjp.py --profile: per-op kernel time of the forward, both VJP graphs and onnx-ad's two."""
    from examples import bench_vjp

    bench_vjp.main(["--profile", "--only", "mlp", "--runs", "1", "--threads", "1", "--onnx-ad"])
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if "op type" in line)
    for column in ("forward", "vjp_x", "vjp_params", "onnx_ad_x", "onnx_ad_params"):
        assert f"{column} ms, nodes" in head, head
    gemm = next(line for line in out.splitlines() if line.split()[:1] == ["Gemm"])
    assert gemm.count(" ms ") == 5, gemm  # every graph runs the last layer's Gemm: a time in each column


def built_for_cuda(tmp_path, name, model, x, modes):
    """bench_cuda.build of one archs source (model, x), saved into tmp_path as `bench_cuda.py prepare` saves it."""
    from examples import bench_cuda

    onnx.save(model, tmp_path / f"archs__{name}.onnx")
    np.save(tmp_path / f"archs__{name}.npy", x)
    return bench_cuda.build((str(tmp_path), "archs", name, modes))


def test_bench_cuda_pipeline_on_the_cpu_provider(tmp_path, capsys):
    """examples/bench_cuda.py's prepare -> build -> bound timing, run with its cpu provider (no GPU in CI): both
    modes give every ratio and jacgraph's results agree with onnx-ad's (read back from the bound outputs)."""
    import onnxruntime as ort

    from examples import bench_cuda, bench_suite

    model, x, _ = bench_suite.SUITES["archs"][1]("mlp", str(tmp_path))
    suite, name, plans = built_for_cuda(tmp_path, "mlp", model, x, ["jvp", "vjp"])
    jvp_row = bench_cuda.time_model(ort, suite, name, "jvp", plans["jvp"], 2, "cpu")
    _positive_finite(jvp_row, ["forward_ms", "auto_ms", "auto_ratio", "onnx_ad_ms", "onnx_ad_over_jvp"])
    assert jvp_row["onnx_ad_difference"] < 1e-3
    vjp_row = bench_cuda.time_model(ort, suite, name, "vjp", plans["vjp"], 2, "cpu")
    _positive_finite(vjp_row, ["vjp_x_ratio", "vjp_params_ratio", "onnx_ad_x_ratio", "onnx_ad_params_ratio"])
    assert vjp_row["onnx_ad_x_difference"] < 1e-3 and vjp_row["onnx_ad_params_difference"] < 1e-3
    broken = bench_cuda.time_model(ort, suite, name, "jvp", {"error": "ValueError: no"}, 2, "cpu")
    assert broken["error"] == "ValueError: no"  # a model that did not build is a row saying why


def test_bench_cuda_keeps_jacgraph_when_onnx_ad_refuses(tmp_path, monkeypatch):
    """onnx-ad refusing a model (its UnsupportedOperator on grouped Conv weights, say) is a note in the row; the
    forward and jacgraph's graphs are still built and timed (it once dropped the whole row)."""
    import onnxruntime as ort

    from examples import bench_cuda, bench_jvp, bench_suite, bench_vjp

    def refuses(*_):
        raise NotImplementedError("not differentiated by the peer")

    monkeypatch.setattr(bench_jvp, "onnx_ad_forward", refuses)
    monkeypatch.setattr(bench_vjp, "onnx_ad_reverse", refuses)
    model, x, _ = bench_suite.SUITES["archs"][1]("mlp", str(tmp_path))
    suite, name, plans = built_for_cuda(tmp_path, "mlp", model, x, ["jvp", "vjp"])
    jvp_row = bench_cuda.time_model(ort, suite, name, "jvp", plans["jvp"], 2, "cpu")
    _positive_finite(jvp_row, ["forward_ms", "auto_ms", "auto_ratio"])
    assert "not differentiated by the peer" in jvp_row["onnx_ad_error"] and "onnx_ad_ms" not in jvp_row
    vjp_row = bench_cuda.time_model(ort, suite, name, "vjp", plans["vjp"], 2, "cpu")
    _positive_finite(vjp_row, ["vjp_x_ratio", "vjp_params_ratio"])
    assert "onnx_ad_x_error" in vjp_row and "onnx_ad_params_error" in vjp_row and "error" not in vjp_row


def conv_batchnorm_net(seed=0):
    """(model, x): Conv-BatchNorm-Relu, a BatchNorm unfolded into Mul/Add by per-channel constants, Conv-BatchNorm,
    GlobalAveragePool, Gemm: the zoo's DenseNet-121/Inception v2/ResNet-50 pattern at 3x6x6, float32."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.5, "c1": 0.1 * rng.standard_normal(4),
               "w2": rng.standard_normal((5, 4, 3, 3)) * 0.3, "scale": rng.uniform(0.5, 1.5, (4, 1, 1)),
               "shift": 0.1 * rng.standard_normal((4, 1, 1)), "wg": rng.standard_normal((3, 5)),
               "bg": 0.1 * rng.standard_normal(3)}
    for bn, c in (("n1", 4), ("n2", 5)):
        weights.update({f"{bn}_s": rng.uniform(0.5, 1.5, c), f"{bn}_b": 0.1 * rng.standard_normal(c),
                        f"{bn}_mean": 0.1 * rng.standard_normal(c), f"{bn}_var": rng.uniform(0.5, 1.5, c)})
    bn_inputs = lambda bn: [f"{bn}_s", f"{bn}_b", f"{bn}_mean", f"{bn}_var"]  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "c1"], ["h1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h1", *bn_inputs("n1")], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Mul", ["r1", "scale"], ["m1"]), helper.make_node("Add", ["m1", "shift"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["h2"]),
             helper.make_node("BatchNormalization", ["h2", *bn_inputs("n2")], ["n2"]),
             helper.make_node("GlobalAveragePool", ["n2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1)]
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # onnxruntime loads it
    return model, rng.standard_normal((1, 3, 6, 6)).astype(np.float32)


def test_onnx_ad_gives_batchnorm_running_statistics_no_gradient_and_jacgraph_the_true_one():
    """Why the benchmarks leave BatchNorm's running mean/variance out of the check against onnx-ad (the zoo's
    0.03-0.81 'differences'): onnx-ad 0.3 returns exact zeros for them; jacgraph's gradient is the true one, float64
    central differences of <u, y> along a random direction of the four statistics (h 1e-6: O(h²) truncation
    ~1e-12; the Relu input nearest its kink is 0.0098 away, a step moves it by ~1e-6), tolerance 1e-6 as
    tests/test_rules_transpose."""
    from examples import bench_vjp
    from jacgraph.passes import vjp
    from jacgraph.runtime import session
    from jacgraph.testing import central_difference, reference_session, relative_error, run_reference, to_float64

    model, x = conv_batchnorm_net()
    stats = ["n1_mean", "n1_var", "n2_mean", "n2_var"]
    u = np.random.default_rng(1).standard_normal((1, 3))
    ad, feeds = bench_vjp.onnx_ad_reverse(model, x, u.astype(np.float32), stats)
    theirs = session(ad).run(None, feeds)[2:]
    assert all(g.shape[-1] == 1 and not np.any(g) for g in theirs)  # onnx-ad: no gradient, exact zeros
    emitted = vjp.emit(model, wrt=stats)
    ours = run_reference(reference_session(to_float64(emitted.model)), {"x": x.astype(np.float64), "y_bar": u})
    source64, values = bench_vjp.with_params_as_inputs(to_float64(model), stats)
    rng = np.random.default_rng(2)
    direction = {p: rng.standard_normal(values[p].shape) for p in stats}
    cd = central_difference(reference_session(source64), {"x": x.astype(np.float64), **values}, direction)["y"]
    along = sum(float(np.sum(ours[emitted.gradient_outputs[p]] * direction[p])) for p in stats)
    assert relative_error(along, float(np.sum(u * cd))) < 1e-6
    assert min(np.abs(ours[emitted.gradient_outputs[p]]).max() for p in stats) > 1e-3  # not zero here either


def test_bench_checks_against_onnx_ad_leave_batchnorm_running_statistics_out(tmp_path):
    """bench_vjp.measure and bench_cuda's checks compare the gradients both tools define: with the running
    statistics in, the all-parameter 'difference' on this net was the statistics' share of the gradient. Left out,
    the two agree to float32 round-off (~1e-7 on this 3-layer net; 1e-5 leaves margin)."""
    import time

    import onnxruntime as ort

    from examples import bench_cuda, bench_vjp

    model, x = conv_batchnorm_net()
    row = bench_vjp.measure(model, x, None, 1, 1, time.thread_time, True, memory=False)
    assert row["onnx_ad_x_difference"] < 1e-5 and row["onnx_ad_params_difference"] < 1e-5, row
    suite, name, plans = built_for_cuda(tmp_path, "conv_bn", model, x, ["vjp"])
    cuda_row = bench_cuda.time_model(ort, suite, name, "vjp", plans["vjp"], 1, "cpu")
    assert cuda_row["onnx_ad_x_difference"] < 1e-5 and cuda_row["onnx_ad_params_difference"] < 1e-5, cuda_row


def test_row_notes_a_nan_difference_from_onnx_ad():
    """A comparison whose relative difference is NaN (a NaN or inf in either result) is a note, like a large one.
    Old: `v > 1e-3` is False for NaN, so the row read as agreeing."""
    from examples.bench_suite import notes_cell

    assert notes_cell({"onnx_ad_difference": 1e-5}) == ""
    assert "onnx_ad: differs from jacgraph's by nan" in notes_cell({"onnx_ad_difference": float("nan")})
    assert "onnx_ad_x: differs from jacgraph's by 2.0e-02" in notes_cell({"onnx_ad_x_difference": 2e-2})


def test_disagreement_cut_keeps_the_nodes_up_to_k_and_works_at_the_last_node():
    """examples/vjp_onnx_ad_disagreement.py's cut(source, k): the nodes k needs, k's first output the only output;
    also for k = the last node, whose output is a graph output and not in value_info (a KeyError before)."""
    from examples.vjp_onnx_ad_disagreement import cut

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["unused"]),
             helper.make_node("Abs", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, kept, out in ((0, ["Relu"], "r"), (2, ["Relu", "Abs"], "y")):
        piece = cut(model, k)
        assert [n.op_type for n in piece.graph.node] == kept and [o.name for o in piece.graph.output] == [out]
        assert [d.dim_value for d in piece.graph.output[0].type.tensor_type.shape.dim] == [2, 3]
        onnx.checker.check_model(piece, full_check=True)


def test_bench_suite_saves_a_nan_row_whole(tmp_path):
    """A NaN difference (one tool's result not finite) used to raise inside json.dump(allow_nan=False), leaving a
    truncated file and losing the rows saved before it: the row is saved, read back, and flagged in the table."""
    from examples import bench_suite

    path = str(tmp_path / "run.json")
    bench_suite.save_json(path, {"rows": [{"name": "ok", "onnx_ad_difference": 1e-7}]})
    rows = [{"name": "ok", "onnx_ad_difference": 1e-7}, {"name": "bad", "onnx_ad_difference": float("nan")}]
    bench_suite.save_json(path, {"rows": rows})
    saved = json.loads((tmp_path / "run.json").read_text())["rows"]
    assert [r["name"] for r in saved] == ["ok", "bad"] and np.isnan(saved[1]["onnx_ad_difference"])
    assert bench_suite.notes_cell(saved[1]) and not bench_suite.notes_cell(saved[0])
    assert not (tmp_path / "run.json.tmp").exists()
