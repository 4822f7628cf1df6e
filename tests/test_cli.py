"""The command line: compile/inspect/verify/bench end to end, and every bad input -> exit 2, no file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jacgraph.cli import main


def mlp_model(path, extra_nodes=(), int_input=False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "c")]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    nodes += list(extra_nodes)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    if int_input:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ["y"] + [n.output[0] for n in extra_nodes]]
    model = helper.make_model(helper.make_graph(nodes, "mlp", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def conv_model(path, weight_channels):
    """A Conv whose weight expects `weight_channels` input channels, fed a 3-channel image."""
    weight = numpy_helper.from_array(np.ones((2, weight_channels, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_compile_verify_inspect_bench(tmp_path, capsys):
    src = mlp_model(tmp_path / "m.onnx")
    out = tmp_path / "m.jvp.onnx"
    assert run_cli("compile", src, "--emit", "jvp", "-o", out) == 0
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert run_cli("verify", out) == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli("inspect", src, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpa"] is True and info["ops"] == {"Gemm": 1, "Relu": 1} and info["emits"]["jvp"] is True
    assert run_cli("bench", src, "--runs", "3", "--no-memory", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["forward_ms"] > 0 and result["emitted_ms"] > 0


def test_verify_catches_a_wrong_tangent(tmp_path, capsys):
    """verify must fail on a graph whose y_dot is wrong (scaled by 2)."""
    src = mlp_model(tmp_path / "m.onnx")
    out = tmp_path / "m.jvp.onnx"
    run_cli("compile", src, "--emit", "jvp", "-o", out)
    model = onnx.load(out)
    last = model.graph.node[-1]
    assert last.op_type == "Identity" and last.output[0] == "y_dot"
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    model.graph.initializer.append(two)
    last.op_type = "Mul"
    last.input.append("two")
    onnx.save(model, out)
    assert run_cli("verify", out) == 1
    assert "FAILED" in capsys.readouterr().out


def test_multi_tangent_and_batched_strategy(tmp_path):
    src = mlp_model(tmp_path / "m.onnx")
    for extra in (["--tangents", "4"], ["--strategy", "batched"], ["--tangents", "2", "--strategy", "batched"]):
        out = tmp_path / "k.onnx"
        assert run_cli("compile", src, "--emit", "jvp", "-o", out, *extra) == 0
        assert run_cli("verify", out) == 0


def write_garbage(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make_input, args, words", [
    (lambda d: d / "missing.onnx", [], "no such file"),
    (lambda d: write_garbage(d / "text.onnx", b"this is not a model\n" * 10), [], "not an ONNX model"),
    (lambda d: write_garbage(d / "cut.onnx", mlp_model(d / "full.onnx").read_bytes()[:100]), [], "truncated"),
    (lambda d: write_garbage(d / "empty.onnx", b""), [], "empty"),
    (lambda d: mlp_model(d / "m.onnx"), ["--inputs", "nope"], "does not have"),
    (lambda d: mlp_model(d / "m.onnx", int_input=True), ["--inputs", "k"], "not floating point"),
    (lambda d: mlp_model(d / "m.onnx", extra_nodes=[
        helper.make_node("Einsum", ["y", "y"], ["yy"], equation="bi,bj->bij"), helper.make_node("Det", ["yy"], ["d"]),
        helper.make_node("Unique", ["y"], ["u"]), helper.make_node("Unique", ["y"], ["u2"])]), [],
     "Det (x1), Unique (x2)"),
    (lambda d: mlp_model(d / "m.onnx", extra_nodes=[helper.make_node("MatMul", ["y", "w"], ["yw"], name="mm")]), [],
     "(op_type:MatMul, node name: mm): Incompatible dimensions"),
    (lambda d: conv_model(d / "c.onnx", weight_channels=5), [], "Conv 'conv1' gets an input with 3 channels"),
    (lambda d: mlp_model(d / "m.onnx"), ["--tangents", "0"], "positive integer"),
    (lambda d: mlp_model(d / "m.onnx"), ["--norm", "inf"], "does not apply"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, make_input, args, words):
    src = make_input(tmp_path)
    out = tmp_path / "out.onnx"
    assert run_cli("compile", src, "--emit", "jvp", "-o", out, *args) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("jacgraph: error:")
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".jacgraph-")]


def test_existing_output_survives_a_failed_compile(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    assert run_cli("compile", tmp_path / "missing.onnx", "--emit", "jvp", "-o", out) == 2
    assert out.read_bytes() == b"precious"


def test_console_script_and_passes_subpackage_import():
    import jacgraph.passes.jvp as pass_module

    assert pass_module.build is not None
    done = subprocess.run([sys.executable, "-m", "jacgraph.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "compile" in done.stdout
