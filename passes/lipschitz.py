"""AutoLip and SeqLip (Scaman & Virmaux, NeurIPS 2018): global l2 Lipschitz upper bounds.

A feed-forward model is lowered (jacgraph.layers) into stages x -> act(A x + b). Its Lipschitz
constant is at most
  AutoLip: prod_i ||A_i||_2 * max|act_i'|                       (per-layer operator norms)
  SeqLip:  prod_i max_{s in box_i} ||S~_{i+1} V_{i+1}^T diag(s) U_i S~_i||  * max|act_last'|
           with A_i = U_i S_i V_i^T, S~ = S for the first and last layer and sqrt(S) between,
           box_i the range of act_i' ({0,1} for ReLU); the norm is convex in s, so its max over
           the box is at a vertex: exact search over 2^n vertices for n <= exact_limit units
           (default 16, at most 24), greedy search on the top-k singular directions beyond (an
           estimate, not a bound). The guaranteed SeqLip bound uses, beyond the limit, the
           midpoint bound |m| ||A B|| + |r| min(||A|| ||B||, sum_j ||a_j|| ||b_j||) with
           s = m + r t, |t| <= 1; it never exceeds AutoLip.
  LipSDP:  sqrt(min rho s.t. M(rho, T) <= 0), LipSDP-Neuron (Fazlyab et al., NeurIPS 2019), in
           passes/lipsdp.py: an SDP (cvxpy + Clarabel) for small dense models, its solution checked in
           float64 so that the printed bound is guaranteed.

`--emit autolip` (`build`) writes, per linear stage i, three ONNX graphs (a dict {suffix: model},
written as OUT.layer<i>.<op|adj|power>.onnx):
  layer<i>.op     u -> A u        (Gemm/MatMul: MatMul by A^T; Conv: Conv without bias)
  layer<i>.adj    v -> A^T v      (MatMul by A; Conv: ConvTranspose, same kernel, with the
                                   output_padding that gives back the input size)
  layer<i>.power  (u0, iterations, tol) -> (sigma, u, sigma_history): an ONNX Loop of power
                  iteration on A^T A, stopping when ||A^T A u|| changes by less than tol relative
                  (tol < 0: run every iteration).
A model that is not a chain (residual joins, concat, pooling: layers.lower_graph) gets AutoLip and SeqLip over
its DAG (graph_lipschitz) and the same three graphs per linear node k, OUT.node<k>.<op|adj|power>.onnx, for the
node's inputs stacked -> its output (graph_stages). Every graph carries jacgraph.emit = autolip metadata, which
`jacgraph verify --source` checks against the operator rebuilt from the source (emitted_operator).
The input shape is fixed at compile time: a Conv's operator norm depends on it. Graphs are float64
when every stage is dense, float32 when a stage is a Conv (onnxruntime has no float64 Conv kernel;
pass dtype="float64" to get float64 graphs for onnx.reference).

Power iteration approaches ||A|| from below: its result is printed as "norm (estimate)". The bound
is certified by jacgraph.spectral (Gram iteration on the dense matrix; for a Conv also the exact norm of
the circular convolution on the padded grid; the smaller of the two). Printing is in jacgraph/cli/analysis.py.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.spectral import (DENSE_LIMIT, EPS, certified_bound, conv_geometry, matrix, max_overlap, norm_estimate,
                               one_blas_thread, size, sparse_bound, stacked_norms)

EXACT_LIMIT = 16            # SeqLip searches all 2^n activation patterns up to this many units
EXACT_CAP = 24              # beyond this the exact search would take hours
TOP_K = 10                  # singular directions kept by the greedy SeqLip search
MAX_CHAIN = 4               # SeqLip on a DAG: matrices per chain (each length is one more SeqLip of its SVDs)
CHAIN_DENSE_LIMIT = 1 << 22  # and the largest matrix in a chain (entries; its SVD takes seconds)


# ---- activations: the range of their derivative ---------------------------------------------------
def slope_box(activation, attrs=None) -> tuple:
    """(lo, hi): every derivative of the activation lies in [lo, hi] (kinks included)."""
    attrs = attrs or {}
    if activation is None:
        return (1.0, 1.0)
    if activation in ("relu", "clip"):
        return (0.0, 1.0)
    if activation == "leaky_relu":
        a = float(attrs.get("alpha", 0.01))
        return (min(a, 1.0), max(a, 1.0))
    if activation == "tanh":
        return (0.0, 1.0)
    if activation == "sigmoid":
        return (0.0, 0.25)
    if activation == "hardsigmoid":
        a = float(attrs.get("alpha", 0.2))
        return (min(a, 0.0), max(a, 0.0))
    raise JacgraphError(f"activation {activation!r} has no known slope range; the Lipschitz pass supports "
                        "relu, leaky_relu, tanh, sigmoid, hardsigmoid and clip.")


def max_slope(activation, attrs=None) -> float:
    lo, hi = slope_box(activation, attrs)
    return max(abs(lo), abs(hi))


# ---- stages -------------------------------------------------------------------------------------
def lower(model, input_shape=None):
    """The model's stages (jacgraph.layers), each with a fixed per-sample input shape."""
    from jacgraph import layers

    stages = layers.lower(model, input_shape=tuple(input_shape) if input_shape else None)
    if not stages:
        raise JacgraphError("the model has no linear layer, so it has no Lipschitz bound to compute.")
    return stages


