"""Every reverse-mode rule: the float64 dot-product test <J v, u> = <v, Jᵀu>, with J v from the JVP pass.

The JVP rules are themselves checked against central differences (tests/test_rules_jvp.py), so the dot
product pins every VJP rule to the true derivative. Both sides are exact linear algebra in float64
(no step size): they differ by round-off only, ~1e-15 relative on these sizes; 1e-10 leaves margin
while a wrong rule gives errors of order 1. Parameter gradients (wrt="params", which the JVP pass does
not take) are checked against float64 central differences with the tolerance of the JVP tests (1e-6).
Kink and tie conventions are pinned exactly in float32 onnxruntime: the Jacobian the VJP emits at a
kink is the transpose of the one the JVP emits there.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.passes import jvp, vjp
from jacgraph.rules.transpose import VJP
from jacgraph.testing import central_difference, reference_session, relative_error, run_reference
from test_rules_jvp import CASES, X, X4, Case, case_id, f64, i64

DOT_TOL = 1e-10
FD_TOL = 1e-6
H = 1e-6


def reference(model):
    """The float64 reference evaluator (jacgraph.reference's ConvTranspose is fast, exact and right for groups)."""
    return reference_session(model)


def props(model):
    return {p.key: json.loads(p.value) for p in model.metadata_props
            if p.key.endswith(("_inputs", "_outputs", ".wrt", ".inputs"))}


# Cases the JVP table has no need for: every Gemm transpose pair, batched MatMul, weights and biases
# as inputs, grouped/strided ConvTranspose, pooling geometry, negative steps, repeated indices.
EXTRA = [
    *[Case("Gemm", {"a": (4, 3) if ta else (3, 4), "w": (5, 4) if tb else (4, 5), "c": (5,)}, ["a", "w", "c"],
           attrs={"transA": ta, "transB": tb, "alpha": 0.7, "beta": 1.3}, id=f"gemm-t{ta}{tb}")
      for ta in (0, 1) for tb in (0, 1)],
    Case("Gemm", {"a": (3, 4), "w": (4, 5)}, ["a", "w"], id="gemm-no-bias"),
    Case("MatMul", {"a": (2, 3, 4), "b": (2, 4, 5)}, ["a", "b"], id="matmul-batched-both"),
    Case("MatMul", {"a": (1, 3, 4), "b": (2, 1, 4, 5)}, ["a", "b"], id="matmul-broadcast-batch"),
    Case("Conv", {"x": (2, 4, 7, 6), "w": (6, 2, 3, 2), "bias": (6,)}, ["x", "w", "bias"],
         attrs={"group": 2, "strides": [2, 2], "dilations": [1, 2], "pads": [1, 0, 0, 1]}, id="conv-weights-groups"),
    Case("Conv", {"x": (2, 3, 8), "w": (4, 3, 3)}, ["x", "w"], attrs={"strides": [2]}, id="conv-1d-floor"),
    Case("Conv", {"x": (1, 2, 4, 5, 4), "w": (3, 2, 2, 3, 2)}, ["x", "w"], attrs={"pads": [1, 0, 1, 0, 1, 1]},
         id="conv-3d"),
    Case("Conv", {"x": (2, 4, 6, 6), "w": (4, 1, 3, 3)}, ["x", "w"], attrs={"group": 4, "auto_pad": "SAME_LOWER",
                                                                            "strides": [2, 2]}, id="conv-depthwise-weights"),
    Case("Conv", {"x": (2, 3, 7, 6)}, ["x", "w"], attrs={"strides": [2, 2], "pads": [1, 0, 0, 0]},
         consts={"w": f64(2, 3, 3, 3)}, declare={"x": ("n", 3, "h", "w")}, id="conv-dynamic-shape"),
    Case("ConvTranspose", {"x": (2, 4, 3, 4), "w": (4, 3, 3, 2), "bias": (6,)}, ["x", "w", "bias"],
         attrs={"group": 2, "strides": [2, 3], "dilations": [2, 1], "pads": [1, 0, 0, 1], "output_padding": [1, 2]},
         id="convtranspose-weights-groups"),
    Case("AveragePool", X4, ["x"], attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2],
                                          "count_include_pad": 1}, id="avgpool-include-pad"),
    Case("AveragePool", {"x": (1, 2, 7, 6)}, ["x"], attrs={"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1,
                                                           "pads": [0, 1, 0, 1], "count_include_pad": 1},
         id="avgpool-ceil-include-pad"),
    Case("AveragePool", {"x": (1, 2, 7)}, ["x"], attrs={"kernel_shape": [3], "strides": [2]}, id="avgpool-1d-floor"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "strides": [1, 1]}, id="maxpool-overlap-stride1"),
    Case("Slice", X, ["x", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(-1, 3), "ends": i64(-100, 0), "axes": i64(2, 1), "steps": i64(-2, -1)},
         id="slice-negative-steps"),
    Case("Resize", X4, ["x", "", "", "sizes"], attrs={"mode": "nearest", "nearest_mode": "floor"},
         consts={"sizes": i64(2, 3, 3, 7)}, id="resize-nearest-sizes"),
    Case("Resize", X4, ["x", "", "scales"], attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         consts={"scales": np.array([1, 1, 0.6, 2.0], np.float32)}, id="resize-linear-align"),
    Case("Resize", X4, ["x", "", "scales"], attrs={"mode": "linear", "axes": [3, 2]},
         consts={"scales": np.array([2.0, 1.5], np.float32)}, id="resize-axes"),
    Case("Max", {"a": (2, 3), "b": (3,), "c": (2, 1)}, ["a", "b", "c"], id="max-three-active"),
    Case("Min", {"a": (2, 3), "b": (2, 3)}, ["a", "b", "a"], id="min-repeated-input"),
    Case("Where", {"a": (2, 3), "b": (3,)}, ["m", "a", "b"], consts={"z": np.zeros(3)},
         extra_nodes=[helper.make_node("Greater", ["b", "z"], ["m"])], id="where-broadcast"),
    Case("Expand", {"x": (3, 1)}, ["x", "shape"], consts={"shape": i64(2, 1, 4)}, id="expand-both-ways"),
    Case("Tile", {"x": (2, 3)}, ["x", "rep"], consts={"rep": i64(3, 2)}, id="tile-2d"),
    Case("CumSum", X, ["x", "axis"], attrs={"exclusive": 1}, consts={"axis": np.array(-1, np.int64)},
         id="cumsum-exclusive"),
    Case("DepthToSpace", {"x": (1, 8, 2, 3)}, ["x"], attrs={"blocksize": 2, "mode": "DCR"}, id="depthtospace-dcr"),
    Case("Gather", {"x": (5, 3)}, ["x", "idx"], attrs={"axis": 0}, consts={"idx": i64(4, -1, 0, 4)},
         id="gather-repeated-negative"),
    Case("Concat", {"a": (2, 3), "b": (2, 4)}, ["a", "b", "a"], attrs={"axis": 1}, id="concat-repeated"),
    Case("Split", {"x": (2, 6)}, ["x", "split"], attrs={"axis": 1}, consts={"split": i64(1, 2, 3)}, n_out=3,
         id="split-three"),
    Case("Softmax", X, ["x"], attrs={"axis": -1}, id="softmax-last"),
    Case("ReduceMean", X, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(0, 2)}, id="reducemean-drop"),
    Case("ReduceMax", {"x": (2, 3, 4)}, ["x"], attrs={"keepdims": 0}, opset=18, id="reducemax-all"),
]
DOT_CASES = [c for c in CASES if c.op in VJP] + EXTRA


