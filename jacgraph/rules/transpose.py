"""Reverse-mode rules: rule(b, node, *output_cotangents) -> input cotangents (None = symbolic zero).

The whole primal graph is already copied into the builder `b`, so rules read primal values by their
source names. `need(b, name)` says whether an input wants a cotangent (it depends on a differentiated
input or parameter); rules skip the work for the others. Linear ops get their transpose (Conv <->
ConvTranspose, Gemm with swapped transposes, broadcasting <-> ReduceSum); nonlinear ops multiply by
the same derivative the JVP rules use, with the same kink conventions. Elementwise ops with a
symmetric Jacobian (diagonal, or Softmax) reuse the JVP rule itself: Jᵀḡ = Jḡ.
"""
from __future__ import annotations

import string

import numpy as np
import onnx
from onnx import helper

from ..errors import JacgraphError, NeedsOpset
from . import reductions
from .jvp import JVP, inference_dropout, lp_norm_parts, pow_base_slope, pow_exponent_slope, s, static, zeros_like
from .registry import ZERO_DERIVATIVE_OPS, RuleTable, window_geometry


def elementwise(slope):
    """x̄ = ḡ·f'(x) for y = f(x), with slope(b, x, y, attrs) -> f'(x) (the elementwise family)."""
    def vjp_rule(b, node, g, *_):
        if g is None:
            return [None] * len(node.input)
        return pad_none([b.Mul(g, slope(b, node.input[0], node.output[0], b.src.attrs(node)))], node)
    vjp_rule.__doc__ = slope.__doc__
    return vjp_rule


VJP = RuleTable("VJP", "the VJP pass", family=lambda op, slope: elementwise(slope))
rule = VJP.register


# ---- helpers ----------------------------------------------------------------------------------

def need(b, name) -> bool:
    """True if source value `name` wants a cotangent (float and on a differentiated path)."""
    return bool(name) and name in b.active and b.src.is_float(name)


def shape_of(b, x):
    """x's shape as a constant when static, else Shape(x)."""
    sx = b.src.shape(x)
    return b.ints(sx) if static(sx) else b.Shape(x)


def sum_to(b, g, g_shape, x):
    """Transpose of broadcasting x to g_shape: ReduceSum over the broadcast axes, Reshape to x's shape."""
    if g is None or not need(b, x):
        return None
    xs = b.src.shape(x)
    if g_shape is None or xs is None:
        raise JacgraphError(f"the shape of '{x}' is unknown after shape inference; export with static ranks.")
    k = len(g_shape) - len(xs)
    axes, dynamic = list(range(k)), False
    for i, d in enumerate(xs):
        e = g_shape[k + i]
        if d == 1 and e != 1:
            axes.append(k + i)
        elif not (d == e and d is not None) and not (isinstance(d, int) and d > 1):
            dynamic = True  # symbolic dims that may or may not be broadcast
    if dynamic:  # sum over the leading axes, then over every axis where x has size 1 (harmless where g does too)
        if k:
            g = b.reduce("ReduceSum", g, list(range(k)), keepdims=0)
        ones = b.Reshape(b.NonZero(b.Equal(b.Shape(x), b.ints([1]))), b.ints([-1]))
        g = b.op("ReduceSum", g, ones, keepdims=1, noop_with_empty_axes=1)
        return b.Reshape(g, b.Shape(x))
    if not axes:
        return g
    return b.Reshape(b.reduce("ReduceSum", g, axes, keepdims=1), shape_of(b, x))


def out_shape(b, node, i=0):
    return b.src.shape(node.output[i])


def positions(b, x):
    """The flat index of every element of x, shaped like x (an index map for gathers and scatters)."""
    size = b.Size(x)
    return b.Reshape(b.Range(b.const(np.int64(0)), size, b.const(np.int64(1))), b.Shape(x))


def scatter_add(b, x, where, g, unique=False):
    """x-shaped tensor with g added at flat positions `where` (the transpose of a gather)."""
    flat = b.ConstantOfShape(b.Reshape(b.Size(x), b.ints([1])),
                             value=helper.make_tensor("value", b.src.dtype(x), [1], [0]))
    idx, vals = b.Reshape(where, b.ints([-1])), b.Reshape(g, b.ints([-1]))
    if unique:
        out = b.ScatterElements(flat, idx, vals, axis=0)
    elif b.opset >= 16:
        out = b.ScatterElements(flat, idx, vals, axis=0, reduction="add")
    else:  # jacgraph.compile converts the model up and emits again
        raise NeedsOpset(16, "the reverse pass sums cotangents of repeated indices with ScatterElements "
                             "reduction='add', which", b.opset)
    return b.Reshape(out, b.Shape(x))


def pad_none(outs, node):
    return list(outs) + [None] * (len(node.input) - len(outs))


# ---- zero cotangents --------------------------------------------------------------------------

@rule(*ZERO_DERIVATIVE_OPS)
def zero(b, node, *cts):
    """Integer, boolean or piecewise-constant outputs: no cotangent reaches the inputs."""
    return [None] * len(node.input)


# ---- self-adjoint elementwise ops: Jᵀḡ = Jḡ, the JVP rule applied to ḡ ---------------------------

def self_adjoint(b, node, g, *_):
    """Symmetric Jacobian (diagonal f'(x), or Softmax's diag(y) - yyᵀ): x̄ = J ḡ by the JVP rule, same kinks."""
    if g is None:
        return [None] * len(node.input)
    return pad_none(JVP[node.op_type](b, node, g, *[None] * (len(node.input) - 1))[:1], node)


for _op in ("Identity", "Neg", "Relu", "LeakyRelu", "Clip", "HardSigmoid", "Abs", "Softmax", "Trilu"):
    VJP[_op] = self_adjoint


@rule("Dropout")
def dropout(b, node, g, *_):
    """Inference Dropout is the identity: x̄ = ḡ (ratio and training_mode get none). Training mode is refused."""
    inference_dropout(b, node)
    return pad_none([g], node)


# ---- structural ops ---------------------------------------------------------------------------

@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_like(b, node, g, *_):
    """x̄ = reshape(ḡ, shape(x))."""
    return pad_none([b.Reshape(g, shape_of(b, node.input[0]), allowzero=1 if b.opset >= 14 else None)], node)


@rule("Transpose")
def transpose(b, node, g):
    """x̄ = transpose(ḡ, perm⁻¹)."""
    rank = b.src.rank(node.input[0])
    perm = b.src.attrs(node).get("perm") or list(reversed(range(rank)))
    return [b.Transpose(g, perm=[int(i) for i in np.argsort(perm)])]


@rule("Concat")
def concat(b, node, g):
    """x̄_i = the slice of ḡ that x_i filled."""
    rank = b.src.rank(node.output[0])
    axis = b.src.attrs(node)["axis"] % rank
    dims = [(b.src.shape(x) or [None] * rank)[axis] for x in node.input]
    sizes = (b.ints(dims) if all(isinstance(d, int) for d in dims)
             else b.Concat(*[b.shape(x, axis, axis + 1) for x in node.input], axis=0))
    parts = b.op("Split", g, sizes, axis=axis, n_out=len(node.input))
    parts = parts if isinstance(parts, list) else [parts]
    return [p if need(b, x) else None for p, x in zip(parts, node.input)]


@rule("Split")
def split(b, node, *gs):
    """x̄ = concat(ḡ_i) along the split axis (zeros for outputs without a cotangent)."""
    axis = b.src.attrs(node).get("axis", 0) % b.src.rank(node.input[0])
    parts = [g if g is not None else zeros_like(b, y) for y, g in zip(node.output, gs)]
    return pad_none([b.Concat(*parts, axis=axis)], node)


@rule("Slice")
def slice_(b, node, g, *_):
    """x̄ = ḡ scattered back to the sliced positions (distinct positions, so no sums)."""
    x = node.input[0]
    where = b.Slice(positions(b, x), *node.input[1:])
    return pad_none([scatter_add(b, x, where, g, unique=True)], node)


@rule("Gather")
def gather(b, node, g):
    """x̄ = scatter-add of ḡ at the gathered positions (repeated indices sum)."""
    x = node.input[0]
    where = b.Gather(positions(b, x), node.input[1], axis=b.src.attrs(node)["axis"])
    return [scatter_add(b, x, where, g), None]


@rule("GatherElements")
def gather_elements(b, node, g):
    """x̄ = scatter-add of ḡ at the gathered positions."""
    x = node.input[0]
    where = b.GatherElements(positions(b, x), node.input[1], axis=b.src.attrs(node)["axis"])
    return [scatter_add(b, x, where, g), None]


