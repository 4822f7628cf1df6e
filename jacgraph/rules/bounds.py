"""Bound rules for the RecurJac pass: activation derivative intervals, linear relaxations, dual norms.

Every rule emits ONNX nodes through a `BoundBuilder` (a Builder that knows the working float dtype)
and takes elementwise pre-activation bounds l <= z <= u (tensor names, any broadcastable shape):

    DERIV[act](b, l, u, attrs) -> (dl, du)             sigma'(z) in [dl, du] for every z in [l, u]
    RELAX[act](b, l, u, attrs) -> Relaxation           aL z + cL <= sigma(z) <= aU z + cU on [l, u]
    RANGE[act](b, l, u, attrs) -> (lo, hi)             sigma(z) in [lo, hi] on [l, u]

Kinks: a unit is stable only when its interval lies strictly inside one linear piece (l > 0 for an
active ReLU, u < 0 for a dead one); an interval that touches a kink gets the derivatives of both
pieces, e.g. relu' in [0, 1] when l <= 0 <= u, so the bounds hold for every subgradient there,
including the autodiff convention relu'(0) = 0.

A Relaxation also says which units are `sel`ected: those whose two lines differ (aU != aL or
cU != cL). Unselected units have aU == aL and cU == cL exactly, so the backward passes treat them
as one shared linear map and spend per-row work only on the selected ones.

`bilinear` relaxes the product g * d of a Jacobian entry g in [L, U] and a derivative d in [dl, du]
as a linear function of g (the RecurJac step); `dual_norm` gives the ball term of a linear bound.
Bounds are exact in real arithmetic; in floating point they carry ordinary round-off (no outward
rounding), about 1e-15 relative per operation in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..builder import Builder


class BoundBuilder(Builder):
    """A Builder whose float constants and tensors have one working dtype (float64 by default)."""

    def __init__(self, src, dtype=np.float64):
        super().__init__(src)
        self.dtype = np.dtype(dtype)
        self.initializers = []  # the bound graph holds its own (lowered) weights, not the source's

    def c(self, value, hint="c"):
        return self.const(np.asarray(value, self.dtype), hint=hint)

    def where(self, cond, a, b):
        return self.Where(cond, a, b)

    def max(self, *xs):
        return self.Max(*xs)

    def min(self, *xs):
        return self.Min(*xs)


@dataclass
class Relaxation:
    aU: str
    cU: str
    aL: str
    cL: str
    sel: str  # bool: the unit's two lines differ


# ---- piecewise-linear activations: kinks k_1 < ... < k_p, slopes s_0 .. s_p ----------------------

def _pieces(act, attrs):
    """(kinks, slopes) of a piecewise-linear activation; Clip's infinite bounds are no kinks."""
    if act == "relu":
        return [0.0], [0.0, 1.0]
    if act == "leaky_relu":
        return [0.0], [attrs["alpha"], 1.0]
    if act == "hardsigmoid":
        a, beta = attrs["alpha"], attrs["beta"]
        if a == 0:
            return [], [0.0]
        k = sorted([-beta / a, (1 - beta) / a])
        return k, [0.0, a, 0.0]
    if act == "clip":
        lo, hi = attrs["min"], attrs["max"]
        kinks = [k for k in (lo, hi) if np.isfinite(k)]
        slopes = ([0.0] if np.isfinite(lo) else []) + [1.0] + ([0.0] if np.isfinite(hi) else [])
        return kinks, slopes
    raise KeyError(act)


def value(b, act, z, attrs):
    """sigma(z) for any supported activation."""
    if act == "relu":
        return b.Relu(z)
    if act == "leaky_relu":  # not the LeakyRelu op: its alpha attribute is float32
        return b.where(b.Greater(z, b.c(0.0)), z, b.Mul(z, b.c(attrs["alpha"])))
    if act == "hardsigmoid":  # onnxruntime has no float64 HardSigmoid kernel
        return b.Clip(b.Add(b.Mul(z, b.c(attrs["alpha"])), b.c(attrs["beta"])), b.c(0.0), b.c(1.0))
    if act == "clip":
        return b.Clip(z, b.c(max(attrs["min"], -np.finfo(b.dtype).max)), b.c(min(attrs["max"], np.finfo(b.dtype).max)))
    if act == "tanh":
        return b.Tanh(z)
    if act == "sigmoid":
        return b.Sigmoid(z)
    raise KeyError(act)


def _pl_touches(b, l, u, kinks):
    """Per piece j, a bool tensor: the closed interval [l, u] meets the closed piece [k_j, k_{j+1}]."""
    edges = [None] + [b.c(k) for k in kinks] + [None]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = None if hi is None else b.LessOrEqual(l, hi)
        if lo is not None:
            t2 = b.GreaterOrEqual(u, lo)
            t = t2 if t is None else b.And(t, t2)
        out.append(t if t is not None else b.GreaterOrEqual(u, l))  # one piece: always touched
    return out


