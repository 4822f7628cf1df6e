"""Kink and tie conventions, pinned exactly at the kinks (float32, onnxruntime, as users run them)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from jacgraph import runtime
from jacgraph.passes import jvp
from jacgraph.testing import central_difference, reference_session, relative_error, to_float64
from jacgraph.rules.jvp import INDICES_BELOW, PHASES_FROM


def one_node(op, shape, attrs=None, consts=None, n_inputs=1, out_types=(TensorProto.FLOAT,)):
    consts = consts or {}
    names = [f"x{i}" for i in range(n_inputs)] + list(consts)
    outs = [f"y{i}" for i in range(len(out_types))]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, **(attrs or {}))], op,
        [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, shape) for i in range(n_inputs)],
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def tangent(model, xs, vs):
    emitted = jvp.build(model)
    feeds = {f"x{i}": x for i, x in enumerate(xs)}
    feeds.update({f"x{i}_dot": v for i, v in enumerate(vs)})
    return runtime.run(runtime.session(emitted), feeds)["y0_dot"]


X = np.array([-1.0, 0.0, 1.0, -0.0], np.float32)
V = np.array([2.0, 3.0, 5.0, 7.0], np.float32)


def test_relu_derivative_at_zero_is_zero():
    np.testing.assert_array_equal(tangent(one_node("Relu", [4]), [X], [V]), [0, 0, 5, 0])


def test_leaky_relu_takes_the_left_slope_at_zero():
    got = tangent(one_node("LeakyRelu", [4], {"alpha": 0.25}), [X], [V])
    np.testing.assert_array_equal(got, np.float32([0.5, 0.75, 5, 1.75]))


def test_clip_derivative_is_zero_on_the_bounds():
    model = one_node("Clip", [4], consts={"lo": -1.0, "hi": 1.0})
    np.testing.assert_array_equal(tangent(model, [X], [V]), [0, 3, 0, 7])


EDGE = np.float32([0.0, -0.0, 2.0**-149, -2.0**-149, 1e-40, 2.0**-126, 1e-30, 1.0, -1.0, 6.0, np.nextafter(6, 0),
                   np.nextafter(6, 7), 3.4e38, -3.4e38, np.inf, -np.inf, np.nextafter(1, 0), np.nextafter(1, 2)])


@pytest.mark.parametrize("op, consts, inside", [
    ("Relu", {}, lambda x: x > 0),
    ("Clip", {"lo": 0.0, "hi": 6.0}, lambda x: (x > 0) & (x < 6)),
    ("Clip", {"lo": -1.0, "hi": 1.0}, lambda x: (x > -1) & (x < 1)),
    ("Clip", {"lo": 0.0, "hi": 1.0}, lambda x: (x > 0) & (x < 1)),
], ids=["relu", "relu6", "clip-1-1", "clip01"])
def test_nchwc_gates_are_exact_on_edge_values(op, consts, inside):
    """On [N, C, H, W] float32 tangents of a Conv's output the gate is a 0/1 mask from a scaled depthwise Conv and
    HardSigmoid (kept in onnxruntime's NCHWc layout): exactly the Where gate, at 0, -0, subnormals, the bounds and
    their neighbours. The gate's input comes from an identity depthwise Conv (weight 1: exact)."""
    shape = [1, 8, 4, 4]
    x = np.resize(EDGE, shape).astype(np.float32)
    x[0, 1] = np.random.default_rng(0).standard_normal([4, 4]) * 4  # ordinary values too
    v = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    model = after_identity_conv(one_node(op, shape, consts=consts))
    emitted = jvp.build(model)
    assert "Where" not in {n.op_type for n in emitted.graph.node}
    np.testing.assert_array_equal(tangent(model, [x], [v]), np.where(inside(x), v, np.float32(0)))


def after_identity_conv(model):
    """The one-node model with its input x0 first through a depthwise 1x1 Conv of weight 1 (y = x exactly)."""
    graph = model.graph
    channels = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    graph.initializer.append(numpy_helper.from_array(np.ones([channels, 1, 1, 1], np.float32), "identity"))
    graph.node[0].input[0] = "x0_conv"
    graph.node.insert(0, helper.make_node("Conv", ["x0", "identity"], ["x0_conv"], group=channels))
    return model


@pytest.mark.parametrize("hi", [6.0, 1.0])
def test_relu6_gate_is_two_fused_convs_and_one_mul(hi):
    """Clip(0, hi) on an NCHWc value: [y > 0] from one mask Conv, then [y < hi] where that mask is 1 from a second
    depthwise Conv of the mask with y added, which onnxruntime runs as one NCHWc Conv (y its sum input, HardSigmoid
    its activation); one Mul applies the gate. (The values are checked on edge cases above.)"""
    model = after_identity_conv(one_node("Clip", [1, 8, 4, 4], consts={"lo": 0.0, "hi": hi}))
    emitted = jvp.build(model)
    assert sum(n.op_type == "Mul" for n in emitted.graph.node) == 1
    options = onnxruntime.SessionOptions()
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3
        onnxruntime.InferenceSession(emitted.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    fused = [n for n in optimized.graph.node if n.op_type == "Conv" and len(n.input) == 4
             and any(a.name == "activation" and a.s == b"HardSigmoid" for a in n.attribute)]
    assert len(fused) == 1 and "Add" not in {n.op_type for n in optimized.graph.node}


THREE = np.float32(3)
HARD_SWISH_EDGE = np.float32([-np.inf, -3.4e38, -1e8, -4, np.nextafter(-THREE, -4), -3, np.nextafter(-THREE, 0), -1.5,
                              -2.0**-149, -0.0, 0.0, 1e-30, 1, np.nextafter(THREE, 0), 3, np.nextafter(THREE, 4), 4, 1e8,
                              3.4e38, np.inf])


@pytest.mark.parametrize("nchwc", [False, True], ids=["nchw", "nchwc"])
def test_hard_swish_slope_is_exact_beyond_and_at_plus_minus_three(nchwc):
    """float32 HardSwish's slope: exactly 0 below -3 and 1 above 3 (the float neighbours of ±3, huge values, ±inf),
    -1/2 and 3/2 at -3 and 3 (PyTorch's middle piece), and x/3 + 1/2 to float32 round-off between (a few ulps of
    1/2). On a plain tensor h + [|x| <= 3]·(h - 1/2) with h = HardSigmoid(x); on an NCHWc value (after a Conv)
    Clip(x/3 + 1/2, -1/2, 3/2) - [x > 3]/2 + [x < -3]/2 from depthwise Convs and HardSigmoid masks."""
    x = HARD_SWISH_EDGE
    v = np.float32(np.arange(1, len(x) + 1))
    if nchwc:
        model = after_identity_conv(one_node("HardSwish", [1, 4, len(x), 1]))
        x, v = np.repeat(x.reshape(1, 1, -1, 1), 4, axis=1), np.repeat(v.reshape(1, 1, -1, 1), 4, axis=1)
    else:
        model = one_node("HardSwish", [len(x)])
    ops = [n.op_type for n in jvp.build(model).graph.node]
    assert not {"Where", "Greater", "Less"} & set(ops)
    assert ops.count("Conv") == (5 if nchwc else 0) and ("Abs" in ops) != nchwc  # identity Conv, its tangent, 3
    slope = (tangent(model, [x], [v]) / v).reshape(-1)
    x = x.reshape(-1)
    beyond, at = np.abs(x) > 3, np.abs(x) == 3
    np.testing.assert_array_equal(slope[beyond], (x[beyond] > 0).astype(np.float32))
    np.testing.assert_array_equal(slope[at], np.where(x[at] > 0, 1.5, -0.5))
    middle = ~beyond & ~at
    np.testing.assert_allclose(slope[middle], x[middle].astype(np.float64) / 3 + 0.5, rtol=0, atol=4 * 2.0**-24)


def test_relu6_gate_and_hard_swish_slope_against_float64_central_differences():
    """Conv -> ReLU6 -> Conv -> HardSwish in float32 (the ReLU6 gate from two NCHWc Convs, the HardSwish slope from
    HardSigmoids): onnxruntime's JVP equals float64 central differences of the source's float64 copy, to float32
    round-off through two Convs (~1e-6; no unit of this fixed draw lies within h of a kink)."""
    rng = np.random.default_rng(6)
    weights = {"w1": rng.standard_normal([16, 3, 3, 3]) * 1.5, "w2": rng.standard_normal([16, 16, 1, 1]) * 0.5}
    nodes = [helper.make_node("Conv", ["x0", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["c2"]),
             helper.make_node("HardSwish", ["c2"], ["y0"])]
    values = {**weights, "lo": 0.0, "hi": 6.0}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()]
    graph = helper.make_graph(nodes, "relu6_hardswish",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "Where" not in {n.op_type for n in jvp.build(model).graph.node}
    x, v = rng.standard_normal([2, 1, 3, 8, 8])
    got = tangent(model, [x.astype(np.float32)], [v.astype(np.float32)])
    fd = central_difference(reference_session(to_float64(model)), {"x0": x}, {"x0": v}, 1e-6)["y0"]
    assert relative_error(got, fd) < 1e-5


def test_gate_on_a_value_outside_nchwc_is_the_where_gate():
    """A ReLU whose input onnxruntime holds in plain NCHW (here the graph input) gets the Where gate: the NCHWc
    mask would cost a reorder before and after its Conv (in_nchwc)."""
    model = one_node("Relu", [1, 8, 4, 4])
    assert "Where" in {n.op_type for n in jvp.build(model).graph.node}
    assert "Where" not in {n.op_type for n in jvp.build(after_identity_conv(model)).graph.node}


def test_abs_derivative_at_zero_is_zero():
    np.testing.assert_array_equal(tangent(one_node("Abs", [4]), [X], [V]), [-2, 0, 5, 0])


def test_max_ties_go_to_the_first_input():
    a, b = np.float32([1, 2, 3]), np.float32([1, 0, 3])
    got = tangent(one_node("Max", [3], n_inputs=2), [a, b], [np.float32([1, 1, 1]), np.float32([10, 10, 10])])
    np.testing.assert_array_equal(got, [1, 1, 1])


def test_reduce_max_ties_share_the_tangent_evenly():
    model = one_node("ReduceMax", [1, 4], {"keepdims": 0})
    got = tangent(model, [np.float32([[2, 2, 1, 2]])], [np.float32([[3, 6, 100, 9]])])
    np.testing.assert_allclose(got, [6.0], rtol=0, atol=1e-6)


MAXPOOL_GEOMETRIES = {
    "overlapping": {"kernel_shape": [2, 2], "strides": [1, 1]},
    "non-overlapping": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "padded-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
    "dilated": {"kernel_shape": [2, 3], "dilations": [2, 1]},
    "overlapping-padded": {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    "same-upper": {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "ceil-keeps-last": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "ceil-drops-last": {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1},
    "strided-dilated": {"kernel_shape": [3, 2], "strides": [2, 2], "dilations": [2, 3], "pads": [2, 1, 0, 1]},
    "stride-3": {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1},
}


@pytest.mark.parametrize("attrs", MAXPOOL_GEOMETRIES.values(), ids=MAXPOOL_GEOMETRIES.keys())
def test_maxpool_ties_take_the_index_onnxruntime_reports(attrs):
    shape = [1, 2, 8, 7]
    x = np.random.default_rng(0).integers(-1, 2, shape).astype(np.float32)  # ties in most windows
    v = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    indices_model = one_node("MaxPool", shape, attrs, out_types=(TensorProto.FLOAT, TensorProto.INT64))
    indices = runtime.run(runtime.session(indices_model), {"x0": x})["y1"]
    got = tangent(one_node("MaxPool", shape, attrs), [x], [v])
    np.testing.assert_array_equal(got, v.reshape(-1)[indices])


@pytest.mark.parametrize("shape", [[2, 3, 8, 7], [2, 16, 30, 30], [2, 64, 31, 30]],
                         ids=["small", "unfold", "phase-split"])
@pytest.mark.parametrize("attrs", MAXPOOL_GEOMETRIES.values(), ids=MAXPOOL_GEOMETRIES.keys())
def test_maxpool_static_shapes_find_the_winner_without_the_indices_kernel(attrs, shape):
    """The slice-and-compare rules (no MaxPool Indices output) give the same ties with K stacked tangents: strided
    pools take the one-hot unfold from INDICES_BELOW input elements per window tap (below, the pool's own Indices)
    and the stride-phase split from PHASES_FROM where the strides are equal (by one-hot Convs, or by SpaceToDepth
    when dilated)."""
    K = 3
    model = one_node("MaxPool", shape, attrs)
    emitted = jvp.build(model, tangents=K)
    rng = np.random.default_rng(1)
    x = rng.integers(-1, 2, shape).astype(np.float32)
    v = rng.standard_normal([K] + shape).astype(np.float32)
    got = runtime.run(runtime.session(emitted), {"x0": x, "x0_dot": v})["y0_dot"]
    indices_model = one_node("MaxPool", shape, attrs, out_types=(TensorProto.FLOAT, TensorProto.INT64))
    indices = runtime.run(runtime.session(indices_model), {"x0": x})["y1"]
    inferred = onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape
    shapes_agree = [d.dim_value for d in inferred.dim] == list(indices.shape)  # else the Indices kernel is used
    strides = attrs.get("strides", [1, 1])
    per_tap = np.prod(shape[1:]) / np.prod(attrs["kernel_shape"])
    by_indices = not shapes_agree or (max(strides) > 1 and per_tap < INDICES_BELOW)
    assert all(len(n.output) == 1 for n in emitted.graph.node if n.op_type == "MaxPool") != by_indices
    phase_split = not by_indices and strides[0] == strides[1] > 1 and per_tap >= PHASES_FROM
    ops = {n.op_type for n in emitted.graph.node}
    assert ("ArgMax" in ops) == (not by_indices and max(strides) > 1 and not phase_split)  # the one-hot unfold
    dilated = attrs.get("dilations", [1, 1]) != [1, 1]  # the phases by SpaceToDepth, else by one-hot Convs
    assert ("SpaceToDepth" in ops) == (phase_split and dilated)
    np.testing.assert_array_equal(got, np.stack([vk.reshape(-1)[indices] for vk in v]))


@pytest.mark.parametrize("pads", [[0, 0, 1, 1], [1, 1, 1, 1]], ids=["end-padded", "padded"])
def test_maxpool_phase_convs_against_float64_central_differences(pads):
    """A float32 3x3/2 pool large enough for the stride phases (32x40x40: 5689 input elements per tap) takes them by
    one-hot Convs; its JVP in onnxruntime equals float64 central differences of the source's float64 copy. The
    tangent is a copied cell of ẋ, so the only error is the differences' round-off (h = 1e-8: ~1e-8 relative; a
    window's two largest values closer than h·|v| is a ~1e-3 chance over the 20x20x32 windows, and the seed is fixed)."""
    model = one_node("MaxPool", [1, 32, 40, 40], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": pads})
    emitted = jvp.build(model)
    assert "SpaceToDepth" not in {n.op_type for n in emitted.graph.node}
    assert sum(n.op_type == "Conv" for n in emitted.graph.node) == 8  # 4 phases of x, 4 of ẋ
    rng = np.random.default_rng(4)
    x, v = rng.standard_normal([2, 1, 32, 40, 40]).astype(np.float32)
    got = tangent(model, [x], [v])
    fd = central_difference(reference_session(to_float64(model)), {"x0": x.astype(np.float64)},
                            {"x0": v.astype(np.float64)}, 1e-8)["y0"]
    assert relative_error(got, fd) < 1e-6


def test_maxpool_with_a_symbolic_channel_count_still_compiles_and_picks_the_index_onnxruntime_reports():
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2]}
    model = one_node("MaxPool", [1, "c", 40, 40], attrs)
    x = np.random.default_rng(2).integers(-1, 2, [1, 8, 40, 40]).astype(np.float32)
    v = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    indices_model = one_node("MaxPool", list(x.shape), attrs, out_types=(TensorProto.FLOAT, TensorProto.INT64))
    indices = runtime.run(runtime.session(indices_model), {"x0": x})["y1"]
    np.testing.assert_array_equal(tangent(model, [x], [v]), v.reshape(-1)[indices])


def test_hard_swish_uses_the_middle_piece_at_plus_minus_three():
    x = np.float32([-3, 3])
    got = tangent(one_node("HardSwish", [2]), [x], [np.float32([1, 1])])
    np.testing.assert_allclose(got, [-0.5, 1.5], rtol=1e-6)


def test_source_model_is_not_mutated():
    model = one_node("Relu", [4])
    before = model.SerializeToString()
    jvp.build(model)
    assert model.SerializeToString() == before