@rule("Pad")
def pad(b, node, g):
    """x̄ = ḡ at the positions x was copied to: constant mode drops the fill, reflect/edge sum the copies."""
    x, pads = node.input[0], node.input[1]
    axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    mode = b.src.attrs(node)["mode"]
    if mode != "constant":
        return pad_none([scatter_add(b, x, b.Pad(positions(b, x), pads, None, axes, mode=mode), g)], node)
    value = node.input[2] if len(node.input) > 2 else ""
    value_bar = None
    if need(b, value):  # the fill value's cotangent: ḡ summed over the padded cells
        ones = b.Pad(b.Mul(x, s(b, 0.0, x)), pads, s(b, 1.0, x), axes, mode="constant")
        value_bar = b.Reshape(b.ReduceSum(b.Mul(g, ones), keepdims=0), b.Shape(value))
    if not need(b, x):
        return pad_none([None, None, value_bar], node)
    # fill cells (and cells cropped by negative pads) point at a spare slot past the end, dropped after the scatter
    size = b.Size(x)
    where = b.Pad(positions(b, x), pads, b.const(np.int64(-1)), axes, mode="constant")
    where = b.Reshape(b.Where(b.Less(where, b.const(np.int64(0))), size, where), b.ints([-1]))
    spare = b.ConstantOfShape(b.Reshape(b.Add(size, b.const(np.int64(1))), b.ints([1])),
                              value=helper.make_tensor("value", b.src.dtype(x), [1], [0]))
    flat = b.ScatterElements(spare, where, b.Reshape(g, b.ints([-1])), axis=0)
    return pad_none([b.Reshape(b.Slice(flat, b.ints([0]), b.Reshape(size, b.ints([1]))), b.Shape(x)), None, value_bar], node)


@rule("Expand")
def expand(b, node, g):
    """x̄ = ḡ summed over the broadcast axes."""
    return [sum_to(b, g, out_shape(b, node), node.input[0]), None]


@rule("Tile")
def tile(b, node, g):
    """x̄ = Σ over the tiles: reshape ḡ to [r0, d0, r1, d1, ...] and sum the repeat axes."""
    x = node.input[0]
    xs, reps = b.src.shape(x), b.src.const(node.input[1])
    if not static(xs) or reps is None:  # in general: ḡ scatter-added back to the positions tiled from x
        return [scatter_add(b, x, b.Tile(positions(b, x), node.input[1]), g), None]
    split = [v for r, d in zip(reps.tolist(), xs) for v in (r, d)]
    summed = b.reduce("ReduceSum", b.Reshape(g, b.ints(split)), list(range(0, 2 * len(xs), 2)), keepdims=0)
    return [summed, None]


@rule("CumSum")
def cumsum(b, node, g):
    """x̄ = cumsum(ḡ) in the opposite direction (exclusive stays exclusive)."""
    attrs = b.src.attrs(node)
    return [b.CumSum(g, node.input[1], exclusive=attrs["exclusive"], reverse=1 - attrs["reverse"]), None]


@rule("Resize")
def resize(b, node, g, *_):
    """Resize is separable and linear in x: x̄ = Π_axes Aᵢᵀ ḡ with each axis's interpolation matrix Aᵢ.

    Aᵢ is read off the op itself at compile time (the same Resize applied to the identity along one
    axis, onnx's reference evaluator in float64), so every mode and coordinate transform is covered.
    """
    x = node.input[0]
    matrices = _resize_matrices(b, node)
    if matrices is None:  # roi, scales or sizes computed: the same probes, run in the emitted graph
        matrices = _resize_matrices_at_run_time(b, node)
    for axis, matrix in matrices:
        rank = b.src.rank(x)
        a = b.const(matrix.astype(b.src.np_dtype(x)), hint="resize_matrix") if isinstance(matrix, np.ndarray) else matrix
        if axis == rank - 1:
            g = b.MatMul(g, a)
        else:
            perm = [i for i in range(rank) if i != axis] + [axis]
            g = b.Transpose(b.MatMul(b.Transpose(g, perm=perm), a), perm=[int(i) for i in np.argsort(perm)])
    return pad_none([g], node)


def _resize_matrices(b, node):
    return resize_matrices(b.src, node, b.opset)


def resize_matrices(src, node, opset):
    """[(axis, A [out, in])] for every axis the Resize changes; None when roi/scales/sizes are computed
    (also the bound passes' lowering, jacgraph.layers)."""
    from ..reference import reference_session

    x, y = node.input[0], node.output[0]
    xs, ys = src.shape(x), src.shape(y)
    attrs = src.attrs(node)
    inputs = (list(node.input[1:]) + ["", "", ""])[:3]
    consts = [src.const(n) if n else None for n in inputs]
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    # roi matters only to tf_crop_and_resize, and computed sizes only through y's (static) shape, which the probe uses
    needed = [n and c is None and not (k == 0 and not crop) and not (k == 2 and static(ys))
              for k, (n, c) in enumerate(zip(inputs, consts))]
    if not (static(xs) and static(ys)) or any(needed):
        return None
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise JacgraphError(f"Resize '{node.name}': keep_aspect_ratio_policy other than 'stretch' is not supported.")
    rank = len(xs)
    axes = list(attrs.get("axes") or range(rank))
    roi, scales, sizes = consts
    full_roi, full_scales = [0.0] * rank + [1.0] * rank, [1.0] * rank
    for k, a in enumerate(axes):
        if roi is not None and roi.size:
            full_roi[a], full_roi[rank + a] = float(roi[k]), float(roi[len(axes) + k])
        if scales is not None and scales.size:
            full_scales[a] = float(scales[k])
    changed = [a for a in range(rank) if xs[a] != ys[a] or full_scales[a] != 1.0
               or (crop and (full_roi[a], full_roi[rank + a]) != (0.0, 1.0))]
    probe_attrs = _probe_attrs(attrs)
    out = []
    for a in changed:
        basis = next((j for j in range(rank) if j not in changed), None)
        if basis is None:
            raise JacgraphError(f"Resize '{node.name}' changes every axis; the reverse pass needs one it leaves alone.")
        n, m = xs[a], ys[a]
        shape = [1] * rank
        shape[a] = shape[basis] = n
        eye = np.eye(n).reshape([n if i in (a, basis) else 1 for i in range(rank)])  # x[basis=h, a] = e_h
        probe_in = [""] * 3
        feeds, inits = {"x": eye}, []
        if crop:
            r = [0.0] * rank + [1.0] * rank
            r[a], r[rank + a] = full_roi[a], full_roi[rank + a]
            inits.append(onnx.numpy_helper.from_array(np.array(r, np.float64), "roi"))
            probe_in[0] = "roi"
        if scales is not None and scales.size:
            sc = [1.0] * rank
            sc[a] = full_scales[a]
            inits.append(onnx.numpy_helper.from_array(np.array(sc, np.float32), "scales"))
            probe_in[1] = "scales"
        else:
            sz = [1] * rank
            sz[a], sz[basis] = m, n
            inits.append(onnx.numpy_helper.from_array(np.array(sz, np.int64), "sizes"))
            probe_in[2] = "sizes"
        probe_node = helper.make_node("Resize", ["x"] + probe_in, ["y"], **probe_attrs)
        graph = helper.make_graph([probe_node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, shape)],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        result = np.asarray(reference_session(model).run(None, feeds)[0])
        result = np.moveaxis(result, (basis, a), (0, 1)).reshape(n, -1)  # [basis h, out o] = A[o, h]
        if result.shape[1] != m:
            raise JacgraphError(f"Resize '{node.name}': probing axis {a} gave {result.shape[1]} outputs, "
                                f"shape inference says {m}.")
        out.append((a, result.T.copy()))
    return out


def _probe_attrs(attrs):
    """The Resize's attributes for a probe over every axis, with no extrapolated constant (it is not linear in x)."""
    probe = {k: v for k, v in attrs.items() if k != "axes"}
    if "extrapolation_value" in probe:
        probe["extrapolation_value"] = 0.0
    return probe


