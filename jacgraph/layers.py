"""Lowering of a model for the bound passes: a chain of stages (lower), or a DAG (lower_graph, below).

    stages = lower(model, input_shape=None)
    stage.matrix()   # dense float64 [out_features, in_features]; Conv lowered for the stage's input shape
    stage.bias       # float64 [out_features]

The model must be one chain from its single float input to its single output: Gemm / MatMul / Conv
(with constant weights), BatchNormalization (folded into the preceding linear op), Flatten / Reshape
(absorbed: flat C-order features are unchanged), Add / Sub / Mul / Div by constants, Identity /
Dropout, and the elementwise activations in ACTIVATIONS. A stage ends at each activation; a final
stage with activation None holds the affine ops after the last activation (if any). Flat feature
order is C order of the per-sample shape (the batch axis dropped).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .errors import JacgraphError
from .model import SourceModel, unsupported_error
from .progress import stage
from .rules.registry import resolve_window, transpose_output_size

# ONNX op -> activation name in Stage.activation
ACTIVATIONS = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Tanh": "tanh", "Sigmoid": "sigmoid",
               "HardSigmoid": "hardsigmoid", "Clip": "clip"}
LINEAR_OPS = {"Gemm", "MatMul", "Conv", "BatchNormalization", "Flatten", "Reshape", "Add", "Sub", "Mul", "Div",
              "Identity", "Dropout"}


# ---- pieces of one stage's affine map (applied to flat C-order feature vectors, or matrix columns) ----

@dataclass
class _Dense:
    M: np.ndarray  # [out, in]

    def apply(self, X):
        return self.M @ X

    def dense(self):
        return self.M


@dataclass
class _Diag:
    s: np.ndarray  # [features]

    def apply(self, X):
        return self.s.reshape((-1,) + (1,) * (X.ndim - 1)) * X

    def dense(self):
        return np.diag(self.s)


@dataclass
class _Conv:
    W: np.ndarray       # kernel [Co, Ci/group, *k], float64
    attrs: dict         # explicit pads, strides, dilations, group (auto_pad resolved to NOTSET)
    in_shape: tuple     # (Ci, *spatial)
    out_shape: tuple    # (Co, *spatial_out)
    _sparse: object = field(default=None, repr=False)

    def sparse(self):
        if self._sparse is None:
            self._sparse = conv_sparse(self.W, self.in_shape, self.out_shape, self.attrs)
        return self._sparse

    def apply(self, X):
        return self.sparse() @ X

    def dense(self):
        return self.sparse().toarray()


@dataclass
class Stage:
    """One affine map (the source nodes in `nodes`) followed by an elementwise activation (None: linear)."""
    nodes: list
    weight: object          # ndarray or a callable returning it; use matrix()
    bias: np.ndarray        # float64 [out_features]
    in_shape: tuple         # per-sample input shape (no batch axis)
    out_shape: tuple        # per-sample output shape
    activation: str | None  # a value of ACTIVATIONS, or None
    act_attrs: dict = field(default_factory=dict)
    conv: dict | None = None  # {'W', 'attrs', 'in_shape', 'out_shape'} when the map is one Conv (BN folded) + reshapes
    act_node: object = None   # the activation's source node

    def matrix(self) -> np.ndarray:
        """Dense float64 [out_features, in_features] (computed once)."""
        if callable(self.weight):
            self.weight = np.ascontiguousarray(self.weight(), dtype=np.float64)
        return self.weight

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape, dtype=np.int64))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.out_shape, dtype=np.int64))

    def affine(self, x):
        """W x + b for x of shape [..., in_features] (the dense map; for tests and references)."""
        return x @ self.matrix().T + self.bias


# ---- Conv as a sparse matrix ------------------------------------------------------------------

def conv_sparse(W, in_shape, out_shape, attrs):
    """The N-d grouped, strided, dilated, padded convolution as a sparse [prod(out), prod(in)] matrix."""
    W = np.asarray(W, np.float64)
    co, ci_g = W.shape[:2]
    ksp, isp, osp = W.shape[2:], tuple(in_shape[1:]), tuple(out_shape[1:])
    nd = len(ksp)
    group = attrs["group"]
    strides, dil, pads = attrs["strides"], attrs["dilations"], attrs["pads"]
    # index grids over (co, ci, k..., o...)
    grids = np.meshgrid(np.arange(co), np.arange(ci_g), *[np.arange(k) for k in ksp], *[np.arange(o) for o in osp],
                        indexing="ij", sparse=True)
    c_out, c_in, ks, os_ = grids[0], grids[1], grids[2:2 + nd], grids[2 + nd:]
    pos = [os_[d] * strides[d] - pads[d] + ks[d] * dil[d] for d in range(nd)]
    valid = np.ones((1,) * (2 + 2 * nd), bool)
    for d in range(nd):
        valid = valid & (pos[d] >= 0) & (pos[d] < isp[d])
    shape = np.broadcast_shapes(*(g.shape for g in grids))
    valid = np.broadcast_to(valid, shape)
    group_of = c_out // (co // group)
    cin_abs = group_of * ci_g + c_in
    row = c_out
    for d in range(nd):
        row = row * osp[d] + os_[d]
    col = cin_abs
    for d in range(nd):
        col = col * isp[d] + np.clip(pos[d], 0, isp[d] - 1)
    vals = W.reshape((co, ci_g) + tuple(ksp) + (1,) * nd)
    row, col, vals = (np.broadcast_to(a, shape)[valid] for a in (row, col, vals))
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return sp.csr_matrix((vals, (row, col)), shape=(n_out, n_in))


def _conv_attrs(src, node, in_shape, kernel_shape):
    a = src.attrs(node)
    nd = len(kernel_shape)
    isp = in_shape[1:]
    geometry = resolve_window(a, kernel_shape, isp)
    strides, dil, pads = geometry.strides, geometry.dilations, geometry.pads
    osp = tuple((isp[d] + pads[d] + pads[d + nd] - dil[d] * (kernel_shape[d] - 1) - 1) // strides[d] + 1
                for d in range(nd))
    attrs = {"strides": strides, "dilations": dil, "pads": pads, "group": int(a.get("group", 1)),
             "kernel_shape": list(kernel_shape)}
    return attrs, osp


# ---- lowering ---------------------------------------------------------------------------------

def _per_sample(c, shape, what):
    """A constant broadcast to the per-sample shape (a leading batch axis of 1 allowed), flattened."""
    c = np.asarray(c, np.float64)
    full = (1,) + tuple(shape)
    try:
        return np.broadcast_to(c, full)[0].reshape(-1).copy() if c.ndim <= len(full) else None
    except ValueError:
        raise JacgraphError(f"{what}: a constant of shape {c.shape} does not broadcast to the per-sample shape "
                            f"{tuple(shape)} without touching the batch axis. Fold it into the weights when exporting.") from None


class _Lowering:
    def __init__(self, src, x, in_shape):
        self.src = src
        self.x = x
        self.stages = []
        self._start(in_shape)

    def _start(self, shape):
        self.nodes, self.pieces, self.shape = [], [], tuple(shape)
        self.in_shape = tuple(shape)
        self.bias = np.zeros(int(np.prod(shape, dtype=np.int64)))

    def push(self, piece, add=None):
        """Append a linear piece; the running bias goes through it, then `add` is added."""
        if isinstance(piece, _Diag) and np.all(piece.s == 1):  # a plain bias add
            self.bias = self.bias if add is None else self.bias + add
            return
        last = self.pieces[-1] if self.pieces else None
        if isinstance(piece, _Diag) and isinstance(last, _Dense):
            last.M = piece.s[:, None] * last.M
        elif isinstance(piece, _Diag) and isinstance(last, _Diag):
            last.s = piece.s * last.s
        elif isinstance(piece, _Diag) and isinstance(last, _Conv) and _per_channel(piece.s, last.out_shape):
            last.W = last.W * piece.s.reshape(last.out_shape[0], -1)[:, 0].reshape((-1,) + (1,) * (last.W.ndim - 1))
            last._sparse = None
        elif isinstance(piece, _Dense) and isinstance(last, _Dense):
            last.M = piece.M @ last.M
        else:
            self.pieces.append(piece)
        self.bias = piece.apply(self.bias)
        if add is not None:
            self.bias = self.bias + add

    def close(self, activation, act_attrs, act_node):
        pieces, in_shape = list(self.pieces), self.in_shape
        n_in = int(np.prod(in_shape, dtype=np.int64))

        def weight():
            M = None
            for p in pieces:
                M = p.dense() if M is None else p.apply(M)
            return np.eye(n_in) if M is None else M

        conv = None
        if len(pieces) == 1 and isinstance(pieces[0], _Conv):
            c = pieces[0]
            conv = {"W": c.W, "attrs": dict(c.attrs), "in_shape": c.in_shape, "out_shape": c.out_shape}
        dense = pieces[0].M if len(pieces) == 1 and isinstance(pieces[0], _Dense) else None
        self.stages.append(Stage(nodes=self.nodes, weight=dense if dense is not None else weight, bias=self.bias,
                                 in_shape=in_shape, out_shape=self.shape, activation=activation,
                                 act_attrs=act_attrs, conv=conv, act_node=act_node))
        self._start(self.shape)


def _per_channel(s, shape):
    s = s.reshape(shape[0], -1)
    return bool(np.all(s == s[:, :1]))


def _check_chain(src, x):
    """Every node on x's path must be supported, take x's path in one input, and form one chain."""
    missing = Counter()
    active = set([x])
    for node in src.active_nodes([x]):
        var = [i for i in node.input if i in active]
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if node.domain not in ("", "ai.onnx") or (op not in LINEAR_OPS and op not in ACTIVATIONS):
            missing[op] += 1
        elif len(var) > 1:
            missing[f"{op} of two computed tensors (residual/branching)"] += 1
        elif op in ("Gemm", "MatMul", "Conv") and node.input[0] not in active:
            missing[f"{op} with a computed weight operand"] += 1
        else:
            for j, name in enumerate(node.input):
                if name and name not in active and src.const(name) is None and not (
                        op == "Reshape" and j == 1) and not (op == "Dropout" and j > 0):
                    missing[f"{op} with a non-constant operand"] += 1
                    break
        active.update(o for o in node.output[:1] if o)
    return missing


def _single_input(model):
    """(SourceModel, its one float input): the bound passes take single-input, single-output networks."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    floats = src.float_inputs()
    if len(floats) != 1 or len(src.outputs) != 1:
        raise JacgraphError(f"the bound passes need a model with one float input and one output; this one has "
                            f"{len(floats)} float input(s) and {len(src.outputs)} output(s). Export a single-input, "
                            "single-output network.")
    return src, floats[0]


