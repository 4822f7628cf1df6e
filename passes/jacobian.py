"""Whole Jacobians from few probes: structural sparsity, colouring, and x -> (y, J) in one graph.

1. `sparsity(model)`: the pattern of J(x), a boolean scipy.sparse matrix (rows: every element of every
   float output, in output order; columns: the elements of x), derived symbolically. One rule per op
   (table PATTERN) gives a connectivity matrix C from the node's output elements to its inputs'
   elements (index-moving ops are traced by running the op itself on integer ids). Forward:
   D_out = C @ D_in, D_v saying which elements of x each element of v depends on; reverse:
   R_in += Cᵀ @ R_out, which output elements depend on each element of v. The pass runs the narrower
   one (reverse when J has fewer rows than columns). The pattern holds for every x: rules never look
   at x (a ReLU or a max-pool keeps every entry its window could have), only at shapes and constants.
2. `colouring(P)`: columns that share no row get one colour; one JVP probe per colour then measures
   them all at once. The structured colouring by (index mod R) on every axis of x, with R one more
   than the widest spread of a row along that axis (optimal for convolution/pooling chains: the
   receptive-field windows are cliques), then, unless it already meets the clique bound (the longest
   row), networkx greedy 'largest_first' on the column-intersection graph, or a direct distance-2
   greedy on the pattern when that graph is too large. The fewest wins. `row_colouring` colours Jᵀ.
3. `build(model)`: probes, then in-graph decompression (J[i, j] read from the one probe that holds it,
   0 off the pattern). Columns: the source's multi-tangent JVP with K = column colours and the seed
   matrix as a constant tangent. Rows (when 4·row colours < column colours, or probes="rows"): the
   primal once and an ONNX Loop over row colours running the VJP's reverse sweep. Outputs: the source
   outputs, then `<y>_jac` with shape y.shape + x.shape (jacfwd's layout), or with sparse=True
   `<y>_jac_values` [nnz] and `<y>_jac_indices` [nnz, 2] (row in y.ravel(), column in x.ravel()).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper, numpy_helper

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, load, unsupported_error
from jacgraph.rules.jvp import reduce_axes

GRAPH_EDGE_LIMIT = 4_000_000  # above this many column-pair products, skip networkx and colour the pattern directly
NNZ_LIMIT = 60_000_000  # entries of one dependency matrix (~0.5 GB in CSR) before the pass gives up with an error


# ---- source model with a fixed input shape --------------------------------------------------------

def fixed_source(model, inputs=None, input_shape=None):
    """(SourceModel with static input shapes, name of x). Symbolic dims become 1 unless input_shape says."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    wrt = src.check_inputs(inputs if inputs else src.float_inputs())
    if len(wrt) != 1:
        raise JacgraphError(f"the model has {len(wrt)} float inputs ({', '.join(wrt)}); a Jacobian is taken with "
                            "respect to one. Choose it with --inputs NAME (inputs=[NAME]).")
    x = wrt[0]
    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    for inp in proto.graph.input:
        if inp.name in src.initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name == x and input_shape is not None:
            if len(input_shape) != len(dims) or any(d.HasField("dim_value") and d.dim_value != s
                                                    for d, s in zip(dims, input_shape)):
                declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                raise JacgraphError(f"x has shape {list(input_shape)} but the model's input '{x}' is declared "
                                    f"{declared}. Give an x of the declared shape (symbolic dims may take any size).")
            for d, s in zip(dims, input_shape):
                d.Clear()
                d.dim_value = int(s)
        for d in dims:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    del proto.graph.value_info[:]
    fixed = _fold_constants(SourceModel(proto))
    for name in _active_values(fixed, x):
        shape = fixed.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise JacgraphError(f"the shape of '{name}' is not static after fixing the input shape to "
                                f"{list(fixed.shape(x))}; the Jacobian pass needs static shapes. Re-export the "
                                "model with static shapes (no data-dependent reshapes).")
    return fixed, x