def _resize_matrices_at_run_time(b, node):
    """[(axis, A [out, in] as a graph value)] when roi, scales or sizes are computed: the probe of
    _resize_matrices emitted into the graph and fed the node's own inputs. Each resized axis is probed with
    the identity laid along it and the next axis, whose scale is 1 (every mode maps a scale-1 axis to itself)."""
    x = node.input[0]
    xs, attrs = b.src.shape(x), b.src.attrs(node)
    rank = len(xs or [])
    if not static(xs) or rank < 2 or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise JacgraphError(f"Resize '{node.name}': with computed roi/scales/sizes the reverse pass needs a static "
                            "input shape of rank >= 2 and keep_aspect_ratio_policy 'stretch'; export with a fixed size.")
    roi, scales, sizes = (list(node.input[1:]) + ["", "", ""])[:3]
    axes = [a % rank for a in (attrs.get("axes") or range(rank))]
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    entry = lambda v, i: b.Slice(v, b.ints([i]), b.ints([i + 1]))  # noqa: E731
    out = []
    for k, a in enumerate(axes):
        c, n = (a + 1) % rank, xs[a]
        eye = np.eye(n).reshape([n if i in (a, c) else 1 for i in range(rank)]).astype(b.src.np_dtype(x))
        probe_roi = probe_scales = probe_sizes = None
        if scales:
            ones = b.const(np.ones(1, np.float32))
            probe_scales = b.Concat(*[entry(scales, k) if i == a else ones for i in range(rank)], axis=0)
        else:
            probe_sizes = b.Concat(*[entry(sizes, k) if i == a else b.ints([n if i == c else 1]) for i in range(rank)], axis=0)
        if crop and roi:
            zero, one = (b.const(np.array([v], b.src.np_dtype(roi))) for v in (0.0, 1.0))
            probe_roi = b.Concat(*[entry(roi, k) if i == a else zero for i in range(rank)],
                                 *[entry(roi, len(axes) + k) if i == a else one for i in range(rank)], axis=0)
        probe = b.op("Resize", b.const(eye, hint="resize_probe"), probe_roi, probe_scales, probe_sizes, **_probe_attrs(attrs))
        others = [i for i in range(rank) if i not in (a, c)]
        pair = b.Squeeze(probe, b.ints(others)) if others else probe  # [m, n] when a < c, else [n, m]
        out.append((a, pair if a < c else b.Transpose(pair, perm=[1, 0])))
    return out


# ---- linear algebra ---------------------------------------------------------------------------

@rule("Add", "Sub")
def add_sub(b, node, g):
    """ā = ḡ, b̄ = ±ḡ, each summed over its broadcast axes."""
    a, c = node.input
    ys = out_shape(b, node)
    gb = None if not need(b, c) else (b.Neg(g) if node.op_type == "Sub" else g)
    return [sum_to(b, g, ys, a), sum_to(b, gb, ys, c)]


@rule("Sum", "Mean")
def sum_mean(b, node, g):
    """x̄_i = ḡ (Mean: ḡ/n) summed over x_i's broadcast axes."""
    ys = out_shape(b, node)
    if node.op_type == "Mean":
        g = b.Mul(g, s(b, 1.0 / len(node.input), node.output[0]))
    return [sum_to(b, g, ys, x) for x in node.input]


@rule("Mul")
def mul(b, node, g):
    """ā = ḡ·c, c̄ = ḡ·a (summed over broadcast axes)."""
    a, c = node.input
    ys = out_shape(b, node)
    return [sum_to(b, b.Mul(g, c), ys, a) if need(b, a) else None,
            sum_to(b, b.Mul(g, a), ys, c) if need(b, c) else None]


@rule("Div")
def div(b, node, g):
    """ā = ḡ/c, c̄ = -ḡ·y/c."""
    a, c, y = *node.input, node.output[0]
    ys = out_shape(b, node)
    return [sum_to(b, b.Div(g, c), ys, a) if need(b, a) else None,
            sum_to(b, b.Neg(b.Div(b.Mul(g, y), c)), ys, c) if need(b, c) else None]


@rule("Pow")
def pow_(b, node, g):
    """x̄ = ḡ·p·x^(p-1), p̄ = ḡ·y·log(x), with the JVP rule's edge cases (0 where p = 0, resp. x = 0)."""
    x, p, y = *node.input, node.output[0]
    ys = out_shape(b, node)
    xb = sum_to(b, b.Mul(g, pow_base_slope(b, x, p)), ys, x) if need(b, x) else None
    pb = sum_to(b, b.Mul(g, pow_exponent_slope(b, x, y)), ys, p) if need(b, p) else None
    return [xb, pb]


@rule("Mod")
def mod(b, node, g):
    """Float Mod (fmod): ā = ḡ, b̄ = -ḡ·round((a - y)/b) (the piecewise-constant quotient, as the JVP rule)."""
    a, c, y = *node.input, node.output[0]
    if not b.src.is_float(y):
        return [None, None]
    ys = out_shape(b, node)
    cb = sum_to(b, b.Neg(b.Mul(g, b.Round(b.Div(b.Sub(a, y), c)))), ys, c) if need(b, c) else None
    return [sum_to(b, g, ys, a), cb]


@rule("MatMul")
def matmul(b, node, g):
    """ā = ḡ @ cᵀ, c̄ = aᵀ @ ḡ, with 1-D operands promoted and broadcast batch axes summed."""
    a, c, y = *node.input, node.output[0]
    sa, sc, sy = b.src.shape(a), b.src.shape(c), b.src.shape(y)
    if sa is None or sc is None or sy is None:
        raise JacgraphError(f"MatMul '{node.name}': operand ranks are unknown; export with static ranks.")
    g2 = g
    if len(sa) == 1:
        g2 = b.Unsqueeze(g2, b.ints([-2] if len(sc) > 1 else [0]))
    if len(sc) == 1:
        g2 = b.Unsqueeze(g2, b.ints([-1]))
    a2 = a if len(sa) > 1 else b.Unsqueeze(a, b.ints([0]))
    c2 = c if len(sc) > 1 else b.Unsqueeze(c, b.ints([1]))
    batch = list(sy[:len(sy) - (len(sa) > 1) - (len(sc) > 1)])
    m, n = (sa[-2] if len(sa) > 1 else 1), (sc[-1] if len(sc) > 1 else 1)
    swap = lambda t, r: b.Transpose(t, perm=list(range(r - 2)) + [r - 1, r - 2])  # noqa: E731
    ab = cb = None
    if need(b, a):
        full = b.MatMul(g2, swap(c2, max(len(sc), 2)))  # [batch, m, k]
        if len(sa) == 1:
            full = b.Squeeze(full, b.ints([-2]))
        ab = sum_to(b, full, batch + ([m] if len(sa) > 1 else []) + [sa[-1]], a)
    if need(b, c):
        full = b.MatMul(swap(a2, max(len(sa), 2)), g2)  # [batch, k, n]
        if len(sc) == 1:
            full = b.Squeeze(full, b.ints([-1]))
        cb = sum_to(b, full, batch + [sc[0] if len(sc) == 1 else sc[-2]] + ([n] if len(sc) > 1 else []), c)
    return [ab, cb]


@rule("Gemm")
def gemm(b, node, g):
    """y = α op(A) op(B) + βC: Ā = α ḡ op(B)ᵀ (transposed back if transA), B̄ likewise, C̄ = β ḡ summed to C."""
    attrs = b.src.attrs(node)
    A, B = node.input[:2]
    C = node.input[2] if len(node.input) > 2 and node.input[2] else None
    alpha, beta, ta, tb = attrs["alpha"], attrs["beta"], attrs["transA"], attrs["transB"]
    outs = [None, None, None]
    if need(b, A):
        outs[0] = (b.Gemm(B, g, alpha=alpha, transA=tb, transB=1) if ta else
                   b.Gemm(g, B, alpha=alpha, transB=1 - tb))
    if need(b, B):
        outs[1] = (b.Gemm(g, A, alpha=alpha, transA=1, transB=ta) if tb else
                   b.Gemm(A, g, alpha=alpha, transA=1 - ta))
    if C is not None and need(b, C):
        gc = g if beta == 1.0 else b.Mul(g, s(b, beta, node.output[0]))
        outs[2] = sum_to(b, gc, out_shape(b, node), C)
    return outs[:len(node.input)]