# ---- emitted graphs: A, A^T and power iteration ----------------------------------------------------
def _apply(b: Builder, stage, x: str, adjoint: bool, dtype) -> str:
    """Emit A x (or A^T x) for a batch-1 tensor x of the stage's input (output) shape; no bias."""
    shape_in, shape_out = (stage.out_shape, stage.in_shape) if adjoint else (stage.in_shape, stage.out_shape)
    conv = getattr(stage, "conv", None)
    if conv is not None:
        g = conv_geometry(conv, conv.get("in_shape", stage.in_shape))
        common = dict(kernel_shape=g["kernel_shape"], strides=g["strides"], dilations=g["dilations"],
                      pads=g["pads"], group=g["group"])
        w = b.const(g["W"].astype(dtype), hint="kernel")
        # a Reshape/Flatten inside the stage gives it other shapes than the Conv's own
        conv_in, conv_out = tuple(conv.get("in_shape", stage.in_shape)), tuple(conv.get("out_shape", stage.out_shape))
        if adjoint:
            conv_in, conv_out = conv_out, conv_in
        if conv_in != tuple(shape_in):
            x = b.Reshape(x, b.ints([1, *conv_in]))
        if adjoint:
            y = b.op("ConvTranspose", x, w, output_padding=g["output_padding"], **common)
        else:
            y = b.op("Conv", x, w, **common)
        return y if conv_out == tuple(shape_out) else b.Reshape(y, b.ints([1, *shape_out]))
    A = matrix(stage)
    flat = b.Reshape(x, b.ints([1, int(np.prod(shape_in))]))
    y = b.MatMul(flat, b.const(np.ascontiguousarray(A if adjoint else A.T).astype(dtype), hint="matrix"))
    return b.Reshape(y, b.ints([1, *shape_out]))


def _builder(src) -> Builder:
    b = Builder(src)
    b.initializers = []  # these graphs carry only their own layer's weights
    return b


def _norm(b, x):
    return b.Sqrt(b.reduce("ReduceSum", b.Mul(x, x), None, keepdims=0))


def _named(b, x, name):
    """x under a readable graph-output name (fresh, so no source name is reused)."""
    out = b.fresh(name)
    b.nodes.append(helper.make_node("Identity", [x], [out], name=b.fresh(f"jg_{name}")))
    return out


def _label(index) -> str:
    """A graph's name stem: layer<i> for stage i of a chain, node<k> (given as a string) for a DAG's node k."""
    return index if isinstance(index, str) else f"layer{index}"


def _metadata(index, graph, input_shape) -> dict:
    """The graph's kind and what `jacgraph verify --source` needs to rebuild its operator (emitted_operator)."""
    meta = {"jacgraph.emit": "autolip", "jacgraph.autolip.graph": graph, "jacgraph.autolip.layer": _label(index)}
    if input_shape is not None:  # the model's per-sample input shape the stages were lowered for
        meta["jacgraph.input_shape"] = json.dumps([int(d) for d in input_shape])
    return meta