def _fold_constants(src: SourceModel) -> SourceModel:
    """Replace every node whose value is fixed once the input shapes are (shape arithmetic, constant
    subgraphs such as exported F.pad's pads) by an initializer, so shape inference sees static shapes."""
    values = {name: src.const(name) for name in src.initializers}
    keep, outputs = [], {o.name for o in src.outputs}
    for node in src.nodes:
        shape = src.shape(node.input[0]) if node.input and node.op_type in ("Shape", "Size") else None
        static = shape is not None and all(isinstance(d, int) for d in shape)
        if node.op_type == "Shape" and static:
            attrs = src.attrs(node)
            outs = [np.array(shape[attrs.get("start", 0):attrs.get("end")], np.int64)]
        elif node.op_type == "Size" and static:
            outs = [np.array(int(np.prod(shape)), np.int64)]
        elif node.op_type == "Constant" or (node.input and all(not i or i in values for i in node.input)
                                            and node.domain in ("", "ai.onnx") and "Random" not in node.op_type):
            try:
                outs = run_node(src, node, {i: values[i] for i in node.input if i})
            except Exception:  # an op the reference evaluator cannot run stays in the graph, unfolded
                keep.append(node)
                continue
        else:
            keep.append(node)
            continue
        if any(o in outputs for o in node.output):
            keep.append(node)
            continue
        values.update((o, np.asarray(v)) for o, v in zip(node.output, outs) if o)
    if len(keep) == len(src.nodes):
        return src
    used = {i for node in keep for i in node.input} | outputs
    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    del proto.graph.node[:], proto.graph.initializer[:], proto.graph.value_info[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items() if name in used)
    for inp in [i for i in proto.graph.input if i.name in src.initializers and i.name not in used]:
        proto.graph.input.remove(inp)
    return SourceModel(proto)


def _active_values(src, x):
    names = [x]
    for node in src.active_nodes([x]):
        names += [o for o in node.output if o and src.is_float(o)]
    return names


# ---- the pattern pass ----------------------------------------------------------------------------

class Context:
    """What pattern rules read: static shapes and the values of x-independent (integer) inputs."""

    def __init__(self, src: SourceModel, x: str):
        self.src, self.x = src, x
        self.depends = set(_active_values(src, x)) | {o for n in src.active_nodes([x]) for o in n.output}
        self._values = {}

    def shape(self, name):
        return tuple(self.src.shape(name))

    def size(self, name):
        return int(np.prod(self.shape(name), dtype=np.int64))

    def value(self, name):
        """Value of a tensor that does not depend on x's values (constants, shape arithmetic)."""
        if name in self._values:
            return self._values[name]
        value = self.src.const(name)
        if value is None:
            node = self.src.producer.get(name)
            if node is None:
                raise JacgraphError(f"'{name}' is a model input that a shape or index computation needs; the "
                                    "Jacobian pass needs it to be a constant (an initializer).")
            if node.op_type == "Shape":
                attrs = self.src.attrs(node)
                value = np.array(self.shape(node.input[0])[attrs.get("start", 0):attrs.get("end")], np.int64)
            elif node.op_type == "Size":
                value = np.array(self.size(node.input[0]), np.int64)
            elif node.input and any(i in self.depends and self.src.is_float(i) for i in node.input if i):
                raise JacgraphError(f"'{name}' (from {node.op_type} '{node.name}') is computed from x's values and "
                                    "used as an index or shape, so the sparsity of the Jacobian depends on x; the "
                                    "Jacobian pass supports only structure fixed by the graph.")
            else:
                outs = run_node(self.src, node, {i: self.value(i) for i in node.input if i})
                self._values.update(zip(node.output, outs))
                value = self._values[name]
        self._values[name] = value
        return value


def run_node(src, node, feeds):
    """Run one node in onnx's reference evaluator (works on int64 index tensors, which is how index-moving
    ops are traced here)."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(node, opsets={"": src.opset})
    return ev.run(None, {k: np.asarray(v) for k, v in feeds.items()})


def _binary(m):
    """Keep the pattern only: products count paths, and counts never cancel."""
    m = sp.csr_matrix(m)
    m.data = np.ones_like(m.data, dtype=np.float32)
    return m


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


PATTERN: dict = {}


def rule(*op_types):
    def register(fn):
        for op in op_types:
            PATTERN[op] = fn
        return fn
    return register


@rule("Shape", "Size", "Constant", "ConstantOfShape", "Range", "Equal", "Less", "Greater", "LessOrEqual",
      "GreaterOrEqual", "Not", "And", "Or", "Xor", "ArgMax", "ArgMin", "NonZero", "EyeLike", "Sign", "Floor",
      "Ceil", "Round", "IsNaN", "IsInf")
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


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Neg", "Relu", "LeakyRelu",
      "Clip", "HardSigmoid", "Abs", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Sin", "Cos",
      "Softplus", "Softsign", "Elu", "Selu", "HardSwish", "Gelu", "Cast")
def elementwise(ctx, node, ids):
    """y[e] = f(x1[e], x2[e], ...) with broadcasting: y[e] depends on each operand's element at e."""
    y = node.output[0]
    if not ctx.src.is_float(y):
        return [None]
    return [from_ids(ctx.size(y), *broadcast_ids(ctx, ids, node.input, y))]


