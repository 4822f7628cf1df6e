"""Forward-mode rules: rule(b, node, *input_tangents) -> output tangents (None = symbolic zero).

The primal node is already copied into the builder `b`, so rules read primal values by their source
names (node.input / node.output). With `b.K` set, every tangent carries a leading axis of K
directions; the helpers below fold it into the batch axis, shift axes, or rely on broadcasting.
CPA ops freeze their state at x; additive inputs (biases, constants) never reach the tangent path.
"""
from __future__ import annotations

import math
import string
from collections import Counter, namedtuple

import numpy as np
from onnx import TensorProto, helper

from ..errors import JacgraphError
from . import slopes  # noqa: F401  (fills the elementwise family every table reads)
from .reductions import REDUCE_OPS, WEIGHTS, reduction, with_rank
from .registry import SLOPES, ZERO_DERIVATIVE_OPS, RuleTable, window_geometry

JVP = RuleTable("JVP", "the JVP pass")
rule = JVP.register


# ---- stacked-tangent helpers ------------------------------------------------------------------

def lead(b) -> int:
    """Leading tangent axes: 0 for one tangent, 1 for K stacked tangents."""
    return 0 if b.K is None else 1


def fold(b, t):
    """[K, N, ...] -> [K*N, ...] so batch-first ops (Conv, pooling, BN, Resize) take stacked tangents."""
    if b.K is None:
        return t
    return b.Reshape(t, b.Concat(b.ints([-1]), b.shape(t, 2), axis=0))


def unfold(b, t):
    """[K*N, ...] -> [K, N, ...], the inverse of fold."""
    if b.K is None:
        return t
    return b.Reshape(t, b.Concat(b.ints([b.K, -1]), b.shape(t, 1), axis=0))


def batch_first(b, t, op_type, *inputs, **attrs):
    """Apply a batch-first op to a (possibly stacked) tangent."""
    return unfold(b, b.op(op_type, fold(b, t), *inputs, **attrs))


def taxis(b, axis, rank):
    """A source axis as an axis of the stacked tangent."""
    return (axis + rank if axis < 0 else axis) + lead(b)


def taxes_tensor(b, axes):
    """Source axes held in a tensor, as tangent axes (negative axes need no shift)."""
    if b.K is None:
        return axes
    zero, one = b.const(np.int64(0)), b.const(np.int64(1))
    return b.Where(b.Less(axes, zero), axes, b.Add(axes, one))


def full_shape(b, y):
    """Shape of y's tangent: Shape(y), with K prepended when tangents are stacked."""
    return b.Shape(y) if b.K is None else b.Concat(b.ints([b.K]), b.Shape(y), axis=0)


def zeros_like(b, y):
    return b.ConstantOfShape(full_shape(b, y), value=helper.make_tensor("value", b.src.dtype(y), [1], [0]))


def align(b, t, name, out):
    """Unsqueeze a stacked tangent of `name` so it broadcasts against tangents of `out` (K stays first)."""
    if b.K is None or t is None:
        return t
    missing = b.src.rank(out) - b.src.rank(name)
    return b.Unsqueeze(t, b.ints(range(1, 1 + missing))) if missing > 0 else t


def static(shape):
    return shape is not None and all(isinstance(d, int) for d in shape)


def to_output(b, t, name, out):
    """Tangent of operand `name` broadcast to output `out`'s full shape (it may have been broadcast)."""
    if t is None:
        return None
    t = align(b, t, name, out)
    s_in, s_out = b.src.shape(name), b.src.shape(out)
    if static(s_in) and s_in == s_out:
        return t
    return b.Expand(t, full_shape(b, out))


def add_all(b, terms):
    """Sum of tangent terms, None where all are None."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = b.Add(out, t)
    return out


def times(b, t, factor):
    return None if t is None else b.Mul(t, factor)


def s(b, value, like):
    return b.scalar(value, like)


def reduce_axes(b, node, rank):
    """Static reduce axes of a Reduce* node (attribute or constant input), or None for all axes."""
    attrs = b.src.attrs(node)
    if len(node.input) > 1 and node.input[1]:
        axes = b.src.const(node.input[1])
        if axes is None:
            raise JacgraphError(f"{node.op_type} node '{node.name}' has computed axes; jacgraph needs constant axes.")
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        axes = attrs.get("axes")
    if not axes:
        return None if not attrs.get("noop_with_empty_axes", 0) else []
    return [a + rank if a < 0 else a for a in axes]


def tangent_reduce(b, op_type, t, axes, rank, keepdims):
    """A Reduce op over source `axes` (None = all) applied to a stacked tangent."""
    if axes is None:
        axes = list(range(rank))
    return b.reduce(op_type, t, [a + lead(b) for a in axes], keepdims=keepdims)


# ---- zero tangents: integer/shape paths, comparisons, piecewise-constant ops --------------------

@rule(*ZERO_DERIVATIVE_OPS)
def zero(b, node, *tangents):
    """Outputs are integer, boolean or piecewise constant: tangent 0 (sign'(x) = floor'(x) = 0 everywhere)."""
    return [None] * len(node.output)


# ---- structural and linear ops -----------------------------------------------------------------

@rule("Identity")
def identity(b, node, t):
    """y = x: ẏ = ẋ."""
    return [t]


def inference_dropout(b, node):
    """Refuse a Dropout that may run in training mode: its output is random, there is no derivative to emit."""
    mode = node.input[2] if len(node.input) > 2 and node.input[2] else None
    value = None if mode is None else b.src.const(mode)
    if mode is not None and (value is None or bool(np.any(value))):
        state = "is not a constant" if value is None else "is true"
        raise JacgraphError(
            f"Dropout '{node.name or node.output[0]}' runs in training mode (its training_mode input {mode!r} {state}): "
            "it drops random units, so it has no derivative to emit. Export the model in eval() mode, or feed "
            "training_mode=False as a constant.")


@rule("Dropout")
def dropout(b, node, t, *_):
    """Inference Dropout is the identity: ẏ = ẋ, mask has no tangent. Training mode is refused."""
    inference_dropout(b, node)
    return [t] + [None] * (len(node.output) - 1)


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_like(b, node, t, *_):
    """Shape-only ops keep element order: ẏ = reshape(ẋ, shape(y))."""
    # the target is y's actual shape, so a 0 in it is a real empty axis (allowzero), never "copy this axis"
    return [b.Reshape(t, full_shape(b, node.output[0]), allowzero=1 if b.opset >= 14 else None)]


@rule("Transpose")
def transpose(b, node, t):
    """ẏ = transpose(ẋ, perm) (K axis stays first)."""
    rank = b.src.rank(node.input[0])
    perm = b.src.attrs(node).get("perm") or list(reversed(range(rank)))
    return [b.Transpose(t, perm=[0] + [p + 1 for p in perm] if b.K else list(perm))]


@rule("Concat")
def concat(b, node, *ts):
    """ẏ = concat(ẋ_i), zeros for inactive inputs."""
    rank = b.src.rank(node.output[0])
    parts = [t if t is not None else zeros_like(b, x) for x, t in zip(node.input, ts)]
    return [b.Concat(*parts, axis=taxis(b, b.src.attrs(node)["axis"], rank))]


@rule("Split")
def split(b, node, t, *_):
    """ẏ_i = split(ẋ)_i with the same sizes."""
    attrs = b.src.attrs(node)
    axis = taxis(b, attrs.get("axis", 0), b.src.rank(node.input[0]))
    extra = {"num_outputs": attrs["num_outputs"]} if "num_outputs" in attrs and len(node.input) < 2 else {}
    if "split" in attrs and attrs["split"]:
        extra["split"] = attrs["split"]
    outs = b.op("Split", t, *node.input[1:2], axis=axis, n_out=len(node.output), **extra)
    return outs if isinstance(outs, list) else [outs]


@rule("Slice")
def slice_(b, node, t, *_):
    """ẏ = ẋ[starts:ends:steps] on the same axes."""
    starts, ends = node.input[1], node.input[2]
    axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
    if b.K is not None:
        if axes is None:
            axes = b.Range(b.const(np.int64(0)), b.Squeeze(b.Shape(starts), b.ints([0])), b.const(np.int64(1)))
        axes = taxes_tensor(b, axes)
    return [b.Slice(t, starts, ends, axes, steps)]


@rule("Gather")
def gather(b, node, t, _):
    """ẏ = gather(ẋ, indices) along the same axis."""
    axis = taxis(b, b.src.attrs(node)["axis"], b.src.rank(node.input[0]))
    return [b.Gather(t, node.input[1], axis=axis)]


@rule("GatherElements")
def gather_elements(b, node, t, _):
    """ẏ = gather_elements(ẋ, indices) along the same axis."""
    axis = taxis(b, b.src.attrs(node)["axis"], b.src.rank(node.input[0]))
    indices = node.input[1]
    if b.K is not None:
        indices = b.Expand(indices, b.Concat(b.ints([b.K]), b.Shape(indices), axis=0))
    return [b.GatherElements(t, indices, axis=axis)]


@rule("Pad")
def pad(b, node, t, _=None, t_value=None, *__):
    """ẏ = pad(ẋ) with the same mode and zero fill; in constant mode a constant_value with a tangent fills
    the padded cells with that tangent."""
    mode = b.src.attrs(node)["mode"]
    pads = node.input[1]
    axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    fill = None
    if t_value is not None and mode == "constant":
        x, y = node.input[0], node.output[0]
        ones = b.Pad(b.Mul(x, s(b, 0.0, x)), pads, s(b, 1.0, x), axes, mode="constant")  # 1 on the padded cells
        fill = b.Mul(align(b, b.Reshape(t_value, b.ints([-1] if b.K else [])), node.input[2], y), ones)
        t = t if t is not None else zeros_like(b, x)
    if t is None:
        return [fill]
    if b.K is not None:
        if axes is not None:
            axes = taxes_tensor(b, axes)
        else:
            begin, end = b.split(pads, [b.src.rank(node.input[0])] * 2)
            zero = b.ints([0])
            pads = b.Concat(zero, begin, zero, end, axis=0)
    return [add_all(b, [b.Pad(t, pads, None, axes, mode=mode), fill])]


@rule("Expand")
def expand(b, node, t, _):
    """ẏ = broadcast(ẋ) to y's shape."""
    return [to_output(b, t, node.input[0], node.output[0])]


@rule("Tile")
def tile(b, node, t, _):
    """ẏ = tile(ẋ, repeats)."""
    repeats = node.input[1] if b.K is None else b.Concat(b.ints([1]), node.input[1], axis=0)
    return [b.Tile(t, repeats)]


@rule("Trilu")
def trilu(b, node, t, *_):
    """ẏ = trilu(ẋ, k): a mask on the last two axes."""
    return [b.op("Trilu", t, *node.input[1:], upper=b.src.attrs(node)["upper"])]


@rule("CumSum")
def cumsum(b, node, t, axis):
    """ẏ = cumsum(ẋ) along the same axis."""
    attrs = b.src.attrs(node)
    return [b.CumSum(t, taxes_tensor(b, node.input[1]), exclusive=attrs["exclusive"], reverse=attrs["reverse"])]


@rule("Resize")
def resize(b, node, t, *_):
    """ẏ = resize(ẋ): every mode interpolates with weights that do not depend on x."""
    roi, scales, sizes = (list(node.input[1:]) + ["", "", ""])[:3]
    if b.K is not None and sizes:
        sizes = b.Concat(b.Mul(b.Slice(sizes, b.ints([0]), b.ints([1])), b.ints([b.K])),
                         b.Slice(sizes, b.ints([1]), b.ints([2**62])), axis=0)
    attrs = b.src.attrs(node)
    if "extrapolation_value" in attrs:  # a constant fill outside the image: no tangent there
        attrs["extrapolation_value"] = 0.0
    return [batch_first(b, t, "Resize", roi or None, scales or None, sizes or None, **attrs)]


@rule("Neg")
def neg(b, node, t):
    """ẏ = -ẋ."""
    return [b.Neg(t)]