@rule("Einsum")
def einsum(b, node, g):
    """x̄_i = einsum(other operands, ḡ -> subscripts of x_i); a repeated subscript (a diagonal) is tied to a fresh
    one by an identity matrix, and a subscript only x_i has (summed away) gets ḡ's value broadcast back."""
    subs, rhs = explicit_einsum(b, node)
    spare = iter(c for c in string.ascii_letters if c not in "".join(subs) + rhs)
    outs = []
    for i, x in enumerate(node.input):
        if not need(b, x):
            outs.append(None)
            continue
        xs, target, eye_subs, eyes = b.src.shape(x), "", [], []
        for axis, c in enumerate(subs[i]):
            if c not in target:
                target += c
                continue
            if not isinstance(xs[axis], int):
                raise JacgraphError(f"Einsum '{node.name}': the reverse pass needs a static size for repeated subscript {c}.")
            fresh = next(spare)
            target += fresh
            eye_subs.append(c + fresh)
            eyes.append(b.const(np.eye(xs[axis], dtype=b.src.np_dtype(x)), hint="einsum_eye"))
        others = [sub for j, sub in enumerate(subs) if j != i] + [rhs] + eye_subs
        kept = "".join(c for c in target if c in "".join(others))
        names = [n for j, n in enumerate(node.input) if j != i] + [g] + eyes
        bar = b.Einsum(*names, equation=",".join(others) + "->" + kept)
        summed = [axis for axis, c in enumerate(target) if c not in kept]
        outs.append(b.Expand(b.Unsqueeze(bar, b.ints(summed)), b.Shape(x)) if summed else bar)
    return outs


# ---- convolution and pooling --------------------------------------------------------------------

def _geometry(b, node):
    """Strides, dilations, explicit (begin, end) pads (auto_pad resolved), and the spatial shapes of x and y
    (None where not static)."""
    g = window_geometry(b.src, node)
    if g.begin is None:
        raise JacgraphError(f"{node.op_type} '{node.name}' uses auto_pad={g.auto_pad} on a spatial shape unknown at "
                            "compile time; export with a fixed input size or explicit pads.")
    return g.strides, g.dilations, g.begin, g.end, g.in_spatial, g.out_spatial


def _transpose_windows(b, g, weight, kernel, geometry, group=1, x=None):
    """Transpose of a strided window op (Conv-like, zero padding) as a ConvTranspose landing exactly on x's shape.

    The last window may stop short of x's end (floor) or run past its end pad (ceil_mode): the end pad
    is set to where the last window really ends, and a shortfall becomes output_padding (< stride).
    With spatial shapes unknown at compile time, the end is cut or zero-filled to Shape(x) at run time.
    """
    strides, dilations, begin, end, xs, ys = geometry
    d = len(kernel)
    attrs = dict(kernel_shape=kernel, strides=strides, dilations=dilations, group=group)
    if xs is None or ys is None:
        full = b.ConvTranspose(g, weight, pads=begin + [0] * d, **attrs)
        target = b.shape(x, 2)
        short = b.Max(b.Sub(target, b.shape(full, 2)), b.ints([0] * d))
        filled = b.Pad(full, b.Concat(b.ints([0] * (d + 4)), short, axis=0))
        return b.Slice(filled, b.ints([0] * d), target, b.ints(list(range(2, 2 + d))))
    pads_end, output_padding = [], []
    for i, k in enumerate(kernel):
        reach = (ys[i] - 1) * strides[i] + dilations[i] * (k - 1) + 1 - xs[i] - begin[i]
        pads_end.append(max(reach, 0))
        output_padding.append(max(-reach, 0))
    return b.ConvTranspose(g, weight, pads=begin + pads_end, output_padding=output_padding, **attrs)