@rule("Where")
def where(ctx, node, ids):
    """y = where(c, a, b): y[e] depends on a[e] and b[e] (c has no derivative)."""
    y = node.output[0]
    return [from_ids(ctx.size(y), *broadcast_ids(ctx, ids[1:], node.input[1:], y))]


@rule("BatchNormalization", "LpNormalization")
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


@rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
      "ReduceSumSquare", "ReduceProd")
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


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx, node, ids):
    """y[e] depends on every element of x along the softmax axis through e."""
    if node.op_type == "Hardmax":
        return [None]
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


def _pads_begin(attrs, in_spatial, out_spatial, kernel, strides, dilations, transpose=False):
    """Leading padding per spatial axis, resolving auto_pad from the (inferred) output shape."""
    auto = attrs.get("auto_pad", "NOTSET")
    r = len(kernel)
    if auto in ("NOTSET", "VALID") or not auto:
        pads = attrs.get("pads") or [0] * 2 * r
        return [0] * r if auto == "VALID" else list(pads[:r])
    begin = []
    for i, o, k, s, d in zip(in_spatial, out_spatial, kernel, strides, dilations):
        if transpose:
            total = max(s * (i - 1) + (k - 1) * d + 1 - o, 0)
            begin.append(total - total // 2 if auto == "SAME_UPPER" else total // 2)
        else:
            total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
    return begin


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
    pb = _pads_begin(attrs, in_shape[2:], out_shape[2:], kernel, strides, dilations, transpose)
    return [window_connect(in_shape, out_shape, kernel, strides, dilations, pb, attrs.get("group", 1), ids[0],
                           transpose)]


@rule("MaxPool", "AveragePool", "LpPool")
def pool(ctx, node, ids):
    """y[n, c, o] depends on x[n, c, window(o)] (max-pool: every element its window could pick)."""
    attrs = ctx.src.attrs(node)
    if node.op_type == "MaxPool" and attrs.get("storage_order", 0):
        raise JacgraphError(f"MaxPool '{node.name}' uses storage_order=1; re-export with row-major order.")
    in_shape, out_shape = ctx.shape(node.input[0]), ctx.shape(node.output[0])
    kernel = attrs["kernel_shape"]
    r = len(kernel)
    strides, dilations = attrs.get("strides") or [1] * r, attrs.get("dilations") or [1] * r
    pb = _pads_begin(attrs, in_shape[2:], out_shape[2:], kernel, strides, dilations)
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


@dataclass
class Pattern:
    """The structural pattern of J(x): `matrix` (m x n, bool CSR), the outputs' row blocks, x's name and shape."""
    matrix: sp.csr_matrix
    x: str
    x_shape: tuple
    outputs: list = field(default_factory=list)  # [(name, shape, first row, last row + 1)]


def sparsity(model, inputs=None, input_shape=None, direction=None) -> Pattern:
    """The structural sparsity pattern of the Jacobian of every float output with respect to x.

    direction: 'forward' (input dependencies per value element), 'reverse' (output dependencies), or
    None for the cheaper one (reverse when J has fewer rows than columns). Both give the same pattern."""
    src, x = fixed_source(model, inputs, input_shape)
    return _pattern(src, x, direction)


def _pattern(src, x, direction=None) -> Pattern:
    active = src.active_nodes([x])
    missing = Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                      for node in active if node.domain not in ("", "ai.onnx") or node.op_type not in PATTERN)
    if missing:
        raise unsupported_error(missing, "the Jacobian sparsity pass")
    ctx = Context(src, x)
    n = ctx.size(x)
    floats = [y.name for y in src.outputs if src.is_float(y.name)]
    if not floats:
        raise JacgraphError("the model has no floating-point output, so its Jacobian is empty. Export the model "
                            "with its float outputs.")
    m = sum(ctx.size(y) for y in floats)
    # The same connectivity matrices serve both directions; propagate along the narrower side of J
    # (forward: one n-wide dependency row per value element; reverse: one m-wide row), which keeps
    # deep CNNs with few outputs cheap.
    reachable = _reaching(src, active, set(floats))
    if direction not in (None, "forward", "reverse"):
        raise JacgraphError(f"direction {direction!r} is not known; use forward, reverse or None (automatic).")
    if direction == "reverse" or (direction is None and m < n):
        rows = _reverse(ctx, [nd for nd in active if id(nd) in reachable], floats, m)
        P = rows.T.tocsr()
    else:
        P = _forward(ctx, [nd for nd in active if id(nd) in reachable], floats, n)
    P = P.astype(bool)
    P.sort_indices()
    outputs, row = [], 0
    for y in floats:
        outputs.append((y, ctx.shape(y), row, row + ctx.size(y)))
        row += ctx.size(y)
    return Pattern(P, x, tuple(src.shape(x)), outputs)