def operator_graph(src, stage, index, adjoint=False, dtype=np.float64, input_shape=None) -> onnx.ModelProto:
    b = _builder(src)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape_in, shape_out = (stage.out_shape, stage.in_shape) if adjoint else (stage.in_shape, stage.out_shape)
    x = b.fresh("v" if adjoint else "u")
    b.add_input(x, elem, [1, *shape_in])
    y = _named(b, _apply(b, stage, x, adjoint, dtype), "ATv" if adjoint else "Au")
    b.add_output(y, elem, [1, *shape_out])
    what = "A^T v" if adjoint else "A u"
    kind = "adj" if adjoint else "op"
    return b.build(f"{_label(index)}_{kind}", doc=f"{_label(index)}: {what} (no bias)",
                   metadata=_metadata(index, kind, input_shape))


def power_graph(src, stage, index, dtype=np.float64, input_shape=None) -> onnx.ModelProto:
    """(u0, iterations, tol) -> (sigma, u, sigma_history): power iteration on A^T A in an ONNX Loop.
    sigma = sqrt(||A^T A u||) for the last unit u: a lower estimate of ||A||_2."""
    b = _builder(src)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = [1, *stage.in_shape]
    u0, iters, tol = b.fresh("u0"), b.fresh("iterations"), b.fresh("tol")
    b.add_input(u0, elem, shape)
    b.add_input(iters, TensorProto.INT64, [])
    b.add_input(tol, elem, [])
    u = b.Div(u0, _norm(b, u0))
    tiny = b.const(np.asarray(np.finfo(dtype).tiny, dtype=dtype), hint="tiny")

    # the body is emitted through the same builder (fresh names stay unique across scopes), then moved
    start = len(b.nodes)
    i_in, c_in, u_in, lam_in = b.fresh("i"), b.fresh("cond_in"), b.fresh("u_in"), b.fresh("lam_in")
    w = _apply(b, stage, _apply(b, stage, u_in, False, dtype), True, dtype)
    lam = _norm(b, w)
    u_out = b.Div(w, b.Max(lam, tiny))
    c_out = b.Greater(b.Abs(b.Sub(lam, lam_in)), b.Mul(tol, lam))
    lam_scan = b.Identity(lam)
    body_nodes = b.nodes[start:]
    del b.nodes[start:]
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        body_nodes, f"{_label(index)}_power_step",
        [vi(i_in, TensorProto.INT64, []), vi(c_in, TensorProto.BOOL, []), vi(u_in, elem, shape), vi(lam_in, elem, [])],
        [vi(c_out, TensorProto.BOOL, []), vi(u_out, elem, shape), vi(lam, elem, []), vi(lam_scan, elem, [])])

    true = b.const(np.asarray(True), hint="true")
    lam0 = b.const(np.asarray(0, dtype=dtype), hint="zero")
    u_fin, lam_fin, history = b.op("Loop", iters, true, u, lam0, n_out=3, body=body)
    sigma, u_last = _named(b, b.Sqrt(lam_fin), "sigma"), _named(b, u_fin, "u")
    sigma_hist = _named(b, b.Sqrt(history), "sigma_history")
    b.add_output(sigma, elem, [])
    b.add_output(u_last, elem, shape)
    b.add_output(sigma_hist, elem, [None])
    return b.build(f"{_label(index)}_power", doc=f"{_label(index)}: power iteration on A^T A (an estimate of ||A||_2 from "
                   "below)", metadata=_metadata(index, "power", input_shape))