def _weight_grad(b, data, cot, kernel, geometry, group, data_channels, cot_channels, like):
    """W̄[m, c, k] = Σ_{n,o} cot[n, m, o]·data_pad[n, g(m)·C/G + c, o·s + k·d]: unfold data, then one Gemm/MatMul.

    The windows of data are unfolded by a Conv with one-hot filters (each channel on its own, as a
    batch of one-channel images), giving [N, G, C/G·taps, L] patches against cot's [N, G, M/G, L].
    (A Conv of data by cot over the batch computes the same thing, but with cot's whole spatial extent as
    its kernel: measured 3-5x slower in onnxruntime on the example architectures.) Returns [M, C/G, *kernel].
    """
    strides, dilations, begin, end = geometry[:4]
    taps = int(np.prod(kernel))
    onehot = b.const(np.eye(taps).reshape([taps, 1] + kernel).astype(b.src.np_dtype(like)), hint="window_taps")
    single = b.Reshape(data, b.Concat(b.ints([-1, 1]), b.shape(data, 2), axis=0))
    windows = b.Conv(single, onehot, kernel_shape=kernel, strides=strides, dilations=dilations, pads=begin + end)
    shape = [cot_channels, data_channels // group] + kernel
    if group == 1 and (b.src.shape(like) or [None])[0] == 1:  # one sample: Gemm reads cot·patchesᵀ as they lie
        patches = b.Reshape(windows, b.ints([data_channels * taps, -1]))
        return b.Reshape(b.Gemm(b.Reshape(cot, b.ints([cot_channels, -1])), patches, transB=1), b.ints(shape))
    # else patches·cotᵀ per sample and group: the transposed operand is cot, 1/taps the size of the patches
    batch = b.shape(data, 0, 1)
    patches = b.Reshape(windows, b.Concat(batch, b.ints([group, data_channels // group * taps, -1]), axis=0))
    cots = b.Reshape(cot, b.Concat(batch, b.ints([group, cot_channels // group, -1]), axis=0))
    per_sample = b.MatMul(patches, b.Transpose(cots, perm=[0, 1, 3, 2]))  # [N, G, C/G·taps, M/G]
    total = b.Transpose(b.reduce("ReduceSum", per_sample, [0], keepdims=0), perm=[0, 2, 1])
    return b.Reshape(total, b.ints(shape))


def _bias_grad(b, node, g):
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None or not need(b, bias):
        return None
    rank = b.src.rank(node.output[0])
    return b.reduce("ReduceSum", g, [0] + list(range(2, rank)), keepdims=0)


def _kernel(b, node):
    attrs = b.src.attrs(node)
    kernel = attrs.get("kernel_shape") or list((b.src.shape(node.input[1]) or [])[2:])
    if not static(kernel) or not kernel:
        raise JacgraphError(f"{node.op_type} '{node.name}': the kernel shape is unknown; give kernel_shape.")
    return list(kernel)


@rule("Conv")
def conv(b, node, g):
    """x̄ = ConvTranspose(ḡ, W) with the output_padding that lands on x's shape; W̄ = conv of x by ḡ; b̄ = Σ ḡ."""
    x, w = node.input[:2]
    kernel, group = _kernel(b, node), b.src.attrs(node)["group"]
    geometry = _geometry(b, node)
    xb = _transpose_windows(b, g, w, kernel, geometry, group, x) if need(b, x) else None
    wb = None
    if need(b, w):
        ws = b.src.shape(w)
        wb = _weight_grad(b, x, g, kernel, geometry, group, ws[1] * group, ws[0], x)
    return [xb, wb, _bias_grad(b, node, g)][:len(node.input)]


def _conv_transpose_adjoint_geometry(b, node):
    """Strides, dilations and the (begin, end) pads of the Conv that maps ConvTranspose's output shape back to its
    input's (its adjoint in x).

    y = ConvTranspose(x) has out = s·(in-1) + output_padding + d·(k-1) + 1 - begin - end cells, with auto_pad and
    output_shape resolved as onnxruntime does (registry.resolve_window); the Conv of ḡ by W lands on in cells when
    its end pad is end - output_padding, which is negative where output_padding (or an output_shape past the full
    size) appends cells no window reaches.
    """
    g = window_geometry(b.src, node)
    if g.begin is None:
        raise JacgraphError(f"ConvTranspose '{node.name}' sets output_shape on an input whose spatial shape is unknown "
                            "at compile time; export with a fixed input size or explicit pads.")
    extra = b.src.attrs(node).get("output_padding") or [0] * len(g.kernel)
    return g.strides, g.dilations, g.begin, [e - p for e, p in zip(g.end, extra)]


@rule("ConvTranspose")
def conv_transpose(b, node, g):
    """x̄ = Conv(ḡ, W) with the same strides, dilations, groups and the pads that land on x (see
    _conv_transpose_adjoint_geometry); W̄ = conv of ḡ by x with the same geometry; b̄ = Σ ḡ."""
    attrs = b.src.attrs(node)
    x, w = node.input[:2]
    kernel, group = _kernel(b, node), attrs["group"]
    d = len(kernel)
    strides, dilations, begin, end = _conv_transpose_adjoint_geometry(b, node)
    pads = begin + [max(e, 0) for e in end]
    # ḡ's cells past every window's reach (no x or W reads them): the Conv's floor drops fewer than a stride of
    # them by itself; more are cut first
    cut = [i for i in range(d) if -end[i] >= strides[i]]
    gc = g
    if cut and (need(b, x) or need(b, w)):
        gc = b.Slice(g, b.ints([0] * len(cut)), b.ints([end[i] for i in cut]), b.ints([2 + i for i in cut]))
    xb = wb = None
    if need(b, x):
        xb = b.Conv(gc, w, kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads, group=group)
    if need(b, w):
        ws = b.src.shape(w)
        wb = _weight_grad(b, gc, x, kernel, (strides, dilations, pads[:d], pads[d:]), group, ws[1] * group, ws[0], x)
    return [xb, wb, _bias_grad(b, node, g)][:len(node.input)]


@rule("BatchNormalization")
def batch_norm(b, node, g, *_):
    """y = γ(x-μ)r + β, r = 1/√(σ²+ε): x̄ = ḡγr, γ̄ = Σḡ(x-μ)r, β̄ = Σḡ, μ̄ = -Σḡγr, σ̄² = -½Σḡγ(x-μ)r³."""
    attrs = b.src.attrs(node)
    if attrs.get("training_mode", 0):
        raise JacgraphError(f"BatchNormalization '{node.name}' is in training mode; export the model in eval() mode.")
    x, scale, bias, mean, var = node.input[:5]
    rank = b.src.rank(x)
    chan = lambda v: b.Unsqueeze(v, b.ints(list(range(1, rank - 1)))) if rank > 2 else v  # noqa: E731  [C] -> [C, 1, ..]
    others = [0] + list(range(2, rank))
    total = lambda v: b.reduce("ReduceSum", v, others, keepdims=0)  # noqa: E731
    r = b.Reciprocal(b.Sqrt(b.Add(var, s(b, attrs["epsilon"], x))))
    centred = b.Sub(x, chan(mean)) if any(need(b, v) for v in (scale, var)) else None
    gr = b.Mul(g, chan(b.Mul(scale, r)))
    outs = [gr if need(b, x) else None,
            total(b.Mul(b.Mul(g, centred), chan(r))) if need(b, scale) else None,
            total(g) if need(b, bias) else None,
            b.Neg(total(gr)) if need(b, mean) else None,
            b.Mul(total(b.Mul(gr, centred)), b.Mul(b.Mul(r, r), s(b, -0.5, x))) if need(b, var) else None]
    return outs


@rule("AveragePool")
def average_pool(b, node, g):
    """x̄ = ConvTranspose of ḡ/D by a window of ones, D the divisor the pool used at each output.

    D comes from the op itself: AveragePool(ones) = n_valid/D, with n_valid the in-bounds window cells
    (counted here), so both count_include_pad settings and ceil_mode follow the runtime's own forward.
    """
    x = node.input[0]
    kernel = list(b.src.attrs(node)["kernel_shape"])
    geometry = _geometry(b, node)
    strides, dilations, begin, _, xs, ys = geometry
    if xs is None or ys is None:
        raise JacgraphError(f"AveragePool '{node.name}': the reverse pass needs static spatial shapes; "
                            "export with a fixed input size.")
    n_valid = np.ones([1, 1])
    for i, k in enumerate(kernel):
        starts = np.arange(ys[i]) * strides[i] - begin[i]
        cells = starts[:, None] + np.arange(k)[None, :] * dilations[i]
        count = ((cells >= 0) & (cells < xs[i])).sum(axis=1)
        n_valid = np.multiply.outer(n_valid, count).reshape([1, 1] + ys[:i + 1])
    dtype = b.src.np_dtype(x)
    ones = b.const(np.ones([1, 1] + xs, dtype), hint="ones")
    pooled_ones = b.op("AveragePool", ones, **b.src.attrs(node))
    inv_divisor = b.Div(pooled_ones, b.const(n_valid.astype(dtype), hint="window_count"))
    flat = b.Reshape(b.Mul(g, inv_divisor), b.ints([-1, 1] + ys))
    window = b.const(np.ones([1, 1] + kernel, dtype), hint="window_ones")
    return [b.Reshape(_transpose_windows(b, flat, window, kernel, geometry), shape_of(b, x))]


@rule("GlobalAveragePool")
def global_average_pool(b, node, g):
    """x̄ = ḡ/(H·W) broadcast over the spatial axes."""
    x = node.input[0]
    xs = b.src.shape(x)
    if static(xs[2:]):
        n = s(b, float(np.prod(xs[2:])), x)
    else:
        n = b.Cast(b.ReduceProd(b.shape(x, 2), keepdims=0), to=b.src.dtype(x))
    return [b.Expand(b.Div(g, n), b.Shape(x))]


@rule("MaxPool")
def max_pool(b, node, g, *_):
    """x̄ = ḡ scatter-added at the argmax MaxPool reports (ties: the first maximum, as the JVP rule).

    onnxruntime's MaxPool with an Indices output runs a generic kernel 8-30x slower than its plain one, so
    large 2-D float32 pools with equal strides and no dilation find the winner without it
    (_max_pool_by_positions); small ones (INDICES_BELOW input elements per window tap), a source that reads the
    Indices anyway, dynamic shapes and the rest scatter at the pool's own Indices.
    """
    x = node.input[0]
    if _max_pool_without_indices(b, node):
        return [_max_pool_by_positions(b, node, g)]
    indices = row_major_argmax(b, node)
    return [scatter_add(b, x, indices, g, unique=window_geometry(b.src, node).disjoint)]


def _max_pool_without_indices(b, node):
    """The cases _max_pool_by_positions takes: 2-D, float32, static [C, H, W] (fewer than 2^24 cells per plane),
    equal strides, no dilation, the window count onnxruntime uses equal to the inferred one, no Indices output in
    the source, and a large pool (the JVP rule then finds the winner without the Indices kernel too)."""
    geometry, x = window_geometry(b.src, node), node.input[0]
    shape = b.src.shape(x) or ()
    if len(geometry.kernel) != 2 or b.src.dtype(x) != onnx.TensorProto.FLOAT or not static(shape[1:]) \
            or geometry.pads is None or geometry.out_spatial is None or geometry.dilations != [1, 1] \
            or geometry.strides[0] != geometry.strides[1] or (len(node.output) > 1 and node.output[1]):
        return False
    per_tap = np.prod(shape[1:]) / np.prod(geometry.kernel)
    overlapping_needs_opset = not geometry.disjoint and b.opset < 16  # ScatterElements' reduction: the other route
    return per_tap >= INDICES_BELOW and np.prod(shape[2:]) < 2 ** 24 and not overlapping_needs_opset \
        and _pool_window_counts(geometry, b.src.attrs(node)) == geometry.out_spatial


def _max_pool_by_positions(b, node, g):
    """x̄ without MaxPool's Indices: the JVP rule of the pool (jacgraph.rules.jvp.max_pool: one-hot phase Convs,
    slices and Equal, the first maximum in row-major window order, which is the index onnxruntime reports) run on a
    constant tangent holding each cell's 1-based flat spatial position (exact in float32 below 2^24 cells; with a
    static batch its Convs on a constant are folded by onnxruntime) gives each window's winning cell; ḡ is
    scatter-added there along the flat spatial axis, into one extra slot 0 that is dropped: a padded cell's
    position. The JVP's choice
    is taken as it is, so the two passes stay each other's transpose, also where an infinite x spoils the JVP's
    one-hot Convs (0·inf = NaN, so no tap equals y there and the JVP falls back to the window's last tap)."""
    x = node.input[0]
    spatial = list(b.src.shape(x)[2:])
    cells, windows = int(np.prod(spatial)), int(np.prod(b.src.shape(node.output[0])[2:]))
    one_based = np.arange(1, cells + 1, dtype=np.float32).reshape([1, 1] + spatial)
    positions = b.Expand(b.const(one_based, hint="cell_positions"), shape_of(b, x))  # x's shape: every JVP route
    winners = b.Cast(JVP["MaxPool"](b, node, positions)[0], to=onnx.TensorProto.INT64)
    flat_g = b.Reshape(g, b.ints([-1, windows]))
    slots = b.ConstantOfShape(b.Concat(b.shape(flat_g, 0, 1), b.ints([cells + 1]), axis=0),
                              value=helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0]))
    reduction = {} if window_geometry(b.src, node).disjoint else {"reduction": "add"}  # slot 0 is dropped
    summed = b.ScatterElements(slots, b.Reshape(winners, b.ints([-1, windows])), flat_g, axis=1, **reduction)
    return b.Reshape(b.Slice(summed, b.ints([1]), b.ints([cells + 1]), b.ints([1])), shape_of(b, x))


@rule("GlobalMaxPool")
def global_max_pool(b, node, g):
    """x̄ = ḡ at the spatial argmax of each channel (ties: the first index), zero elsewhere."""
    x = node.input[0]
    flat_x = b.Reshape(x, b.Concat(b.shape(x, 0, 2), b.ints([-1]), axis=0))
    idx = b.ArgMax(flat_x, axis=2, keepdims=1)
    zeros = b.Mul(flat_x, s(b, 0.0, x))
    picked = b.ScatterElements(zeros, idx, b.Reshape(g, b.Concat(b.shape(x, 0, 2), b.ints([1]), axis=0)), axis=2)
    return [b.Reshape(picked, b.Shape(x))]


@rule(*reductions.REDUCE_OPS)
def reduce(b, node, g, *_):
    """x̄ = w·ḡ over the reduced axes, w = ∂y/∂x as in the JVP rule (jacgraph.rules.reductions); ReduceMax/Min:
    ḡ shared evenly among the positions attaining the extreme (as PyTorch and JAX)."""
    return pad_none([reductions.vjp(b, node, g)], node)


# ---- CPA ops with several inputs -----------------------------------------------------------------

@rule("PRelu")
def prelu(b, node, g):
    """x̄ = ḡ·(x > 0 ? 1 : slope), slopē = Σ ḡ·(x > 0 ? 0 : x); at 0 the slope is `slope` (as the JVP rule)."""
    x, slope = node.input
    positive = b.Greater(x, s(b, 0.0, x))
    ys = out_shape(b, node)
    return [sum_to(b, b.Mul(g, b.Where(positive, s(b, 1.0, x), slope)), ys, x) if need(b, x) else None,
            sum_to(b, b.Where(positive, s(b, 0.0, x), b.Mul(g, x)), ys, slope) if need(b, slope) else None]


@rule("Max", "Min")
def max_min(b, node, g):
    """x̄_w = ḡ for the winning input w, 0 for the others; on ties the first input wins (as the JVP rule)."""
    better = b.Greater if node.op_type == "Max" else b.Less
    best, winner = node.input[0], b.const(np.int64(0))
    for i, x in enumerate(node.input[1:], 1):
        winner = b.Where(better(x, best), b.const(np.int64(i)), winner)
        best = b.Max(best, x) if node.op_type == "Max" else b.Min(best, x)
    ys, zero = out_shape(b, node), s(b, 0.0, node.output[0])
    return [sum_to(b, b.Where(b.Equal(winner, b.const(np.int64(i))), g, zero), ys, x) if need(b, x) else None
            for i, x in enumerate(node.input)]


# ---- smooth ops with a non-symmetric Jacobian ----------------------------------------------------

@rule("LogSoftmax")
def log_softmax(b, node, g):
    """x̄ = ḡ - softmax(x)·Σ_axis ḡ."""
    rank = b.src.rank(node.input[0])
    axis = b.src.attrs(node)["axis"] % rank
    return [b.Sub(g, b.Mul(b.Exp(node.output[0]), b.reduce("ReduceSum", g, [axis], keepdims=1)))]


def _normalize_vjp(b, x, gs, axes, epsilon):
    """x̂ = (x-μ)r over `axes`: x̄ = r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) for ĝ = ḡ·γ; also returns x̂."""
    mean = b.reduce("ReduceMean", x, axes)
    centred = b.Sub(x, mean)
    r = b.Reciprocal(b.Sqrt(b.Add(b.reduce("ReduceMean", b.Mul(centred, centred), axes), s(b, epsilon, x))))
    x_hat = b.Mul(centred, r)
    if gs is None:
        return None, x_hat
    inner = b.Sub(b.Sub(gs, b.reduce("ReduceMean", gs, axes)), b.Mul(x_hat, b.reduce("ReduceMean", b.Mul(gs, x_hat), axes)))
    return b.Mul(inner, r), x_hat


@rule("LayerNormalization")
def layer_norm(b, node, g, *extra):
    """y = γx̂ + β over axes [axis, rank): x̄ as _normalize_vjp with ĝ = ḡγ, γ̄ = Σ ḡx̂, β̄ = Σ ḡ."""
    if any(e is not None for e in extra):
        raise JacgraphError(f"LayerNormalization '{node.name}': its Mean/InvStdDev outputs feed the differentiated "
                            "path; the reverse pass does not support that.")
    attrs = b.src.attrs(node)
    x, scale = node.input[:2]
    rank = b.src.rank(x)
    axes = list(range(attrs["axis"] % rank, rank))
    xb, x_hat = _normalize_vjp(b, x, b.Mul(g, scale) if need(b, x) else None, axes, attrs["epsilon"])
    ys = out_shape(b, node)
    outs = [xb, sum_to(b, b.Mul(g, x_hat), ys, scale) if need(b, scale) else None]
    if len(node.input) > 2:
        outs.append(sum_to(b, g, ys, node.input[2]))
    return outs


@rule("InstanceNormalization")
def instance_norm(b, node, g):
    """Per (sample, channel) over spatial axes: x̄ as _normalize_vjp with ĝ = ḡγ, γ̄ = Σ ḡx̂, β̄ = Σ ḡ."""
    x, scale, bias = node.input
    rank = b.src.rank(x)
    axes = list(range(2, rank))
    gamma = b.Unsqueeze(scale, b.ints(list(range(1, rank - 1))))
    xb, x_hat = _normalize_vjp(b, x, b.Mul(g, gamma) if need(b, x) else None, axes, b.src.attrs(node)["epsilon"])
    others = [0] + axes
    return [xb, b.reduce("ReduceSum", b.Mul(g, x_hat), others, keepdims=0) if need(b, scale) else None,
            b.reduce("ReduceSum", g, others, keepdims=0) if need(b, bias) else None]


@rule("LRN")
def lrn(b, node, g):
    """y = x·d^-β, d = bias + α/n·S(x²), S the channel-window sum: x̄ = ḡ·d^-β - 2αβ/n·x·Sᵀ(ḡ·x·d^(-β-1))."""
    x, y = node.input[0], node.output[0]
    attrs = b.src.attrs(node)
    size, alpha, beta, bias = attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"]
    rank = b.src.rank(x)

    def window_sum(z, before, after):  # Σ over channels [c - before, c + after]
        pads = [0] * 2 * (rank - 1)
        pads[0], pads[rank - 1] = before, after
        pooled = b.AveragePool(b.Unsqueeze(z, b.ints([1])), kernel_shape=[size] + [1] * (rank - 2),
                               pads=pads, count_include_pad=1)
        return b.Mul(b.Squeeze(pooled, b.ints([1])), s(b, float(size), x))

    alpha_n = float(np.float32(alpha) / np.float32(size))  # α/n in float32, as onnxruntime's kernel and the JVP rule
    # S sums [c - (n-1)//2, c + n//2]; its transpose sums [c - n//2, c + (n-1)//2] (they differ for even n)
    d = b.Add(b.Mul(window_sum(b.Mul(x, x), (size - 1) // 2, size // 2), s(b, alpha_n, x)), s(b, bias, x))
    inner = b.Mul(b.Mul(g, x), b.Pow(d, s(b, -beta - 1.0, x)))
    cross = b.Mul(window_sum(inner, size // 2, (size - 1) // 2), b.Mul(x, s(b, 2.0 * alpha_n * beta, x)))
    return [b.Sub(b.Mul(g, b.Pow(d, s(b, -beta, x))), cross)]


@rule("LpNormalization")
def lp_normalization(b, node, g):
    """y = x/n: x̄ = (ḡ - w·Σ_axis y·ḡ)/n, w = ∂n/∂x (the transpose of the JVP rule)."""
    norm, axis, _, w = lp_norm_parts(b, node)
    return [b.Div(b.Sub(g, b.Mul(w, b.reduce("ReduceSum", b.Mul(g, node.output[0]), [axis], keepdims=1))), norm)]


@rule("Where")
def where(b, node, g):
    """ā = where(c, ḡ, 0), b̄ = where(c, 0, ḡ), each summed to its operand's shape."""
    c, a, other = node.input
    ys, zero = out_shape(b, node), s(b, 0.0, node.output[0])
    return [None, sum_to(b, b.Where(c, g, zero), ys, a) if need(b, a) else None,
            sum_to(b, b.Where(c, zero, g), ys, other) if need(b, other) else None]


@rule("Cast")
def cast(b, node, g):
    """x̄ = cast(ḡ) back to x's float type (an integer x gets none)."""
    x = node.input[0]
    return [b.Cast(g, to=b.src.dtype(x)) if need(b, x) else None]


# ---- indexing, scatter and signal ops ----
# The transposes of the flat-position rules in jacgraph.rules.jvp: a gather's transpose scatters
# (adds where positions repeat), a scatter's transpose gathers.

from .jvp import (INDICES_BELOW, _pool_window_counts, explicit_einsum, flat_positions, grid_slopes,  # noqa: E402
                  lp_slope, moved_positions, row_major_argmax, scatter_parts, scatter_where, unpooled_shape)

def _flat(b, v):
    return b.Reshape(v, b.ints([-1]))


@rule("ScatterND", "ScatterElements")
def scatter(b, node, g):
    """none: d̄ = ḡ with the overwritten cells zeroed, ū = ḡ[where]; add: d̄ = ḡ; mul: d̄ = ḡ·R, ū = (ḡ·y)[where]/u;
    max/min: ḡ shared evenly among the tied winners (the transpose of the JVP rule)."""
    data, updates = node.input[0], node.input[2]
    where = scatter_where(b, node)
    reduction, p = scatter_parts(b, node, where)
    G = _flat(b, g)
    if reduction == "none":
        d_bar, u_bar = b.ScatterElements(G, where, b.Mul(b.Gather(G, where), s(b, 0.0, data)), axis=0), b.Gather(G, where)
    elif reduction == "add":
        d_bar, u_bar = G, b.Gather(G, where)
    elif reduction == "mul":
        d_bar, u_bar = b.Mul(G, p["R"]), b.Div(b.Gather(b.Mul(G, p["Y"]), where), p["U"])
    else:
        shared = b.Div(G, p["count"])
        d_bar, u_bar = b.Mul(shared, p["hit_d"]), b.Mul(b.Gather(shared, where), p["hit_u"])
    return [b.Reshape(d_bar, b.Shape(data)) if need(b, data) else None, None,
            b.Reshape(u_bar, b.Shape(updates)) if need(b, updates) else None]


@rule("GatherND")
def gather_nd(b, node, g):
    """x̄ = scatter-add of ḡ at the gathered positions."""
    x = node.input[0]
    where = b.GatherND(flat_positions(b, x), node.input[1], batch_dims=b.src.attrs(node).get("batch_dims", 0))
    return [scatter_add(b, x, where, g), None]


@rule("TopK")
def top_k(b, node, g, *_):
    """x̄ = ḡ scattered to the reported indices (distinct along the axis, so no sums)."""
    x = node.input[0]
    indices = node.output[1] if len(node.output) > 1 and node.output[1] else b.extra_output(node, 1, f"{node.output[0]}_indices")
    where = b.GatherElements(flat_positions(b, x), indices, axis=b.src.attrs(node)["axis"] % b.src.rank(x))
    return [scatter_add(b, x, where, g, unique=True), None]


@rule("Compress")
def compress(b, node, g):
    """x̄ = ḡ scattered back to the kept positions, zero elsewhere."""
    x = node.input[0]
    where = b.Compress(flat_positions(b, x), node.input[1], axis=b.src.attrs(node).get("axis"))
    return [scatter_add(b, x, where, g, unique=True), None]


@rule("CumProd")
def cum_prod(b, node, g):
    """y = cumprod(x): x̄ = cumsum(ḡ·y) in the opposite direction, divided by x (x nonzero)."""
    x, y = node.input[0], node.output[0]
    attrs = b.src.attrs(node)
    summed = b.CumSum(b.Mul(g, y), node.input[1], exclusive=attrs["exclusive"], reverse=1 - attrs["reverse"])
    return [b.Div(summed, x), None]


@rule("LpPool")
def lp_pool(b, node, g):
    """x̄ = |x|^(p-1)·sign(x)·Sᵀ(ḡ·y^(1-p)), Sᵀ the transpose of the window sum (a ConvTranspose by ones)."""
    x, y = node.input[0], node.output[0]
    p = b.src.attrs(node)["p"]
    kernel = list(b.src.attrs(node)["kernel_shape"])
    geometry = _geometry(b, node)
    ys = geometry[5]
    if ys is None:
        raise JacgraphError(f"LpPool '{node.name}': the reverse pass needs static spatial shapes; export with a fixed input size.")
    scaled = b.Reshape(b.Mul(g, b.Pow(y, s(b, float(1 - p), x))), b.ints([-1, 1] + ys))
    window = b.const(np.ones([1, 1] + kernel, b.src.np_dtype(x)), hint="window_ones")
    spread = b.Reshape(_transpose_windows(b, scaled, window, kernel, geometry, x=x), shape_of(b, x))
    return [b.Mul(spread, lp_slope(b, x, p))]


@rule("GlobalLpPool")
def global_lp_pool(b, node, g):
    """x̄ = |x|^(p-1)·sign(x)·ḡ·y^(1-p), broadcast over the spatial axes."""
    x, y = node.input[0], node.output[0]
    p = b.src.attrs(node)["p"]
    return [b.Mul(b.Mul(g, b.Pow(y, s(b, float(1 - p), x))), lp_slope(b, x, p))]


@rule("Col2Im")
def col2im(b, node, g):
    """Col2Im sums blocks into the image; its transpose cuts them out again (Im2Col by a one-hot Conv)."""
    x, image_shape, block_shape = node.input[:3]
    block = b.src.const(block_shape)
    if block is None:
        raise JacgraphError(f"Col2Im '{node.name}': the reverse pass needs a constant block_shape.")
    block = [int(v) for v in block.reshape(-1)]
    attrs = b.src.attrs(node)
    d = len(block)
    taps = int(np.prod(block))
    onehot = b.const(np.eye(taps).reshape([taps, 1] + block).astype(b.src.np_dtype(x)), hint="window_taps")
    single = b.Reshape(g, b.Concat(b.ints([-1, 1]), b.shape(g, 2), axis=0))
    windows = b.Conv(single, onehot, kernel_shape=block, strides=attrs.get("strides") or [1] * d,
                     dilations=attrs.get("dilations") or [1] * d, pads=attrs.get("pads") or [0] * 2 * d)
    return [b.Reshape(windows, shape_of(b, x)), None, None]


def dft_matrix(opset, n, c_in, onesided=0, inverse=0, length=None):
    """The real matrix M [n·c_in, m·2] with DFT(x) = x M along the signal axis, x [.., n, c_in]; read off the op
    itself at compile time (the DFT of each basis vector, onnx's reference evaluator in float64)."""
    from ..reference import reference_session

    basis = np.eye(n * c_in).reshape(n * c_in, n, c_in)
    inputs, inits, attrs = ["x"], [], {"onesided": onesided, "inverse": inverse}
    if length is not None:
        inputs.append("length")
        inits.append(onnx.numpy_helper.from_array(np.asarray(length, np.int64).reshape(()), "length"))
    if opset >= 20:
        inputs += [""] * (2 - len(inputs)) + ["axis"]
        inits.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "axis"))
    else:
        attrs["axis"] = 1
    graph = helper.make_graph([helper.make_node("DFT", inputs, ["y"], **attrs)], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, basis.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 17))])
    return np.asarray(reference_session(model).run(None, {"x": basis})[0]).reshape(n * c_in, -1)


def dft_transpose(b, g, matrix, axis, rank, n, c_in, like):
    """x̄ = ḡ Mᵀ along the signal axis `axis` of a rank-`rank` signal: ḡ [.., m, 2] -> x̄ [.., n, c_in]."""
    perm = [i for i in range(rank - 1) if i != axis] + [axis, rank - 1]  # the signal axis beside the complex one
    moved = b.Transpose(g, perm=perm)
    lead_shape = b.shape(moved, 0, rank - 2)
    rows = b.Reshape(moved, b.Concat(lead_shape, b.ints([-1]), axis=0))
    back = b.MatMul(rows, b.const(matrix.T.copy().astype(b.src.np_dtype(like)), hint="dft_matrix"))
    back = b.Reshape(back, b.Concat(lead_shape, b.ints([n, c_in]), axis=0))
    return b.Transpose(back, perm=[int(i) for i in np.argsort(perm)])


def _constant_input(b, node, i, what):
    if len(node.input) <= i or not node.input[i]:
        return None
    value = b.src.const(node.input[i])
    if value is None:
        raise JacgraphError(f"{node.op_type} '{node.name}': the reverse pass needs a constant {what}.")
    return int(np.asarray(value).reshape(-1)[0])


@rule("DFT")
def dft(b, node, g):
    """The DFT is a real-linear map along its axis: x̄ = ḡ Mᵀ with M read off the op (see dft_matrix)."""
    x = node.input[0]
    xs, attrs = b.src.shape(x), b.src.attrs(node)
    if not static(xs):
        raise JacgraphError(f"DFT '{node.name}': the reverse pass needs a static signal shape.")
    length = _constant_input(b, node, 1, "dft_length")
    axis = _constant_input(b, node, 2, "axis")
    axis = (attrs.get("axis", 1) if axis is None else axis) % len(xs)
    n, c_in = xs[axis], xs[-1]
    matrix = dft_matrix(b.opset, n, c_in, attrs.get("onesided", 0), attrs.get("inverse", 0), length)
    return pad_none([dft_transpose(b, g, matrix, axis, len(xs), n, c_in, x)], node)


@rule("STFT")
def stft(b, node, g):
    """y[b, f] = DFT(w·s[b, f·step : f·step + L]): s̄ = scatter-add over the frames of w·DFTᵀ(ḡ[b, f]),
    w̄ = Σ_{b, f} s-frame·DFTᵀ(ḡ[b, f])."""
    signal = node.input[0]
    window = node.input[2] if len(node.input) > 2 and node.input[2] else None
    ss, ys = b.src.shape(signal), b.src.shape(node.output[0])
    step = _constant_input(b, node, 1, "frame_step")
    if not (static(ss) and static(ys)):
        raise JacgraphError(f"STFT '{node.name}': the reverse pass needs static shapes.")
    batch, length, c_in = ss
    frames = ys[1]
    frame_length = (b.src.shape(window) or [None])[0] if window else _constant_input(b, node, 3, "frame_length")
    index = np.arange(frames)[:, None] * step + np.arange(frame_length)[None, :]  # [frames, L]
    matrix = dft_matrix(b.opset, frame_length, c_in, b.src.attrs(node)["onesided"])
    frames_bar = dft_transpose(b, g, matrix, 2, 4, frame_length, c_in, signal)  # [batch, frames, L, c_in]
    outs = [None] * len(node.input)
    if need(b, signal):
        weighted = frames_bar if window is None else b.Mul(frames_bar, b.Reshape(window, b.ints([1, 1, frame_length, 1])))
        where = (np.arange(batch)[:, None, None, None] * length * c_in + index[None, :, :, None] * c_in
                 + np.arange(c_in)[None, None, None, :])
        outs[0] = scatter_add(b, signal, b.const(where.astype(np.int64), hint="frame_positions"), weighted)
    if window is not None and need(b, window):
        cut = b.Gather(signal, b.const(index.astype(np.int64), hint="frame_index"), axis=1)  # [batch, frames, L, c_in]
        outs[2] = b.reduce("ReduceSum", b.Mul(frames_bar, cut), [0, 1, 3], keepdims=0)
    return outs


@rule("MaxUnpool")
def max_unpool(b, node, g):
    """x̄ = ḡ at the flat indices I."""
    x = node.input[0]
    shape = unpooled_shape(b, node)
    if len(node.input) > 2 and node.input[2]:  # the corner output_shape padded
        g = b.Slice(g, b.ints([0] * len(shape)), b.ints(shape))
    picked = b.Gather(_flat(b, g), b.Reshape(node.input[1], b.ints([-1])))
    return pad_none([b.Reshape(picked, b.Shape(x))], node)


@rule("ReverseSequence", "DepthToSpace", "SpaceToDepth")
def permute_elements(b, node, g):
    """x̄ = ḡ moved back to the positions the op took each element from (distinct, so no sums)."""
    return pad_none([scatter_add(b, node.input[0], moved_positions(b, node), g, unique=True)], node)


@rule("TensorScatter")
def tensor_scatter(b, node, g):
    """c̄ = ḡ with the written cells zeroed; ū = ḡ at the cells each update element was written to."""
    cache, update = node.input[0], node.input[1]
    rest, attrs = node.input[2:], b.src.attrs(node)
    zeros = b.Mul(update, s(b, 0.0, update)) if b.src.is_float(update) else None
    cache_bar = b.op("TensorScatter", g, zeros, *rest, **attrs) if need(b, cache) else None
    update_bar = None
    if need(b, update):  # which update element landed in each cell (-1: none), then ḡ moved to those elements
        unset = b.ConstantOfShape(b.Shape(cache), value=helper.make_tensor("value", onnx.TensorProto.INT64, [1], [-1]))
        source = _flat(b, b.op("TensorScatter", unset, flat_positions(b, update), *rest, **attrs))
        size = b.Size(update)
        slot = b.Where(b.Less(source, b.const(np.int64(0))), size, source)  # unwritten cells go to a spare slot
        spare = b.ConstantOfShape(b.Reshape(b.Add(size, b.const(np.int64(1))), b.ints([1])),
                                  value=helper.make_tensor("value", b.src.dtype(update), [1], [0]))
        moved = b.ScatterElements(spare, slot, _flat(b, g), axis=0)
        update_bar = b.Reshape(b.Slice(moved, b.ints([0]), b.Reshape(size, b.ints([1]))), b.Shape(update))
    return pad_none([cache_bar, update_bar], node)


@rule("DequantizeLinear")
def dequantize_linear(b, node, g):
    """s̄ = Σ ḡ·(x - zero_point) over the elements each scale entry multiplies (all, per axis, or per block)."""
    x, scale = node.input[0], node.input[1]
    if not need(b, scale):
        return pad_none([], node)
    attrs, rank = b.src.attrs(node), b.src.rank(x)
    ones = b.Add(b.Mul(scale, s(b, 0.0, scale)), s(b, 1.0, scale))
    spread = b.Mul(g, b.op("DequantizeLinear", x, ones, *node.input[2:], **attrs))  # ḡ·(x - zero_point)
    scale_rank, axis, block = b.src.rank(scale), attrs.get("axis", 1) % max(rank, 1), attrs.get("block_size", 0)
    if scale_rank == 0 or (scale_rank == 1 and b.src.shape(scale)[0] == 1 and not block):
        return pad_none([None, b.Reshape(b.ReduceSum(spread, keepdims=0), b.Shape(scale))], node)
    if not block:
        return pad_none([None, b.reduce("ReduceSum", spread, [i for i in range(rank) if i != axis], keepdims=0)], node)
    xs = b.src.shape(x)
    if not static(xs) or xs[axis] % block:
        raise JacgraphError(f"DequantizeLinear '{node.name}': the reverse pass needs a static shape whose blocked axis "
                            "the block size divides.")
    split = list(xs[:axis]) + [xs[axis] // block, block] + list(xs[axis + 1:])
    return pad_none([None, b.reduce("ReduceSum", b.Reshape(spread, b.ints(split)), [axis + 1], keepdims=0)], node)


@rule("GridSample")
def grid_sample(b, node, g):
    """x̄ = ḡ through the transpose of each sample's sampling matrix, read off the op applied to the pixel basis
    ([N, H·W, H, W] images: memory H·W times the output's, for small images); ḡrid_d = Σ_channels ḡ·∂y/∂grid_d."""
    x, grid = node.input[0], node.input[1]
    xs, ys, attrs = b.src.shape(x), b.src.shape(node.output[0]), b.src.attrs(node)
    outs = [None, None]
    if need(b, x):
        if not (static(xs) and static(ys)):
            raise JacgraphError(f"GridSample '{node.name}': the reverse pass needs static shapes.")
        pixels, samples = int(np.prod(xs[2:])), int(np.prod(ys[2:]))
        basis = b.const(np.eye(pixels).reshape([1, pixels] + list(xs[2:])).astype(b.src.np_dtype(x)), hint="pixel_basis")
        basis = b.Expand(basis, b.ints([xs[0], pixels] + list(xs[2:])))
        sampled = b.Reshape(b.op("GridSample", basis, grid, **attrs), b.ints([xs[0], pixels, samples]))  # [N, P, Q]
        flat_g = b.Reshape(g, b.ints([xs[0], xs[1], samples]))
        outs[0] = b.Reshape(b.MatMul(flat_g, b.Transpose(sampled, perm=[0, 2, 1])), b.ints(xs))
    if need(b, grid) and attrs.get("mode") != "nearest":
        parts = [b.ReduceSum(b.Mul(g, slope), b.ints([1]), keepdims=0) for slope in grid_slopes(b, node)]
        outs[1] = b.Concat(*[b.Unsqueeze(p, b.ints([-1])) for p in parts], axis=-1)
    return outs