@stage("lowering the model to linear layers and activations")
def lower(model, input_shape=None) -> list[Stage]:
    """Stages of a feed-forward chain; raises one JacgraphError listing every unsupported op."""
    src, x = _single_input(model)
    missing = _check_chain(src, x)
    if missing:
        raise unsupported_error(missing, "the layer lowering for bounds (jacgraph.layers)")
    shape = _input_shape(src, x, input_shape)
    low = _Lowering(src, x, shape)
    current = x
    for node in src.active_nodes([x]):
        _lower_node(low, src, node, current)
        current = node.output[0]
    if current != src.outputs[0].name:
        raise JacgraphError(f"the model's output '{src.outputs[0].name}' is not at the end of the chain from "
                            f"'{x}'. Export a plain feed-forward network.")
    # trailing Identity / Flatten / Reshape change no flat feature: no identity stage for them
    if low.pieces or np.any(low.bias != 0) or not low.stages:
        low.close(None, {}, None)
    return low.stages


def _input_shape(src, x, input_shape):
    declared = src.shape(x)
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if declared is not None and len(input_shape) == len(declared):
            input_shape = input_shape[1:]
        if declared is not None and len(input_shape) != len(declared) - 1:
            raise JacgraphError(f"--input-shape {input_shape} does not match the rank of input '{x}' {declared}. "
                                "Give the full shape with the batch axis, e.g. 1,3,32,32.")
        for d, given in zip((declared or [])[1:], input_shape):
            if isinstance(d, int) and d != given:
                raise JacgraphError(f"--input-shape {input_shape} contradicts input '{x}' of shape {declared}.")
        return input_shape
    if declared is None or len(declared) < 2 or not all(isinstance(d, int) and d > 0 for d in declared[1:]):
        raise JacgraphError(f"input '{x}' has shape {declared}, with no fixed per-sample size. "
                            "Give one with --input-shape (e.g. --input-shape 1,3,32,32) or input_shape=(...).")
    return tuple(declared[1:])