def _reaching(src, nodes, targets):
    """ids of the nodes in `nodes` from which some name in `targets` can be reached."""
    wanted, keep = set(targets), set()
    for node in reversed(nodes):
        if any(o in wanted for o in node.output if o):
            keep.add(id(node))
            wanted.update(i for i in node.input if i)
    return keep


def _connections(ctx, node, live):
    """[(input name, offset, size)] for the node's x-dependent inputs and [(output, [F...])] with
    C = F[0] @ F[1] @ ... the connectivity from each output element to the stacked input elements."""
    ids, blocks, offset = [], [], 0
    for name in node.input:
        if name and name in live:
            size = ctx.size(name)
            ids.append(offset + 1 + np.arange(size, dtype=np.int64).reshape(ctx.shape(name)))
            blocks.append((name, offset, size))
            offset += size
        else:
            shape = ctx.shape(name) if name and ctx.src.shape(name) is not None else ()
            ids.append(np.zeros(shape, np.int64))
    conns = []
    for name, conn in zip(node.output, PATTERN[node.op_type](ctx, node, ids)):
        if name and conn is not None and ctx.src.is_float(name):
            if isinstance(conn, Chain):
                conn[-1].resize((conn[-1].shape[0], offset))
            else:
                r, c = conn
                conn = [sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(ctx.size(name), offset))]
            conns.append((name, conn))
    return blocks, conns


def _guard(D, name):
    if D.nnz > NNZ_LIMIT:
        raise JacgraphError(f"the dependency pattern at '{name}' has {D.nnz:,} entries (limit {NNZ_LIMIT:,}): "
                            "this Jacobian is too large to hold. Take it on a smaller input or a sub-model "
                            "(onnx.utils.extract_model), or use `jacgraph compile --emit jvp --tangents K`.")
    return D


def _forward(ctx, nodes, floats, n):
    """D_v (size(v) x n): which elements of x each element of v depends on; D_out = C @ D_in."""
    env = {ctx.x: sp.identity(n, dtype=np.float32, format="csr")}
    last_use = {name: k for k, node in enumerate(nodes) for name in node.input}
    for k, node in enumerate(nodes):
        blocks, conns = _connections(ctx, node, env)
        if not blocks:
            continue
        D_in = sp.vstack([env[name] for name, _, _ in blocks], format="csr")
        for name, chain in conns:
            D = D_in
            for F in reversed(chain):
                D = _guard(_binary(F @ D), name)
            env[name] = D
        for name in node.input:  # free patterns no later node reads
            if last_use.get(name) == k and name != ctx.x and name not in floats:
                env.pop(name, None)
    return sp.vstack([env.get(y, sp.csr_matrix((ctx.size(y), n), dtype=np.float32)) for y in floats], format="csr")


def _reverse(ctx, nodes, floats, m):
    """R_v (size(v) x m): which output elements depend on each element of v; R_in += Cᵀ @ R_out."""
    live = {ctx.x} | {o for node in nodes for o in node.output if o and ctx.src.is_float(o)}
    R, row = {}, 0
    for y in floats:
        R[y] = sp.identity(m, dtype=np.float32, format="csr")[row:row + ctx.size(y)]
        row += ctx.size(y)
    for node in reversed(nodes):
        R_out = {o: R[o] for o in node.output if o in R}
        for o in R_out:
            if o not in floats:  # every consumer has been seen
                del R[o]
        if not R_out:
            continue
        blocks, conns = _connections(ctx, node, live)
        terms = []
        for name, chain in conns:
            if name in R_out:
                T = R_out[name]
                for F in chain:
                    T = _guard(_binary(F.T.tocsr() @ T), name)
                terms.append(T)
        if not blocks or not terms:
            continue
        grad = sp.csr_matrix(sum(terms[1:], terms[0]))
        for name, offset, size in blocks:
            part = grad[offset:offset + size]
            R[name] = _guard(_binary(part if name not in R else R[name] + part), name)
    return R.get(ctx.x, sp.csr_matrix((ctx.size(ctx.x), m), dtype=np.float32))


