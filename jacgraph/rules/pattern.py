"""The structural sparsity rule table: rule(ctx, node, ids) -> one connectivity per output (None: no entry).

`ids` holds, for each input of the node, an int64 array shaped like it: 1 + the element's index among the
node's stacked x-dependent inputs, 0 where the input does not depend on x. A rule returns, per output,
the pairs (rows, cols) = (output element, stacked input element it depends on), or a `Chain` of sparse
factors whose product is that connectivity. Rules look only at shapes and constants (through `ctx`),
never at x's values, so the pattern holds for every x and every weight value: a ReLU or a max-pool keeps
every entry its window could have. Index-moving ops are traced by running the op itself on the ids.
The interpreters that propagate these connectivities through a graph are in jacgraph.sparsity.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from onnx import helper

from ..errors import JacgraphError
from .jvp import reduce_axes
from .reductions import REDUCE_OPS
from .registry import ZERO_DERIVATIVE_OPS, RuleTable, resolve_window, window_geometry


def run_node(src, node, feeds):
    """Run one node in onnx's reference evaluator (works on int64 index tensors, which is how index-moving
    ops are traced here)."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(node, opsets={"": src.opset})
    return ev.run(None, {k: np.asarray(v) for k, v in feeds.items()})


def from_ids(out_size, *id_arrays):
    """Connectivity from id arrays shaped like the output: element e reads stacked input ids[e] - 1 (0: none)."""
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for ids in id_arrays:
        flat = np.asarray(ids, np.int64).reshape(-1)
        assert flat.size == out_size, "an id array must cover the output"
        keep = flat > 0
        rows.append(np.nonzero(keep)[0])
        cols.append(flat[keep] - 1)
    return np.concatenate(rows), np.concatenate(cols)


PATTERN = RuleTable("PATTERN", "the Jacobian sparsity pass", family=lambda op, slope: elementwise)


rule = PATTERN.register


@rule(*ZERO_DERIVATIVE_OPS)
def zero(ctx, node, ids):
    """Integer, boolean or piecewise-constant outputs: no entry of J."""
    return [None] * len(node.output)


def _float_out(ctx, node, out_ids):
    return [(from_ids(ctx.size(o), ids) if ctx.src.is_float(o) else None) if o else None
            for o, ids in zip(node.output, out_ids)]


@rule("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather",
      "GatherElements", "Pad", "Expand", "Tile", "Trilu", "DepthToSpace", "SpaceToDepth")
def index_moving(ctx, node, ids):
    """y[e] = x[π(e)] (or 0): trace π by running the op itself on int64 ids (0 = no source, so Pad fills 0)."""
    feeds = {}
    for k, name in enumerate(node.input):
        if not name:
            continue
        if ctx.src.is_float(name):
            feeds[name] = ids[k]
        else:
            feeds[name] = ctx.value(name)
    if node.op_type == "Pad" and len(node.input) > 2 and node.input[2]:
        feeds[node.input[2]] = np.array(0, np.int64)
    return _float_out(ctx, node, run_node(ctx.src, node, feeds))


@rule("Dropout")
def dropout(ctx, node, ids):
    """Inference dropout: y = x."""
    return [from_ids(ctx.size(node.output[0]), ids[0])] + [None] * (len(node.output) - 1)


def broadcast_ids(ctx, ids, names, out):
    """Each operand's ids broadcast to the output shape (numpy rules, as ONNX)."""
    shape = ctx.shape(out)
    return [np.broadcast_to(i, shape) for i, n in zip(ids, names) if n and ctx.src.is_float(n)]


@rule("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "PRelu", "Neg", "Relu", "LeakyRelu",
      "Clip", "HardSigmoid", "Abs", "Cast")
def elementwise(ctx, node, ids):
    """y[e] = f(x1[e], x2[e], ...) with broadcasting: y[e] depends on each operand's element at e
    (also the rule of every op of the elementwise family, jacgraph.rules.slopes)."""
    y = node.output[0]
    if not ctx.src.is_float(y):
        return [None]
    return [from_ids(ctx.size(y), *broadcast_ids(ctx, ids, node.input, y))]