def _reshape_target(src, node, n):
    """The per-sample shape a Reshape of n features gives."""
    out = src.shape(node.output[0])
    target = src.const(node.input[1])
    if target is None and out is not None and all(isinstance(d, int) for d in out[1:]):
        target = [0] + list(out[1:])
    if target is None:
        raise JacgraphError(f"Reshape '{node.name}' has a computed target shape that shape inference could not "
                            "resolve. Export with a constant shape (e.g. x.flatten(1)).")
    target = [int(d) for d in target]
    rest = target[1:]
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
        rest[rest.index(-1)] = n // max(known, 1)
    if int(np.prod(rest, dtype=np.int64)) != n:
        raise JacgraphError(f"Reshape '{node.name}' to {target} mixes the batch axis with the features. "
                            "Keep the batch axis first and separate.")
    return tuple(rest)


def _lower_node(low, src, node, x):
    op, a = node.op_type, src.attrs(node)
    low.nodes.append(node)
    n = int(np.prod(low.shape, dtype=np.int64))
    if op in ACTIVATIONS:
        low.nodes.pop()
        act_attrs = {}
        if op == "LeakyRelu":
            act_attrs = {"alpha": float(a.get("alpha", 0.01))}
        elif op == "HardSigmoid":
            act_attrs = {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))}
        elif op == "Clip":
            lo = src.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            act_attrs = {"min": -np.inf if lo is None else float(lo), "max": np.inf if hi is None else float(hi)}
        low.close(ACTIVATIONS[op], act_attrs, node)
        return
    if op in ("Identity", "Dropout"):
        return
    if op in ("Flatten", "Reshape"):
        if op == "Flatten":
            if a.get("axis", 1) != 1:
                raise JacgraphError(f"Flatten '{node.name}' has axis {a.get('axis')}; only axis=1 keeps the batch "
                                    "axis apart. Export with torch.flatten(x, 1).")
            low.shape = (n,)
            return
        low.shape = _reshape_target(src, node, n)
        return
    if op == "Gemm":
        B = np.asarray(src.const(node.input[1]), np.float64)
        B = B.T if a.get("transB", 0) else B
        if a.get("transA", 0) or len(low.shape) != 1:
            raise JacgraphError(f"Gemm '{node.name}' needs a flat [batch, features] input (transA=0).")
        C = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        add = None if C is None else a.get("beta", 1.0) * _per_sample(C, (B.shape[1],), f"Gemm '{node.name}'")
        low.push(_Dense(a.get("alpha", 1.0) * B.T), add)
        low.shape = (B.shape[1],)
        return
    if op == "MatMul":
        B = np.asarray(src.const(node.input[1]), np.float64)
        if B.ndim != 2 or len(low.shape) != 1:
            raise JacgraphError(f"MatMul '{node.name}' must multiply flat [batch, features] by a 2-D constant.")
        low.push(_Dense(B.T))
        low.shape = (B.shape[1],)
        return
    if op == "Conv":
        Wk = np.asarray(src.const(node.input[1]), np.float64)
        attrs, osp = _conv_attrs(src, node, low.shape, Wk.shape[2:])
        if len(low.shape) != Wk.ndim - 1:
            raise JacgraphError(f"Conv '{node.name}' gets features of shape {low.shape}, not [channels, spatial...].")
        out_shape = (Wk.shape[0],) + osp
        Bc = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        add = None if Bc is None else np.repeat(np.asarray(Bc, np.float64), int(np.prod(osp)))
        low.push(_Conv(Wk, attrs, low.shape, out_shape), add)
        low.shape = out_shape
        return
    if op == "BatchNormalization":
        scale, bias, mean, var = (np.asarray(src.const(i), np.float64) for i in node.input[1:5])
        s = scale / np.sqrt(var + a.get("epsilon", 1e-5))
        spatial = int(np.prod(low.shape[1:], dtype=np.int64)) if len(low.shape) > 1 else 1
        low.push(_Diag(np.repeat(s, spatial)), np.repeat(bias - mean * s, spatial))
        return
    # elementwise with a constant: Add / Sub / Mul / Div
    xi = list(node.input).index(x)
    c = _per_sample(src.const(node.input[1 - xi]), low.shape, f"{op} '{node.name}'")
    if op == "Add":
        low.push(_Diag(np.ones(n)), c)
    elif op == "Sub":
        low.push(_Diag(np.full(n, 1.0 if xi == 0 else -1.0)), -c if xi == 0 else c)
    elif op == "Mul":
        low.push(_Diag(c))
    elif op == "Div":
        if xi != 0:
            raise JacgraphError(f"Div '{node.name}' divides a constant by the features: not affine.")
        low.push(_Diag(1.0 / c))