# ---- colouring -------------------------------------------------------------------------------------

@dataclass
class Colouring:
    """colours[j] for every column; `count` colours (probes); the method that won; the clique lower bound
    (the longest row: no colouring has fewer colours); and the count of every method tried."""
    colours: np.ndarray
    count: int
    method: str
    lower_bound: int
    counts: dict


def is_valid(P, colours) -> bool:
    """No row holds two columns of one colour."""
    P = sp.csr_matrix(P)
    row_of = np.repeat(np.arange(P.shape[0]), np.diff(P.indptr))
    pairs = row_of.astype(np.int64) * (int(colours.max(initial=0)) + 1) + colours[P.indices]
    return np.unique(pairs).size == pairs.size


def structured_colouring(P, shape):
    """colour(j) = (j_a mod R_a) over every axis a of x, R_a = 1 + the widest spread along a within one row.
    Valid by construction: two columns of one colour differ by a multiple of R_a >= spread + 1 on some
    axis (or not at all), so no row holds both."""
    P = sp.csr_matrix(P)
    coords = np.unravel_index(np.arange(P.shape[1]), shape)
    nonempty = np.diff(P.indptr) > 0
    starts = P.indptr[:-1][nonempty]
    R = []
    for a, d in enumerate(shape):
        if P.nnz == 0:
            R.append(1)
            continue
        c = coords[a][P.indices]
        spread = np.maximum.reduceat(c, starts) - np.minimum.reduceat(c, starts)
        R.append(int(min(d, spread.max() + 1)))
    colours = np.zeros(P.shape[1], np.int64)
    for a, r in enumerate(R):
        colours = colours * r + coords[a] % r
    _, colours = np.unique(colours, return_inverse=True)
    return colours.astype(np.int64)


def greedy_colouring(P):
    """networkx greedy 'largest_first' on the column-intersection graph (columns adjacent when they share a row)."""
    import networkx as nx

    P = sp.csr_matrix(P, dtype=np.float32)
    G = (P.T @ P).tocoo()
    graph = nx.Graph()
    graph.add_nodes_from(range(P.shape[1]))
    off = G.row < G.col
    graph.add_edges_from(zip(G.row[off].tolist(), G.col[off].tolist()))
    colour = nx.greedy_color(graph, strategy="largest_first")
    return np.array([colour[j] for j in range(P.shape[1])], np.int64)


def distance2_colouring(P):
    """Greedy distance-2 colouring straight on the pattern, columns in decreasing order of their row lengths'
    sum (an upper bound on the degree); never builds the intersection graph."""
    P = sp.csr_matrix(P, dtype=np.float32)
    Pc = P.tocsc()
    row_len = np.diff(P.indptr)
    weight = np.asarray(Pc.multiply(row_len[:, None]).sum(axis=0)).ravel() if P.nnz else np.zeros(P.shape[1])
    colours = np.full(P.shape[1], -1, np.int64)
    for j in np.argsort(-weight, kind="stable"):
        rows = Pc.indices[Pc.indptr[j]:Pc.indptr[j + 1]]
        if rows.size:
            neighbours = np.concatenate([P.indices[P.indptr[r]:P.indptr[r + 1]] for r in rows])
            used = colours[neighbours]
            taken = np.zeros(neighbours.size + 1, bool)
            taken[used[(used >= 0) & (used <= neighbours.size)]] = True
            colours[j] = int(np.argmin(taken))
        else:
            colours[j] = 0
    return colours


def _count(colours):
    return int(colours.max()) + 1 if colours.size else 0


METHODS = ("auto", "structured", "greedy", "distance2")


def colouring(P, shape=None, method="auto") -> Colouring:
    """Colour the columns of pattern P (m x n); `shape` is x's shape (for the structured colouring).

    auto: the structured colouring first; if it does not reach the clique lower bound (the longest
    row), networkx greedy largest_first, or distance-2 greedy when the intersection graph is too big;
    the fewest colours win. Any other method runs alone."""
    if method not in METHODS:
        raise JacgraphError(f"colouring method {method!r} is not known; use one of {', '.join(METHODS)}.")
    P = sp.csr_matrix(P, dtype=bool)
    row_len = np.diff(P.indptr)
    lower = int(row_len.max(initial=0))
    small = int((row_len.astype(np.int64) ** 2).sum()) <= GRAPH_EDGE_LIMIT
    found = {}
    for m in (("structured", "greedy", "distance2") if method == "auto" else (method,)):
        if method == "auto" and found and min(map(_count, found.values())) <= lower:
            break  # optimal: no colouring beats the longest row
        if m == "structured" and shape is not None:
            found[m] = structured_colouring(P, shape)
        elif m == "greedy" and (small or method == "greedy"):
            found[m] = greedy_colouring(P)
        elif m == "distance2" and (method == "distance2" or "greedy" not in found):
            found[m] = distance2_colouring(P)
    if not found:
        found["distance2"] = distance2_colouring(P)
    best = min(found, key=lambda m: _count(found[m]))
    colours = found[best]
    assert is_valid(P, colours), "a colouring put two columns of one row in one colour"
    return Colouring(colours, _count(colours), best, lower, {m: _count(c) for m, c in found.items()})


