"""The Reduce* ops as one family: y = reduce(x) over some axes, and ∂y/∂x at each element of x is a weight w.

ẏ = Σ_axes w·ẋ (JVP) and x̄ = w·ḡ broadcast back over the reduced axes (VJP) for every member; one weight
function per op says what w is. Axes come in every form the opsets use: the `axes` attribute (before
opset 18; ReduceSum before 13), a constant `axes` input, or a computed one (VJP graphs emit ReduceSum
with computed axes), with keepdims and noop_with_empty_axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceProd", "ReduceMax", "ReduceMin")


@dataclass
class Reduction:
    """axes: sorted non-negative ints, None (every axis), [] (noop: y = x), or a tensor name (computed)."""
    x: str
    y: str
    rank: int
    axes: list | None | str
    keepdims: int
    noop: int

    @property
    def identity(self) -> bool:
        return self.axes == []

    @property
    def computed(self) -> bool:
        return isinstance(self.axes, str)


def reduction(b, node) -> Reduction:
    attrs = b.src.attrs(node)
    x, y = node.input[0], node.output[0]
    rank = b.src.rank(x)
    noop = attrs.get("noop_with_empty_axes", 0)
    if len(node.input) > 1 and node.input[1]:
        value = b.src.const(node.input[1])
        axes = node.input[1] if value is None else [int(a) for a in value.reshape(-1)]
    else:
        axes = attrs.get("axes")
    if not isinstance(axes, str):
        axes = sorted(a % rank for a in axes) if axes else ([] if noop else None)
    return Reduction(x, y, rank, axes, attrs["keepdims"], noop)


def reduce_kept(b, r: Reduction, op_type, v):
    """`op_type` over r's axes of an x-shaped v, keepdims=1."""
    if r.computed:
        return with_rank(b, b.op(op_type, v, r.axes, keepdims=1, noop_with_empty_axes=r.noop), r.rank, r.x)
    return b.reduce(op_type, v, r.axes, keepdims=1)


def with_rank(b, name, rank, like):
    """Record that `name` has `rank` (dims unknown): ONNX shape inference finds no rank for a Reduce with computed
    axes even with keepdims=1, and a pass run on this graph later (jvp of jvp) needs it."""
    b.value_info.append(helper.make_tensor_value_info(name, b.src.dtype(like), [None] * rank))
    return name


def kept(b, r: Reduction, v):
    """A y-shaped v (y itself or its cotangent) with the reduced axes back as size 1: it broadcasts against x."""
    if r.keepdims:
        return v
    axes = r.axes if r.computed else b.ints(range(r.rank) if r.axes is None else r.axes)
    return b.Unsqueeze(v, axes)


def _scalar(b, value, like):
    return b.scalar(value, like)


def _mean(b, r):
    """1/n, n the number of elements summed into each output."""
    xs, ys = b.src.shape(r.x), b.src.shape(r.y)
    if xs is not None and ys is not None and all(isinstance(d, int) for d in list(xs) + list(ys)):
        return _scalar(b, float(np.prod(ys, dtype=np.int64)) / float(np.prod(xs, dtype=np.int64)), r.x)
    return b.Reciprocal(b.Cast(b.Div(b.Size(r.x), b.Size(r.y)), to=b.src.dtype(r.x)))


def _sum_square(b, r):
    """y = Σx²: w = 2x."""
    return b.Mul(r.x, _scalar(b, 2.0, r.x))


def _l1(b, r):
    """y = Σ|x|: w = sign(x) (0 at x = 0, as abs'(0) = 0)."""
    return b.Sign(r.x)


def _l2(b, r):
    """y = √Σx²: w = x/y (undefined where y = 0)."""
    return b.Div(r.x, kept(b, r, r.y))


def _log_sum(b, r):
    """y = log Σx: w = 1/Σx = exp(-y)."""
    return b.Exp(b.Neg(kept(b, r, r.y)))


def _log_sum_exp(b, r):
    """y = log Σ exp(x): w = softmax over the axes = exp(x - y)."""
    return b.Exp(b.Sub(r.x, kept(b, r, r.y)))


def _prod(b, r):
    """y = Πx: w = the product of the other elements, exactly, zeros included (no division by a zero)."""
    x = r.x
    zero, one = _scalar(b, 0.0, x), _scalar(b, 1.0, x)
    is_zero = b.Equal(x, zero)
    x_or_one = b.Where(is_zero, one, x)
    nonzero_product = reduce_kept(b, r, "ReduceProd", x_or_one)
    zeros = reduce_kept(b, r, "ReduceSum", b.Cast(is_zero, to=b.src.dtype(x)))
    at_zero = b.Where(b.Equal(zeros, one), nonzero_product, zero)  # the only zero: the others' product
    elsewhere = b.Where(b.Equal(zeros, zero), b.Div(nonzero_product, x_or_one), zero)
    return b.Where(is_zero, at_zero, elsewhere)


def _max_min(b, r):
    """w = 1/count at the positions attaining the extreme, 0 elsewhere (ties share evenly, as PyTorch and JAX)."""
    hit = b.Cast(b.Equal(r.x, kept(b, r, r.y)), to=b.src.dtype(r.x))
    return b.Div(hit, reduce_kept(b, r, "ReduceSum", hit))


# op -> (weight(b, r) or None for w = 1, True when the weight has x's full shape)
WEIGHTS = {
    "ReduceSum": (None, False), "ReduceMean": (_mean, False), "ReduceSumSquare": (_sum_square, True),
    "ReduceL1": (_l1, True), "ReduceL2": (_l2, True), "ReduceLogSum": (_log_sum, False),
    "ReduceLogSumExp": (_log_sum_exp, True), "ReduceProd": (_prod, True), "ReduceMax": (_max_min, True),
    "ReduceMin": (_max_min, True),
}


def vjp(b, node, g):
    """x̄ = w·ḡ with ḡ's reduced axes restored, broadcast to x's shape."""
    r = reduction(b, node)
    if r.identity:
        return g
    weight, full = WEIGHTS[node.op_type]
    g = kept(b, r, g)
    if weight is not None:
        g = b.Mul(g, weight(b, r))
    return g if full else b.Expand(g, b.Shape(r.x))