@rule("Where")
def where(ctx, node, ids):
    """y = where(c, a, b): y[e] depends on a[e] and b[e] (c has no derivative)."""
    y = node.output[0]
    return [from_ids(ctx.size(y), *broadcast_ids(ctx, ids[1:], node.input[1:], y))]


@rule("BatchNormalization")
def per_channel(ctx, node, ids):
    """Inference BN is affine per element of x (scale, bias, mean, var constant)."""
    _constant_params(ctx, node, node.input[1:])
    return [from_ids(ctx.size(node.output[0]), ids[0])] + [None] * (len(node.output) - 1)


def _constant_params(ctx, node, names):
    bad = [n for n in names if n and n in ctx.depends]
    if bad:
        raise JacgraphError(f"{node.op_type} '{node.name}': its parameter(s) {', '.join(bad)} depend on x; the "
                            "Jacobian pass supports x-dependent data inputs only.")


def group_of(shape, axes):
    """For each element of a tensor of `shape`, its index in the tensor reduced over `axes` (keepdims)."""
    kept = [1 if a in axes else d for a, d in enumerate(shape)]
    return np.broadcast_to(np.arange(int(np.prod(kept))).reshape(kept), shape).reshape(-1)


def reduce_connect(in_shape, axes, ids):
    """Reduced element g reads every input element of its group."""
    groups = group_of(in_shape, axes)
    flat = np.asarray(ids).reshape(-1)
    keep = flat > 0
    return groups[keep], flat[keep] - 1


@rule(*REDUCE_OPS)
def reduce(ctx, node, ids):
    """y[g] depends on every element of x reduced into g."""
    shape = ctx.shape(node.input[0])
    axes = reduce_axes(ctx, node, len(shape))
    if axes == []:
        return [from_ids(ctx.size(node.output[0]), ids[0])]
    return [reduce_connect(shape, range(len(shape)) if axes is None else axes, ids[0])]


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(ctx, node, ids):
    """y[n, c] depends on all of x[n, c, ...]."""
    shape = ctx.shape(node.input[0])
    return [reduce_connect(shape, range(2, len(shape)), ids[0])]


def _within_groups(ctx, node, shape, axes, ids):
    """y[e] depends on every element of e's group (softmax, normalisation): C = Gᵀ G."""
    groups = group_of(shape, axes)
    flat = np.asarray(ids).reshape(-1)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    member = sp.csr_matrix((np.ones(flat.size, np.float32), (groups, np.arange(flat.size))),
                           shape=(n_groups, flat.size))
    rows, cols = (member.T @ member).nonzero()
    keep = flat[cols] > 0
    return rows[keep], flat[cols[keep]] - 1


@rule("Softmax", "LogSoftmax", "LpNormalization")
def softmax(ctx, node, ids):
    """y[e] depends on every element of x along the softmax (normalisation) axis through e."""
    shape = ctx.shape(node.input[0])
    axis = ctx.src.attrs(node)["axis"] % len(shape)
    return [_within_groups(ctx, node, shape, [axis], ids[0])]


@rule("LayerNormalization")
def layer_norm(ctx, node, ids):
    """y[e] depends on every element of x in e's normalised group (axis..end)."""
    _constant_params(ctx, node, node.input[1:])
    shape = ctx.shape(node.input[0])
    axis = ctx.src.attrs(node)["axis"] % len(shape)
    return [_within_groups(ctx, node, shape, range(axis, len(shape)), ids[0])] + [None] * (len(node.output) - 1)


@rule("InstanceNormalization")
def instance_norm(ctx, node, ids):
    """y[n, c, ...] depends on every element of x[n, c, ...]."""
    _constant_params(ctx, node, node.input[1:])
    shape = ctx.shape(node.input[0])
    return [_within_groups(ctx, node, shape, range(2, len(shape)), ids[0])]