def _dtype_for(stages, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    has_conv = any(getattr(s, "conv", None) is not None for s in stages)
    return np.dtype(np.float32 if has_conv else np.float64)


def build(model, input_shape=None, dtype=None) -> dict:
    """`--emit autolip`: {"layer<i>.op" | "layer<i>.adj" | "layer<i>.power": ModelProto} for every linear stage of
    a chain; for a DAG (layers.lower_graph) the same three graphs "node<k>.*" for every linear node k, whose
    operator maps its inputs, flattened and stacked in the order of node.inputs, to its output (graph_stages)."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    stages, shape = emitted_stages(src, input_shape)
    dt = _dtype_for(list(stages.values()), dtype)
    out = {}
    for index, stage in stages.items():
        out[f"{_label(index)}.op"] = operator_graph(src, stage, index, False, dt, shape)
        out[f"{_label(index)}.adj"] = operator_graph(src, stage, index, True, dt, shape)
        out[f"{_label(index)}.power"] = power_graph(src, stage, index, dt, shape)
    return out


def emitted_stages(src, input_shape=None) -> tuple:
    """({index: Stage}, the model's per-sample input shape) for the operators `--emit autolip` writes: stage i of a
    chain (index i), or linear node k of a DAG (index "node<k>")."""
    from jacgraph import layers

    if layers.is_chain(src):
        stages = lower(src, input_shape)
        return dict(enumerate(stages)), stages[0].in_shape
    graph = layers.lower_graph(src, input_shape)
    return {f"node{k}": stage for k, stage in graph_stages(graph).items()}, graph.in_shape


def emitted_operator(source, props) -> np.ndarray:
    """The dense matrix an emitted autolip graph applies (its metadata names it), rebuilt from the source model."""
    label, shape = props.get("jacgraph.autolip.layer", ""), props.get("jacgraph.input_shape")
    index = int(label[5:]) if label.startswith("layer") and label[5:].isdigit() else label
    stages, _ = emitted_stages(SourceModel(source), tuple(json.loads(shape)) if shape else None)
    if index not in stages:
        raise JacgraphError(f"the graph applies the operator of {label!r}, which the source model's lowering does not "
                            f"have ({', '.join(map(_label, stages))}). Give the model it was compiled from as --source.")
    if size(stages[index]) > DENSE_LIMIT:
        raise JacgraphError(f"{label}'s operator has {size(stages[index])} matrix entries, more than the {DENSE_LIMIT} "
                            "verify rebuilds densely; check a smaller --input-shape.")
    return matrix(stages[index])


def graph_stages(graph) -> dict:
    """{k: Stage} for each linear node k of a lowered DAG: its inputs flattened and stacked -> its flat output, one
    dense matrix [M_k1 .. M_kJ] (the operator whose norm the DAG's AutoLip bounds jointly)."""
    import scipy.sparse as sp

    from jacgraph.layers import Stage

    out = {}
    for k, node in enumerate(graph.nodes):
        if node.kind != "linear":
            continue
        n_in = sum(graph.nodes[i].n for i in node.inputs)
        if n_in * node.n > DENSE_LIMIT:
            raise JacgraphError(f"linear node {k} of the lowered DAG ({n_in} -> {node.n}) has more than {DENSE_LIMIT} "
                                "matrix entries to emit densely. Use `jacgraph lipschitz --method autolip` (sparse "
                                "operators), or a smaller --input-shape.")
        out[k] = Stage(nodes=[], weight=sp.hstack(node.mats).toarray(), bias=node.bias, in_shape=(n_in,),
                       out_shape=(node.n,), activation=None)
    return out


def _session(model):
    """onnxruntime where it has the kernels; onnx.reference for float64 Conv graphs."""
    is_f64 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    if is_f64 and any(n.op_type in ("Conv", "ConvTranspose") for n in _all_nodes(model.graph)):
        from jacgraph.reference import reference_session

        sess = reference_session(model)
        return lambda feeds: sess.run(None, feeds)
    from jacgraph.runtime import session

    sess = session(model)
    return lambda feeds: sess.run(None, feeds)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def power_norm(graph, stage, iterations=1000, tol=None, seed=0):
    """Run the emitted power-iteration graph: (sigma estimate, iterations run, final unit vector)."""
    dtype = helper.tensor_dtype_to_np_dtype(graph.graph.input[0].type.tensor_type.elem_type)
    if tol is None:  # float64: stop once changes are at rounding level; float32: run every iteration, since
        tol = 1e-13 if dtype == np.float64 else -1.0  # its sigma stalls (repeats exactly) long before u converges
    u0 = np.random.default_rng(seed).standard_normal((1, *stage.in_shape)).astype(dtype)
    sigma, u, history = _session(graph)({graph.graph.input[0].name: u0, graph.graph.input[1].name: np.asarray(iterations, np.int64),
                                         graph.graph.input[2].name: np.asarray(tol, dtype)})
    return float(sigma), len(history), u


# ---- SeqLip -------------------------------------------------------------------------------------
def _pair_exact(A, B, lo, hi, chunk=4096) -> float:
    """max over s in {lo, hi}^n of ||A diag(s) B||_2, by enumerating every vertex."""
    n = A.shape[1]
    base = lo * (A @ B)
    outer = (hi - lo) * np.einsum("rj,js->jrs", A, B)
    best = 0.0
    for start in range(0, 1 << n, chunk):
        codes = np.arange(start, min(start + chunk, 1 << n))
        bits = ((codes[:, None] >> np.arange(n)) & 1).astype(np.float64)
        M = base + np.tensordot(bits, outer, axes=1)
        best = max(best, float(stacked_norms(M).max()))
    return best


def _pair_greedy(A, B, lo, hi, top_k=TOP_K, screen=32) -> float:
    """A vertex s found by local search on the top-k singular directions (start: the rank-1 optimum; each
    step takes the best single flip among the `screen` with the largest first-order gain), and
    ||A diag(s) B||_2 there: a lower estimate of the pair's maximum, not a bound."""
    n = A.shape[1]
    Ak, Bk = A[:top_k], B[:, :top_k]
    c = Ak[0] * Bk[:, 0]
    starts = [np.where(c > 0, hi, lo), np.where(c < 0, hi, lo)]
    s = max(starts, key=lambda v: abs(float(v @ c))).astype(np.float64)
    outer = np.einsum("rj,js->jrs", Ak, Bk)
    M = np.einsum("rj,j,js->rs", Ak, s, Bk)
    value = np.linalg.norm(M, 2)
    for _ in range(4 * n):
        flips = np.where(s == hi, lo - hi, hi - lo)
        U, _, Vt = np.linalg.svd(M)
        gain = flips * (U[:, 0] @ Ak) * (Bk @ Vt[0])  # d sigma_max for each flip, to first order
        pick = np.argsort(gain)[::-1][:screen]
        candidates = M[None] + flips[pick, None, None] * outer[pick]
        norms = np.linalg.norm(candidates, ord=2, axis=(1, 2))
        j = int(np.argmax(norms))
        if norms[j] <= value * (1 + 1e-12):
            break
        s[pick[j]] += flips[pick[j]]
        M, value = candidates[j], norms[j]
    return float(np.linalg.norm((A * s) @ B, 2))


def _pair_midpoint_bound(A, B, lo, hi) -> float:
    """A guaranteed bound on max over s in [lo, hi]^n of ||A diag(s) B||_2 without search: with
    s = m + r t, |t| <= 1, it is at most |m| ||A B|| + |r| min(||A|| ||B||, sum_j ||a_j|| ||b_j||)."""
    m, r = (lo + hi) / 2, (hi - lo) / 2
    spread = min(np.linalg.norm(A, 2) * np.linalg.norm(B, 2),
                 float(np.linalg.norm(A, axis=0) @ np.linalg.norm(B, axis=1)))
    whole = max(abs(lo), abs(hi)) * np.linalg.norm(A, 2) * np.linalg.norm(B, 2)
    return float(min(abs(m) * np.linalg.norm(A @ B, 2) + abs(r) * spread, whole))


def seqlip(mats, boxes, last_slope=1.0, exact_limit=EXACT_LIMIT, top_k=TOP_K, greedy=True) -> dict:
    """SeqLip over dense layer matrices; boxes[i] is the slope range of the activation after layer i.

    value: the product of pair maxima (exact search up to exact_limit units, greedy beyond: then an
    estimate). bound: guaranteed, the product of exact pair maxima, and beyond the limit of the
    midpoint bound, plus a float64 rounding allowance. greedy=False skips the greedy search (value: the bound)."""
    if exact_limit > EXACT_CAP:
        raise JacgraphError(f"--exact-limit {exact_limit} would search 2^{exact_limit} patterns per pair; "
                            f"the most that finishes is {EXACT_CAP}.")
    svd = [np.linalg.svd(W, full_matrices=False) for W in mats]
    top = [float(S[0]) if S.size else 0.0 for _, S, _ in svd]
    k = len(mats)
    # computed SVD factors reproduce W up to c n eps ||W|| (backward stable), so the product of pair norms
    # is off by at most k c n eps times the product of the layer norms: added to the bound
    n_max = max(max(W.shape) for W in mats)
    autolip = float(np.prod(top)) * math.prod(max(abs(lo), abs(hi)) for lo, hi in boxes[:-1]) * last_slope
    allowance = 16 * k * n_max * EPS * autolip
    if k == 1:
        return {"value": last_slope * top[0], "bound": last_slope * top[0] + allowance, "exact": True, "pairs": []}
    pairs, value, bound, exact = [], last_slope, last_slope, True
    for i in range(k - 1):
        t0 = time.perf_counter()
        U1, S1, _ = svd[i]
        _, S2, V2t = svd[i + 1]
        B = U1 * (S1 if i == 0 else np.sqrt(S1))
        A = (S2 if i + 1 == k - 1 else np.sqrt(S2))[:, None] * V2t
        lo, hi = boxes[i]
        n = A.shape[1]
        if lo == hi:
            v = pair_bound = abs(lo) * float(np.linalg.norm(A @ B, 2))
            how = "linear"
        elif n <= exact_limit:
            v = pair_bound = _pair_exact(A, B, lo, hi)
            how = "exact"
        else:
            pair_bound = _pair_midpoint_bound(A, B, lo, hi)
            if greedy:
                v, how = _pair_greedy(A, B, lo, hi, top_k), f"greedy top-{top_k} (estimate)"
            else:
                v, how = pair_bound, "midpoint bound"
            exact = False
        pairs.append({"pair": [i, i + 1], "units": n, "value": v, "bound": pair_bound, "method": how,
                      "seconds": time.perf_counter() - t0})
        value *= v
        bound *= pair_bound
    return {"value": value, "bound": bound + allowance, "exact": exact, "pairs": pairs}


# ---- the analysis ---------------------------------------------------------------------------------
@dataclass
class Report:
    layers: list = field(default_factory=list)
    autolip: dict | None = None
    seqlip: dict | None = None
    lipsdp: dict | None = None

    def as_dict(self):
        return {"layers": self.layers, "autolip": self.autolip, "seqlip": self.seqlip, "lipsdp": self.lipsdp}


def describe(stage) -> str:
    kind = "Conv" if getattr(stage, "conv", None) is not None else "dense"
    ops = "+".join(n.op_type for n in getattr(stage, "nodes", [])) or kind
    return ops


def analyze(model, method="all", input_shape=None, iterations=1000, tol=None, exact_limit=EXACT_LIMIT,
            top_k=TOP_K, seed=0, dtype=None) -> Report:
    """AutoLip, SeqLip and LipSDP (method: one of them or all) of a chain or a DAG, with one BLAS thread."""
    with one_blas_thread():
        return _analyze(model, method, input_shape, iterations, tol, exact_limit, top_k, seed, dtype)


def _analyze(model, method, input_shape, iterations, tol, exact_limit, top_k, seed, dtype) -> Report:
    if method not in ("autolip", "seqlip", "lipsdp", "all"):
        raise JacgraphError(f"--method {method!r} is not known; use autolip, seqlip, lipsdp or all.")
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    from jacgraph import layers

    if not layers.is_chain(src):
        return analyze_graph(src, method, input_shape, exact_limit, top_k)
    stages = lower(src, input_shape)
    report = Report()
    slopes = [max_slope(s.activation, s.act_attrs) for s in stages]
    if method in ("autolip", "all"):
        dt = _dtype_for(stages, dtype)
        bound, estimate = 1.0, 1.0
        for i, stage in enumerate(stages):
            t0 = time.perf_counter()
            sigma, its, u = power_norm(power_graph(src, stage, i, dt), stage, iterations, tol, seed)
            if dt != np.float64 and size(stage) <= DENSE_LIMIT:
                # float32 iterates, float64 Rayleigh quotient: its error is quadratic in u's
                u = u.astype(np.float64).ravel()
                sigma = float(np.linalg.norm(matrix(stage) @ u) / np.linalg.norm(u))
            t1 = time.perf_counter()
            cert, how = certified_bound(stage)
            t2 = time.perf_counter()
            if cert < sigma * (1 - 1e-4 if dt == np.float32 else 1 - 1e-9):
                raise AssertionError(f"layer {i}: certified bound {cert} below the power-iteration norm {sigma}")
            report.layers.append({"layer": i, "op": describe(stage), "in": list(stage.in_shape), "out": list(stage.out_shape),
                                  "activation": stage.activation, "norm_estimate": sigma, "iterations": its,
                                  "bound": cert, "bound_method": how, "power_seconds": t1 - t0, "bound_seconds": t2 - t1})
            bound *= cert * slopes[i]
            estimate *= sigma * slopes[i]
        report.autolip = {"bound": bound, "estimate": estimate,
                          "seconds": sum(r["power_seconds"] + r["bound_seconds"] for r in report.layers)}
    if method in ("seqlip", "all"):
        t0 = time.perf_counter()
        too_big = [i for i, s in enumerate(stages) if size(s) > DENSE_LIMIT]
        if too_big:
            raise JacgraphError(f"SeqLip needs each layer's dense matrix; layer(s) {too_big} exceed {DENSE_LIMIT} entries. "
                                "Use --method autolip for this model, or a smaller --input-shape.")
        mats = [matrix(s) for s in stages]
        boxes = [slope_box(s.activation, s.act_attrs) for s in stages]
        result = seqlip(mats, boxes, slopes[-1], exact_limit, top_k)
        result["seconds"] = time.perf_counter() - t0
        result["exact_limit"] = exact_limit
        report.seqlip = result
    if method in ("lipsdp", "all"):
        report.lipsdp = run_lipsdp(stages, slopes[-1], explicit=method == "lipsdp")
    return report


# ---- AutoLip over a DAG (residual joins, concat, pooling, max selections) ----------------------------

def graph_lipschitz(graph, chains=False, exact_limit=EXACT_LIMIT, top_k=TOP_K) -> dict:
    """Per node k, a bound L_k on the l2 Lipschitz constant of x -> node_k(x) (and an estimate E_k):

      linear node   sum_j ||M_kj|| L_j, or ||[M_k1 .. M_kJ]|| sqrt(sum_j L_j^2) when smaller
                    (||sum_j M_j d_j|| <= ||[M_j]|| ||stacked d||, ||stacked d||^2 = sum_j ||d_j||^2)
      activation    max |sigma'| L_j
      max node      sqrt(c) L_j, c the largest number of windows one input is in
                    (sum_o max_{i in W_o} d_i^2 <= sum_o sum_{i in W_o} d_i^2 <= c ||d||^2).
    A residual block h + f(h) is one linear node whose inputs are h and f's last activation, so its
    identity and f's matrix are bounded jointly where they are one operator.

    chains=True also gives SeqLip over the DAG (result["seqlip"]): a second bound S_k by the same rules,
    except that a linear node's term M_kj h_j, h_j = act(A h_start + b) reached through a chain of one-input
    linear nodes and activations (_chain_terms), is bounded by SeqLip of that chain times S_start when smaller
    than ||M_kj|| S_j. So S_k <= L_k at every node: SeqLip on a DAG is never above AutoLip."""
    import scipy.sparse as sp

    L, E, S, layers_, chain_rows = [1.0], [1.0], [1.0], [], []
    for k, node in enumerate(graph.nodes[1:], start=1):
        j = node.inputs[0] if node.inputs else None
        if node.kind == "act":
            slope = max_slope(node.activation, node.act_attrs)
            L.append(slope * L[j])
            E.append(slope * E[j])
            S.append(slope * S[j])
        elif node.kind == "max":
            c = math.sqrt(max_overlap(node.windows))
            L.append(c * L[j])
            E.append(E[j])  # no estimate from below beyond the input's
            S.append(c * S[j])
        else:
            t0 = time.perf_counter()
            bounds = [sparse_bound(M) for M in node.mats]
            parts = [b_ for b_, _ in bounds]
            stacked = sp.hstack(node.mats) if len(node.mats) > 1 else node.mats[0]
            joint, how = sparse_bound(stacked) if len(node.mats) > 1 else bounds[0]
            total = sum(b_ * L[i] for b_, i in zip(parts, node.inputs))
            estimate = sum(norm_estimate(M) * E[i] for M, i in zip(node.mats, node.inputs))
            terms = [b_ * S[i] for b_, i in zip(parts, node.inputs)]
            if chains:
                for t, (i, M) in enumerate(zip(node.inputs, node.mats)):
                    for start, mats, boxes in _chain_terms(graph, i, M):
                        t1 = time.perf_counter()
                        r = seqlip(mats, boxes, 1.0, exact_limit, top_k, greedy=False)
                        methods = sorted({p["method"] for p in r["pairs"]})
                        chain_rows.append({"pair": [start, k], "units": sum(A.shape[0] for A in mats[:-1]),
                                           "value": r["value"], "bound": r["bound"],
                                           "method": f"chain of {len(mats)}: {', '.join(methods)}",
                                           "seconds": time.perf_counter() - t1})
                        terms[t] = min(terms[t], r["bound"] * S[start])
            if len(node.mats) > 1:
                total = min(total, joint * math.sqrt(sum(L[i] ** 2 for i in node.inputs)))
            L.append(total)
            E.append(min(estimate, total))
            S.append(min(sum(terms), joint * math.sqrt(sum(S[i] ** 2 for i in node.inputs)), total))
            layers_.append({"layer": k, "op": "linear" if len(parts) == 1 else f"join of {len(parts)}",
                            "in": [graph.nodes[i].n for i in node.inputs], "out": [node.n],
                            "activation": None, "norm_estimate": norm_estimate(stacked),
                            "iterations": 0, "bound": joint, "bound_method": how,
                            "power_seconds": 0.0, "bound_seconds": time.perf_counter() - t0})
    result = {"bound": L[-1], "estimate": E[-1], "layers": layers_}
    if chains:
        result["seqlip"] = {"bound": S[-1], "value": S[-1], "exact": all("midpoint" not in r["method"] for r in chain_rows),
                            "dag": True, "pairs": chain_rows, "exact_limit": exact_limit}
    return result


def _chain_terms(graph, j, M, max_maps=MAX_CHAIN):
    """The chains that end in the term M h_j of a linear node: [(start, mats, boxes)], one per length, each the
    path h_start -> A_1 -> act_1 -> ... -> A_r -> act_r = h_j -> M through activations whose input is a linear
    node of one input (dense matrices only, at most CHAIN_DENSE_LIMIT entries; at most max_maps matrices)."""
    def dense(A):
        return np.asarray(A.toarray(), np.float64) if A.shape[0] * A.shape[1] <= CHAIN_DENSE_LIMIT else None

    found, mats, boxes, cur = [], [dense(M)], [(1.0, 1.0)], j
    while mats[0] is not None and graph.nodes[cur].kind == "act" and len(mats) < max_maps:
        act = graph.nodes[cur]
        p = graph.nodes[act.inputs[0]]
        if p.kind != "linear" or len(p.inputs) != 1:
            break
        A = dense(p.mats[0])
        if A is None:
            break
        mats.insert(0, A)
        boxes.insert(0, slope_box(act.activation, act.act_attrs))
        cur = p.inputs[0]
        found.append((cur, list(mats), list(boxes)))
    return found


def analyze_graph(src, method, input_shape, exact_limit=EXACT_LIMIT, top_k=TOP_K) -> Report:
    """AutoLip and SeqLip (on the chains inside it, graph_lipschitz) for a model that is not a chain; LipSDP
    needs a chain of dense layers."""
    from jacgraph import layers

    if method == "lipsdp":
        raise JacgraphError("--method lipsdp needs a plain chain of layers; this model has residual joins, "
                            "concatenation or pooling. Use --method seqlip or autolip (they bound any such DAG).")
    t0 = time.perf_counter()
    graph = layers.lower_graph(src, tuple(input_shape) if input_shape else None)
    result = graph_lipschitz(graph, chains=method in ("seqlip", "all"), exact_limit=exact_limit, top_k=top_k)
    seq = result.pop("seqlip", None)
    report = Report(layers=result.pop("layers") if method != "seqlip" else [])
    seconds = time.perf_counter() - t0
    if method in ("autolip", "all"):
        report.autolip = {**result, "seconds": seconds}
    if seq is not None:
        report.seqlip = {**seq, "seconds": seconds}
    if method == "all":
        report.lipsdp = {"skipped": "LipSDP needs a plain chain of layers; this model is a DAG"}
    return report


def run_lipsdp(stages, last_slope, explicit=True) -> dict:
    """LipSDP-Neuron on the stages' dense matrices; with explicit=False (--method all) a model it does not fit
    gets {"skipped": why} instead of an error."""
    from jacgraph.passes import lipsdp

    big = [i for i, s in enumerate(stages) if size(s) > DENSE_LIMIT]
    why = (f"layer(s) {big} exceed {DENSE_LIMIT} matrix entries" if big else
           lipsdp.too_big([stages[0].in_features] + [s.out_features for s in stages[:-1]],
                          lipsdp.PAIR_LIMIT if explicit else lipsdp.AUTO_PAIR_LIMIT))
    if why:
        if explicit:
            raise JacgraphError(f"{why}: too large for the LipSDP semidefinite program. Use --method seqlip or "
                                "--method autolip for this model.")
        return {"skipped": f"{why}: too large for LipSDP; the limits are in passes/lipsdp.py"}
    mats = [matrix(s) for s in stages]
    boxes = [slope_box(s.activation, s.act_attrs) for s in stages]
    try:
        return lipsdp.lipsdp(mats, boxes, last_slope)
    except JacgraphError as e:  # no solver found a solution
        if explicit:
            raise
        return {"skipped": str(e)}