def _pl_deriv(b, l, u, attrs, act):
    """[min, max] of the slopes of every piece [l, u] touches (a kink touched counts both sides)."""
    kinks, slopes = _pieces(act, attrs)
    touched = _pl_touches(b, l, u, kinks)
    big = np.finfo(b.dtype).max
    dl = du = None
    for t, s in zip(touched, slopes):
        lo_j, hi_j = b.where(t, b.c(s), b.c(big)), b.where(t, b.c(s), b.c(-big))
        dl = lo_j if dl is None else b.min(dl, lo_j)
        du = hi_j if du is None else b.max(du, hi_j)
    return dl, du


def _extremes(b, act, attrs, l, u, a, candidates):
    """(max, min) over candidate points z in [l, u] of sigma(z) - a z."""
    vals = []
    for z in candidates:
        z = b.min(b.max(z, l), u)
        vals.append(b.Sub(value(b, act, z, attrs), b.Mul(a, z)))
    return b.max(*vals) if len(vals) > 1 else vals[0], b.min(*vals) if len(vals) > 1 else vals[0]


def _chord(b, act, attrs, l, u, fallback):
    """(sigma(u) - sigma(l)) / (u - l), or `fallback` where u == l."""
    width = b.Sub(u, l)
    wide = b.Greater(width, b.c(0.0))
    safe = b.where(wide, width, b.c(1.0))
    chord = b.Div(b.Sub(value(b, act, u, attrs), value(b, act, l, attrs)), safe)
    return b.where(wide, chord, fallback), wide


def _pl_relax(b, l, u, attrs, act, slope=None):
    """Upper line: the chord; lower line: the chord, or for one-kink units (ReLU, LeakyReLU) the
    steeper/flatter piece through the kink, whichever is closer (CROWN's adaptive choice), or the
    given `slope` (alpha-CROWN; clipped into [s_0, s_1], where NaN keeps the adaptive choice).
    Intercepts: max/min of sigma(z) - a z over {l, u, kinks} (its extremes on [l, u]): sound for any slope."""
    kinks, slopes = _pieces(act, attrs)
    dl, du = _pl_deriv(b, l, u, attrs, act)
    stable = b.Equal(dl, du)
    chord, _ = _chord(b, act, attrs, l, u, dl)
    aU = b.where(stable, dl, chord)
    aL = aU
    if act in ("relu", "leaky_relu"):
        aL = b.where(stable, dl, b.where(b.Greater(b.Add(u, l), b.c(0.0)), b.c(slopes[1]), b.c(slopes[0])))
        if slope is not None:
            s_lo, s_hi = slope_range(act, attrs)
            given = b.min(b.max(slope, b.c(s_lo)), b.c(s_hi))  # on a tie Max/Min pass the gradient to `slope`
            aL = b.where(b.Or(stable, b.IsNaN(slope)), aL, given)
    cands = [l, u] + [b.c(k) for k in kinks]
    cU, _ = _extremes(b, act, attrs, l, u, aU, cands)
    _, cL = _extremes(b, act, attrs, l, u, aL, cands)
    # a stable unit is exactly one linear piece: one line, one intercept
    cL = b.where(stable, cU, cL)
    return Relaxation(aU, cU, aL, cL, b.Not(stable))


def _pl_range(b, l, u, attrs, act):
    kinks, _ = _pieces(act, attrs)
    vals = [value(b, act, b.min(b.max(z, l), u), attrs) for z in [l, u] + [b.c(k) for k in kinks]]
    return b.min(*vals), b.max(*vals)


# ---- smooth sigmoid-shaped activations: sigma' unimodal with its peak at 0 --------------------

def _smooth_deriv_at(b, act, z):
    s = value(b, act, z, {})
    if act == "tanh":
        return b.Sub(b.c(1.0), b.Mul(s, s))
    return b.Mul(s, b.Sub(b.c(1.0), s))


def _smooth_deriv(b, l, u, attrs, act):
    """sigma' is unimodal with its maximum sigma'(0): min at an endpoint; max at 0 if l <= 0 <= u."""
    dl_, du_ = _smooth_deriv_at(b, act, l), _smooth_deriv_at(b, act, u)
    peak = b.c(1.0 if act == "tanh" else 0.25)
    spans0 = b.And(b.LessOrEqual(l, b.c(0.0)), b.GreaterOrEqual(u, b.c(0.0)))
    return b.min(dl_, du_), b.where(spans0, peak, b.max(dl_, du_))


