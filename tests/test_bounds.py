"""jacgraph.rules.bounds: every activation's derivative interval, linear relaxation and range, the
RecurJac product relaxation and the dual-norm ball term, each checked on sampled points.

Each rule is emitted into a small float64 graph and run in onnxruntime on many intervals [l, u]
(wide, narrow, points, touching and straddling every kink); its claims are then checked at points z
of [l, u] (the endpoints, the kinks inside, uniform samples). Kinks count with both one-sided slopes.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jacgraph.layers import ACTIVATIONS
from jacgraph.model import SourceModel
from jacgraph.rules.bounds import DERIV, RANGE, RELAX, BoundBuilder, _pieces, bilinear, dual_norm
from jacgraph.runtime import session

# float64 round-off of the emitted arithmetic (a few operations on values of size <= 10): 1e-12 is ~1e4 ulps
TOL = 1e-12

ACTS = {"relu": {}, "leaky_relu": {"alpha": 0.1}, "tanh": {}, "sigmoid": {},
        "hardsigmoid": {"alpha": 0.2, "beta": 0.5}, "clip": {"min": -0.5, "max": 0.7}}


def _src():
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1])])
    return SourceModel(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def run_rule(emit, inputs):
    """Emit emit(b, *input names) -> list of names into a graph and run it on the given arrays."""
    b = BoundBuilder(_src())
    for name, a in inputs.items():
        b.add_input(name, TensorProto.DOUBLE, list(a.shape))
    outs = emit(b, *inputs)
    names = []
    for i, o in enumerate(outs):
        name = f"out{i}"
        producer = next(n for n in b.nodes if o in n.output)
        if producer.op_type in ("Not", "Greater", "Equal", "And", "Or"):  # a Relaxation's `sel` is bool
            o = b.Cast(o, to=TensorProto.DOUBLE)
        b.nodes.append(helper.make_node("Identity", [o], [name]))
        b.add_output(name, TensorProto.DOUBLE, [next(iter(inputs.values())).shape[0]])
        names.append(name)
    model = b.build("rule")
    return session(model, provider="CPUExecutionProvider").run(names, inputs)


def sigma(act, attrs, z):
    if act == "relu":
        return np.maximum(z, 0)
    if act == "leaky_relu":
        return np.where(z > 0, z, attrs["alpha"] * z)
    if act == "tanh":
        return np.tanh(z)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "hardsigmoid":
        return np.clip(attrs["alpha"] * z + attrs["beta"], 0, 1)
    return np.clip(z, attrs["min"], attrs["max"])


def one_sided_slopes(act, attrs, z):
    """(left, right) derivatives; equal except at kinks."""
    if act in ("tanh", "sigmoid"):
        s = sigma(act, attrs, z)
        d = 1 - s * s if act == "tanh" else s * (1 - s)
        return d, d
    kinks, slopes = _pieces(act, attrs)
    k = np.asarray(kinks)
    left = np.asarray(slopes)[np.searchsorted(k, z, side="left")]
    right = np.asarray(slopes)[np.searchsorted(k, z, side="right")]
    return left, right


def intervals(act, attrs, rng):
    """Intervals [l, u]: random wide and narrow ones, points, and ones ending exactly on a kink."""
    kinks = _pieces(act, attrs)[0] if act not in ("tanh", "sigmoid") else [0.0]
    a = rng.uniform(-6, 6, 300)
    w = np.concatenate([rng.uniform(0, 8, 100), rng.uniform(0, 1e-3, 100), np.zeros(100)])
    l, u = a, a + w
    for k in kinks:
        l = np.concatenate([l, [k, k, k, k - 1, k - 1e-300, k + 1e-12]])
        u = np.concatenate([u, [k, k + 1, k + 1e-9, k, k, k + 2]])
    return l, u


def points_in(l, u, attrs, act, rng, n=40):
    kinks = _pieces(act, attrs)[0] if act not in ("tanh", "sigmoid") else [0.0]
    t = rng.uniform(0, 1, (n, l.size))
    cands = [l[None], u[None], l + t * (u - l)]
    cands += [np.clip(np.full((1, l.size), k), l, u) for k in kinks]
    return np.concatenate(cands)


def test_every_activation_has_every_rule_and_a_test_case():
    assert set(ACTS) == set(ACTIVATIONS.values())
    for act in ACTIVATIONS.values():
        assert act in DERIV and act in RELAX and act in RANGE, act


@pytest.mark.parametrize("act", list(ACTS))
def test_derivative_interval_contains_every_slope(act):
    attrs, rng = ACTS[act], np.random.default_rng(0)
    l, u = intervals(act, attrs, rng)
    dl, du = run_rule(lambda b, l, u: DERIV[act](b, l, u, attrs), {"l": l, "u": u})
    z = points_in(l, u, attrs, act, rng)
    left, right = one_sided_slopes(act, attrs, z)
    for s in (left, right):
        assert np.all(s >= dl - TOL) and np.all(s <= du + TOL)
    if act in ("relu", "leaky_relu"):  # strict inequalities decide a stable unit
        lo_slope = attrs.get("alpha", 0.0)
        touching = (l <= 0) & (u >= 0)
        np.testing.assert_array_equal(dl, np.where(l > 0, 1.0, lo_slope))
        np.testing.assert_array_equal(du, np.where(u < 0, lo_slope, 1.0))
        assert np.all((dl < du) == touching)


@pytest.mark.parametrize("act", list(ACTS))
def test_relaxation_lines_enclose_the_activation(act):
    attrs, rng = ACTS[act], np.random.default_rng(1)
    l, u = intervals(act, attrs, rng)
    aU, cU, aL, cL, sel = run_rule(lambda b, l, u: list(vars(RELAX[act](b, l, u, attrs)).values()),
                                   {"l": l, "u": u})
    z = points_in(l, u, attrs, act, rng)
    s = sigma(act, attrs, z)
    assert np.all(aU * z + cU >= s - TOL) and np.all(aL * z + cL <= s + TOL)
    # unselected units have one line (the backward pass shares it across rows)
    assert np.all((aU == aL) & (cU == cL) | (sel == 1))
    if act in ("relu", "leaky_relu", "clip", "hardsigmoid"):  # exact on a single linear piece
        lin = sel == 0
        np.testing.assert_allclose((aU * z + cU)[:, lin], s[:, lin], atol=TOL)


@pytest.mark.parametrize("act", list(ACTS))
def test_range_contains_the_values(act):
    attrs, rng = ACTS[act], np.random.default_rng(2)
    l, u = intervals(act, attrs, rng)
    lo, hi = run_rule(lambda b, l, u: RANGE[act](b, l, u, attrs), {"l": l, "u": u})
    s = sigma(act, attrs, points_in(l, u, attrs, act, rng))
    assert np.all(s >= lo - TOL) and np.all(s <= hi + TOL)
    np.testing.assert_allclose(hi - lo, np.ptp(s, axis=0), atol=1e-9 if act in ("tanh", "sigmoid") else TOL)


def test_bilinear_relaxation_of_jacobian_times_derivative():
    rng = np.random.default_rng(3)
    n = 400
    L = rng.uniform(-3, 3, n)
    U = L + np.concatenate([rng.uniform(0, 4, n - 100), np.zeros(100)])
    dl = rng.uniform(-0.2, 1, n)
    du = dl + np.where(rng.uniform(size=n) < 0.3, 0.0, rng.uniform(0, 1, n))
    aU, cU, aL, cL, sel = run_rule(lambda b, *t: list(vars(bilinear(b, *t)).values()),
                                   {"L": L, "U": U, "dl": dl, "du": du})
    t, s = rng.uniform(0, 1, (200, n)), rng.uniform(0, 1, (200, n))
    g = np.concatenate([L[None], U[None], L + t * (U - L)])
    d = np.concatenate([dl[None], du[None], dl + s * (du - dl)])
    prod = g * d
    assert np.all(aU * g + cU >= prod - TOL) and np.all(aL * g + cL <= prod + TOL)
    # tight: both lines touch max_d g d (convex) and min_d g d (concave) at g = L and g = U
    for gg in (L, U):
        np.testing.assert_allclose(aU * gg + cU, np.maximum(gg * dl, gg * du), atol=TOL)
        np.testing.assert_allclose(aL * gg + cL, np.minimum(gg * dl, gg * du), atol=TOL)
    np.testing.assert_array_equal(sel == 1, dl < du)
    stable = dl == du
    np.testing.assert_array_equal(aU[stable], du[stable])
    np.testing.assert_array_equal(cU[stable], 0.0)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_dual_norm_is_the_max_over_the_unit_ball(norm):
    rng = np.random.default_rng(4)
    coef = rng.standard_normal((5, 7))
    (q,) = run_rule(lambda b, c: [dual_norm(b, c, norm)], {"c": coef})
    # attained: sign(coef) for the l_inf ball, coef / ||coef|| for l_2
    best = np.sign(coef) if norm == "inf" else coef / np.linalg.norm(coef, axis=1, keepdims=True)
    np.testing.assert_allclose(q, np.sum(coef * best, axis=1), rtol=1e-14)
    d = rng.uniform(-1, 1, (1000, 7)) if norm == "inf" else rng.standard_normal((1000, 7))
    if norm == "2":
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    assert np.all(d @ coef.T <= q + TOL)