@rule("Add", "Sub")
def add_sub(b, node, ta, tb):
    """ẏ = ȧ ± ḃ (constants drop out), broadcast to y."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    if inside_chain(b.src, node):
        return [None]  # GELU's x + c·x³: the chain's tangent is emitted whole at its end (chain_tangent)
    if tb is None:
        return [to_output(b, ta, a, y)]
    tb = b.Neg(tb) if node.op_type == "Sub" else tb
    if ta is None:
        return [to_output(b, tb, c, y)]
    if (node.op_type == "Add" and nchwc_gate_fits(b, y) and b.src.shape(a) == b.src.shape(c)  # no broadcast (into_nchwc)
            and _made_in_nchw(b, ta) != _made_in_nchw(b, tb)):
        ta, tb = (into_nchwc(b, t, y) if _made_in_nchw(b, t) else t for t in (ta, tb))
    return [to_output(b, b.Add(align(b, ta, a, y), align(b, tb, c, y)), y, y)]


NCHW_ONLY = ("Where", "Gather", "GatherElements", "Slice", "Reshape")  # no NCHWc kernel in onnxruntime


def _made_in_nchw(b, t):
    """Whether tangent t comes from an op onnxruntime runs in NCHW only (a max pool's selection)."""
    made = next((n for n in reversed(b.nodes) if t in n.output), None)
    return made is not None and made.op_type in NCHW_ONLY


def into_nchwc(b, t, y):
    """t through an identity depthwise 1x1 Conv (weight 1: exact), which onnxruntime runs in NCHWc. A residual Add of a
    Conv's tangent (NCHWc) and a max pool's (NCHW: Where/Gather) otherwise runs in NCHW, and so do the gate and the
    Adds after it along the residual path, each with reorders (resnet18's first stage: 4 ReorderOutput, 2
    ReorderInput and 2 NCHW Adds for this one Conv)."""
    return depthwise(b, t, b.src.shape(y)[1], 1.0, hint="identity")


@rule("Sum", "Mean")
def sum_mean(b, node, *ts):
    """ẏ = Σ ẋ_i (Mean: divided by the number of inputs)."""
    y = node.output[0]
    total = to_output(b, add_all(b, [align(b, t, x, y) for x, t in zip(node.input, ts)]), y, y)
    if node.op_type == "Mean":
        total = b.Mul(total, s(b, 1.0 / len(node.input), y))
    return [total]


@rule("Mul")
def mul(b, node, ta, tb):
    """ẏ = ȧ·b + a·ḃ (a written-out RMSNorm, SiLU or GELU: chain_tangent at its end, nothing inside)."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    whole = chain_tangent(b, node, ta, tb)
    if whole is not None or inside_chain(b.src, node):
        return [whole]
    return [to_output(b, add_all(b, [times(b, align(b, ta, a, y), c), times(b, align(b, tb, c, y), a)]), y, y)]


@rule("Div")
def div(b, node, ta, tb):
    """ẏ = (ȧ - y·ḃ) / b (a written-out RMSNorm or GELU: chain_tangent at its end, nothing inside)."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    whole = chain_tangent(b, node, ta, tb)
    if whole is not None or inside_chain(b.src, node):
        return [whole]
    num = add_all(b, [align(b, ta, a, y), None if tb is None else b.Neg(b.Mul(align(b, tb, c, y), y))])
    return [to_output(b, b.Div(num, c), y, y)]


def _matmul_tangent(b, a, c, y, ta, tc):
    """Terms ȧ @ c and a @ ċ with the stacked axis kept in front (1-D operands included)."""
    ra, rc = b.src.rank(a), b.src.rank(c)
    terms = []
    if ta is not None:
        if b.K is not None and ra == 1 and rc > 2:  # [K, n] -> [K, 1.., 1, n] against c's batch axes
            row = b.Unsqueeze(ta, b.ints(range(1, rc)))
            terms.append(b.Squeeze(b.MatMul(row, c), b.ints([-2])))
        else:
            terms.append(b.MatMul(align(b, ta, a, y) if ra > 1 else ta, c))
    if tc is not None:
        if b.K is not None and rc == 1:  # [K, n] -> [K, 1.., n, 1] against a's batch axes
            extra = max(ra - 2, 0)
            col = b.Unsqueeze(tc, b.ints(list(range(1, 1 + extra)) + [2 + extra]))
            terms.append(b.Squeeze(b.MatMul(a, col), b.ints([-1])))
        else:
            terms.append(b.MatMul(a, align(b, tc, c, y) if rc > 1 else tc))
    return terms


@rule("MatMul")
def matmul(b, node, ta, tc):
    """ẏ = ȧ @ c + a @ ċ."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    return [add_all(b, _matmul_tangent(b, a, c, y, ta, tc))]


@rule("Gemm")
def gemm(b, node, ta, tb, tc=None):
    """ẏ = α(op(ȧ) op(B) + op(A) op(ḃ)) + β ċ; the bias C is additive and drops out when constant."""
    attrs = b.src.attrs(node)
    A, B, y = node.input[0], node.input[1], node.output[0]
    alpha, beta, trans_a, trans_b = attrs["alpha"], attrs["beta"], attrs["transA"], attrs["transB"]
    if tb is None and not trans_a:
        out = unfold(b, b.Gemm(fold(b, ta), B, alpha=alpha, transB=trans_b))
    else:
        def op(x, t, trans):
            if t is None:
                return None
            return b.Transpose(t, perm=[0, 2, 1] if b.K else [1, 0]) if trans else t
        A_ = b.Transpose(A, perm=[1, 0]) if trans_a else A
        B_ = b.Transpose(B, perm=[1, 0]) if trans_b else B
        terms = [None if ta is None else b.MatMul(op(A, ta, trans_a), B_),
                 None if tb is None else b.MatMul(A_, op(B, tb, trans_b))]
        out = add_all(b, terms)
        if alpha != 1.0:
            out = b.Mul(out, s(b, alpha, y))
    if tc is not None:
        tc = align(b, tc, node.input[2], y)
        out = b.Add(out, tc if beta == 1.0 else b.Mul(tc, s(b, beta, y)))
    return [to_output(b, out, y, y)]


def _no_stacked_weight_tangent(b, node, *tangents):
    if b.K is not None and any(t is not None for t in tangents):
        raise JacgraphError(f"{node.op_type} '{node.name}': a tangent on the weights with --tangents K is not "
                            "supported; differentiate with respect to the data input, or drop --tangents.")


@rule("Conv", "ConvTranspose")
def conv(b, node, tx, tw=None, tbias=None):
    """ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ; the bias is additive and drops out when constant. Behind a folded
    BatchNormalization (scale_folds_into_convs) ẋ's term takes W·s instead of W."""
    attrs = b.src.attrs(node)
    _no_stacked_weight_tangent(b, node, tw)
    terms = [None if tx is None else batch_first(b, tx, node.op_type, folded_weight(b, node), **attrs),
             None if tw is None else b.op(node.op_type, node.input[0], tw, **attrs)]
    out = add_all(b, terms)
    if tbias is not None:
        out = add_all(b, [out, per_channel(b, tbias, b.src.rank(node.output[0]))])
    return [out]


def per_channel(b, t, rank):
    """A per-channel tangent ([C], or [K, C] stacked) shaped to broadcast against [(K,) N, C, *spatial] of `rank`
    source axes: [C] -> [C, 1..]; [K, C] -> [K, 1, C, 1..]."""
    k = lead(b)
    axes = [1] * k + list(range(1 + 2 * k, rank - 1 + 2 * k))
    return b.Unsqueeze(t, b.ints(axes)) if axes else t


@rule("BatchNormalization")
def batch_norm(b, node, t, tscale=None, tbias=None, tmean=None, tvar=None):
    """Inference BN y = γ(x-μ)r + β, r = 1/√(σ²+ε), is affine per channel in x: ẋ's term is BN itself with bias and
    mean 0; tangents on the parameters add x̂·γ̇ + β̇ - γr·μ̇ - ½γx̂r²·σ̇² (x̂ = (x-μ)r)."""
    attrs = b.src.attrs(node)
    if attrs.get("training_mode", 0):
        raise JacgraphError(f"BatchNormalization '{node.name}' is in training mode; export the model in eval() mode.")
    x, scale, bias, mean, var = node.input[:5]
    if t is not None and scale_folds_into_convs(b.src, node):
        return [t] + [None] * (len(node.output) - 1)  # its scale is in the tangent Convs' weights (conv)
    terms = []
    if t is not None:
        zero = b.Mul(bias, s(b, 0.0, x))
        terms.append(batch_first(b, t, "BatchNormalization", scale, zero, zero, var, epsilon=attrs["epsilon"]))
    if any(p is not None for p in (tscale, tbias, tmean, tvar)):
        rank = b.src.rank(x)
        chan = (lambda v: b.Unsqueeze(v, b.ints(range(1, rank - 1)))) if rank > 2 else (lambda v: v)  # [C] -> [C, 1..]
        r = b.Reciprocal(b.Sqrt(b.Add(var, s(b, attrs["epsilon"], x))))
        x_hat = b.Mul(b.Sub(x, chan(mean)), chan(r))
        terms += [None if tscale is None else b.Mul(per_channel(b, tscale, rank), x_hat),
                  None if tbias is None else per_channel(b, tbias, rank),
                  None if tmean is None else b.Neg(b.Mul(per_channel(b, tmean, rank), chan(b.Mul(scale, r)))),
                  None if tvar is None else b.Mul(per_channel(b, tvar, rank),
                                                  b.Mul(x_hat, chan(b.Mul(b.Mul(scale, b.Mul(r, r)), s(b, -0.5, x)))))]
    return [add_all(b, terms)] + [None] * (len(node.output) - 1)


# A BatchNormalization whose output reaches only Convs, directly or through one Relu (DenseNet's BN-ReLU-Conv), is not
# applied to the tangent: its per-channel scale s = γ/√(σ²+ε) commutes with the ReLU's elementwise 0/1 gate, so it
# goes into the tangent Convs' weights instead (W·s over input channels, folded into a constant by onnxruntime): one
# BatchNormalization kernel less per block. The tangent held for the BN and ReLU outputs is then ẋ without s, and
# only those Convs read it (both rules ask scale_folds_into_convs, so they agree).

def scale_folds_into_convs(src, bn):
    """Whether `bn` (inference mode, constant parameters, no extra outputs read) feeds, alone or through a Relu
    that alone reads it, only group-1 Convs with constant weights, as their data input. Not after a Conv that only it
    reads (ResNet's Conv-BN-ReLU): onnxruntime fuses the tangent BN into the tangent Conv there for free, and the
    folded weights would be a second copy of the next Conv's (resnet50: no change in time, more memory)."""
    if src.attrs(bn).get("training_mode", 0) or any(bn.output[1:]) or any(src.const(p) is None for p in bn.input[1:5]):
        return False
    made = src.producer.get(bn.input[0])
    if made is not None and made.op_type == "Conv" and sole_reader(src, bn.input[0]) is bn:
        return False
    value = bn.output[0]
    gate = sole_reader(src, value)
    if gate is not None and gate.op_type == "Relu":
        value = gate.output[0]
    convs = src.readers(value)
    return bool(convs) and all(c is not None and c.op_type == "Conv" and c.input[0] == value and value not in c.input[1:]
                               and src.attrs(c).get("group", 1) == 1 and src.const(c.input[1]) is not None
                               for c in convs)


def folded_batch_norm(src, conv):
    """The BatchNormalization whose scale conv's tangent term takes into its weights, or None."""
    made = src.producer.get(conv.input[0])
    if made is not None and made.op_type == "Relu":
        made = src.producer.get(made.input[0])
    return made if made is not None and made.op_type == "BatchNormalization" and scale_folds_into_convs(src, made) else None


def folded_weight(b, conv):
    """The weight conv's tangent term takes: W, or W·s with s the scale of the BatchNormalization folded into it."""
    bn = folded_batch_norm(b.src, conv)
    if bn is None:
        return conv.input[1]
    scale, var = bn.input[1], bn.input[4]
    per_channel_scale = b.Div(scale, b.Sqrt(b.Add(var, s(b, b.src.attrs(bn)["epsilon"], var))))
    shape = [1, -1] + [1] * (b.src.rank(conv.input[1]) - 2)  # over W's input-channel axis
    return b.Mul(conv.input[1], b.Reshape(per_channel_scale, b.ints(shape)))


@rule("AveragePool", "GlobalAveragePool")
def average_pool(b, node, t):
    """ẏ = avgpool(ẋ) with the same window (padding counted or not as in the source)."""
    return [batch_first(b, t, node.op_type, **b.src.attrs(node))]


@rule(*REDUCE_OPS)
def reduce(b, node, t, *_):
    """ẏ = Σ_axes w·ẋ with w = ∂y/∂x (jacgraph.rules.reductions); ReduceSum and ReduceMean apply themselves to ẋ.

    ReduceMax/Min: ties share evenly, as PyTorch and JAX."""
    r = reduction(b, node)
    if r.identity:
        return [t]
    op = node.op_type
    if op not in ("ReduceSum", "ReduceMean"):
        t, op = b.Mul(t, WEIGHTS[op][0](b, r)), "ReduceSum"
    if not r.computed:
        return [tangent_reduce(b, op, t, r.axes, r.rank, r.keepdims)]
    out = b.op(op, t, _stacked_axes(b, r), keepdims=r.keepdims, noop_with_empty_axes=r.noop)
    return [with_rank(b, out, r.rank + lead(b), r.x) if r.keepdims else out]


def _stacked_axes(b, r):
    """Computed reduce axes as axes of the stacked tangent; empty axes with noop_with_empty_axes=0 mean every
    axis of the source, so they become those axes (not K's)."""
    axes = r.axes
    if b.K is None:
        return axes
    if not r.noop:
        n = b.Size(axes)
        end = b.Where(b.Equal(n, b.const(np.int64(0))), b.const(np.int64(r.rank)), n)
        axes = b.Slice(b.Concat(axes, b.ints(range(r.rank)), axis=0), b.ints([0]), b.Reshape(end, b.ints([1])))
    return taxes_tensor(b, axes)


@rule("Einsum")
def einsum(b, node, *ts):
    """ẏ = Σ_i einsum(..., ẋ_i, ...): multilinear in its operands (the equation made explicit first)."""
    subs, rhs = explicit_einsum(b, node)
    eq = ",".join(subs) + "->" + rhs
    k = next(c for c in string.ascii_letters if c not in eq)
    terms = []
    for i, t in enumerate(ts):
        if t is None:
            continue
        inputs = list(node.input)
        inputs[i] = t
        if b.K is None:
            terms.append(b.Einsum(*inputs, equation=eq))
        else:
            sub = list(subs)
            sub[i] = k + sub[i]
            terms.append(b.Einsum(*inputs, equation=",".join(sub) + "->" + k + rhs))
    return [add_all(b, terms)]


# ---- CPA ops: state frozen at x -----------------------------------------------------------------

# The masks below read the activation's output y where it decides the state exactly as x does
# (relu(x) > 0 <=> x > 0): then x feeds nothing but the activation, and onnxruntime can fuse
# Conv+activation on the primal path as it does in the forward model.

def nchwc_gate_fits(b, y):
    """Whether a gate on y can run in onnxruntime's blocked NCHWc layout: one float32 [N, C, H, W] tangent with
    C a multiple of 4 (what its depthwise Conv takes), y held in NCHWc (in_nchwc). Where and the comparisons have
    no NCHWc kernel, so a gate built from them costs a ReorderOutput of the tangent Conv's result and a
    ReorderInput of the next."""
    shape = b.src.shape(y)
    return (b.K is None and b.src.dtype(y) == TensorProto.FLOAT and shape is not None and len(shape) == 4
            and isinstance(shape[1], int) and shape[1] % 4 == 0 and in_nchwc(b.src, y))


# ops onnxruntime runs in NCHWc when their (first) input is, or fuses into the Conv before them
NCHWC_FOLLOWERS = {"BatchNormalization", "Relu", "Clip", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "MaxPool",
                   "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "Identity", "Dropout"}
NCHWC_BLOCK = 16  # onnxruntime's NCHWc channel block with AVX-512 (8 with AVX2)


def in_nchwc(src, name, seen=None):
    """Whether onnxruntime will likely hold the primal value `name` in NCHWc: made by a Conv with constant 4-D
    weights that its NCHWc transformer takes (plain, depthwise, or block-aligned groups), through ops that stay in
    NCHWc or fuse (NCHWC_FOLLOWERS, Add/Sum/Mul of such values or by constants, Concat of block-aligned ones).
    Otherwise (a graph input, a Transpose, shufflenet's unaligned grouped convs) the NCHWc gate's mask would cost a
    ReorderInput and a ReorderOutput around its Conv; the Where gate measured 6% faster on shufflenet there."""
    seen = {} if seen is None else seen  # value -> answer: residual chains and diamonds are walked once
    if name not in seen:
        seen[name] = False  # (a cycle cannot occur: the graph is acyclic)
        seen[name] = _in_nchwc(src, src.producer.get(name), seen)
    return seen[name]


def _in_nchwc(src, node, seen):
    if node is None:
        return False
    if node.op_type == "Conv":
        weight = src.const(node.input[1])
        if weight is None or weight.ndim != 4:
            return False
        group = src.attrs(node).get("group", 1)
        out, per_group = weight.shape[0], weight.shape[1]
        aligned = (out // group) % NCHWC_BLOCK == 0 and per_group % NCHWC_BLOCK == 0
        return group == 1 or (per_group == 1 and out == group) or aligned
    if node.op_type in NCHWC_FOLLOWERS:
        return in_nchwc(src, node.input[0], seen)
    if node.op_type == "Concat" and any(not isinstance((src.shape(i) or (0, None))[1], int)
                                        or src.shape(i)[1] % NCHWC_BLOCK for i in node.input):
        return False
    if node.op_type in ("Add", "Sum", "Mul", "Concat"):
        return all(in_nchwc(src, i, seen) for i in node.input if not _constant(src, i))
    return False


def _constant(src, name):
    """An initializer or Constant, or one reshaped (BatchNormalization's scale as [C, 1, 1] in old exports)."""
    node = src.producer.get(name)
    return src.const(name) is not None or (node is not None and node.op_type in ("Unsqueeze", "Reshape")
                                            and _constant(src, node.input[0]))


def positive_mask(b, v, lower=0.0, sign=1.0):
    """[sign·(v - lower) > 0] as 0/1 floats from ops onnxruntime keeps in NCHWc: a depthwise 1x1 Conv computing
    2^125·sign·(v - lower) (a power-of-two scale: a nonzero difference of such float32 multiples is at least
    2^-24, and a sum rounds to 0 only when exactly 0) fused with HardSigmoid(α = 2^127, β = 0), which sends
    every positive value to at least 2^103 before clipping to [0, 1]: the mask is exact (|lower| < 8)."""
    scaled = depthwise(b, v, b.src.shape(v)[1], sign * 2.0**125, -sign * lower * 2.0**125)
    return b.HardSigmoid(scaled, alpha=2.0**127, beta=0.0)


def depthwise(b, v, channels, scale, shift=None, hint="gate"):
    """scale·v + shift on a float32 [N, channels, H, W] value as a depthwise 1x1 Conv, which onnxruntime runs in
    NCHWc with an activation after it fused, or an Add of another NCHWc value (as the Conv's sum input)."""
    weight = b.const(np.full([channels, 1, 1, 1], scale, np.float32), hint=f"{hint}_scale")
    bias = None if shift is None else b.const(np.full([channels], shift, np.float32), hint=f"{hint}_shift")
    return b.Conv(v, weight, bias, group=channels, kernel_shape=[1, 1])


def below_where_positive(b, y, positive, hi):
    """[y < hi]·positive for y in [0, hi] and positive = [y > 0] as 0/1: one depthwise 1x1 Conv of `positive` (weight
    -hi, no bias) plus y, then HardSigmoid(α = -2^127). onnxruntime fuses the Add as the NCHWc Conv's sum input and the
    HardSigmoid as its activation, so a ReLU6 gate is two Convs and one Mul instead of two Convs and two Muls
    (mobilenetv2_style JVP 0.92x; docs/benchmarks/jvp-profile.md section 7). Exact: where positive is 1 the sum is
    y - hi with one rounding (exact sign; nonzero, at least 2^-127 for hi >= 2^-100, so 2^127 times it saturates);
    where it is 0, y is ±0 and so is the sum."""
    shifted = b.Add(depthwise(b, positive, b.src.shape(y)[1], -hi), y)
    return b.HardSigmoid(shifted, alpha=-2.0**127, beta=0.0)


@rule("Relu")
def relu(b, node, t):
    """ẏ = ẋ·[x > 0] = ẋ·[y > 0]; relu'(0) = 0. On NCHW float32 tangents the mask is built in NCHWc
    (positive_mask, exact) and multiplied in: no layout reorders around the gate."""
    x, y = node.input[0], node.output[0]
    if nchwc_gate_fits(b, y):
        return [b.Mul(t, positive_mask(b, y))]
    return [b.Where(b.Greater(y, s(b, 0.0, x)), t, s(b, 0.0, x))]


@rule("LeakyRelu")
def leaky_relu(b, node, t):
    """ẏ = ẋ·(x > 0 ? 1 : α); at 0 the slope is α (the left slope, as PyTorch)."""
    x, alpha = node.input[0], b.src.attrs(node)["alpha"]
    state = node.output[0] if alpha > 0 else x  # y > 0 <=> x > 0 needs α > 0
    slope = b.Where(b.Greater(state, s(b, 0.0, x)), s(b, 1.0, x), s(b, alpha, x))
    return [b.Mul(t, slope)]


@rule("PRelu")
def prelu(b, node, t, tslope):
    """ẏ = (x > 0 ? ẋ : slope·ẋ + x·ṡlope); at 0 the slope is `slope`."""
    x, slope, y = node.input[0], node.input[1], node.output[0]
    positive = b.Greater(x, s(b, 0.0, x))
    terms = [None if t is None else b.Mul(t, b.Where(positive, s(b, 1.0, x), slope)),
             None if tslope is None else b.Where(positive, s(b, 0.0, x), b.Mul(align(b, tslope, slope, y), x))]
    return [to_output(b, add_all(b, terms), y, y)]


@rule("Clip")
def clip(b, node, t, *_):
    """ẏ = ẋ·[lo < x < hi] = ẋ·[lo < y < hi]; at a bound the derivative is 0 (strict, like relu'(0) = 0)."""
    x, y = node.input[0], node.output[0]
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bounds = [(b.src.const(v), sign) for v, sign in ((lo, 1.0), (hi, -1.0)) if v]  # lo < y, y < hi
    if nchwc_gate_fits(b, y) and bounds and all(v is not None and v.size == 1 and abs(float(v)) < 8 for v, _ in bounds):
        if len(bounds) == 2 and float(bounds[0][0]) == 0 and float(bounds[1][0]) >= 2.0**-100:  # ReLU6
            return [b.Mul(t, below_where_positive(b, y, positive_mask(b, y), float(bounds[1][0])))]
        masks = [positive_mask(b, y, float(v), sign) for v, sign in bounds]
        return [b.Mul(t, masks[0] if len(masks) == 1 else b.Mul(*masks))]
    inside = None
    for cond in ([b.Greater(y, lo)] if lo else []) + ([b.Less(y, hi)] if hi else []):
        inside = cond if inside is None else b.And(inside, cond)
    return [t if inside is None else b.Where(inside, t, s(b, 0.0, x))]


@rule("HardSigmoid")
def hard_sigmoid(b, node, t):
    """ẏ = α·ẋ·[0 < αx+β < 1] = α·ẋ·[0 < y < 1]; 0 at both kinks."""
    x, y, attrs = node.input[0], node.output[0], b.src.attrs(node)
    inside = b.And(b.Greater(y, s(b, 0.0, x)), b.Less(y, s(b, 1.0, x)))
    return [b.Where(inside, b.Mul(t, s(b, attrs["alpha"], x)), s(b, 0.0, x))]


@rule("HardSwish")
def hard_swish(b, node, t):
    """ẏ = ẋ·(x < -3 ? 0 : x > 3 ? 1 : x/3 + 1/2), PyTorch's middle piece at ±3 (jacgraph.rules.slopes). onnxruntime
    runs HardSwish in NCHWc (as HardSigmoid and Mul), so on an NCHWc x the slope is made of kernels it keeps there
    and x, ẋ and ẏ are not reordered (hardswish_se 0.94x the JVP's time; docs/benchmarks/jvp-profile.md section 7):
    q = Clip(x/3 + 1/2, -1/2, 3/2) by a depthwise 1x1 Conv with the Clip fused (exactly -1/2 below -3 and 3/2 above 3,
    while x/3 + 1/2 rounds to -1/2 and 3/2 at ±3), then q - [x > 3]/2 + [x < -3]/2 by two depthwise Convs of exact
    HardSigmoid masks (2^100·(x - 3), -2^100·(x + 3)) with the running sum as their fused sum input."""
    x = node.input[0]
    if not nchwc_gate_fits(b, x):
        return elementwise(SLOPES["HardSwish"])(b, node, t)
    channels = b.src.shape(x)[1]
    middle = b.Clip(depthwise(b, x, channels, 1.0 / 3.0, 0.5, "hard_swish"), s(b, -0.5, x), s(b, 1.5, x))
    above = b.HardSigmoid(x, alpha=2.0**100, beta=-3.0 * 2.0**100)
    below = b.HardSigmoid(x, alpha=-2.0**100, beta=-3.0 * 2.0**100)
    up_to_above = b.Add(depthwise(b, above, channels, -0.5, hint="hard_swish"), middle)
    return [b.Mul(t, b.Add(depthwise(b, below, channels, 0.5, hint="hard_swish"), up_to_above))]


@rule("Abs")
def abs_(b, node, t):
    """ẏ = ẋ·sign(x); abs'(0) = 0."""
    return [b.Mul(t, b.Sign(node.input[0]))]


@rule("Max", "Min")
def max_min(b, node, *ts):
    """ẏ = ẋ_w for the winning input w; on ties the first input wins (a frozen selection)."""
    y = node.output[0]
    better = b.Greater if node.op_type == "Max" else b.Less
    best, out = node.input[0], align(b, ts[0], node.input[0], y)
    for x, t in zip(node.input[1:], ts[1:]):
        wins = better(x, best)
        out = b.Where(wins, align(b, t, x, y) if t is not None else s(b, 0.0, y),
                      out if out is not None else s(b, 0.0, y))
        best = b.Max(best, x) if node.op_type == "Max" else b.Min(best, x)
    return [to_output(b, out, y, y)]


@rule("MaxPool")
def max_pool(b, node, t):
    """ẏ = ẋ[argmax]; ties take the first maximum in row-major window order, the index onnxruntime reports.

    onnxruntime's MaxPool with an Indices output runs a generic kernel 8-30x slower than its plain
    one, so with static shapes the winner is found without it. Stride 1 (overlapping windows, e.g.
    inception's 3x3/1 pool): one window axis at a time from the last, each of the k taps along the
    axis is a Slice, the taps' Max is compared with Equal, and Where keeps the tangent of the first
    tap that attains it. Over the last axis this picks the leftmost maximum of every window row,
    over the next the topmost row whose maximum is the window's: the first maximum in row-major
    order, exactly (Slice and Max copy values, Equal compares them exactly); Σ k_i slices instead of
    a Π k_i-fold unfold. Padding is explicit (-inf, and 0 in the tangent), so a padded cell never
    wins, and ceil_mode's windows are counted as onnxruntime counts them. Strided windows: see
    _max_pool_phase_convs and _max_pool_phases (large 2-D inputs, equal strides; the dilated ones by
    SpaceToDepth), _max_pool_unfolded (the rest) and INDICES_BELOW (small ones). Measured per
    architecture in docs/benchmarks/speed.md and docs/benchmarks/jvp-profile.md.
    """
    attrs = b.src.attrs(node)
    geometry = window_geometry(b.src, node)
    x, y = node.input[0], node.output[0]
    has_indices = len(node.output) > 1 and node.output[1]  # the source pays for the Indices kernel anyway
    counts = None if geometry.in_spatial is None or geometry.pads is None else _pool_window_counts(geometry, attrs)
    shape = b.src.shape(x) or ()
    per_tap = np.prod([d for d in shape[1:] if isinstance(d, int)]) / np.prod(geometry.kernel)  # per sample
    small = any(st > 1 for st in geometry.strides) and per_tap < INDICES_BELOW
    # dynamic shapes, or a ceil_mode window count that ONNX shape inference and onnxruntime disagree on, or a
    # small strided pool: onnxruntime's own argmax
    if counts is None or counts != geometry.out_spatial or has_indices or small:
        indices = row_major_argmax(b, node)
        flat = b.Reshape(t, b.ints([-1] if b.K is None else [b.K, -1]))
        return [b.Gather(flat, indices, axis=lead(b)), None][:len(node.output)]
    spans = [dil * (k - 1) + 1 for k, dil in zip(geometry.kernel, geometry.dilations)]
    ends = [max(0, (m - 1) * st + span - n - lo)  # end padding the last window reads (ceil_mode: may exceed pads)
            for m, st, span, n, lo in zip(counts, geometry.strides, spans, geometry.in_spatial, geometry.begin)]
    if len(counts) == 2 and geometry.strides[0] == geometry.strides[1] > 1 and per_tap >= PHASES_FROM:
        by_convs = geometry.dilations == [1, 1] and b.src.dtype(x) == TensorProto.FLOAT \
            and isinstance(b.src.shape(x)[1], int)
        split = _max_pool_phase_convs if by_convs else _max_pool_phases
        return [split(b, x, t, y, geometry, counts), None][:len(node.output)]
    if any(st > 1 for st in geometry.strides):
        return [_max_pool_unfolded(b, x, t, y, geometry, ends), None][:len(node.output)]
    values, tangent = x, t
    for i in reversed(range(len(counts))):  # last axis first: row-major order
        values, tangent = _first_maximum_pass(b, values, tangent, i, geometry, counts[i], ends[i],
                                              s(b, -np.inf, x), best=y if i == 0 else None)
    return [tangent, None][:len(node.output)]


def finite(b, v, like):
    """v with ±inf clipped to the largest finite magnitudes of like's dtype. A one-hot Conv copies a cell exactly
    only when the other cells of its footprint are finite (0·inf is NaN): a -inf input (a mask) next to a window's
    winner made the winner NaN, so the wrong cell won (review FR-C: 968 of 6720 windows with 2% -inf cells). The
    order of the values is kept, except that ±inf ties with the extreme finite value of its sign; NaN stays NaN."""
    big = float(np.finfo(b.src.np_dtype(like)).max)
    return b.Clip(v, s(b, -big, like), s(b, big, like))


def _max_pool_unfolded(b, x, t, y, geometry, ends):
    """Strided windows: strided Slices are slow in onnxruntime, so the windows are unfolded instead by a
    Conv with one-hot filters (exact: one product by 1, the rest by 0), padded cells set to -inf by a
    constant mask, and the first maximum taken by ArgMax (it reports the first of equal maxima)."""
    kernel = geometry.kernel
    taps = int(np.prod(kernel))
    onehot = np.eye(taps).reshape([taps, 1] + kernel).astype(b.src.np_dtype(x))
    weight = b.const(onehot, hint="window_taps")
    spatial = list(b.src.shape(x)[2:])
    pads = geometry.begin + ends

    def unfold_windows(v):  # [..., *spatial] -> [M, taps, *out_spatial]
        flat = b.Reshape(v, b.ints([-1, 1] + spatial))
        return b.Conv(flat, weight, kernel_shape=kernel, strides=geometry.strides, dilations=geometry.dilations,
                      pads=pads)

    windows = unfold_windows(finite(b, x, x))
    if any(pads):
        valid = unfold_windows(b.const(np.ones([1, 1] + spatial, b.src.np_dtype(x)), hint="ones"))
        windows = b.Where(b.Greater(valid, s(b, 0.5, x)), windows, s(b, -np.inf, x))
    argmax = b.ArgMax(windows, axis=1, keepdims=1, select_last_index=0)
    if b.K is not None:
        argmax = b.Tile(argmax, b.ints([b.K, 1] + [1] * len(kernel)))
    picked = b.GatherElements(unfold_windows(t), argmax, axis=1)
    return b.Reshape(picked, full_shape(b, y))


# Input elements per window tap below which a strided pool's JVP reads the Indices of onnxruntime's MaxPool (3
# nodes: the primal pool with Indices, Reshape, Gather) instead of the one-hot unfold (~9 nodes as onnxruntime runs
# it, with its Convs' reorders): on pools this small the nodes, not the data, cost. Interleaved A/B, thread CPU time,
# 7x40 runs at load 11: lenet (2 pools, 1176 and 400 per tap) 0.965x the JVP's time, alexnet_style (2 of 3 pools)
# 0.979x, squeezenet_style (1 of 3) 0.993x.
INDICES_BELOW = 1500

# Input elements per window tap from which the phase split beats the one-hot unfold: it emits about 2·taps + 10
# nodes against the unfold's ~10, so it wins only where data, not node count, is the cost. Single pools, thread CPU
# time (docs/benchmarks/jvp-profile.md): 3x3/2 on 64x31x31 (6.8K per tap) 0.93x the unfold's time, 128x15x15 (3.2K)
# 1.32x; 2x2/2 on 32x32x32 (8K) 0.77x, 128x8x8 (2K) 1.17x; 240x32x32 3x3/2 (27K) 0.62x.
PHASES_FROM = 5000


def _max_pool_phases(b, x, t, y, geometry, counts):
    """2-D windows with stride s on both axes, split into stride phases by SpaceToDepth (7x faster than the
    equivalent Reshape + Transpose in onnxruntime): cell s·i + e of an axis goes to phase e % s at position
    i + e // s. A window tap (di, dj) (times the dilation) of the window anchored at (i, j) is then its phase
    plane at (i, j) + offset: on the planes flattened row by row, one contiguous Slice per tap, where anchors
    past the last window column read the next row (dropped at the end). The first tap in row-major order equal
    to the pool's own output wins: Equal compares copied values exactly, and padded cells (-inf) never win."""
    (rows, cols), stride = counts, geometry.strides[0]
    reach = [(k - 1) * dil // stride for k, dil in zip(geometry.kernel, geometry.dilations)]
    # positions per phase plane: every valid window's taps (one row more: the last window row's
    # slice runs to the end of its plane row) and the whole input fit; the rest is -inf / 0
    sizes = [max(m + r + extra, -(-(n + lo) // stride)) for m, r, extra, n, lo in
             zip(counts, reach, (1, 0), geometry.in_spatial, geometry.begin)]
    ends = [q * stride - n - lo for q, n, lo in zip(sizes, geometry.in_spatial, geometry.begin)]
    length = rows * sizes[1]  # anchors (i < rows, any column) on the flattened plane

    def planes(v, fill, k):  # [k?, N, C, H, W] -> [k?, N·C, s², plane]
        pads = [0] * (2 + k)
        v = b.Pad(v, b.ints(pads + geometry.begin + pads + ends), fill)
        v = b.SpaceToDepth(b.Reshape(v, b.ints([-1, 1] + [q * stride for q in sizes])), blocksize=stride)
        return b.Reshape(v, b.ints([b.K] * k + [-1, stride * stride, sizes[0] * sizes[1]]))

    def cell(v, tap):
        (di, dj), (dil_i, dil_j) = tap, geometry.dilations
        phase = (di * dil_i % stride) * stride + dj * dil_j % stride
        start = (di * dil_i // stride) * sizes[1] + dj * dil_j // stride
        return b.Slice(v, b.ints([phase, start]), b.ints([phase + 1, start + length]), b.ints([-2, -1]))

    values, tangents = planes(x, s(b, -np.inf, x), 0), planes(t, s(b, 0.0, x), lead(b))
    best = b.Reshape(b.Pad(y, b.ints([0] * 7 + [sizes[1] - cols]), s(b, -np.inf, x)), b.ints([-1, 1, length]))
    taps = list(np.ndindex(*geometry.kernel))  # row-major window order
    picked = cell(tangents, taps[-1])
    for tap in reversed(taps[:-1]):
        picked = b.Where(b.Equal(cell(values, tap), best), cell(tangents, tap), picked)
    picked = b.Reshape(picked, b.ints([b.K] * lead(b) + [-1, rows, sizes[1]]))
    picked = b.Slice(picked, b.ints([0]), b.ints([cols]), b.ints([-1]))
    return b.Reshape(picked, full_shape(b, y))


def _max_pool_phase_convs(b, x, t, y, geometry, counts):
    """2-D windows with stride s on both axes, no dilation, float32: stride phase (p, q) of the input (cells
    (s·i + p, s·j + q) of the padded input) is a depthwise Conv with a one-hot (p+1)x(q+1) kernel and stride s,
    which onnxruntime runs in NCHWc straight from a Conv before the pool: no reorder of the whole input, no Pad,
    no SpaceToDepth, and the taps come out in the pool's own layout (unet 0.94x, squeezenet zoo 0.94x, vgg 0.97x
    the JVP's time against _max_pool_phases; docs/benchmarks/jvp-profile.md). Tap (di, dj) is phase (di % s, dj % s) at
    (i, j) + (di // s, dj // s): one 2-D Slice. A one-hot Conv copies its cell (1·v plus zeros; an inf or NaN
    neighbour in the kernel's footprint would spoil it, as in _max_pool_unfolded); the Conv's zero padding is set
    to -inf in x's phases by a constant, so a padded cell never wins. The first tap in row-major order equal to
    the pool's output wins (exact ties)."""
    (rows, cols), s = counts, geometry.strides[0]
    channels, dtype = b.src.shape(x)[1], b.src.np_dtype(x)
    kernel_h, kernel_w = geometry.kernel

    def phase(v, p, q, fill):  # [N', C, H, W] -> [N', C, rows + reach, cols + reach] of phase (p, q)
        need = [rows + (kernel_h - 1 - p) // s, cols + (kernel_w - 1 - q) // s]
        ends = [max(0, (m - 1) * s + e + 1 - n - lo) for m, e, n, lo in
                zip(need, (p, q), geometry.in_spatial, geometry.begin)]
        onehot = np.zeros([channels, 1, p + 1, q + 1], dtype)
        onehot[:, :, p, q] = 1
        out = b.Conv(v, b.const(onehot, hint="phase_tap"), group=channels, kernel_shape=[p + 1, q + 1],
                     strides=[s, s], pads=geometry.begin + ends)
        sizes = [(n + lo + e - k) // s + 1 for n, lo, e, k in
                 zip(geometry.in_spatial, geometry.begin, ends, (p + 1, q + 1))]
        cells = [np.arange(m) * s + e - lo for m, e, lo in zip(sizes, (p, q), geometry.begin)]
        outside = ~np.outer((cells[0] >= 0) & (cells[0] < geometry.in_spatial[0]),
                            (cells[1] >= 0) & (cells[1] < geometry.in_spatial[1]))
        if fill is not None and outside.any():
            out = b.Add(out, b.const(np.where(outside, fill, 0).astype(dtype)[None, None], hint="phase_padding"))
        return out, sizes

    def tap(planes, di, dj):
        v, sizes = planes[di % s, dj % s]
        start = [di // s, dj // s]
        if start == [0, 0] and sizes == [rows, cols]:
            return v
        return b.Slice(v, b.ints(start), b.ints([start[0] + rows, start[1] + cols]), b.ints([-2, -1]))

    used = {(di % s, dj % s) for di in range(kernel_h) for dj in range(kernel_w)}
    clipped = finite(b, x, x)
    values = {pq: phase(clipped, *pq, -np.inf) for pq in used}
    folded, tangents = fold(b, t), {}  # K stacked tangents: [K·N, C, H, W] for the Conv, [K, N, ...] for the taps
    for pq in used:
        v, sizes = phase(folded, *pq, None)
        tangents[pq] = unfold(b, v), sizes
    taps = list(np.ndindex(kernel_h, kernel_w))  # row-major window order
    best = finite(b, y, x)  # the pool's output, clipped as the taps were
    picked = tap(tangents, *taps[-1])
    for di, dj in reversed(taps[:-1]):
        picked = b.Where(b.Equal(tap(values, di, dj), best), tap(tangents, di, dj), picked)
    return picked


def _pool_window_counts(geometry, attrs):
    """Windows per spatial axis as onnxruntime counts them: with ceil_mode a window that would start in
    the end padding is dropped (ONNX shape inference may keep it, so the count is not read from there)."""
    ceil_mode, counts = attrs["ceil_mode"], []
    for n, k, st, dil, lo, hi in zip(geometry.in_spatial, geometry.kernel, geometry.strides, geometry.dilations,
                                     geometry.begin, geometry.end):
        room = n + lo + hi - dil * (k - 1) - 1
        m = (-(-room // st) if ceil_mode else room // st) + 1
        counts.append(m - 1 if ceil_mode and (m - 1) * st >= n + lo else m)
    return counts


def _first_maximum_pass(b, values, tangent, i, geometry, count, end, lowest, best=None):
    """Max over the window's taps (dilation apart) of `count` stride-1 windows along spatial axis i, and the tangent
    at the first tap attaining it; `best` is that max when already computed (the last tap's values are then not
    read). The axis alone is padded here (`lowest`, -inf; 0 in the tangent), so the tap at offset `begin` over the
    whole axis is the unpadded tensor itself, with no Slice: per 3x3 pad-1 pool 11 full-size copies instead of 14
    (JVP time 0.965x on inception_style, 0.964x on inception_v1 against padding both axes first;
    docs/benchmarks/jvp-profile.md)."""
    taps, dilation = geometry.kernel[i], geometry.dilations[i]
    begin, size = geometry.begin[i], geometry.in_spatial[i]
    rank = len(geometry.kernel) + 2

    def padded(v, k, fill=None):  # k leading tangent axes
        if not begin and not end:
            return v
        pads = [0] * 2 * (rank + k)
        pads[2 + k + i], pads[rank + k + 2 + k + i] = begin, end
        return b.Pad(v, b.ints(pads), *([fill] if fill else []))

    def tap(v, unpadded, j, k):
        start = j * dilation
        if start == begin and count == size:
            return unpadded
        return b.Slice(v, b.ints([start]), b.ints([start + count]), b.ints([2 + k + i]))

    wide, wide_tangent = padded(values, 0, lowest), padded(tangent, lead(b))
    cells = [tap(wide, values, j, 0) for j in range(taps if best is None else taps - 1)]
    cell_tangents = [tap(wide_tangent, tangent, j, lead(b)) for j in range(taps)]
    if best is None:
        best = cells[0] if taps == 1 else b.Max(*cells)
    picked = cell_tangents[-1]
    for cell, cell_tangent in zip(reversed(cells[:taps - 1]), reversed(cell_tangents[:-1])):
        picked = b.Where(b.Equal(cell, best), cell_tangent, picked)
    return best, picked


@rule("GlobalMaxPool")
def global_max_pool(b, node, t):
    """ẏ = ẋ at the spatial argmax per channel; ties: the first index."""
    x, y = node.input[0], node.output[0]
    flat_x = b.Reshape(x, b.Concat(b.shape(x, 0, 2), b.ints([-1]), axis=0))
    idx = b.ArgMax(flat_x, axis=2, keepdims=1)
    flat_t = b.Reshape(t, b.Concat(b.shape(t, 0, 2 + lead(b)), b.ints([-1]), axis=0))
    if b.K is not None:
        idx = b.Expand(idx, b.Concat(b.ints([b.K]), b.Shape(idx), axis=0))
    picked = b.GatherElements(flat_t, idx, axis=2 + lead(b))
    return [b.Reshape(picked, full_shape(b, y))]


# ---- smooth elementwise ops: exact forward mode -------------------------------------------------

def elementwise(derivative):
    """Rule for y = f(x): ẏ = ẋ·f'(x), with derivative(b, x, y, attrs) -> f'(x)."""
    def jvp_rule(b, node, t, *_):
        return [b.Mul(t, derivative(b, node.input[0], node.output[0], b.src.attrs(node)))]
    jvp_rule.__doc__ = derivative.__doc__
    return jvp_rule


JVP.family = lambda op, slope: elementwise(slope)  # the slopes live in jacgraph.rules.slopes


def pow_base_slope(b, x, p):
    """∂(x^p)/∂x = p·x^(p-1), and 0 where p = 0 (x^0 = 1 is constant; p·x^(p-1) would be 0·inf at x = 0)."""
    p_cast = p if b.src.dtype(p) == b.src.dtype(x) else b.Cast(p, to=b.src.dtype(x))
    slope = b.Mul(p_cast, b.Pow(x, b.Sub(p_cast, s(b, 1.0, x))))
    p_value = b.src.const(p)
    if p_value is not None and np.all(p_value != 0):
        return slope
    return b.Where(b.Equal(p_cast, s(b, 0.0, x)), s(b, 0.0, x), slope)


def pow_exponent_slope(b, x, y):
    """∂(x^p)/∂p = y·log(x), and 0 where x = 0 (as PyTorch); NaN for x < 0, like the primal there."""
    return b.Where(b.Equal(x, s(b, 0.0, x)), s(b, 0.0, y), b.Mul(y, b.Log(x)))


@rule("Pow")
def pow_(b, node, tx, tp):
    """ẏ = ẋ·p·x^(p-1) + ṗ·y·log(x) (edge cases: pow_base_slope, pow_exponent_slope)."""
    x, p, y = node.input[0], node.input[1], node.output[0]
    if tp is None and inside_chain(b.src, node):
        return [None]  # the chain's tangent is emitted whole at its end (chain_tangent)
    terms = []
    if tx is not None:
        terms.append(b.Mul(align(b, tx, x, y), pow_base_slope(b, x, p)))
    if tp is not None:
        terms.append(b.Mul(align(b, tp, p, y), pow_exponent_slope(b, x, y)))
    return [to_output(b, add_all(b, terms), y, y)]


@rule("Mod")
def mod(b, node, ta, tb):
    """Float Mod is fmod: y = a - q·b with q = trunc(a/b) piecewise constant, so ẏ = ȧ - q·ḃ; q is read back as
    round((a - y)/b), an exact integer. Integer Mod has no tangent."""
    a, c, y = node.input[0], node.input[1], node.output[0]
    if not b.src.is_float(y):
        return [None]
    terms = [align(b, ta, a, y)]
    if tb is not None:
        q = b.Round(b.Div(b.Sub(a, y), c))
        terms.append(b.Neg(b.Mul(align(b, tb, c, y), q)))
    return [to_output(b, add_all(b, terms), y, y)]


def _softmax_axis(b, node):
    rank = b.src.rank(node.input[0])
    axis = b.src.attrs(node)["axis"]
    return (axis + rank if axis < 0 else axis), rank


@rule("Softmax")
def softmax(b, node, t):
    """ẏ = y·(ẋ - Σ_axis y·ẋ)."""
    y = node.output[0]
    axis, rank = _softmax_axis(b, node)
    inner = tangent_reduce(b, "ReduceSum", b.Mul(t, y), [axis], rank, 1)
    return [b.Mul(y, b.Sub(t, inner))]


@rule("LogSoftmax")
def log_softmax(b, node, t):
    """ẏ = ẋ - Σ_axis softmax(x)·ẋ."""
    axis, rank = _softmax_axis(b, node)
    return [b.Sub(t, tangent_reduce(b, "ReduceSum", b.Mul(t, b.Exp(node.output[0])), [axis], rank, 1))]


def lp_norm_parts(b, node):
    """For LpNormalization (p = 1 or 2 along `axis`): the norm n (axis kept), the axis, the rank, and w = ∂n/∂x
    (x/n for p = 2, sign(x) for p = 1)."""
    x, attrs = node.input[0], b.src.attrs(node)
    rank = b.src.rank(x)
    axis, p = attrs["axis"] % rank, attrs["p"]
    if p not in (1, 2):
        raise JacgraphError(f"LpNormalization '{node.name}' has p={p}; ONNX defines p = 1 or 2.")
    norm = b.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=1)
    return norm, axis, rank, (b.Div(x, norm) if p == 2 else b.Sign(x))


@rule("LpNormalization")
def lp_normalization(b, node, t):
    """y = x/n, n = ‖x‖_p along the axis: ẏ = (ẋ - y·Σ_axis w·ẋ)/n, w = ∂n/∂x (sign(0) = 0 for p = 1)."""
    norm, axis, rank, w = lp_norm_parts(b, node)
    inner = tangent_reduce(b, "ReduceSum", b.Mul(t, w), [axis], rank, 1)
    return [b.Div(b.Sub(t, b.Mul(node.output[0], inner)), norm)]


@rule("Where")
def where(b, node, _, ta, tb):
    """ẏ = where(c, ȧ, ḃ)."""
    c, a, other, y = *node.input, node.output[0]
    if ta is None and tb is None:
        return [None]
    ta = align(b, ta, a, y) if ta is not None else s(b, 0.0, y)
    tb = align(b, tb, other, y) if tb is not None else s(b, 0.0, y)
    return [to_output(b, b.Where(c, ta, tb), y, y)]


@rule("Cast")
def cast(b, node, t):
    """ẏ = cast(ẋ) to a float type; casting to an integer type has tangent 0."""
    to = b.src.attrs(node)["to"]
    return [b.Cast(t, to=to) if b.src.is_float(node.output[0]) else None]


@rule("LRN")
def lrn(b, node, t):
    """y = x·d^-β, d = bias + α·mean_window x²: ẏ = ẋ·d^-β - 2αβ·(y/d)·mean_window x·ẋ (mean over the n channels
    [c - (n-1)//2, c + n//2], zeros outside: α/n·Σ = α·mean).

    The primal is recomputed as x·d^-β in place of the copied LRN node, so d^-β serves both: onnxruntime's LRN
    kernel took 7.6 ms on AlexNet's 96x55x55 input against about 1 ms for these ops (its two LRNs were a third of
    its forward; docs/benchmarks/speed.md). y then differs from the LRN kernel's by rounding only."""
    x, y = node.input[0], node.output[0]
    attrs = b.src.attrs(node)
    size, alpha, beta, bias = attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"]

    def window_mean(z):  # batch-first
        rank = b.src.rank(x)
        pads = [0] * 2 * (rank - 1)
        pads[0], pads[rank - 1] = (size - 1) // 2, size // 2
        pooled = b.AveragePool(b.Unsqueeze(z, b.ints([1])), kernel_shape=[size] + [1] * (rank - 2),
                               pads=pads, count_include_pad=1)
        return b.Squeeze(pooled, b.ints([1]))

    alpha = float(np.float32(alpha) / np.float32(size)) * size  # α/n in float32, as onnxruntime's kernel has it
    d = b.Add(b.Mul(window_mean(b.Mul(x, x)), s(b, alpha, x)), s(b, bias, x))
    if beta == 0.75:  # d^-0.75 by two Sqrt (correctly rounded, vectorised): a third of Pow's time
        root = b.Sqrt(d)
        inv = b.Reciprocal(b.Mul(root, b.Sqrt(root)))
    else:
        inv = b.Pow(d, s(b, -beta, x))
    b.remove_copy(node)
    b.nodes.append(helper.make_node("Mul", [x, inv], [y], name=b.fresh("jg_LRN")))
    cross = unfold(b, window_mean(fold(b, b.Mul(t, x))))
    second = b.Mul(cross, b.Mul(b.Div(y, d), s(b, 2.0 * alpha * beta, x)))
    return [b.Sub(b.Mul(t, inv), second)]


@rule("LayerNormalization")
def layer_norm(b, node, t, tscale=None, tbias=None):
    """x̂ = (x-μ)/σ: ẏ = γ/σ·(ẋ - mean(ẋ) - x̂·mean(x̂·ẋ)) + x̂·γ̇ + β̇ over the normalized axes."""
    attrs = b.src.attrs(node)
    x, scale, y = node.input[0], node.input[1], node.output[0]
    rank = b.src.rank(x)
    axes = list(range(attrs["axis"] % rank, rank))
    if b.src.dtype(x) == attrs.get("stash_type", TensorProto.FLOAT):  # the primal's own Mean and InvStdDev outputs
        mean, inv_std = b.extra_output(node, 1, f"{y}_mean"), b.extra_output(node, 2, f"{y}_inv_std_dev")
        centred = b.Sub(x, mean)
    else:  # they would be computed in the narrower stash type: recompute in x's type
        mean = b.reduce("ReduceMean", x, axes)
        centred = b.Sub(x, mean)
        inv_std = b.Reciprocal(b.Sqrt(b.Add(b.reduce("ReduceMean", b.Mul(centred, centred), axes),
                                            s(b, attrs["epsilon"], x))))
    x_hat = b.Mul(centred, inv_std)
    terms = []
    if t is not None:
        t_mean = tangent_reduce(b, "ReduceMean", t, axes, rank, 1)
        proj = tangent_reduce(b, "ReduceMean", b.Mul(t, x_hat), axes, rank, 1)
        terms.append(b.Mul(b.Sub(b.Sub(t, t_mean), b.Mul(x_hat, proj)), b.Mul(inv_std, scale)))
    if tscale is not None:
        terms.append(b.Mul(align(b, tscale, scale, y), x_hat))
    if tbias is not None:
        terms.append(align(b, tbias, node.input[2], y))
    return [to_output(b, add_all(b, terms), y, y)] + [None] * (len(node.output) - 1)


@rule("InstanceNormalization")
def instance_norm(b, node, t, tscale=None, tbias=None):
    """Per (sample, channel) over spatial axes: ẏ = γ/σ·(ẋ - mean(ẋ) - x̂·mean(x̂·ẋ)) + x̂·γ̇ + β̇."""
    x, scale = node.input[0], node.input[1]
    rank = b.src.rank(x)
    axes = list(range(2, rank))
    mean = b.reduce("ReduceMean", x, axes)
    centred = b.Sub(x, mean)
    var = b.reduce("ReduceMean", b.Mul(centred, centred), axes)
    inv_std = b.Reciprocal(b.Sqrt(b.Add(var, s(b, b.src.attrs(node)["epsilon"], x))))
    x_hat = b.Mul(centred, inv_std)
    terms = [None if tscale is None else b.Mul(per_channel(b, tscale, rank), x_hat),
             None if tbias is None else per_channel(b, tbias, rank)]
    if t is not None:
        t_mean = tangent_reduce(b, "ReduceMean", t, axes, rank, 1)
        proj = tangent_reduce(b, "ReduceMean", b.Mul(t, x_hat), axes, rank, 1)
        gamma = b.Unsqueeze(scale, b.ints(range(1, rank - 1)))
        terms.append(b.Mul(b.Sub(b.Sub(t, t_mean), b.Mul(x_hat, proj)), b.Mul(inv_std, gamma)))
    return [add_all(b, terms)]


# ---- smooth chains written out (RMSNorm, SiLU, GELU): one tangent for the chain ----------------------
# Exporters write RMSNorm (T5, LLaMA), SiLU (LLaMA, MobileViT) and GELU (BERT, ViT, Swin, ConvNeXt: erf form;
# GPT-2: tanh form) as chains of elementwise nodes. Node by node their tangents cost 4-9 kernels more than the
# chain's derivative written with the primal's own intermediates (RMSNorm 14 -> 5, SiLU 6 -> 4, GELU 10 -> 7 and
# 14 -> 8). A chain whose inner values nothing else reads gets its whole tangent at its last node (`Chain.tangent`,
# from the tangent of the end's input `feed`); the rules of the inner nodes a tangent reaches return None
# (`inside_chain`). Both ask `chain_at`, so they agree; a chain value read elsewhere keeps node-by-node rules.

Chain = namedtuple("Chain", "feed inside tangent")  # tangent(b, end, tangent of feed) -> the end's tangent

def sole_reader(src, name):
    """The one node of src's graph that reads `name`, or None (read by several, or a graph output)."""
    found = src.readers(name)  # SourceModel's map, made again if its node list changes (it cannot go stale)
    return found[0] if len(found) == 1 else None


def _made_by(src, name, op_type, reader):
    """The `op_type` node that makes `name` when `reader` is the only node reading it, else None."""
    node = src.producer.get(name)
    return node if node is not None and node.op_type == op_type and sole_reader(src, name) is reader else None


def _scalar(src, name):
    """The value of a one-element constant, else None."""
    c = src.const(name)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def _with_scalar(src, node):
    """(the other input, the scalar) when one of the binary node's inputs is a one-element constant, else None."""
    for other, c in (node.input, node.input[::-1]):
        if _scalar(src, c) is not None and _scalar(src, other) is None:
            return other, _scalar(src, c)
    return None


def chain_at(src, end):
    """The written-out chain that ends at `end`, or None. Its end must have its feed's rank: a one-element constant
    of higher rank (ε, γ, β as [1, 1, 1, 1]) would raise the rank of the chain's values, which the tangents (x's
    axes, K stacked in front) do not follow; such a chain goes node by node."""
    for match in (rms_norm, silu, gelu_erf, gelu_tanh):
        chain = match(src, end)
        if chain is not None:
            return chain if src.rank(end.output[0]) == src.rank(chain.feed) else None
    return None


def inside_chain(src, node):
    """Whether `node` is an inner node of a chain (its tangent is then emitted whole at the chain's end)."""
    reader = node
    for _ in range(8):  # the longest walk: GELU's tanh form, from its Pow to its end
        reader = sole_reader(src, reader.output[0])
        if reader is None:
            return False
        chain = chain_at(src, reader)
        if chain is not None:
            return any(inner is node for inner in chain.inside)
    return False


def chain_tangent(b, node, ta, tb):
    """The whole chain's tangent when `node` ends a chain whose inner tangents were dropped, else None."""
    chain = chain_at(b.src, node)
    if chain is None:
        return None
    tangents = dict(zip(node.input, (ta, tb)))
    if any(t is not None for name, t in tangents.items() if name != chain.feed):
        return None  # (cannot happen: the chain's other values depend on `feed` alone)
    return chain.tangent(b, node, tangents[chain.feed])


def rms_norm(src, end):
    """x·rsqrt(ReduceMean(x², keepdims) + ε) as Pow, ReduceMean, Add, Sqrt, then Mul(x, Div(1, ·) or Reciprocal(·))
    or Div(x, ·): u̇ = d·(ẋ - u·mean(u·ẋ)) with the primal's d = rsqrt(...) and u (Div: divided by the Sqrt)."""
    if end.op_type == "Div":
        x, factor, root = end.input[0], end.input[1], _made_by(src, end.input[1], "Sqrt", end)
    elif end.op_type == "Mul":
        for x, factor in (end.input, end.input[::-1]):
            inverse = _made_by(src, factor, "Reciprocal", end) or _made_by(src, factor, "Div", end)
            if inverse is not None and (inverse.op_type == "Reciprocal" or _scalar(src, inverse.input[0]) == 1.0):
                break
        else:
            return None
        root = _made_by(src, inverse.input[-1], "Sqrt", inverse)
    else:
        return None
    add = root and _made_by(src, root.input[0], "Add", root)
    mean = add and _with_scalar(src, add) and _made_by(src, _with_scalar(src, add)[0], "ReduceMean", add)
    constant_axes = mean and (len(mean.input) < 2 or not mean.input[1] or src.const(mean.input[1]) is not None)
    square = constant_axes and src.attrs(mean).get("keepdims", 1) and _made_by(src, mean.input[0], "Pow", mean)
    if not square or square.input[0] != x or _scalar(src, square.input[1]) != 2.0:
        return None

    def tangent(b, end, t):
        u, rank = end.output[0], b.src.rank(x)
        t = align(b, t, x, u)
        axes, product = reduce_axes(b, mean, rank), b.Mul(t, u)  # axes [] (noop_with_empty_axes): mean = identity
        projection = product if axes == [] else tangent_reduce(b, "ReduceMean", product, axes, rank, 1)
        inner = b.Sub(t, b.Mul(u, projection))
        return b.Div(inner, factor) if end.op_type == "Div" else b.Mul(inner, factor)
    return Chain(x, [square], tangent)


def silu(src, end):
    """x·sigmoid(x) as Mul(x, Sigmoid(x)): ẏ = ẋ·(s + y·(1 - s)) with the primal's s and y."""
    if end.op_type != "Mul":
        return None
    for x, s_name in (end.input, end.input[::-1]):
        sigmoid = _made_by(src, s_name, "Sigmoid", end)
        if sigmoid is not None and sigmoid.input[0] == x:
            return Chain(x, [sigmoid], lambda b, end, t: b.Mul(t, b.Add(s_name, b.Mul(end.output[0], one_minus(
                b, s_name, end.output[0])))))
    return None


def gelu_erf(src, end):
    """x·(erf(z) + β) with z = x/γ (Div) or x·γ (Mul): Mul(x, Add(Erf(z), β)), the 0.5 outside the chain.
    ẏ = ẋ·(a + z·erf'(z)) with the primal's z and a = erf(z) + β, erf'(z) = 2/√π·exp(-z²)."""
    if end.op_type != "Mul":
        return None
    for x, a in (end.input, end.input[::-1]):
        add = _made_by(src, a, "Add", end)
        erf = add and _with_scalar(src, add) and _made_by(src, _with_scalar(src, add)[0], "Erf", add)
        z = erf and (_made_by(src, erf.input[0], "Div", erf) or _made_by(src, erf.input[0], "Mul", erf))
        if z and _with_scalar(src, z) is not None and _with_scalar(src, z)[0] == x and (
                z.op_type == "Mul" or z.input[0] == x):
            def tangent(b, end, t, a=a, z=z.output[0]):
                slope = b.Mul(b.Mul(z, b.Exp(b.Neg(b.Mul(z, z)))), s(b, 2.0 / math.sqrt(math.pi), z))
                return b.Mul(t, b.Add(a, slope))
            return Chain(x, [z], tangent)
    return None


def gelu_tanh(src, end):
    """Mul(h, tanh(i) + β) with h = α·x, i = k·(x + c·x³) written Pow(x, 3), Mul(c), Add(x, ·), Mul(k), Tanh, Add(β)
    (GPT-2's "new GELU"): ẏ = ḣ·(a + (1 - th²)·(i + 2kc·x³)) with the primal's a, th, i and x³ (α, β, c, k any)."""
    if end.op_type != "Mul":
        return None
    for h, a in (end.input, end.input[::-1]):
        add = _made_by(src, a, "Add", end)
        tanh = add and _with_scalar(src, add) and _made_by(src, _with_scalar(src, add)[0], "Tanh", add)
        inner = tanh and _made_by(src, tanh.input[0], "Mul", tanh)
        k = inner and _with_scalar(src, inner)
        total = k and _made_by(src, k[0], "Add", inner)
        scaled = total and (_made_by(src, total.input[1], "Mul", total) or _made_by(src, total.input[0], "Mul", total))
        c = scaled and _with_scalar(src, scaled)
        cube = c and _made_by(src, c[0], "Pow", scaled)
        half = src.producer.get(h)
        if not cube or _scalar(src, cube.input[1]) != 3.0 or half is None or half.op_type != "Mul":
            continue
        x = cube.input[0]
        if sorted(total.input) != sorted([x, scaled.output[0]]) or (_with_scalar(src, half) or [None])[0] != x:
            continue
        def tangent(b, end, t, a=a, th=tanh.output[0], i=inner.output[0], p=cube.output[0], kc=k[1] * c[1]):
            slope = b.Mul(one_minus(b, b.Mul(th, th), th), b.Add(i, b.Mul(p, s(b, 2.0 * kc, p))))
            return b.Mul(t, b.Add(a, slope))
        return Chain(h, [cube, total], tangent)
    return None


@rule("Sigmoid")
def sigmoid(b, node, t):
    """ẏ = ẋ·y(1-y) (jacgraph.rules.slopes); inside a SiLU x·sigmoid(x), nothing: the chain's end emits it."""
    if inside_chain(b.src, node):
        return [None]
    return elementwise(SLOPES["Sigmoid"])(b, node, t)


def one_minus(b, v, y):
    """1 - v for v of y's shape. Where onnxruntime holds y in NCHWc with whole channel blocks, a depthwise 1x1 Conv
    (weight -1, bias 1: the same one rounding) keeps the tangent in NCHWc; a Sub from a constant has no NCHWc
    kernel and costs reorders of its operands and of the tangent around it (4 per SiLU on MobileViT)."""
    if not (nchwc_gate_fits(b, y) and b.src.shape(y)[1] % NCHWC_BLOCK == 0):
        return b.Sub(s(b, 1.0, y), v)
    return depthwise(b, v, b.src.shape(y)[1], -1.0, 1.0, "minus_one")


# ---- batched strategy: primal and tangent through one call of the linear op ----------------------

def _batched_linear(b, node, tx, *inactive, bias_axis_from_end=None):
    """Run the op once on concat(x, ẋ) along the batch axis; the bias is added to the primal half only. Not behind a
    folded BatchNormalization (its tangent needs other weights than its primal)."""
    if (tx is None or any(t is not None for t in inactive) or b.src.attrs(node).get("transA", 0)
            or node.op_type == "Conv" and folded_batch_norm(b.src, node) is not None):
        return NotImplemented
    x = node.input[0]
    attrs = b.src.attrs(node)
    stacked = b.Concat(x, fold(b, tx), axis=0)
    n = b.shape(x, 0, 1)
    rest = b.Sub(b.shape(stacked, 0, 1), n)
    rows = _bias_rows(b, node, x) if node.op_type == "Gemm" else None
    if rows is not None:  # the bias through Gemm's C, on the primal rows only: no Add after the Split
        out, bias = b.Gemm(stacked, node.input[1], rows, alpha=attrs["alpha"], transB=attrs["transB"]), None
    elif node.op_type == "Gemm":
        out = b.Gemm(stacked, node.input[1], alpha=attrs["alpha"], transB=attrs["transB"])
        bias = b.Mul(node.input[2], s(b, attrs["beta"], x)) if len(node.input) > 2 and node.input[2] else None
    elif node.op_type == "MatMul":
        out, bias = b.MatMul(stacked, node.input[1]), None
    else:
        out = b.op(node.op_type, stacked, node.input[1], **attrs)
        bias = (b.Unsqueeze(node.input[2], b.ints(range(1, b.src.rank(node.output[0]) - 1)))
                if len(node.input) > 2 and node.input[2] else None)
    primal, tangent = b.op("Split", out, b.Concat(n, rest, axis=0), axis=0, n_out=2)
    y = node.output[0]
    b.nodes.append(_named(b.Add(primal, bias) if bias is not None else primal, y, b))
    return [unfold(b, tangent)]


def _bias_rows(b, node, x):
    """β·C broadcast over the primal's rows and 0 over the tangents' ([N + K·N, out]) as one constant, where C is a
    constant and both counts are static; else None."""
    bias = b.src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    n, out = (b.src.shape(x) or (None,))[0], (b.src.shape(node.output[0]) or (None, None))[1]
    if bias is None or not isinstance(n, int) or not isinstance(out, int):
        return None
    primal = np.broadcast_to(b.src.attrs(node)["beta"] * bias.astype(np.float64), (n, out))
    rows = np.concatenate([primal, np.zeros(((b.K or 1) * n, out))])
    return b.const(rows.astype(b.src.np_dtype(x)), hint="bias_rows")


def _named(value, name, b):
    """Identity that gives `value` the source name `name` (the primal output other nodes read)."""
    return helper.make_node("Identity", [value], [name], name=b.fresh("jg_Identity"))


BATCHED = {}
for _op in ("Conv", "ConvTranspose", "Gemm"):
    BATCHED[_op] = _batched_linear


def _batched_matmul(b, node, ta, tc):
    """MatMul x @ W with W constant and x batch-first: one MatMul over concat(x, ẋ)."""
    if b.src.rank(node.input[1]) != 2 or b.src.rank(node.input[0]) < 2:
        return NotImplemented
    return _batched_linear(b, node, ta, tc)


BATCHED["MatMul"] = _batched_matmul


# ---- indexing, scatter and signal ops ----
# Gathers and scatters of every kind are read as moves between flat positions: `where` holds, for
# each element picked or written, its flat index in the data tensor (the same op applied to the
# index map of the data). Tangents and cotangents then need one Gather or ScatterElements on a flat
# axis, which takes stacked tangents ([K, N]) as they are.

def flat_positions(b, x):
    """The flat index of every element of x, shaped like x."""
    return b.Reshape(b.Range(b.const(np.int64(0)), b.Size(x), b.const(np.int64(1))), b.Shape(x))


def flatten_tangent(b, t):
    """[N] ([K, N] when stacked)."""
    return b.Reshape(t, b.ints([-1] if b.K is None else [b.K, -1]))


def gather_positions(b, t, where):
    """The tangent at flat positions `where` of its primal, shaped like `where` (K in front when stacked)."""
    return b.Gather(flatten_tangent(b, t), where, axis=lead(b))


def scatter_positions(b, base, where, values, reduction="none"):
    """ScatterElements into a flat tangent `base` ([N] or [K, N]) at flat positions `where` ([M])."""
    if b.K is not None:
        where = b.Expand(where, b.ints([b.K, 1]))
    return b.ScatterElements(base, where, values, axis=lead(b), reduction=None if reduction == "none" else reduction)


def scatter_where(b, node):
    """For ScatterND/ScatterElements: the flat data position each update lands on, as a 1-D tensor."""
    data, indices = node.input[0], node.input[1]
    if node.op_type == "ScatterND":
        where = b.GatherND(flat_positions(b, data), indices)
    else:
        where = b.GatherElements(flat_positions(b, data), indices, axis=b.src.attrs(node).get("axis", 0))
    return b.Reshape(where, b.ints([-1]))


def scatter_parts(b, node, where):
    """Flat primal pieces the scatter rules share: data D, updates U, output Y, and per reduction
    mul: R = the product scattered onto each data cell; max/min: the winner masks and their count."""
    data, updates, y = node.input[0], node.input[2], node.output[0]
    flat = lambda v: b.Reshape(v, b.ints([-1]))  # noqa: E731
    parts = {"D": flat(data), "U": flat(updates), "Y": flat(y)}
    reduction = b.src.attrs(node).get("reduction", "none")
    dtype = b.src.dtype(data)
    if reduction == "mul":
        ones = b.ConstantOfShape(b.Shape(parts["D"]), value=helper.make_tensor("value", dtype, [1], [1]))
        parts["R"] = b.ScatterElements(ones, where, parts["U"], axis=0, reduction="mul")
    elif reduction in ("max", "min"):
        zeros = b.ConstantOfShape(b.Shape(parts["D"]), value=helper.make_tensor("value", dtype, [1], [0]))
        parts["hit_d"] = b.Cast(b.Equal(parts["D"], parts["Y"]), to=dtype)
        parts["hit_u"] = b.Cast(b.Equal(parts["U"], b.Gather(parts["Y"], where)), to=dtype)
        parts["count"] = b.Add(parts["hit_d"], b.ScatterElements(zeros, where, parts["hit_u"], axis=0, reduction="add"))
    return reduction, parts


@rule("ScatterND", "ScatterElements")
def scatter(b, node, t_data, _, t_updates):
    """none: ẏ = scatter(ḋ, u̇); add: scatter-add(ḋ, u̇); mul: ẏ = ḋ·R + scatter-add(0, u̇·y/u) (updates
    nonzero); max/min: ẏ = the winner's tangent, shared evenly among ties (as ReduceMax)."""
    data, updates, y = node.input[0], node.input[2], node.output[0]
    where = scatter_where(b, node)
    reduction, p = scatter_parts(b, node, where)
    td = flatten_tangent(b, t_data if t_data is not None else zeros_like(b, data))
    tu = flatten_tangent(b, t_updates if t_updates is not None else zeros_like(b, updates))
    zeros = flatten_tangent(b, zeros_like(b, data))
    if reduction in ("none", "add"):
        out = scatter_positions(b, td, where, tu, reduction)
    elif reduction == "mul":
        spread = b.Mul(tu, b.Div(b.Gather(p["Y"], where), p["U"]))
        out = b.Add(b.Mul(td, p["R"]), scatter_positions(b, zeros, where, spread, "add"))
    else:
        picked = b.Add(b.Mul(td, p["hit_d"]), scatter_positions(b, zeros, where, b.Mul(tu, p["hit_u"]), "add"))
        out = b.Div(picked, p["count"])
    return [b.Reshape(out, full_shape(b, y))]


@rule("GatherND")
def gather_nd(b, node, t, _):
    """ẏ = ẋ at the gathered positions."""
    where = b.GatherND(flat_positions(b, node.input[0]), node.input[1], batch_dims=b.src.attrs(node).get("batch_dims", 0))
    return [gather_positions(b, t, where)]


@rule("TopK")
def top_k(b, node, t, _):
    """values: ẏ = ẋ at the reported indices (ties: the index TopK reports); indices: no tangent."""
    x, indices = node.input[0], node.output[1] if len(node.output) > 1 and node.output[1] else None
    if indices is None:
        indices = b.extra_output(node, 1, f"{node.output[0]}_indices")
    axis = b.src.attrs(node)["axis"] % b.src.rank(x)
    where = b.GatherElements(flat_positions(b, x), indices, axis=axis)
    return [gather_positions(b, t, where), None]


@rule("Compress")
def compress(b, node, t, _):
    """ẏ = ẋ at the kept positions."""
    axis = b.src.attrs(node).get("axis")
    where = b.Compress(flat_positions(b, node.input[0]), node.input[1], axis=axis)
    return [gather_positions(b, t, where)]


@rule("CumProd")
def cum_prod(b, node, t, _):
    """ẏ = y·cumsum(ẋ/x) with the same axis, exclusive and reverse (x nonzero, as the product rule needs)."""
    x, y = node.input[0], node.output[0]
    attrs = b.src.attrs(node)
    summed = b.CumSum(b.Div(t, x), taxes_tensor(b, node.input[1]), exclusive=attrs["exclusive"], reverse=attrs["reverse"])
    return [b.Mul(y, summed)]


def window_sum(b, z, node):
    """Σ over each window of an LpPool node (same geometry, zero padding), as two p=1 LpPools: exact for any sign."""
    attrs = {k: v for k, v in b.src.attrs(node).items() if k != "p"}
    return b.Sub(b.op("LpPool", b.Relu(z), p=1, **attrs), b.op("LpPool", b.Relu(b.Neg(z)), p=1, **attrs))


def lp_slope(b, x, p):
    """d|x|^p/dx / p = |x|^(p-1)·sign(x)."""
    return b.Mul(b.Pow(b.Abs(x), s(b, float(p - 1), x)), b.Sign(x))


@rule("LpPool")
def lp_pool(b, node, t):
    """y = (Σ_window |x|^p)^(1/p): ẏ = y^(1-p)·Σ_window |x|^(p-1)·sign(x)·ẋ (y > 0)."""
    x, y = node.input[0], node.output[0]
    p = b.src.attrs(node)["p"]
    summed = unfold(b, window_sum(b, fold(b, b.Mul(t, lp_slope(b, x, p))), node))
    return [b.Mul(summed, b.Pow(y, s(b, float(1 - p), x)))]


@rule("GlobalLpPool")
def global_lp_pool(b, node, t):
    """y = (Σ_spatial |x|^p)^(1/p): ẏ = y^(1-p)·Σ_spatial |x|^(p-1)·sign(x)·ẋ (y > 0)."""
    x, y = node.input[0], node.output[0]
    p, rank = b.src.attrs(node)["p"], b.src.rank(x)
    summed = tangent_reduce(b, "ReduceSum", b.Mul(t, lp_slope(b, x, p)), list(range(2, rank)), rank, 1)
    return [b.Mul(summed, b.Pow(y, s(b, float(1 - p), x)))]


@rule("Col2Im")
def col2im(b, node, t, *_):
    """Col2Im is linear in its input: ẏ = col2im(ẋ)."""
    return [batch_first(b, t, "Col2Im", *node.input[1:], **b.src.attrs(node))]


@rule("DFT")
def dft(b, node, t, *_):
    """The DFT is linear in its signal: ẏ = DFT(ẋ) with the same length, axis, inverse and onesided."""
    return [batch_first(b, t, "DFT", *node.input[1:], **b.src.attrs(node))]


@rule("STFT")
def stft(b, node, t_signal, _, t_window=None, *__):
    """Bilinear in signal and window: ẏ = STFT(ṡ, w) + STFT(s, ẇ) with the same step and frame length."""
    signal, step = node.input[0], node.input[1]
    window = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rest, attrs = node.input[3:], b.src.attrs(node)
    terms = [None if t_signal is None else batch_first(b, t_signal, "STFT", step, window, *rest, **attrs)]
    if t_window is not None and b.K is None:
        terms.append(b.op("STFT", signal, step, t_window, *rest, **attrs))
    elif t_window is not None:  # K windows: DFT of the signal's frames times each window tangent
        terms.append(_stft_of_windows(b, node, t_window))
    return [add_all(b, terms)]


def _stft_of_windows(b, node, t_window):
    """[K, batch, frames, bins, 2]: the STFT of the signal with each of K windows (static shapes, constant step)."""
    signal, y = node.input[0], node.output[0]
    step, (batch, _, channels), frames = b.src.const(node.input[1]), b.src.shape(signal), b.src.shape(y)[1]
    if step is None or not static(b.src.shape(signal)):
        raise JacgraphError(f"STFT '{node.name}': a stacked window tangent needs static shapes and a constant frame_step.")
    length = b.src.shape(node.input[2])[0]
    index = np.arange(frames)[:, None] * int(step) + np.arange(length)[None, :]
    cut = b.Gather(signal, b.const(index.astype(np.int64), hint="frame_index"), axis=1)  # [batch, frames, L, c]
    windowed = b.Mul(b.Unsqueeze(cut, b.ints([0])), b.Reshape(t_window, b.ints([b.K, 1, 1, length, 1])))
    flat = b.Reshape(windowed, b.ints([b.K * batch, frames, length, channels]))
    onesided = b.src.attrs(node)["onesided"]
    spectrum = (b.DFT(flat, None, b.const(np.int64(2)), onesided=onesided) if b.opset >= 20
                else b.DFT(flat, axis=2, onesided=onesided))
    return b.Reshape(spectrum, b.Concat(b.ints([b.K]), b.Shape(y), axis=0))


def unpooled_shape(b, node):
    """The shape MaxUnpool scatters into before an output_shape pads it at the end (the spec's reference; onnxruntime
    1.31 scatters into output_shape itself and disagrees with ONNX's own test cases)."""
    xs, attrs = b.src.shape(node.input[0]), b.src.attrs(node)
    kernel = list(attrs["kernel_shape"])
    d = len(kernel)
    strides, pads = list(attrs.get("strides") or [1] * d), list(attrs.get("pads") or [0] * 2 * d)
    if not static(xs):
        raise JacgraphError(f"MaxUnpool '{node.name}': jacgraph needs a static input shape.")
    return list(xs[:2]) + [(xs[2 + i] - 1) * strides[i] - pads[i] - pads[d + i] + kernel[i] for i in range(d)]


@rule("MaxUnpool")
def max_unpool(b, node, t, *_):
    """y = zeros with x written at the flat indices I (then padded at the end to output_shape): ẏ = the same of ẋ."""
    shape = unpooled_shape(b, node)
    where = b.Reshape(node.input[1], b.ints([-1]))
    zeros = flatten_tangent(b, b.ConstantOfShape(b.ints(([b.K] if b.K else []) + shape),
                                                 value=helper.make_tensor("value", b.src.dtype(node.input[0]), [1], [0])))
    out = b.Reshape(scatter_positions(b, zeros, where, flatten_tangent(b, t)), b.ints(([b.K] if b.K else []) + shape))
    if len(node.input) > 2 and node.input[2]:
        short = b.Sub(node.input[2], b.ints(shape))  # pads: none at the start (K axis included), `short` at the end
        out = b.Pad(out, b.Concat(b.ints([0] * (len(shape) + 2 * lead(b))), short, axis=0))
    return [out]


def moved_positions(b, node):
    """For an op that only moves elements: where each output element comes from (the op applied to x's index map).
    The map goes through float64 (exact below 2^53): onnxruntime has no int64 DepthToSpace/SpaceToDepth."""
    positions = b.Cast(flat_positions(b, node.input[0]), to=TensorProto.DOUBLE)
    return b.Cast(b.op(node.op_type, positions, *node.input[1:], **b.src.attrs(node)), to=TensorProto.INT64)


@rule("ReverseSequence", "DepthToSpace", "SpaceToDepth")
def permute_elements(b, node, t, *_):
    """Ops that only move elements: ẏ = ẋ at the positions the op moves x's own index map to."""
    return [gather_positions(b, t, moved_positions(b, node))]


@rule("TensorScatter")
def tensor_scatter(b, node, t_cache, t_update, _=None):
    """Linear in (past_cache, update): ẏ = TensorScatter(ċ, u̇) with the same write indices, axis and mode."""
    cache, update = node.input[0], node.input[1]
    indices = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if indices is not None and b.K is not None:  # the batch axis folds K in front: k·N + n reads indices[n]
        indices = b.Tile(indices, b.ints([b.K]))
    t_cache = t_cache if t_cache is not None else zeros_like(b, cache)
    t_update = t_update if t_update is not None else zeros_like(b, update)
    return [unfold(b, b.op("TensorScatter", fold(b, t_cache), fold(b, t_update), indices, **b.src.attrs(node)))]


def explicit_einsum(b, node):
    """(operand subscripts, output subscripts) of an Einsum with '...' spelled out in spare letters (from the
    operands' ranks) and an implicit output made explicit: the ellipsis axes, then the letters used once, sorted."""
    eq = b.src.attrs(node)["equation"].replace(" ", "")
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    subs = lhs.split(",")
    spare = iter(c for c in string.ascii_letters if c not in eq)
    ellipsis_ranks = [b.src.rank(x) - (len(sub) - 3) for x, sub in zip(node.input, subs) if "..." in sub]
    ellipsis = "".join(next(spare) for _ in range(max(ellipsis_ranks, default=0)))
    subs = [sub.replace("...", ellipsis[len(ellipsis) - (b.src.rank(x) - (len(sub) - 3)):]) if "..." in sub else sub
            for x, sub in zip(node.input, subs)]
    if rhs is None:
        counts = Counter("".join(subs))
        rhs = ellipsis + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ellipsis))
    return subs, rhs.replace("...", ellipsis)


def row_major_argmax(b, node):
    """A MaxPool's Indices in row-major order (the flat positions its JVP and VJP read): its own Indices output,
    or, under storage_order=1 (column-major Indices), those of a row-major copy of the pool."""
    attrs = b.src.attrs(node)
    if not attrs.get("storage_order", 0):
        return b.extra_output(node, 1, f"{node.output[0]}_argmax")
    return b.op("MaxPool", node.input[0], n_out=2, **{**attrs, "storage_order": 0})[1]


@rule("DequantizeLinear")
def dequantize_linear(b, node, _, t_scale, *__):
    """y = (x - zero_point)·scale is linear in the scale (x and zero_point are integers): ẏ = the op with ṡ as scale;
    K stacked scale tangents run as K copies (the op takes one scale tensor)."""
    x, rest, attrs = node.input[0], node.input[2:], b.src.attrs(node)
    if b.K is None:
        return [b.op("DequantizeLinear", x, t_scale, *rest, **attrs)]
    copies = [b.Unsqueeze(b.op("DequantizeLinear", x, b.Gather(t_scale, b.const(np.int64(k)), axis=0), *rest, **attrs),
                          b.ints([0])) for k in range(b.K)]
    return [b.Concat(*copies, axis=0)]


def grid_slopes(b, node):
    """∂y/∂grid[..., d] of a linear-mode GridSample, one [N, C, *out] tensor per grid component d: between the
    integer pixel coordinates around the sample point the interpolant is linear in that coordinate, so the slope
    is the op itself at the two neighbouring integer coordinates, differenced, times the pixel-per-grid-unit factor
    (border and zeros padding and the clipping they imply included: a clipped coordinate gives equal values)."""
    x, grid = node.input[0], node.input[1]
    xs, attrs = b.src.shape(x), b.src.attrs(node)
    if not static(xs[2:]):
        raise JacgraphError(f"GridSample '{node.name}': a tangent of the grid needs static spatial input dimensions.")
    if attrs.get("mode") not in ("linear", "bilinear"):
        raise JacgraphError(f"GridSample '{node.name}': the grid's derivative is supported in linear mode "
                            f"(and is zero in nearest mode), not in mode {attrs.get('mode')!r}.")
    spatial, align = list(xs[2:]), attrs.get("align_corners", 0)
    dims = len(spatial)
    parts = b.op("Split", grid, b.ints([1] * dims), axis=-1, n_out=dims) if dims > 1 else [grid]
    slopes = []
    for d in range(dims):
        size = spatial[dims - 1 - d]  # grid component d (x, y, z) indexes the last, second-last, ... axis
        per_unit = (size - 1) / 2.0 if align else size / 2.0  # pixels per grid unit
        offset = 0.0 if align else -0.5
        pixel = b.Add(b.Mul(b.Add(parts[d], s(b, 1.0, grid)), s(b, per_unit, grid)), s(b, offset, grid))
        below = b.Floor(pixel)
        values = []
        for corner in (below, b.Add(below, s(b, 1.0, grid))):
            moved = list(parts)
            moved[d] = b.Sub(b.Div(b.Sub(corner, s(b, offset, grid)), s(b, per_unit, grid)), s(b, 1.0, grid))
            values.append(b.op("GridSample", x, b.Concat(*moved, axis=-1) if dims > 1 else moved[0], **attrs))
        slopes.append(b.Mul(b.Sub(values[1], values[0]), s(b, per_unit, x)))
    return slopes


@rule("GridSample")
def grid_sample(b, node, t_x, t_grid):
    """Linear in the image: GridSample(ẋ, grid); in the grid (linear mode): Σ_d ∂y/∂grid_d·ġrid_d (grid_slopes);
    nearest mode is piecewise constant in the grid (tangent 0 there)."""
    x, grid = node.input[0], node.input[1]
    attrs = b.src.attrs(node)
    terms = []
    if t_x is not None:
        tiled = grid if b.K is None else b.Tile(grid, b.ints([b.K] + [1] * (b.src.rank(grid) - 1)))
        terms.append(unfold(b, b.op("GridSample", fold(b, t_x), tiled, **attrs)))
    if t_grid is not None and attrs.get("mode") != "nearest":
        channel = 1 + lead(b)  # ġrid [K?, N, *out, D] -> [K?, N, 1, *out] per component, against y's channels
        for d, slope in enumerate(grid_slopes(b, node)):
            component = b.Gather(t_grid, b.const(np.int64(d)), axis=-1)
            terms.append(b.Mul(slope, b.Unsqueeze(component, b.ints([channel]))))
    return [add_all(b, terms)]