@rule("CumSum")
def cumsum(ctx, node, ids):
    """y[.., k, ..] depends on x[.., l, ..] for l <= k (l >= k reversed; strict when exclusive)."""
    attrs = ctx.src.attrs(node)
    axis = int(np.asarray(ctx.value(node.input[1])).reshape(-1)[0]) % len(ctx.shape(node.input[0]))
    x = np.moveaxis(ids[0], axis, -1)
    L = x.shape[-1]
    out = np.moveaxis(np.arange(ctx.size(node.output[0])).reshape(ctx.shape(node.output[0])), axis, -1)
    k, l = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    take = (l >= k) if attrs["reverse"] else (l <= k)
    if attrs["exclusive"]:
        take &= l != k
    k, l = k[take], l[take]
    rows, cols = out[..., k].reshape(-1), x[..., l].reshape(-1)
    keep = cols > 0
    return [(rows[keep], cols[keep] - 1)]


def _matmul_connect(out_shape, a_ids, b_ids):
    """y[..., i, j] = Σ_k a[..., i, k] b[..., k, j]: dense over the contracted axis k (numpy matmul shapes)."""
    a1, b1 = a_ids.ndim == 1, b_ids.ndim == 1
    a = a_ids[None, :] if a1 else a_ids
    b = b_ids[:, None] if b1 else b_ids
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    out = np.arange(int(np.prod(out_shape, dtype=np.int64))).reshape(batch + (M, N))
    rows = np.broadcast_to(out[..., :, :, None], batch + (M, N, K))
    from_a = np.broadcast_to(np.broadcast_to(a, batch + (M, K))[..., :, None, :], batch + (M, N, K))
    from_b = np.broadcast_to(np.swapaxes(np.broadcast_to(b, batch + (K, N)), -1, -2)[..., None, :, :],
                             batch + (M, N, K))
    rows = np.concatenate([rows.reshape(-1), rows.reshape(-1)])
    cols = np.concatenate([from_a.reshape(-1), from_b.reshape(-1)])
    keep = cols > 0
    return rows[keep], cols[keep] - 1


@rule("MatMul")
def matmul(ctx, node, ids):
    """y = a @ b: y[..., i, j] depends on row i of a and column j of b."""
    return [_matmul_connect(ctx.shape(node.output[0]), ids[0], ids[1])]


@rule("Gemm")
def gemm(ctx, node, ids):
    """y = α op(A) op(B) + β C: rows of A, columns of B, and C broadcast."""
    attrs = ctx.src.attrs(node)
    a = ids[0].T if attrs["transA"] else ids[0]
    b = ids[1].T if attrs["transB"] else ids[1]
    rows, cols = _matmul_connect(ctx.shape(node.output[0]), a, b)
    if len(node.input) > 2 and node.input[2]:
        extra_rows, extra_cols = from_ids(ctx.size(node.output[0]), np.broadcast_to(ids[2], ctx.shape(node.output[0])))
        rows, cols = np.concatenate([rows, extra_rows]), np.concatenate([cols, extra_cols])
    return [(rows, cols)]