def row_colouring(pattern, method="auto") -> Colouring:
    """Colours of the rows of J (one VJP probe per colour): the column colouring of Jᵀ."""
    shape = pattern.outputs[0][1] if len(pattern.outputs) == 1 else (pattern.matrix.shape[0],)
    return colouring(pattern.matrix.T.tocsr(), shape, method)


def seed_matrix(colours, count, shape, dtype=np.float32):
    """S[k] = indicator of colour k, shaped like x: the K tangents of the compressed JVP."""
    n = colours.size
    S = np.zeros((count, n), dtype)
    S[colours, np.arange(n)] = 1
    return S.reshape((count,) + tuple(shape))


# ---- the emitted graph -----------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything decided before emitting: the pattern, the column colouring (one JVP probe per colour)
    and the row colouring (one VJP probe per colour)."""
    source: SourceModel
    pattern: Pattern
    columns: Colouring
    rows: Colouring

    def summary(self, probes="columns") -> str:
        P = self.pattern.matrix
        used = (f"{self.columns.count} JVP probes instead of {P.shape[1]}" if probes == "columns"
                else f"{self.rows.count} VJP probes instead of {P.shape[0]}")
        return (f"Jacobian {P.shape[0]} x {P.shape[1]}, {P.nnz} structural nonzeros; {self.columns.count} column "
                f"colours ({self.columns.method}; lower bound {self.columns.lower_bound}), {self.rows.count} row "
                f"colours ({self.rows.method}; lower bound {self.rows.lower_bound}); using {used}")


def plan(model, inputs=None, input_shape=None, colouring_method="auto") -> Plan:
    """Pattern and colourings of the model's Jacobian with respect to x (one float input)."""
    from jacgraph.rules.jvp import JVP

    src, x = fixed_source(model, inputs, input_shape)
    missing = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                      for n in src.active_nodes([x])
                      if n.domain not in ("", "ai.onnx") or n.op_type not in JVP or n.op_type not in PATTERN)
    if missing:  # one error for both tables (JVP rules and pattern rules), before any work
        raise unsupported_error(missing, "the Jacobian pass")
    pat = _pattern(src, x)
    return Plan(src, pat, colouring(pat.matrix, pat.x_shape, colouring_method), row_colouring(pat))


PROBES = ("auto", "columns", "rows")
# One VJP probe (a reverse sweep, one Loop iteration each) against one tangent of the batched JVP: measured
# 1.3-2.2x on conv stacks and CNN heads, up to 7x on tiny models where the Loop's per-iteration overhead
# dominates (examples/jacobian_probes.py, onnxruntime CPU); rows win only when clearly fewer.
ROW_PROBE_COST = 4


def choose_probes(p: Plan, probes="auto") -> str:
    """columns (JVP probes), or rows (VJP probes) when reverse mode covers the model and they are cheaper."""
    if probes not in PROBES:
        raise JacgraphError(f"--probes {probes!r} is not known; use auto, columns or rows.")
    if probes == "columns":
        return probes
    missing = _vjp_missing(p)
    if probes == "rows" and missing:
        raise JacgraphError(f"row probes need reverse mode, which has no rule for {', '.join(sorted(missing))}. "
                            "Use --probes columns (JVP probes).")
    if probes == "rows":
        return probes
    return "rows" if not missing and ROW_PROBE_COST * p.rows.count < p.columns.count else "columns"


def _vjp_missing(p: Plan):
    try:
        from jacgraph.passes.vjp import missing_rules
        from jacgraph.rules.transpose import VJP
    except ImportError:  # reverse mode not installed: column probes only
        return {"(reverse mode)": 1}
    return missing_rules(p.source, [p.pattern.x], VJP)