def dot_product(case):
    """(<J v, u>, <v, Jᵀu>) over every differentiated input and every float output."""
    model = case.model()
    emitted_jvp, emitted_vjp = jvp.build(model), vjp.build(model)
    rng = np.random.default_rng(1)
    feeds = {name: case.sample(rng, shape) for name, shape in case.inputs.items()}
    v = {name: rng.standard_normal(shape) for name, shape in case.inputs.items()}
    jp = props(emitted_jvp)
    dot_in, dot_out = dict(jp["jacgraph.tangent_inputs"]), dict(jp["jacgraph.tangent_outputs"])
    jv = run_reference(reference(emitted_jvp), {**feeds, **{dot_in[k]: d for k, d in v.items()}})
    vp = props(emitted_vjp)
    u = {bar: rng.standard_normal(jv[dot_out[y]].shape) for y, bar in vp["jacgraph.cotangent_inputs"]}
    out = run_reference(reference(emitted_vjp), {**feeds, **u})
    primal = run_reference(reference(model), feeds)
    for y, value in primal.items():  # the primal outputs pass through unchanged
        np.testing.assert_array_equal(out[y], value)
    for x, bar in vp["jacgraph.gradient_outputs"]:
        assert out[bar].shape == v[x].shape, f"{bar} has shape {out[bar].shape}, {x} has {v[x].shape}"
    lhs = sum(float(np.vdot(jv[dot_out[y]], u[bar])) for y, bar in vp["jacgraph.cotangent_inputs"])
    rhs = sum(float(np.vdot(v[x], out[bar])) for x, bar in vp["jacgraph.gradient_outputs"])
    scale = sum(np.linalg.norm(jv[dot_out[y]]) * np.linalg.norm(u[bar]) for y, bar in vp["jacgraph.cotangent_inputs"])
    return lhs, rhs, scale


