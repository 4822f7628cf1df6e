"""jacgraph.verify's RecurJac check on sources whose input has a fixed batch of 1: the sampled Jacobians
come from batched runs of a free-batch copy where that copy reproduces the source, and from one point per
run where it does not (an exporter's Reshape to [1, -1], an op over the batch axis); either way they equal
an independent float64 Jacobian (torch.func), and verify passes a sound bound graph and fails a broken one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from jacgraph import verify
from jacgraph.cli import main

RNG = np.random.default_rng(3)
CONV_W = RNG.standard_normal((2, 1, 3, 3)) * 0.7  # Conv 1 -> 2 channels, 3x3, stride 2, pad 1: 6x6 -> 3x3
UP_W = RNG.standard_normal((2, 2, 2, 2)) * 0.7  # ConvTranspose 2 -> 2 channels, 2x2, stride 2: 3x3 -> 6x6
HEAD_W, HEAD_B = RNG.standard_normal((3, 72)) * 0.3, RNG.standard_normal(3) * 0.1


def conv_model(path, flatten):
    """x [1, 1, 6, 6] -> Conv/2 -> Relu -> ConvTranspose/2 -> Relu -> `flatten` -> Gemm -> y [1, 3], float32;
    flatten is "Flatten" or "Reshape" (to the constant [1, -1], as an exporter tracing batch 1 writes)."""
    init = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
            [(CONV_W, "w1"), (UP_W, "w2"), (HEAD_W, "w3"), (HEAD_B, "b3")]]
    init.append(numpy_helper.from_array(np.array([1, -1], np.int64), "one_row"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]) if flatten == "Flatten"
             else helper.make_node("Reshape", ["r2", "one_row"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def torch_jacobians(points):
    """The same network in torch, float64: J [P, 3, 36] by torch.func.jacrev (weights rounded to float32 as stored)."""
    w1, w2, w3, b3 = (torch.from_numpy(a.astype(np.float32).astype(np.float64)) for a in (CONV_W, UP_W, HEAD_W, HEAD_B))

    def f(x):
        h = torch.relu(torch.nn.functional.conv2d(x.reshape(1, 1, 6, 6), w1, stride=2, padding=1))
        h = torch.relu(torch.nn.functional.conv_transpose2d(h, w2, stride=2))
        return h.reshape(-1) @ w3.T + b3
    return torch.func.vmap(torch.func.jacrev(f))(torch.from_numpy(points)).reshape(len(points), 3, 36).numpy()


def count_runs(monkeypatch):
    """Records the number of points (the batch of input x) in every run of verify's float64 sessions."""
    batches, real = [], verify.float64_session

    def counted(model):
        sess = real(model)
        run = sess.run

        def run_and_count(names, feeds):
            if "x" in feeds:
                batches.append(len(feeds["x"]))
            return run(names, feeds)
        sess.run = run_and_count
        return sess
    monkeypatch.setattr(verify, "float64_session", counted)
    return batches


@pytest.mark.parametrize("flatten,batched", [("Flatten", True), ("Reshape", False)])
def test_batch_of_one_source_runs_its_points_batched_where_the_copy_reproduces_it(flatten, batched, tmp_path,
                                                                                  monkeypatch):
    """Old: one float64 run per point for every source with a fixed batch of 1 (a U-Net took > 15 minutes)."""
    batches = count_runs(monkeypatch)
    points = np.random.default_rng(0).standard_normal((150, 1, 6, 6))
    J = verify._true_jacobian(str(conv_model(tmp_path / "m.onnx", flatten)), (1, 6, 6))(points)
    np.testing.assert_allclose(J, torch_jacobians(points), rtol=0, atol=1e-12)
    # the copy on the first three points, then (where it ran) the source on each of them; then the points
    assert batches == ([3, 1, 1, 1, 64, 64, 22] if batched else [3] + [1] * 150)


