"""Lowering of a feed-forward model into stages (affine map, elementwise activation) for the bound passes.

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
from .rules.registry import resolve_window

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


def lower(model, input_shape=None) -> list[Stage]:
    """Stages of a feed-forward chain; raises one JacgraphError listing every unsupported op."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    floats = src.float_inputs()
    if len(floats) != 1 or len(src.outputs) != 1:
        raise JacgraphError(f"the bound passes need a model with one float input and one output; this one has "
                            f"{len(floats)} float input(s) and {len(src.outputs)} output(s). Export a single-input, "
                            "single-output network.")
    x = floats[0]
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
        out = src.shape(node.output[0])
        if op == "Flatten":
            if a.get("axis", 1) != 1:
                raise JacgraphError(f"Flatten '{node.name}' has axis {a.get('axis')}; only axis=1 keeps the batch "
                                    "axis apart. Export with torch.flatten(x, 1).")
            low.shape = (n,)
            return
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
        low.shape = tuple(rest)
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