@pytest.mark.parametrize("case", DOT_CASES, ids=case_id)
def test_dot_product(case):
    lhs, rhs, scale = dot_product(case)
    assert abs(lhs - rhs) <= DOT_TOL * max(scale, 1e-30), f"{case_id(case)}: <Jv,u> = {lhs!r}, <v,J^T u> = {rhs!r}"


def to_float32(model):
    """The float32 copy users run in onnxruntime (the cases are built in float64)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.DOUBLE:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.DOUBLE:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.GRAPH:  # Loop/Scan/If bodies
                attr.g.CopyFrom(to_float32(helper.make_model(attr.g)).graph)
    return m


# maxpool-nonoverlapping-padded-ceil: onnxruntime and ONNX shape inference disagree on this ceil-mode pool's output
# size, so the y_bar shape the case declares (from shape inference) is not the one onnxruntime produces;
# lrn-even: onnxruntime refuses LRN with an even size (the forward model does not load either);
# opset 28 (Celu in float64): onnxruntime 1.31 loads ai.onnx up to opset 26.
ORT_CASES = [c for c in DOT_CASES if c.id not in ("maxpool-nonoverlapping-padded-ceil", "lrn-even") and c.opset <= 26]


@pytest.mark.parametrize("case", ORT_CASES, ids=case_id)
def test_runs_in_onnxruntime_float32(case):
    """The emitted graph runs in float32 onnxruntime and agrees with the float64 reference to 1e-4: float32
    round-off (~1e-7 per op, sums of at most a few hundred terms), inputs 0.05 away from every kink."""
    model = case.model()
    emitted = vjp.build(model)
    vp = props(emitted)
    rng = np.random.default_rng(1)
    feeds = {name: case.sample(rng, shape) for name, shape in case.inputs.items()}
    primal = run_reference(reference(model), feeds)
    u = {bar: rng.standard_normal(np.shape(primal[y])) for y, bar in vp["jacgraph.cotangent_inputs"]}
    expected = run_reference(reference(emitted), {**feeds, **u})
    got = runtime.run(runtime.session(to_float32(emitted)), {k: v.astype(np.float32) for k, v in {**feeds, **u}.items()})
    for _, bar in vp["jacgraph.gradient_outputs"]:
        assert relative_error(got[bar], expected[bar]) < 1e-4, f"{case_id(case)}: {bar} in onnxruntime"


def test_every_rule_has_a_case():
    from test_rules_jvp import COVERED_ELSEWHERE

    covered = {c.op for c in DOT_CASES} | {op for c in DOT_CASES for op in c.covers} | set(COVERED_ELSEWHERE)
    missing = sorted(set(VJP) - covered)
    assert not missing, f"VJP rules without a dot-product case: {missing}"


# ---- parameter gradients against central differences ---------------------------------------------

PARAM_CASES = [
    Case("Gemm", {"a": (3, 4)}, ["a", "w", "c"], attrs={"transB": 1, "alpha": 0.7, "beta": 2.0},
         consts={"w": f64(5, 4), "c": f64(1, 5)}, id="gemm-params"),
    Case("Conv", {"x": (2, 4, 7, 6)}, ["x", "w", "bias"], attrs={"group": 2, "strides": [2, 1], "pads": [1, 1, 0, 1]},
         consts={"w": f64(6, 2, 3, 3), "bias": f64(6)}, id="conv-params"),
    Case("ConvTranspose", {"x": (1, 2, 3, 3)}, ["x", "w", "bias"], attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]},
         consts={"w": f64(2, 3, 3, 2), "bias": f64(3)}, id="convtranspose-params"),
    Case("BatchNormalization", X4, ["x", "scale", "bias", "mean", "var"], attrs={"epsilon": 1e-3},
         consts={"scale": f64(3), "bias": f64(3), "mean": f64(3), "var": np.abs(f64(3)) + 0.5}, id="batchnorm-params"),
    Case("BatchNormalization", {"x": (4, 3)}, ["x", "scale", "bias", "mean", "var"],
         consts={"scale": f64(3), "bias": f64(3), "mean": f64(3), "var": np.abs(f64(3)) + 0.5}, id="batchnorm-2d-params"),
    Case("LayerNormalization", X4, ["x", "scale", "bias"], attrs={"axis": 2}, consts={"scale": f64(5, 5), "bias": f64(5)},
         id="layernorm-params"),
    Case("InstanceNormalization", X4, ["x", "scale", "bias"], consts={"scale": f64(3), "bias": f64(3)}, id="instnorm-params"),
    Case("PRelu", X4, ["x", "slope"], consts={"slope": f64(3, 1, 1)}, kinks=(0,), id="prelu-params"),
    Case("MatMul", {"a": (2, 3, 4)}, ["a", "w"], consts={"w": f64(4, 5)}, id="matmul-params"),
    Case("Mul", {"a": (2, 3, 4)}, ["a", "w"], consts={"w": f64(3, 1)}, id="mul-params"),
    Case("Div", {"a": (2, 3)}, ["w", "a"], consts={"w": f64(3)}, kinks=(0,), id="div-params"),
    Case("Pow", {"x": (2, 3)}, ["x", "p"], consts={"p": np.array([1.5, 2.0, 0.5])}, positive=True, id="pow-params"),
    Case("Add", {"a": (2, 3)}, ["a", "w"], consts={"w": f64(1, 3)}, id="add-params"),
    Case("Einsum", {"a": (2, 3, 4)}, ["a", "w"], attrs={"equation": "bij,jk->bik"}, consts={"w": f64(4, 5)},
         id="einsum-params"),
]
# parameters every case must differentiate (the others, like Pad's fill value, are not parameters here)
EXPECTED_PARAMS = {"gemm-params": {"w", "c"}, "conv-params": {"w", "bias"}, "convtranspose-params": {"w", "bias"},
                   "batchnorm-params": {"scale", "bias", "mean", "var"}}


def with_params_as_inputs(case):
    floats = {k: v for k, v in case.consts.items() if np.issubdtype(v.dtype, np.floating)}
    return dataclasses.replace(case, inputs={**case.inputs, **{k: v.shape for k, v in floats.items()}},
                               consts={k: v for k, v in case.consts.items() if k not in floats}), floats


@pytest.mark.parametrize("case", PARAM_CASES, ids=case_id)
def test_param_gradients_match_central_differences(case):
    emitted = vjp.build(case.model(), wrt="params")
    vp = props(emitted)
    params = vp["jacgraph.wrt"]
    assert EXPECTED_PARAMS.get(case.id, set()) <= set(params)
    assert params, "no parameter was differentiated"
    open_case, values = with_params_as_inputs(case)
    rng = np.random.default_rng(2)
    feeds = {name: case.sample(rng, shape) for name, shape in case.inputs.items()}
    feeds.update(values)
    v = {name: rng.standard_normal(np.shape(feeds[name])) for name in list(case.inputs) + params}
    primal = run_reference(reference(open_case.model()), feeds)
    u = {bar: rng.standard_normal(primal[y].shape) for y, bar in vp["jacgraph.cotangent_inputs"]}
    out = run_reference(reference(emitted), {**{k: feeds[k] for k in case.inputs}, **u})  # params: their defaults
    for name, bar in vp["jacgraph.gradient_outputs"]:
        # per parameter: <(f(θ + hv) - f(θ - hv))/2h, u> = <v, θ̄>
        fd_one = central_difference(reference(open_case.model()), feeds, {name: v[name]}, H)
        lhs = sum(float(np.vdot(fd_one[y], u[b_])) for y, b_ in vp["jacgraph.cotangent_inputs"])
        rhs = float(np.vdot(v[name], out[bar]))
        assert abs(lhs - rhs) <= FD_TOL * max(abs(lhs), 1e-12), f"{case_id(case)} d/d{name}: fd {lhs!r} vs vjp {rhs!r}"
    # and the new defaults are what an override gives: feeding the params explicitly changes nothing
    again = run_reference(reference(emitted), {**{k: feeds[k] for k in case.inputs}, **u, **values})
    for _, bar in vp["jacgraph.gradient_outputs"]:
        np.testing.assert_array_equal(again[bar], out[bar])


def test_wrt_list_and_errors():
    case = PARAM_CASES[1]
    emitted = vjp.build(case.model(), wrt=["bias"])
    assert props(emitted)["jacgraph.wrt"] == ["bias"]
    assert [o.name for o in emitted.graph.output] == ["y0", "x_bar", "bias_bar"]
    assert [i.name for i in emitted.graph.input] == ["x", "bias", "y0_bar"]
    with pytest.raises(JacgraphError, match="'nope'.*w, bias"):
        vjp.build(case.model(), wrt=["nope"])


def test_unsupported_ops_listed_together():
    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["a"]), helper.make_node("Unique", ["x"], ["b"]),
         helper.make_node("Det", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(JacgraphError, match=r"Det \(x1\), Unique \(x2\)"):
        vjp.build(model)


def test_source_model_is_not_mutated():
    model = PARAM_CASES[1].model()
    before = model.SerializeToString()
    vjp.build(model, wrt="params")
    assert model.SerializeToString() == before


# ---- kinks and ties, exactly, in float32 onnxruntime ----------------------------------------------

def one_node(op, shapes, attrs=None, consts=None):
    consts = consts or {}
    names = [f"x{i}" for i in range(len(shapes))] + list(consts)
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **(attrs or {}))], op,
        [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, s) for i, s in enumerate(shapes)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def jacobians(model, xs):
    """J as dense matrices twice: columns J e_k from the JVP pass, rows e_kᵀ J from the VJP pass."""
    jvp_s, vjp_s = runtime.session(jvp.build(model)), runtime.session(vjp.build(model))
    feeds = {f"x{i}": x for i, x in enumerate(xs)}
    sizes = [x.size for x in xs]
    cols = []
    for k in range(sum(sizes)):
        e = np.zeros(sum(sizes), np.float32)
        e[k] = 1
        dots = {f"x{i}_dot": part.reshape(x.shape) for i, (x, part) in enumerate(zip(xs, np.split(e, np.cumsum(sizes)[:-1])))}
        cols.append(runtime.run(jvp_s, {**feeds, **dots})["y_dot"].reshape(-1))
    J = np.stack(cols, axis=1)
    y_shape = runtime.run(jvp_s, {**feeds, **dots})["y"].shape
    rows = []
    for k in range(J.shape[0]):
        u = np.zeros(J.shape[0], np.float32)
        u[k] = 1
        out = runtime.run(vjp_s, {**feeds, "y_bar": u.reshape(y_shape)})
        rows.append(np.concatenate([out[f"x{i}_bar"].reshape(-1) for i in range(len(xs))]))
    return J, np.stack(rows, axis=0)


ZERO = np.float32([-1, 0, 1, -0.0, 3, -3])
KINKS = [
    ("Relu", [ZERO], {}, {}),
    ("LeakyRelu", [ZERO], {"alpha": 0.25}, {}),
    ("Clip", [ZERO], {}, {"lo": -1.0, "hi": 1.0}),
    ("Abs", [ZERO], {}, {}),
    ("HardSwish", [ZERO], {}, {}),
    ("HardSigmoid", [np.float32([-2.5, 2.5, 0, 1])], {"alpha": 0.2, "beta": 0.5}, {}),
    ("PRelu", [ZERO], {}, {"slope": 0.3}),
    ("Max", [np.float32([1, 2, 3]), np.float32([1, 0, 3]), np.float32([1, 2, 0])], {}, {}),
    ("Min", [np.float32([1, 2, 3]), np.float32([1, 5, 3])], {}, {}),
    ("ReduceMax", [np.float32([[2, 2, 1, 2], [0, 1, 1, 0]])], {"keepdims": 0, "axes": [1]}, {}),
    ("MaxPool", [np.zeros((1, 1, 4, 4), np.float32)], {"kernel_shape": [2, 2], "strides": [1, 1]}, {}),
    ("MaxPool", [np.zeros((1, 1, 4, 4), np.float32)], {"kernel_shape": [2, 2], "strides": [2, 2]}, {}),
    ("MaxPool", [np.float32([[[[1, 1, 0, 2], [0, 1, 2, 2], [3, 3, 3, 3], [0, 0, 0, 0]]]])],
     {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, {}),
    ("GlobalMaxPool", [np.float32([[[[1, 3], [3, 0]], [[2, 2], [2, 2]]]])], {}, {}),
]


@pytest.mark.parametrize("op, xs, attrs, consts", KINKS, ids=[f"{k[0]}-{i}" for i, k in enumerate(KINKS)])
def test_kink_conventions_match_the_jvp(op, xs, attrs, consts):
    if op == "ReduceMax":  # axes as an attribute: opset 13 form
        model = one_node(op, [x.shape for x in xs], attrs)
        model.opset_import[0].version = 13
    else:
        model = one_node(op, [x.shape for x in xs], attrs, consts)
    J, J_rows = jacobians(model, xs)
    np.testing.assert_allclose(J_rows, J, rtol=1e-6, atol=0)
    assert np.any(J), "a kink case whose Jacobian is all zero pins nothing"


def test_relu_gradient_at_zero_is_zero():
    emitted = vjp.build(one_node("Relu", [[6]]))
    out = runtime.run(runtime.session(emitted), {"x0": ZERO, "y_bar": np.ones(6, np.float32)})
    np.testing.assert_array_equal(out["x0_bar"], [0, 0, 1, 0, 1, 0])
    assert relative_error(out["y"], np.maximum(ZERO, 0)) == 0


# ---- indexing, scatter and signal ops ----

@pytest.mark.parametrize("case", [
    Case("Gather", X, ["x", "idx"], attrs={"axis": 1}, consts={"idx": i64(0, 2, 0)}, opset=13, id="gather-repeated"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "strides": [1, 1]}, opset=13, id="maxpool-overlapping"),
], ids=case_id)
def test_reverse_pass_at_opset_13_converts_the_model_up(case, monkeypatch):
    """Repeated gather indices and overlapping MaxPool windows sum cotangents with ScatterElements reduction='add'
    (opset 16): jacgraph.compile converts an opset-13 model up rather than refusing it; a direct pass call says why."""
    import jacgraph
    from jacgraph.errors import NeedsOpset

    with pytest.raises(NeedsOpset, match="needs opset 16; the model has opset 13"):
        vjp.build(case.model())
    emitted = jacgraph.compile(case.model(), emit="vjp")
    assert {i.domain: i.version for i in emitted.opset_import}[""] == 16
    runtime.session(emitted)  # loads in onnxruntime
    monkeypatch.setattr(vjp, "build", lambda *_, **__: emitted)
    lhs, rhs, scale = dot_product(case)
    assert abs(lhs - rhs) <= DOT_TOL * scale