# ---- lowering of a DAG: linear operators with forks and joins, elementwise and max nonlinearities --
#
#     graph = lower_graph(model, input_shape=None)
#
# Every linear op (Gemm, MatMul, Conv, BatchNormalization, pooling averages, Concat, Split, Slice, Pad,
# Transpose, Flatten/Reshape, Add/Sub of two computed tensors, Add/Sub/Mul/Div by constants) is folded
# into an affine map sum_k M_k h_k + c over earlier *nonlinear* nodes h_k (scipy sparse M_k on flat
# C-order features). A node is materialised only where a nonlinearity needs its input, and once for
# the output: the graph alternates linear nodes (joins: several inputs) and nonlinear nodes (forks: a
# nonlinear node may feed several linear nodes). Nonlinear nodes are elementwise activations (ACTIVATIONS)
# and max selections (MaxPool, ReduceMax): out_j = max of the inputs listed in windows[j].

@dataclass
class Node:
    kind: str                  # "input", "linear", "act" or "max"
    shape: tuple               # per-sample output shape
    inputs: list = field(default_factory=list)  # indices of earlier nodes
    mats: list = field(default_factory=list)    # linear: one sparse [n, n_input] matrix per input
    bias: np.ndarray | None = None              # linear: [n]
    activation: str | None = None               # act: a value of ACTIVATIONS
    act_attrs: dict = field(default_factory=dict)
    windows: np.ndarray | None = None           # max: [n, K] input indices (short windows repeat a member)
    source: object = None                       # the source node (None for input/linear)

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Graph:
    nodes: list  # topological order; nodes[0] is the input, nodes[-1] the (linear) output

    def consumers(self) -> dict:
        out = {k: [] for k in range(len(self.nodes))}
        for c, node in enumerate(self.nodes):
            for k in node.inputs:
                out[k].append(c)
        return out

    @property
    def in_shape(self) -> tuple:
        return self.nodes[0].shape

    def is_affine(self) -> bool:
        return all(n.kind in ("input", "linear") for n in self.nodes)

    def forward(self, x, act, maximum, matmul=None, array=np.asarray):
        """Evaluate the lowered network on flat inputs x [..., n0] with the given callables
        (act(node, z), maximum(node, z) -> [..., n]; array: numpy -> x's kind); returns every node's value."""
        matmul = matmul or (lambda M, h: (M @ h.T).T)
        vals = [x]
        for node in self.nodes[1:]:
            if node.kind == "linear":
                z = sum(matmul(M, vals[k]) for k, M in zip(node.inputs, node.mats))
                vals.append(z + array(node.bias))
            elif node.kind == "act":
                vals.append(act(node, vals[node.inputs[0]]))
            else:
                vals.append(maximum(node, vals[node.inputs[0]]))
        return vals


@dataclass
class _Affine:
    """sum_k terms[k] @ h_k + bias over graph nodes k; shape is the per-sample shape."""
    terms: dict
    bias: np.ndarray
    shape: tuple

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def map(self, P, add=None, shape=None):
        """P @ self (+ add), P a sparse or dense [n_out, n]."""
        P = sp.csr_matrix(P)
        bias = P @ self.bias
        return _Affine({k: sp.csr_matrix(P @ M) for k, M in self.terms.items()},
                       bias if add is None else bias + add, self.shape if shape is None else tuple(shape))

    def plus(self, other, sign=1.0):
        terms = dict(self.terms)
        for k, M in other.terms.items():
            terms[k] = terms[k] + sign * M if k in terms else sign * M
        return _Affine(terms, self.bias + sign * other.bias, self.shape)


def _select(index, n_in):
    """Sparse [len(index), n_in] selection of flat positions `index` (-1: a zero row)."""
    index = np.asarray(index).reshape(-1)
    rows = np.nonzero(index >= 0)[0]
    return sp.csr_matrix((np.ones(len(rows)), (rows, index[rows])), shape=(len(index), n_in))


def _axis(axis, rank, node):
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        raise JacgraphError(f"{node.op_type} '{node.name}' works along the batch axis; the bound passes treat "
                            "samples independently. Keep the batch axis out of it.")
    return axis - 1  # per-sample axis