def build(model, sparse=False, inputs=None, input_shape=None, colouring_method="auto", probes="auto") -> onnx.ModelProto:
    """x -> (y, J) from compressed probes, decompressed in-graph: one multi-tangent JVP with a constant
    tangent per column colour, or (rows, when 4·row colours < column colours) an ONNX Loop of one VJP per
    row colour."""
    p = model if isinstance(model, Plan) else plan(model, inputs, input_shape, colouring_method)
    kind = choose_probes(p, probes)
    src, pat, x = p.source, p.pattern, p.pattern.x
    b, tables = _column_probes(p) if kind == "columns" else _row_probes(p)
    col, K = (p.columns, p.columns.count) if kind == "columns" else (p.rows, p.rows.count)
    b.outputs.extend(src.outputs)
    n = pat.matrix.shape[1]
    elem, dtype = src.dtype(x), src.np_dtype(x)
    jac_outputs = []
    for y, shape, r0, r1 in pat.outputs:
        block = pat.matrix[r0:r1]
        flat = tables[y]  # columns: y_dot [K, m] flattened; rows: x_bar [K, n] flattened
        # Every structural entry is one element of the compressed table: gather exactly those, then scatter
        # them into zeros (gathering a whole [m, n] spread and masking it cost m·n and dominated the run;
        # onnxruntime's 1-D GatherElements/ScatterElements are ~5x faster than Gather/ScatterND here).
        coo = block.tocoo()
        at = (col.colours[coo.col] * (r1 - r0) + coo.row.astype(np.int64) if kind == "columns"
              else col.colours[r0 + coo.row] * n + coo.col.astype(np.int64))
        values = b.fresh(f"{y}_jac_values")
        b.nodes.append(helper.make_node("GatherElements", [flat, b.const(at, hint=f"{y}_jac_gather")], [values],
                                        name=b.fresh("jg_GatherElements"), axis=0))
        if sparse:
            indices = b.fresh(f"{y}_jac_indices")
            pairs = np.stack([coo.row, coo.col], axis=1).astype(np.int64)
            b.nodes.append(helper.make_node("Identity", [b.const(pairs, hint=f"{y}_pattern")], [indices],
                                            name=b.fresh("jg_Identity")))
            b.add_output(values, elem, [int(coo.nnz)])
            b.add_output(indices, onnx.TensorProto.INT64, [int(coo.nnz), 2])
            jac_outputs.append([y, values, indices])
        else:
            size = (r1 - r0) * n
            zeros = b.ConstantOfShape(b.ints([size]), value=numpy_helper.from_array(np.zeros(1, dtype)))
            where = b.const(coo.row.astype(np.int64) * n + coo.col, hint=f"{y}_jac_scatter")
            dense = b.ScatterElements(zeros, where, values, axis=0)
            name = b.fresh(f"{y}_jac")
            b.nodes.append(helper.make_node("Reshape", [dense, b.ints(list(shape) + list(pat.x_shape))], [name],
                                            name=b.fresh("jg_Reshape")))
            b.add_output(name, elem, list(shape) + list(pat.x_shape))
            jac_outputs.append([y, name])
    metadata = {"jacgraph.emit": "jacobian", "jacgraph.probes": kind, "jacgraph.colours": K,
                "jacgraph.colouring": col.method, "jacgraph.column_colours": p.columns.count,
                "jacgraph.row_colours": p.rows.count, "jacgraph.summary": p.summary(kind),
                "jacgraph.input": x, "jacgraph.input_shape": json.dumps(list(pat.x_shape)),
                "jacgraph.sparse": int(bool(sparse)), "jacgraph.nnz": int(pat.matrix.nnz),
                "jacgraph.columns": n, "jacgraph.rows": json.dumps([[y, r1 - r0] for y, _, r0, r1 in pat.outputs]),
                "jacgraph.jacobian_outputs": json.dumps(jac_outputs)}
    what = "JVP" if kind == "columns" else "VJP"
    return b.build(f"{src.graph.name}_jacobian", doc=f"Jacobian of {src.graph.name} from {K} compressed {what} "
                   f"probes (jacgraph)", metadata=metadata)