def test_an_op_over_the_batch_axis_keeps_one_point_per_run(tmp_path, monkeypatch):
    """ReduceMean over axis 0 is the identity at batch 1 but averages the points of a batch: the copy runs and
    differs from the source, so it is not used."""
    w = RNG.standard_normal((4, 3))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axis0"], ["y"], keepdims=1)]
    graph = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    path = tmp_path / "mix.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    batches = count_runs(monkeypatch)
    points = np.random.default_rng(1).standard_normal((70, 4))
    J = verify._true_jacobian(str(path), (4,))(points)
    want = np.stack([(w * (p @ w > 0)).T for p in points])  # relu(x W): dy/dx = diag(mask) W^T
    np.testing.assert_allclose(J, want, rtol=0, atol=1e-14)
    assert batches == [3, 1, 1, 1] + [1] * 70


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_verify_passes_sound_bounds_and_fails_broken_ones_on_a_batch_of_one(flatten, tmp_path, capsys):
    src = conv_model(tmp_path / "m.onnx", flatten)
    out = tmp_path / "m.recurjac.onnx"
    assert main(["compile", str(src), "--emit", "recurjac", "-o", str(out), "-q"]) == 0
    x0 = tmp_path / "x0.npy"
    np.save(x0, np.random.default_rng(2).standard_normal((1, 6, 6)))
    args = ["verify", str(out), "--source", str(src), "--x0", str(x0), "--eps", "0.3", "--samples", "30"]
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "outside the bounds: 0 (limit 0; of 30 points" in report and "either side of a kink" in report
    model = onnx.load(out)
    broken_by = [("Add", -1e-3, "sampled Jacobians outside the bounds")] + [("Mul", np.nan, "bounds finite")] * (
        flatten == "Flatten")  # (one point per run is slow: one broken graph there)
    for op, value, failed in broken_by:
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        producer = next(n for n in broken.graph.node if "J_upper" in n.output)
        producer.output[list(producer.output).index("J_upper")] = "J_upper_raw"
        broken.graph.initializer.append(numpy_helper.from_array(np.array(value), "J_upper_tamper"))
        broken.graph.node.append(helper.make_node(op, ["J_upper_raw", "J_upper_tamper"], ["J_upper"]))
        onnx.save(broken, tmp_path / "broken.onnx")
        assert main([args[0], str(tmp_path / "broken.onnx"), *args[2:]]) == 1
        report = capsys.readouterr().out
        assert "FAILED" in report and failed in report and "OK" not in report.replace("FAILED", "")


def test_a_wrong_source_exits_2_before_the_bound_graph_runs(tmp_path, capsys, monkeypatch):
    """Old: verify ran the bound graph (the long part on a large model) and only then read --source, and read it
    twice. Now a source of the wrong shapes exits 2 with the one-paragraph error before any session is made, and
    a right source is read once."""
    from jacgraph import runtime

    src = conv_model(tmp_path / "m.onnx", "Flatten")
    out = tmp_path / "m.recurjac.onnx"
    assert main(["compile", str(src), "--emit", "recurjac", "-o", str(out), "-q"]) == 0
    w = RNG.standard_normal((4, 2))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "small",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    wrong = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), wrong)
    sessions, built, real_session, real_source = [], [], runtime.session, verify.SourceModel
    monkeypatch.setattr(runtime, "session", lambda *a, **k: sessions.append(1) or real_session(*a, **k))
    monkeypatch.setattr(verify, "SourceModel", lambda m, *a, **k: built.append(m) or real_source(m, *a, **k))
    capsys.readouterr()
    assert main(["verify", str(out), "--source", str(wrong), "--samples", "30"]) == 2
    err = capsys.readouterr().err
    assert "--source takes inputs of shape [4] and gives 2 outputs" in err and "[1, 6, 6] and 3 outputs" in err
    assert "Traceback" not in err and not sessions
    assert main(["verify", str(out), "--source", str(src), "--samples", "30"]) == 0
    assert sessions and built.count(str(src)) == 1