def _pool_geometry(src, node, shape, kernel):
    """(attrs, output spatial shape) of a pooling op, ceil_mode included."""
    attrs, osp = _conv_attrs(src, node, shape, kernel)
    if src.attrs(node).get("ceil_mode", 0):
        isp, s, d, p = shape[1:], attrs["strides"], attrs["dilations"], attrs["pads"]
        nd = len(kernel)
        osp = []
        for i in range(nd):
            span = isp[i] + p[i] + p[i + nd] - d[i] * (kernel[i] - 1) - 1
            o = -(-span // s[i]) + 1
            if (o - 1) * s[i] >= isp[i] + p[i]:  # the last window would start in the end padding
                o -= 1
            osp.append(o)
        osp = tuple(osp)
    return attrs, osp


def _windows(M):
    """Rows of a 0/1 csr matrix as an index array [rows, K] (short rows repeat their first member)."""
    M = sp.csr_matrix(M)
    counts = np.diff(M.indptr)
    if np.any(counts == 0):
        raise JacgraphError("a max-pooling window covers only padding; the model's pooling geometry is degenerate.")
    K = int(counts.max())
    out = np.empty((M.shape[0], K), np.int64)
    for r in range(M.shape[0]):
        cols = M.indices[M.indptr[r]:M.indptr[r + 1]]
        out[r] = np.concatenate([cols, np.full(K - len(cols), cols[0])])
    return out


def _reduce_axes(src, node, rank):
    a = src.attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = src.const(node.input[1])
        if axes is None:
            raise JacgraphError(f"{node.op_type} '{node.name}' has computed axes. Export with constant axes.")
    axes = list(range(1, rank)) if axes is None or len(axes) == 0 else [int(v) % rank for v in np.ravel(axes)]
    if 0 in axes:
        raise JacgraphError(f"{node.op_type} '{node.name}' reduces over the batch axis; the bound passes treat "
                            "samples independently.")
    return [v - 1 for v in axes], bool(a.get("keepdims", 1))


def _reduce_matrix(shape, axes, keepdims):
    """0/1 [n_out, n] matrix whose row j marks the inputs reduced into output j, and the output shape."""
    idx = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    keep = [d for d in range(len(shape)) if d not in axes]
    moved = np.transpose(idx, keep + list(axes))
    out_shape = tuple(shape[d] for d in keep)
    rows = moved.reshape(int(np.prod(out_shape, dtype=np.int64)), -1)
    K = rows.shape[1]
    M = sp.csr_matrix((np.ones(rows.size), (np.repeat(np.arange(rows.shape[0]), K), rows.reshape(-1))),
                      shape=(rows.shape[0], idx.size))
    if keepdims:
        out_shape = tuple(1 if d in axes else shape[d] for d in range(len(shape)))
    return M, out_shape


class _GraphLowering:
    def __init__(self, src, x, in_shape):
        self.src = src
        self.nodes = [Node("input", tuple(in_shape))]
        n = self.nodes[0].n
        self.env = {x: _Affine({0: sp.identity(n, format="csr")}, np.zeros(n), tuple(in_shape))}
        self._materialised = {}

    def node_of(self, name):
        """The graph node holding the value `name` (a linear node is added unless it is one already)."""
        if name in self._materialised:
            return self._materialised[name]
        a = self.env[name]
        if len(a.terms) == 1 and not np.any(a.bias):
            (k, M), = a.terms.items()
            if M.shape[0] == M.shape[1] == self.nodes[k].n and M.nnz == M.shape[0] and \
                    np.all(M.diagonal() == 1) and self.nodes[k].kind != "linear":
                self._materialised[name] = k
                return k
        ks = sorted(a.terms)
        self.nodes.append(Node("linear", a.shape, inputs=ks, mats=[a.terms[k] for k in ks], bias=a.bias))
        self._materialised[name] = len(self.nodes) - 1
        return self._materialised[name]

    def new(self, node, out_name):
        self.nodes.append(node)
        k = len(self.nodes) - 1
        self.env[out_name] = _Affine({k: sp.identity(node.n, format="csr")}, np.zeros(node.n), node.shape)
        self._materialised[out_name] = k


def _graph_node(low, src, node):
    """Lower one source node: update low.env (affine values) or add a nonlinear node."""
    op, a = node.op_type, src.attrs(node)
    env = low.env
    live = [i for i in node.input if i in env]
    x = env[live[0]]
    if op in ACTIVATIONS:
        if node.input[0] not in env or len(live) > 1:
            raise JacgraphError(f"{op} '{node.name}' has a computed bound; only constant Clip bounds are supported.")
        k = low.node_of(node.input[0])
        act_attrs = _act_attrs(src, node, op, a)
        low.new(Node("act", x.shape, inputs=[k], activation=ACTIVATIONS[op], act_attrs=act_attrs, source=node),
                node.output[0])
        return
    if op in ("MaxPool", "ReduceMax"):
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise JacgraphError(f"MaxPool '{node.name}' also outputs its indices; the bound passes take the values "
                                    "only. Export without return_indices.")
            M, shape = _pool_matrix(src, node, x.shape, np.asarray(a["kernel_shape"]), ones=True)
        else:
            axes, keepdims = _reduce_axes(src, node, len(x.shape) + 1)
            M, shape = _reduce_matrix(x.shape, axes, keepdims)
        k = low.node_of(node.input[0])
        low.new(Node("max", shape, inputs=[k], windows=_windows(M), source=node), node.output[0])
        return
    env[node.output[0]] = _linear_value(src, node, op, a, [env.get(i) for i in node.input], x)
    if op == "Split":
        _split(src, node, a, x, env)


def _act_attrs(src, node, op, a):
    if op == "LeakyRelu":
        return {"alpha": float(a.get("alpha", 0.01))}
    if op == "HardSigmoid":
        return {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))}
    if op == "Clip":
        lo = src.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("min")
        hi = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("max")
        return {"min": -np.inf if lo is None else float(lo), "max": np.inf if hi is None else float(hi)}
    return {}


def _pool_matrix(src, node, shape, kernel, ones):
    """Pooling as a sparse [n_out, n] map: 0/1 window membership (ones=True) or the average."""
    if len(shape) != len(kernel) + 1:
        raise JacgraphError(f"{node.op_type} '{node.name}' gets features of shape {shape}, not [channels, spatial...].")
    attrs, osp = _pool_geometry(src, node, shape, list(kernel))
    attrs["group"] = shape[0]
    out_shape = (shape[0],) + tuple(osp)
    M = conv_sparse(np.ones((shape[0], 1, *kernel)), shape, out_shape, attrs)
    if ones:
        return M, out_shape
    if src.attrs(node).get("count_include_pad", 0):
        if src.attrs(node).get("ceil_mode", 0):
            raise JacgraphError(f"AveragePool '{node.name}' with count_include_pad=1 and ceil_mode=1 is not supported.")
        return M / float(np.prod(kernel)), out_shape
    return sp.diags(1.0 / np.diff(M.indptr)) @ M, out_shape