def window_connect(in_shape, out_shape, kernel, strides, dilations, pb, groups, ids, transpose=False):
    """Sliding windows on (N, C, *spatial): y[n, co, o] reads x[n, ci, o·s - p + k·d] for every kernel offset
    k and every ci in co's channel group (the transposed relation for ConvTranspose)."""
    N, spatial_in, spatial_out = in_shape[0], in_shape[2:], out_shape[2:]
    src_sp, dst_sp = (spatial_out, spatial_in) if transpose else (spatial_in, spatial_out)
    # per axis: for each (dst position, kernel offset) the src position, or -1 outside
    per_axis = []
    for a, (k, s, d, p) in enumerate(zip(kernel, strides, dilations, pb)):
        # conv: input = out·s - p + k·d; transposed: output = in·s - p + k·d (dst is then the input)
        pos = np.arange(dst_sp[a])[:, None] * s - p + np.arange(k)[None, :] * d
        per_axis.append(np.where((pos >= 0) & (pos < src_sp[a]), pos, -1))
    # combine axes: dst flat index x kernel flat index -> src flat index
    grids_dst = np.indices(dst_sp).reshape(len(dst_sp), -1)
    grids_k = np.indices(kernel).reshape(len(kernel), -1)
    src_flat = np.zeros((grids_dst.shape[1], grids_k.shape[1]), np.int64)
    valid = np.ones_like(src_flat, bool)
    for a in range(len(kernel)):
        pos = per_axis[a][grids_dst[a][:, None], grids_k[a][None, :]]
        valid &= pos >= 0
        src_flat = src_flat * src_sp[a] + np.where(pos >= 0, pos, 0)
    d_idx, s_idx = np.nonzero(valid)[0], src_flat[valid]
    # C[(n, co, o), (n, ci, i)] = same_group(co, ci) · window(o, i), kept factored as (broadcast to the
    # group's output channels) · (window, per group) · (sum over the group's input channels): the
    # product has C's pattern, but the factors stay small where C (C_out · C_in · window entries) would not.
    C_out, C_in = out_shape[1], in_shape[1]
    n_sp_in, n_sp_out = int(np.prod(spatial_in)), int(np.prod(spatial_out))
    rows, cols = (s_idx, d_idx) if transpose else (d_idx, s_idx)
    window = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_sp_out, n_sp_in))
    per_group = sp.kron(sp.identity(N * groups, dtype=np.float32, format="csr"), window, format="csr")
    n, c, o = np.indices((N, C_out, n_sp_out)).reshape(3, -1)
    broadcast = sp.csr_matrix((np.ones(n.size, np.float32), (np.arange(n.size), (n * groups + c // (C_out // groups))
                                                               * n_sp_out + o)), shape=(n.size, N * groups * n_sp_out))
    n, c, i = np.indices((N, C_in, n_sp_in)).reshape(3, -1)
    flat = np.asarray(ids).reshape(-1)
    keep = flat > 0
    group_rows = ((n * groups + c // (C_in // groups)) * n_sp_in + i)[keep]
    gather = sp.csr_matrix((np.ones(group_rows.size, np.float32), (group_rows, flat[keep] - 1)),
                           shape=(N * groups * n_sp_in, int(flat.max(initial=0))))
    return Chain([broadcast, per_group, gather])


class Chain(list):
    """A connectivity kept as a product of factors, C = F[0] @ F[1] @ ..., the last on the stacked inputs."""


@rule("Conv", "ConvTranspose")
def conv(ctx, node, ids):
    """Receptive fields: y[n, co, o] depends on x in the kernel window at o, over co's channel group
    (weights taken as dense: the pattern holds for every weight value)."""
    _constant_params(ctx, node, node.input[1:])
    attrs = ctx.src.attrs(node)
    in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    w_shape = ctx.shape(node.input[1])
    r = len(in_shape) - 2
    kernel = attrs.get("kernel_shape") or list(w_shape[2:])
    strides, dilations = attrs.get("strides") or [1] * r, attrs.get("dilations") or [1] * r
    transpose = node.op_type == "ConvTranspose"
    if transpose:
        window_geometry(ctx.src, node)  # refuses a declared output size onnxruntime would not compute
    pb = resolve_window(attrs, kernel, in_shape[2:], out_shape[2:], transpose).begin
    return [window_connect(in_shape, out_shape, kernel, strides, dilations, pb, attrs.get("group", 1), ids[0],
                           transpose)]


@rule("MaxPool", "AveragePool", "LpPool")
def pool(ctx, node, ids):
    """y[n, c, o] depends on x[n, c, window(o)] (max-pool: every element its window could pick). MaxPool's
    storage_order only numbers its integer Indices output (no pattern), so it changes nothing here."""
    attrs = ctx.src.attrs(node)
    in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    kernel = attrs["kernel_shape"]
    r = len(kernel)
    strides, dilations = attrs.get("strides") or [1] * r, attrs.get("dilations") or [1] * r
    pb = resolve_window(attrs, kernel, in_shape[2:], out_shape[2:]).begin
    return [window_connect(in_shape, out_shape, kernel, strides, dilations, pb, in_shape[1], ids[0])] + \
        [None] * (len(node.output) - 1)


@rule("Resize", "Upsample")
def resize(ctx, node, ids):
    """Separable and linear in x for fixed scales: y[o] depends on x[i] iff every axis' 1-D weight
    w_a(o_a, i_a) is nonzero. The weights are the op's own, read off by resizing an identity matrix along
    that axis (the other axis kept at scale 1, where every mode is the identity); they never depend on x."""
    attrs = ctx.src.attrs(node)
    in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise JacgraphError(f"Resize '{node.name}' uses tf_crop_and_resize, which the Jacobian pass does not "
                            "support; re-export with another coordinate_transformation_mode.")
    keep = {k: v for k, v in attrs.items() if k in ("mode", "coordinate_transformation_mode", "nearest_mode",
                                                    "cubic_coeff_a", "exclude_outside", "antialias")}
    scales = None
    if node.op_type == "Resize" and len(node.input) > 2 and node.input[2]:
        scales = np.asarray(ctx.value(node.input[2]), np.float64).reshape(-1)
    elif node.op_type == "Upsample":
        scales = np.asarray(ctx.value(node.input[1]), np.float64).reshape(-1)
    if scales is not None and scales.size and attrs.get("axes"):  # opset 18: scales for the listed axes only
        full = np.ones(len(in_shape))
        full[[a % len(in_shape) for a in attrs["axes"]]] = scales
        scales = full
    per_axis = []
    for a, (d_in, d_out) in enumerate(zip(in_shape, out_shape)):
        if scales is not None and scales.size:
            extra = {"scales": np.array([1.0, scales[a]], np.float32)}
            inputs = ["X", "", "scales"]
        else:
            extra = {"sizes": np.array([d_in, d_out], np.int64)}
            inputs = ["X", "", "", "sizes"]
        probe = helper.make_node("Resize", inputs, ["Y"], **keep)
        W = run_node(ctx.src, probe, {"X": np.eye(d_in), **extra})[0]  # [d_in, d_out]: W[i, o] = w_a(o, i)
        if W.shape != (d_in, d_out):
            raise JacgraphError(f"Resize '{node.name}': could not reproduce its axis-{a} sampling "
                                f"({W.shape} instead of {(d_in, d_out)}).")
        per_axis.append(sp.csr_matrix(W.T != 0))  # [d_out, d_in]
    C = per_axis[0]
    for W in per_axis[1:]:
        C = sp.kron(C, W, format="csr")
    C = C.tocoo()
    flat = np.asarray(ids[0]).reshape(-1)[C.col]
    keep_entries = flat > 0
    return [(C.row[keep_entries], flat[keep_entries] - 1)]


@rule("LRN")
def lrn(ctx, node, ids):
    """y[n, c, ...] depends on x[n, c', ...] for c' in the channel window [c - (size-1)//2, c + size//2]."""
    size = ctx.src.attrs(node)["size"]
    shape = ctx.shape(node.input[0])
    x = np.moveaxis(ids[0], 1, -1)
    out = np.moveaxis(np.arange(ctx.size(node.output[0])).reshape(shape), 1, -1)
    C = shape[1]
    rows, cols = [], []
    for shift in range(-((size - 1) // 2), size // 2 + 1):
        c = np.arange(C)
        ok = (c + shift >= 0) & (c + shift < C)
        rows.append(out[..., c[ok]].reshape(-1))
        cols.append(x[..., c[ok] + shift].reshape(-1))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = cols > 0
    return [(rows[keep], cols[keep] - 1)]
