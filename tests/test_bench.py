"""`jacgraph.bench.peak_memory` sees the memory a run itself allocates (in its own fresh process)."""
from __future__ import annotations

import numpy as np
import onnx
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


def test_cli_bench_profile_prints_both_graphs_per_op(tmp_path, capsys):
    from jacgraph.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(expand_then_sum(64), path)
    assert main(["bench", str(path), "--runs", "3", "--threads", "1", "--no-memory", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "per-op kernel time" in out and "Expand" in out and "ReduceSum" in out