def _linear_value(src, node, op, a, ins, x):
    """The affine value of a linear op's output from its inputs' values (None: a constant input)."""
    n = x.n
    computed = [v for v in ins if v is not None]
    if op in ("Identity", "Dropout"):
        return x
    if op in ("Flatten", "Reshape"):
        if op == "Flatten" and a.get("axis", 1) != 1:
            raise JacgraphError(f"Flatten '{node.name}' has axis {a.get('axis')}; only axis=1 keeps the batch "
                                "axis apart. Export with torch.flatten(x, 1).")
        shape = (n,) if op == "Flatten" else _reshape_target(src, node, n)
        return _Affine(x.terms, x.bias, shape)
    if op == "Transpose":
        perm = list(a.get("perm") or range(len(x.shape) + 1)[::-1])
        if perm[0] != 0:
            raise JacgraphError(f"Transpose '{node.name}' moves the batch axis. Keep it first.")
        idx = np.transpose(np.arange(n).reshape(x.shape), [p - 1 for p in perm[1:]])
        return x.map(_select(idx, n), shape=idx.shape)
    if op in ("Gemm", "MatMul"):
        if ins[0] is None or len(computed) > 1 or len(x.shape) != 1:
            raise JacgraphError(f"{op} '{node.name}' must multiply flat [batch, features] features by a constant "
                                "matrix on the right.")
        B = np.asarray(src.const(node.input[1]), np.float64)
        if op == "MatMul":
            return x.map(B.T, shape=(B.shape[1],))
        if a.get("transA", 0):
            raise JacgraphError(f"Gemm '{node.name}' needs transA=0.")
        B = B.T if a.get("transB", 0) else B
        C = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        add = None if C is None else a.get("beta", 1.0) * _per_sample(C, (B.shape[1],), f"Gemm '{node.name}'")
        return x.map(a.get("alpha", 1.0) * B.T, add, shape=(B.shape[1],))
    if op == "Conv":
        Wk = np.asarray(src.const(node.input[1]), np.float64)
        if len(x.shape) != Wk.ndim - 1:
            raise JacgraphError(f"Conv '{node.name}' gets features of shape {x.shape}, not [channels, spatial...].")
        attrs, osp = _conv_attrs(src, node, x.shape, Wk.shape[2:])
        Bc = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        add = None if Bc is None else np.repeat(np.asarray(Bc, np.float64), int(np.prod(osp)))
        out_shape = (Wk.shape[0],) + osp
        return x.map(conv_sparse(Wk, x.shape, out_shape, attrs), add, shape=out_shape)
    if op == "BatchNormalization":
        scale, bias, mean, var = (np.asarray(src.const(i), np.float64) for i in node.input[1:5])
        s = scale / np.sqrt(var + a.get("epsilon", 1e-5))
        spatial = int(np.prod(x.shape[1:], dtype=np.int64))
        return x.map(sp.diags(np.repeat(s, spatial)), np.repeat(bias - mean * s, spatial))
    if op in ("AveragePool", "GlobalAveragePool"):
        kernel = np.asarray(x.shape[1:]) if op == "GlobalAveragePool" else np.asarray(a["kernel_shape"])
        M, shape = _pool_matrix(src, node, x.shape, kernel, ones=False)
        return x.map(M, shape=shape)
    if op in ("ReduceMean", "ReduceSum"):
        axes, keepdims = _reduce_axes(src, node, len(x.shape) + 1)
        M, shape = _reduce_matrix(x.shape, axes, keepdims)
        return x.map(M / (M.shape[1] / M.shape[0]) if op == "ReduceMean" else M, shape=shape)
    if op == "Concat":
        return _concat(node, a, ins, src)
    if op in ("Slice", "Split"):
        return _slices(src, node, a, x)[0]
    if op == "Pad":
        return _pad(src, node, a, x)
    if op == "ConvTranspose":
        return _conv_transpose(src, node, a, x)
    if op == "Gather":
        indices = src.const(node.input[1])
        if ins[0] is None or indices is None:
            raise JacgraphError(f"Gather '{node.name}' must pick constant indices out of the features.")
        axis = _axis(int(a.get("axis", 0)), len(x.shape) + 1, node)
        indices, size = np.asarray(indices, np.int64), x.shape[axis]
        outside = (indices < -size) | (indices >= size)
        if outside.any():
            raise JacgraphError(f"Gather '{node.name}' picks index {int(indices[outside].flat[0])} "
                                f"of an axis of size {size}: the model is invalid there; fix its indices.")
        picked = np.take(np.arange(n).reshape(x.shape), indices, axis=axis)
        return x.map(_select(picked, n), shape=picked.shape)
    if op == "Resize":
        return x.map(_resize_matrix(src, node, x.shape), shape=src.shape(node.output[0])[1:])
    if op in ("Squeeze", "Unsqueeze"):  # flat C-order features unchanged: a new per-sample shape only
        axes = a.get("axes") if a.get("axes") is not None else (
            src.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
        rank = len(x.shape) + 1 + (0 if op == "Squeeze" else len(np.ravel(axes if axes is not None else [])))
        shape = src.shape(node.output[0])
        if axes is None or 0 in [int(v) % rank for v in np.ravel(axes)] or shape is None \
                or not all(isinstance(d, int) for d in shape[1:]):
            raise JacgraphError(f"{op} '{node.name}' has no constant axes, touches the batch axis, or has an output "
                                "shape that shape inference could not fix. Squeeze/unsqueeze named feature axes.")
        return _Affine(x.terms, x.bias, tuple(shape[1:]))
    if op in ("Add", "Sub") and len(computed) == 2:
        if tuple(ins[0].shape) != tuple(ins[1].shape):
            raise JacgraphError(f"{op} '{node.name}' adds computed tensors of shapes {ins[0].shape} and "
                                f"{ins[1].shape}; broadcasting between computed tensors is not supported.")
        return ins[0].plus(ins[1], -1.0 if op == "Sub" else 1.0)
    if len(computed) > 1:
        raise JacgraphError(f"{op} '{node.name}' multiplies two computed tensors: not affine, and not supported.")
    xi = [i for i, v in enumerate(ins) if v is not None][0]
    c = _per_sample(src.const(node.input[1 - xi]), x.shape, f"{op} '{node.name}'")
    if op == "Add":
        return _Affine(x.terms, x.bias + c, x.shape)
    if op == "Sub":
        return x.map(sp.identity(n) * (1.0 if xi == 0 else -1.0), -c if xi == 0 else c)
    if op == "Mul":
        return x.map(sp.diags(c))
    if xi != 0:
        raise JacgraphError(f"Div '{node.name}' divides a constant by the features: not affine.")
    return x.map(sp.diags(1.0 / c))


def _concat(node, a, ins, src):
    rank = len(next(v for v in ins if v is not None).shape) + 1
    axis = _axis(int(a["axis"]), rank, node)
    parts, offset = [], 0
    for v, name in zip(ins, node.input):
        if v is None:
            c = src.const(name)
            raise JacgraphError(f"Concat '{node.name}' joins a constant of shape {None if c is None else c.shape} "
                                "to the features; only computed tensors are supported.")
        parts.append(np.arange(v.n).reshape(v.shape) + offset)
        offset += v.n
    ids = np.concatenate(parts, axis=axis)
    out = None
    for v, p in zip(ins, parts):
        start = int(p.reshape(-1)[0])
        local = np.where((ids >= start) & (ids < start + v.n), ids - start, -1)
        term = v.map(_select(local, v.n), shape=ids.shape)
        out = term if out is None else out.plus(term)
    return out


def _slices(src, node, a, x):
    """The affine value of each output of Slice / Split."""
    n = x.n
    idx = np.arange(n).reshape(x.shape)
    rank = len(x.shape) + 1
    if node.op_type == "Slice":
        consts = [src.const(i) if i else None for i in list(node.input[1:]) + [""] * (5 - len(node.input))]
        if consts[0] is None or consts[1] is None or any(c is None for c, i in zip(consts[2:], node.input[3:]) if i):
            raise JacgraphError(f"Slice '{node.name}' has computed starts/ends/axes/steps. Export constant slices.")
        starts, ends = np.ravel(consts[0]), np.ravel(consts[1])
        axes = np.ravel(consts[2]) if consts[2] is not None else np.arange(len(starts))
        steps = np.ravel(consts[3]) if consts[3] is not None else np.ones(len(starts), np.int64)
        sl = [slice(None)] * (rank - 1)
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = _axis(int(ax), rank, node)
            sl[ax] = slice(int(s), None if (st > 0 and e >= 2**62) or (st < 0 and e <= -2**62) else int(e), int(st))
        picks = [idx[tuple(sl)]]
    else:
        axis = _axis(int(a.get("axis", 0)), rank, node)
        sizes = src.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("split")
        if sizes is None:
            count = len(node.output)
            size = -(-x.shape[axis] // count)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(count)]
        picks = np.split(idx, np.cumsum(np.ravel(sizes))[:-1], axis=axis)
    return [x.map(_select(p, n), shape=p.shape) for p in picks]


def _split(src, node, a, x, env):
    for name, value in zip(node.output, _slices(src, node, a, x)):
        if name:
            env[name] = value


def _pad(src, node, a, x):
    pads = src.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("pads")
    value = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("value", 0.0)
    if pads is None or value is None or (len(node.input) > 3 and node.input[3]):
        raise JacgraphError(f"Pad '{node.name}' has computed pads or axes. Export constant pads.")
    pads = np.ravel(pads).astype(int)
    rank = len(pads) // 2
    if pads[0] or pads[rank]:
        raise JacgraphError(f"Pad '{node.name}' pads the batch axis. Pad the features only.")
    mode = a.get("mode", "constant")
    width = [(int(pads[d]), int(pads[d + rank])) for d in range(1, rank)]
    idx = np.arange(x.n).reshape(x.shape)
    if mode == "constant":
        out = np.pad(idx, width, constant_values=-1)
        add = np.where(out.reshape(-1) < 0, float(np.ravel(value)[0]) if np.size(value) else 0.0, 0.0)
    elif mode in ("reflect", "edge"):
        out, add = np.pad(idx, width, mode=mode), None
    else:
        raise JacgraphError(f"Pad '{node.name}' uses mode {mode!r}; constant, reflect and edge are supported.")
    return x.map(_select(out, x.n), add, shape=out.shape)


def _conv_transpose(src, node, a, x):
    """ConvTranspose as the transpose of the Conv with the same weight and geometry, its input and output swapped
    (that Conv maps the ConvTranspose's output shape back to its input shape)."""
    Wk = np.asarray(src.const(node.input[1]), np.float64)  # [Ci, Co/group, *kernel]
    if len(x.shape) != Wk.ndim - 1:
        raise JacgraphError(f"ConvTranspose '{node.name}' gets features of shape {x.shape}, not [channels, spatial...].")
    if a.get("output_shape"):
        raise JacgraphError(f"ConvTranspose '{node.name}' sets output_shape; the bound passes need explicit pads and "
                            "output_padding (torch's ConvTranspose2d exports them).")
    kernel, isp, nd = list(Wk.shape[2:]), x.shape[1:], Wk.ndim - 2
    ys = src.shape(node.output[0])
    g = resolve_window(a, kernel, isp, None if ys is None else ys[2:], transpose=True)
    extra = list(a.get("output_padding") or [0] * nd)
    osp = tuple(transpose_output_size(g, isp, extra, kernel))
    out_shape = (Wk.shape[1] * int(a.get("group", 1)),) + osp
    attrs = {"strides": g.strides, "dilations": g.dilations, "pads": g.pads, "group": int(a.get("group", 1))}
    Bc = src.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    add = None if Bc is None else np.repeat(np.asarray(Bc, np.float64), int(np.prod(osp)))
    return x.map(conv_sparse(Wk, out_shape, x.shape, attrs).T, add, shape=out_shape)


RESIZE_MODES = ("nearest", "linear")


def _resize_matrix(src, node, shape):
    """Resize (nearest or linear, constant scales or sizes) as a sparse [n_out, n] map: the Kronecker product of
    its per-axis interpolation matrices, which the reverse pass reads off the op itself."""
    from .rules.transpose import resize_matrices

    matrices = resize_matrices(src, node, src.opset)
    if matrices is None:
        raise JacgraphError(f"Resize '{node.name}' has scales or sizes computed from values that are not fixed. "
                            "Export it with constant scales or sizes (e.g. nn.Upsample(scale_factor=2)).")
    per_axis = dict(matrices)
    if 0 in per_axis:
        raise JacgraphError(f"Resize '{node.name}' resizes the batch axis. Resize the features only.")
    M = sp.identity(1, format="csr")
    for d, n in enumerate(shape):
        A = per_axis.get(d + 1)
        M = sp.kron(M, sp.identity(n) if A is None else sp.csr_matrix(np.where(np.abs(A) > 1e-15, A, 0.0)),
                    format="csr")
    return M


GRAPH_OPS = (LINEAR_OPS | set(ACTIVATIONS) | {"Transpose", "AveragePool", "GlobalAveragePool", "ReduceMean",
                                                "ReduceSum", "Concat", "Slice", "Split", "Pad", "MaxPool", "ReduceMax",
                                                "ConvTranspose", "Resize", "Squeeze", "Unsqueeze", "Gather"})
TWO_OPERAND_OPS = ("Mul", "Div", "Gemm", "MatMul", "Conv", "ConvTranspose")  # affine only with constant operands


def _graph_refusals(src, x, floats_only=False) -> Counter:
    """Every node on x's path that the DAG lowering cannot take, by op (and why, where the op itself is known);
    floats_only: only nodes with a float output (shape arithmetic, which folds once shapes are fixed, left out)."""
    missing, active = Counter(), {x}
    for node in src.active_nodes([x]):
        op, a = node.op_type, src.attrs(node)
        if floats_only and not any(o and src.is_float(o) for o in node.output):
            pass
        elif node.domain not in ("", "ai.onnx") or op not in GRAPH_OPS:
            missing[op if node.domain in ("", "ai.onnx") else f"{node.domain}.{op}"] += 1
        elif op == "Resize" and (a.get("mode") not in RESIZE_MODES
                                 or a.get("coordinate_transformation_mode") == "tf_crop_and_resize"):
            missing[f"Resize with mode {a.get('mode')!r}/{a.get('coordinate_transformation_mode')!r} (nearest and "
                    "linear are linear maps the bounds take)"] += 1
        elif op in TWO_OPERAND_OPS and sum(i in active for i in node.input) > 1:
            missing[f"{op} of two computed tensors (not affine)"] += 1
        elif op in ACTIVATIONS and any(i in active for i in node.input[1:]):
            missing[f"{op} with computed bounds"] += 1
        active.update(o for o in node.output if o)
    return missing


def _with_shapes_fixed(src, x, shape):
    """src with x fixed at [batch, *shape] and its shape arithmetic folded (jacgraph.lowering.prepare), where x's
    path needs it: pads, Resize sizes and Reshape targets computed from Shape become constants; Resize's
    interpolation matrices need static shapes. The batch size (1 unless the model fixes it) changes nothing
    per sample."""
    declared = src.shape(x) or (None,)
    batch = declared[0] if isinstance(declared[0], int) else 1
    active = src.active_nodes([x])
    computed = {x} | {o for n in active for o in n.output}
    # a fixed-shape export still computes pads and sizes from constants (torch: Concat/Slice/Cast chains)
    folded = all(not i or i in computed or src.const(i) is not None for n in active for i in n.input)
    if tuple(declared) == (batch, *shape) and folded and all(n.op_type in GRAPH_OPS for n in active):
        return src
    return SourceModel(src.proto, input_shapes={x: [batch, *shape]})


@stage("lowering the model to a graph of linear operators and nonlinearities")
def lower_graph(model, input_shape=None) -> Graph:
    """The model as a Graph of linear and nonlinear nodes; one JacgraphError lists every unsupported op."""
    src, x = _single_input(model)
    try:
        shape = _input_shape(src, x, input_shape)
    except JacgraphError:  # no fixed shape: name the refused ops first (shape arithmetic, int-valued, may fold)
        missing = _graph_refusals(src, x, floats_only=True)
        if missing:
            raise unsupported_error(missing, "the layer lowering for bounds (jacgraph.layers)") from None
        raise
    src = _with_shapes_fixed(src, x, shape)
    missing = _graph_refusals(src, x)
    if missing:
        raise unsupported_error(missing, "the layer lowering for bounds (jacgraph.layers)")
    low = _GraphLowering(src, x, shape)
    for node in src.active_nodes([x]):
        _graph_node(low, src, node)
    out = src.outputs[0].name
    if out not in low.env:
        raise JacgraphError(f"the model's output '{out}' does not depend on its input '{x}'.")
    value = low.env[out]
    ks = sorted(value.terms)
    low.nodes.append(Node("linear", value.shape, inputs=ks, mats=[value.terms[k] for k in ks], bias=value.bias))
    return Graph(low.nodes)


def is_chain(model) -> bool:
    """True when `lower` (the chain of stages) takes the model."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    floats = src.float_inputs()
    return len(floats) == 1 and len(src.outputs) == 1 and not _check_chain(src, floats[0])