def _column_probes(p: Plan):
    """The source's JVP with K = column colours and the seed matrix as a constant tangent: y_dot[k] = J S[k]."""
    from jacgraph.passes import jvp

    src, pat, col, x = p.source, p.pattern, p.columns, p.pattern.x
    K = max(col.count, 1)
    jvp_model = jvp.build(src, inputs=[x], tangents=K)
    meta = {q.key: q.value for q in jvp_model.metadata_props}
    x_dot = dict(json.loads(meta["jacgraph.tangent_inputs"]))[x]
    y_dots = dict(json.loads(meta["jacgraph.tangent_outputs"]))
    inner = SourceModel(jvp_model)
    b = Builder(inner)
    b.inputs.extend(i for i in inner.inputs if i.name != x_dot)
    b.initializers.append(numpy_helper.from_array(seed_matrix(col.colours, K, pat.x_shape, src.np_dtype(x)), x_dot))
    for node in inner.nodes:
        b.copy(node)
    return b, {y: b.Reshape(y_dots[y], b.ints([-1])) for y, *_ in pat.outputs}


def _row_probes(p: Plan):
    """The primal once, then an ONNX Loop over row colours whose body is the VJP's reverse sweep (reading
    the primal values from the outer graph) with y_bar = the colour's indicator: x_bar[k] = Jᵀ S[k]."""
    from jacgraph.passes import vjp

    src, pat, col, x = p.source, p.pattern, p.rows, p.pattern.x
    K = max(col.count, 1)
    vjp_model = vjp.build(src, inputs=[x])
    meta = {q.key: q.value for q in vjp_model.metadata_props}
    y_bars = dict(json.loads(meta["jacgraph.cotangent_inputs"]))
    x_bar = dict(json.loads(meta["jacgraph.gradient_outputs"]))[x]
    inner = SourceModel(vjp_model)
    b = Builder(inner)
    b.inputs.extend(i for i in inner.inputs if i.name not in y_bars.values())
    primal_names = set(src.producer) | set(src.initializers)
    body = []
    for node in inner.nodes:  # copies of source nodes (maybe with extra outputs) run once, outside the loop
        if any(o in primal_names for o in node.output):
            b.copy(node)
        else:
            body.append(node)
    it, cond = b.fresh("row_colour"), b.fresh("cond")
    seeds = []
    for y, shape, r0, r1 in pat.outputs:
        S = np.zeros((K, r1 - r0), src.np_dtype(y))
        S[col.colours[r0:r1], np.arange(r1 - r0)] = 1
        table = b.const(S.reshape((K,) + tuple(shape)), hint=f"{y}_row_seeds")
        seeds.append(helper.make_node("Gather", [table, it], [y_bars[y]], name=b.fresh("jg_Gather"), axis=0))
    cond_out = b.fresh("cond_out")
    graph = helper.make_graph(
        seeds + body + [helper.make_node("Identity", [cond], [cond_out], name=b.fresh("jg_Identity"))],
        "row_probes",
        [helper.make_tensor_value_info(it, onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info(x_bar, src.dtype(x), list(pat.x_shape))])
    stacked = b.op("Loop", b.const(np.array(K, np.int64), hint="row_colours"), "", body=graph)  # [K, *x.shape]
    flat = b.Reshape(stacked, b.ints([-1]))
    return b, {y: flat for y, *_ in pat.outputs}


# ---- Python API ------------------------------------------------------------------------------------

def jacobian(model, x, sparse=False, inputs=None, probes="auto"):
    """J(x) of every float output (rows stacked in output order) w.r.t. x: an (m, n) numpy array, or with
    sparse=True a scipy.sparse CSR matrix; computed by the emitted graph in onnxruntime."""
    from jacgraph import runtime

    x = np.asarray(x)
    emitted = build(model, sparse=sparse, inputs=inputs, input_shape=x.shape, probes=probes)
    props = {p.key: p.value for p in emitted.metadata_props}
    name = props["jacgraph.input"]
    sess = runtime.session(emitted)
    others = [i.name for i in sess.get_inputs() if i.name != name]
    if others:
        raise JacgraphError(f"the model has other inputs ({', '.join(others)}); jacobian() feeds only x. Make them "
                            "initializers of the model, or compile with --emit jacobian and feed them yourself.")
    x_type = {i.name: i for i in emitted.graph.input}[name].type.tensor_type.elem_type
    out = runtime.run(sess, {name: x.astype(helper.tensor_dtype_to_np_dtype(x_type))})
    n, rows = int(x.size), dict(json.loads(props["jacgraph.rows"]))
    blocks = []
    for y, *names in json.loads(props["jacgraph.jacobian_outputs"]):
        if not sparse:
            blocks.append(out[names[0]].reshape(rows[y], n))
        else:
            values, idx = out[names[0]], out[names[1]]
            blocks.append(sp.csr_matrix((values, (idx[:, 0], idx[:, 1])), shape=(rows[y], n)))
    return np.concatenate(blocks, axis=0) if not sparse else sp.vstack(blocks, format="csr")