def _smooth_stationary(b, act, a):
    """The two points +-z* with sigma'(z*) = a (clamped where a is above the peak: then z* = 0)."""
    if act == "tanh":  # 1 - tanh^2 = a  ->  tanh z* = sqrt(1 - a)
        t = b.Sqrt(b.max(b.Sub(b.c(1.0), a), b.c(0.0)))
        t = b.min(t, b.c(1.0 - 1e-16))
        z = b.Mul(b.c(0.5), b.Log(b.Div(b.Add(b.c(1.0), t), b.Sub(b.c(1.0), t))))
    else:  # s(1 - s) = a  ->  s = (1 + sqrt(1 - 4a)) / 2,  z* = log(s / (1 - s))
        r = b.Sqrt(b.max(b.Sub(b.c(1.0), b.Mul(b.c(4.0), a)), b.c(0.0)))
        r = b.min(r, b.c(1.0 - 1e-16))
        z = b.Log(b.Div(b.Add(b.c(1.0), r), b.Sub(b.c(1.0), r)))
    return [z, b.Neg(z)]


def _smooth_relax(b, l, u, attrs, act, slope=None):
    """Two lines parallel to the chord, shifted to touch sigma: intercepts are the max/min of
    sigma(z) - a z over {l, u, +-z*} (z* the points where sigma' equals the chord slope). No slope option."""
    assert slope is None, f"{act} takes no lower slope (SLOPED lists those that do)"
    a, wide = _chord(b, act, attrs, l, u, _smooth_deriv_at(b, act, l))
    cU, cL = _extremes(b, act, attrs, l, u, a, [l, u] + _smooth_stationary(b, act, a))
    cL = b.where(wide, cL, cU)  # u == l: a point, one line
    return Relaxation(a, cU, a, cL, wide)


def _smooth_range(b, l, u, attrs, act):
    return value(b, act, l, attrs), value(b, act, u, attrs)  # monotone increasing


def _table(pl, smooth):
    return {**{act: (lambda b, l, u, attrs, _a=act, **kw: pl(b, l, u, attrs, _a, **kw))
               for act in ("relu", "leaky_relu", "hardsigmoid", "clip")},
            **{act: (lambda b, l, u, attrs, _a=act, **kw: smooth(b, l, u, attrs, _a, **kw)) for act in ("tanh", "sigmoid")}}


DERIV = _table(_pl_deriv, _smooth_deriv)
RELAX = _table(_pl_relax, _smooth_relax)
RANGE = _table(_pl_range, _smooth_range)
SLOPED = ("relu", "leaky_relu")  # RELAX[act](..., slope=) takes a lower slope for these (in [s_0, s_1])


def slope_range(act, attrs):
    """[s_0, s_1]: the lower slopes a one-kink activation's relaxation may take."""
    _, slopes = _pieces(act, attrs)
    return min(slopes), max(slopes)


# ---- the RecurJac product relaxation and the ball term ----------------------------------------

def bilinear(b, L, U, dl, du):
    """g * d <= aU g + cU and >= aL g + cL for g in [L, U], d in [dl, du] (dl <= du).

    max_d g d = max(du g, dl g) is convex in g, min_d g d concave: where the sign of g is known they
    are linear (du g or dl g: exact); where L < 0 < U the chord through the endpoints bounds them.
    A stable unit (dl == du = d) is exactly d g for every g: one line, selected nowhere.
    """
    pos, neg = b.GreaterOrEqual(L, b.c(0.0)), b.LessOrEqual(U, b.c(0.0))
    width = b.max(b.Sub(U, L), b.c(np.finfo(b.dtype).tiny))
    chord_u = b.Div(b.Sub(b.Mul(du, U), b.Mul(dl, L)), width)
    chord_l = b.Div(b.Sub(b.Mul(dl, U), b.Mul(du, L)), width)
    zero = b.c(0.0)
    aU = b.where(pos, du, b.where(neg, dl, chord_u))
    aL = b.where(pos, dl, b.where(neg, du, chord_l))
    mixed = b.Not(b.Or(pos, neg))
    cU = b.where(mixed, b.Mul(L, b.Sub(dl, aU)), zero)
    cL = b.where(mixed, b.Mul(L, b.Sub(du, aL)), zero)
    stable = b.Equal(dl, du)
    aU, aL = b.where(stable, du, aU), b.where(stable, du, aL)
    cU, cL = b.where(stable, zero, cU), b.where(stable, zero, cL)
    return Relaxation(aU, cU, aL, cL, b.Not(stable))


def interval_mul(b, L, U, dl, du):
    """[L, U] * [dl, du]: min and max of the four corner products."""
    corners = [b.Mul(x, y) for x in (L, U) for y in (dl, du)]
    return b.min(*corners), b.max(*corners)


def dual_norm(b, coef, norm, axis=-1):
    """max over ||delta||_p <= 1 of <coef, delta> = ||coef||_q, q the dual of p (inf -> 1, 2 -> 2)."""
    if norm == "inf":
        return b.reduce("ReduceSum", b.Abs(coef), [axis], keepdims=0)
    return b.Sqrt(b.reduce("ReduceSum", b.Mul(coef, coef), [axis], keepdims=0))
