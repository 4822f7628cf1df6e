"""Reverse-mode MaxPool without onnxruntime's Indices kernel (transpose._max_pool_by_positions): the same x̄ as the
Indices route on finite inputs, ties, huge negatives and padding included, and the transpose of the JVP rule
(dot-product test), infinities included."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jacgraph import runtime
from jacgraph.passes import jvp, vjp
from jacgraph.rules.jvp import INDICES_BELOW, PHASES_FROM

GEOMETRIES = {
    "2x2/2": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "3x3/2": {"kernel_shape": [3, 3], "strides": [2, 2]},
    "3x3/2-pad1": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "3x3/2-end-pad": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]},
    "3x3/1-pad1": {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    "3x3/2-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "3x3/2-pad-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
    "same-upper": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "3x3/3": {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 1, 1]},
}
SHAPE = [2, 16, 31, 30]  # 1653 input elements per tap of a 3x3 window: at INDICES_BELOW or more


def pool(attrs, shape=SHAPE, indices=False):
    outs = ["y", "argmax"] if indices else ["y"]
    types = [TensorProto.FLOAT, TensorProto.INT64][:len(outs)]
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], outs, **attrs)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def by_indices(attrs, x, g):
    """x̄ of the Indices route: g scatter-added at onnxruntime's argmax."""
    argmax = runtime.run(runtime.session(pool(attrs, list(x.shape), indices=True)), {"x": x})["argmax"]
    x_bar = np.zeros(x.size, np.float64)
    np.add.at(x_bar, argmax.reshape(-1), g.reshape(-1))
    return x_bar.reshape(x.shape)


def ties(rng, shape):
    return rng.integers(-1, 2, shape).astype(np.float32)  # three values: ties in almost every window


def huge_negatives(rng, shape):
    """Below the Conv's zero padding, ties among them, whole windows of the lowest float32 at the padded border."""
    x = rng.choice(np.float32([-3.4028235e38, -3e38, -1e30, -1.0]), shape, p=[0.4, 0.2, 0.2, 0.2])
    x[:, :, :4] = -3.4028235e38
    return x


def infinities(rng, shape):
    x = huge_negatives(rng, shape)
    x[rng.random(shape) < 0.2] = -np.inf
    x[:, :, :2] = -np.inf  # whole windows of -inf, padded ones included
    x[0, 0, 10, 10] = np.inf
    return x


