"""A property test of the command line (issue 11): hostile models, arrays and option values.

Whatever hypothesis generates, every command must end with exit code 0 or 2 (verify: 1 when it finds the
graph wrong), print no traceback (and no internal error), leave every input file byte-identical, and on
failure leave no file at -o and no `.jacgraph-*` temporary. The examples are derandomized (the same ones in every CI run) and bounded
(max_examples, a deadline per example), so the test takes seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from datetime import timedelta

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from jacgraph.cli import main


def _mlp(extra=(), x_shape=("batch", 4), w_shape=(4, 3)):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(w_shape[1]).astype(np.float32), "c")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "c"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"]), *extra]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in extra]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _emitted(emit):
    import jacgraph

    return jacgraph.compile(onnx.ModelProto.FromString(VALID), emit=emit).SerializeToString()


VALID = _mlp()
EMITTED = [_emitted("jvp"), _emitted("vjp")]  # verify's input: graphs jacgraph wrote, then damaged
MODELS = {
    "valid": VALID,
    "unsupported op": _mlp(extra=[helper.make_node("Unique", ["y"], ["u"])]),
    "shapes do not fit": _mlp(x_shape=("batch", 5)),
    "no float input": helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["k", "k"], ["y"])], "ints", [helper.make_tensor_value_info("k", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [3])]), opset_imports=[helper.make_opsetid("", 17)]
    ).SerializeToString(),
}


@st.composite
def model_bytes(draw):
    kind = draw(st.sampled_from(["valid", "valid", "valid", "emitted", "named", "truncated", "random", "flipped",
                                 "flipped"]))
    if kind == "valid":
        return VALID
    if kind == "emitted":
        return draw(st.sampled_from(EMITTED))
    if kind == "named":
        return draw(st.sampled_from(sorted(MODELS.values())))
    base = draw(st.sampled_from([VALID, VALID, *EMITTED]))
    if kind == "truncated":
        return base[:draw(st.integers(0, len(base) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(["float32", "float32", "float64", "int64", "complex64", "str", "bool"]))
    shape = draw(st.sampled_from([(1, 4), (1, 4), (4,), (2, 4), (0, 4), (3,), (1, 5), ()]))
    values = np.asarray(draw(st.lists(st.sampled_from([0.0, 1.5, -2.0, 0.3, 0.7, np.nan, np.inf, 1e30]),
                                      min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))) or [0.0])
    values = values[:int(np.prod(shape))].reshape(shape) if np.prod(shape) else np.zeros(shape)
    if dtype == "str":
        return values.astype(str)
    if dtype in ("int64", "bool"):
        return np.clip(np.nan_to_num(values, posinf=3, neginf=-3), -3, 3).astype(dtype)
    return values.astype(dtype)


NUMBERS = st.sampled_from(["1", "3", "0.1", "2", "0", "-1", "-2", "nan", "inf", "-inf", "1e308", "", ",", "x", "2.5"])
SHAPES = st.sampled_from(["1,4", "4", "1,3,64,64", "0,4", "x=1,4", "x=2,4", "a,b", "1,100000,100000"])


@st.composite
def command(draw):
    """argv with {model}, {x0}, {out} placeholders."""
    name = draw(st.sampled_from(["compile", "inspect", "verify", "verify", "bound", "sense", "lipschitz", "bench"]))
    argv = [name, "{model}"]
    if name == "compile":
        emit = draw(st.sampled_from(["jvp", "vjp", "jacobian", "recurjac", "autolip"]))
        argv += ["--emit", emit, "-o", draw(st.sampled_from(["{out}.onnx", "{model}", "{out}.npz", "", "{dir}"]))]
        options = {"jvp": ["--tangents", "--inputs"], "vjp": ["--inputs"], "jacobian": ["--inputs"],
                   "recurjac": ["--input-shape"], "autolip": ["--input-shape"]}[emit]
    elif name == "bound":
        argv += ["--x0", "{x0}", "--eps", draw(NUMBERS), "-o", draw(st.sampled_from(["{out}.npz", "{model}", "{x0}"]))]
        options = ["--threads", "--input-shape"]
    elif name == "sense":
        argv += ["--x0", "{x0}", "-o", draw(st.sampled_from(["{out}.npz", "{x0}"]))]
        options = ["--budget", "--step", "--seed"]
    elif name == "lipschitz":
        argv += ["--method", draw(st.sampled_from(["autolip", "seqlip"]))]
        options = ["--top-k", "--exact-limit", "--iterations", "--input-shape"]
    elif name == "verify":
        options = ["--h", "--tol", "--seed"]
    elif name == "bench":
        argv += ["--no-memory", "--runs", draw(st.sampled_from(["0", "2", "-1", "nan"]))]
        options = ["--tangents", "--threads"]
    else:
        options = []
    for option in draw(st.lists(st.sampled_from(options), max_size=2, unique=True)) if options else []:
        argv += [option, draw(SHAPES if option == "--input-shape" else NUMBERS)]
    return argv + draw(st.sampled_from([[], ["--json"], ["-q"]]))


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@settings(max_examples=250, deadline=timedelta(seconds=30), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=model_bytes(), x0=arrays(), argv=command())
def test_hostile_command_lines_exit_0_or_2_and_change_nothing(model, x0, argv):
    with tempfile.TemporaryDirectory() as folder:
        model_path, x0_path, out = (os.path.join(folder, n) for n in ("model.onnx", "x0.npy", "result"))
        with open(model_path, "wb") as f:
            f.write(model)
        np.save(x0_path, x0)
        before = {p: _digest(p) for p in (model_path, x0_path)}
        args = [a.format(model=model_path, x0=x0_path, out=out, dir=folder) for a in argv]
        stderr, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(args)
        err = stderr.getvalue()
        event(f"{argv[0]} exit {code}")
        assert code in (0, 2) or (code == 1 and argv[0] == "verify"), (args, err)  # 1: verify found it wrong
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        assert {p: _digest(p) for p in before} == before, args
        left = sorted(os.listdir(folder))
        assert not [n for n in left if n.startswith(".jacgraph-")], (args, left)
        if code == 1:
            assert "FAILED" in stdout.getvalue(), (args, stdout.getvalue())
        if code == 2:
            assert err.startswith("jacgraph: error:") or "\njacgraph: error:" in err, (args, err)
            assert left == ["model.onnx", "x0.npy"], (args, left, err)
        if code == 0 and "--json" in args:
            import json

            json.loads(stdout.getvalue())