def masked(rng, shape):
    """Normal values with 2% of the cells -inf (a mask) and a few +inf: before the one-hot Convs' input was clipped
    to finite values, 0·inf = NaN next to a window's winner made the wrong cell win (review FR-C: 1783 of 29760
    cells of x̄, 968 of 6720 windows of the JVP)."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.02] = -np.inf
    x[rng.random(shape) < 0.005] = np.inf
    return x


INPUTS = {
    "normal": lambda rng, shape: rng.standard_normal(shape).astype(np.float32),
    "masked": masked,
    "ties": ties,
    "constant": lambda rng, shape: np.full(shape, 0.5, np.float32),
    "negative-constant": lambda rng, shape: np.full(shape, -2.0, np.float32),  # below the Conv's zero padding
    "huge-negatives": huge_negatives,
}


def takes_the_taps(attrs, shape=SHAPE):
    """Whether the VJP of this pool avoids the Indices kernel, and the emitted model."""
    emitted = vjp.build(pool(attrs, shape))
    onnx.checker.check_model(emitted, full_check=True)
    return all(len(n.output) == 1 for n in emitted.graph.node if n.op_type == "MaxPool"), emitted


@pytest.mark.parametrize("sample", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("attrs", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_x_bar_equals_the_indices_route(attrs, sample):
    """Exact equality: the cotangent is small integers, so every sum landing on a cell is exact in float32 whatever
    the order (ScatterElements' or np.add.at's)."""
    rng = np.random.default_rng(0)
    x = sample(rng, SHAPE)
    taps, emitted = takes_the_taps(attrs)
    y = runtime.run(runtime.session(pool(attrs)), {"x": x})["y"]
    g = rng.integers(-4, 5, y.shape).astype(np.float32)
    got = runtime.run(runtime.session(emitted), {"x": x, "y_bar": g})["x_bar"]
    np.testing.assert_array_equal(got, by_indices(attrs, x, g))
    assert taps


def test_small_pools_float64_and_disputed_window_counts_keep_the_indices_route():
    # ceil_mode where onnxruntime drops the last window and ONNX shape inference keeps it
    drops_last = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    assert not takes_the_taps(drops_last)[0]
    assert not takes_the_taps(GEOMETRIES["3x3/2"], [1, 16, 10, 10])[0]  # 178 elements per tap
    assert INDICES_BELOW > 16 * 10 * 10 / 9
    model = pool(GEOMETRIES["3x3/2"])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    assert any(len(n.output) == 2 for n in vjp.build(model).graph.node if n.op_type == "MaxPool")


@pytest.mark.parametrize("sample", ["normal", "ties", "infinities"])
@pytest.mark.parametrize("attrs", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_dot_product_with_the_jvp(attrs, sample):
    """<J v, u> = <v, Jᵀ u>, J v from the JVP pass. Both sides are float32 selections of v and u; the products and
    sums are taken here in float64, so the only rounding is ScatterElements' float32 sum of at most 9 windows per
    cell: relative error < 9 · 2^-24 ≈ 5.4e-7 of Σ|v||Jᵀu|. With infinite x the JVP's one-hot Convs pick other
    taps than onnxruntime's Indices; the VJP takes the JVP's choice, so the identity still holds there.
    onnxruntime has no float64 Conv, so this route is float32 only (float64 pools take the Indices)."""
    rng = np.random.default_rng(1)
    x = (infinities if sample == "infinities" else INPUTS[sample])(rng, SHAPE)
    v = rng.standard_normal(SHAPE).astype(np.float32)
    tangent = runtime.run(runtime.session(jvp.build(pool(attrs))), {"x": x, "x_dot": v})["y_dot"]
    u = rng.standard_normal(tangent.shape).astype(np.float32)
    x_bar = runtime.run(runtime.session(takes_the_taps(attrs)[1]), {"x": x, "y_bar": u})["x_bar"]
    lhs = np.sum(tangent.astype(np.float64) * u)
    rhs = np.sum(v.astype(np.float64) * x_bar)
    scale = np.sum(np.abs(v.astype(np.float64) * x_bar))
    assert abs(lhs - rhs) <= 6e-7 * scale
    assert np.count_nonzero(x_bar) > 0


def test_at_opset_13_only_disjoint_pools_take_the_positions():
    """Overlapping windows sum with ScatterElements reduction='add' (opset 16): at opset 13 they keep the Indices
    route, which asks for the conversion up (jacgraph.compile does it); disjoint 2x2/2 windows need no reduction."""
    from jacgraph.errors import NeedsOpset

    overlapping, disjoint = pool(GEOMETRIES["3x3/2"]), pool(GEOMETRIES["2x2/2"])
    for model in (overlapping, disjoint):
        model.opset_import[0].version = 13
    with pytest.raises(NeedsOpset):
        vjp.build(overlapping)
    emitted = vjp.build(disjoint)
    assert all(len(n.output) == 1 for n in emitted.graph.node if n.op_type == "MaxPool")
    x = ties(np.random.default_rng(2), SHAPE)
    y = runtime.run(runtime.session(disjoint), {"x": x})["y"]
    g = np.random.default_rng(3).integers(-4, 5, y.shape).astype(np.float32)
    got = runtime.run(runtime.session(emitted), {"x": x, "y_bar": g})["x_bar"]
    np.testing.assert_array_equal(got, by_indices(GEOMETRIES["2x2/2"], x, g))


PHASE_SHAPE = [1, 32, 40, 41]  # 5831 input elements per tap of a 3x3 window: the JVP's one-hot phase Convs


@pytest.mark.parametrize("sample", ["normal", "ties", "huge-negatives", "masked"])
@pytest.mark.parametrize("name", ["2x2/2", "3x3/2", "3x3/2-pad1", "3x3/2-pad-ceil", "same-upper"])
def test_x_bar_through_the_jvp_phase_convs_equals_the_indices_route(name, sample):
    """The same exact equality where the JVP rule finds the winners by one-hot phase Convs (PHASES_FROM and more)."""
    attrs, rng = GEOMETRIES[name], np.random.default_rng(5)
    assert np.prod(PHASE_SHAPE[1:]) / np.prod(attrs["kernel_shape"]) >= PHASES_FROM
    x = INPUTS[sample](rng, PHASE_SHAPE)
    taps, emitted = takes_the_taps(attrs, PHASE_SHAPE)
    ops = {n.op_type for n in emitted.graph.node}
    assert taps and "Conv" in ops and "ArgMax" not in ops  # the phase Convs, not the one-hot unfold
    y = runtime.run(runtime.session(pool(attrs, PHASE_SHAPE)), {"x": x})["y"]
    g = rng.integers(-4, 5, y.shape).astype(np.float32)
    got = runtime.run(runtime.session(emitted), {"x": x, "y_bar": g})["x_bar"]
    np.testing.assert_array_equal(got, by_indices(attrs, x, g))
