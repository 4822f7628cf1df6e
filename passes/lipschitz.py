"""AutoLip (Scaman & Virmaux, NeurIPS 2018) and the public Lipschitz analysis: global l2 Lipschitz upper bounds.

A feed-forward model is lowered (jacgraph.layers) into stages x -> act(A x + b). Its Lipschitz
constant is at most
  AutoLip: prod_i ||A_i||_2 * max|act_i'|                       (per-layer operator norms)
  SeqLip:  pairs of consecutive layers bounded jointly over the range of the activation slopes between
           them (slope_box): passes/seqlip.py. It never exceeds AutoLip.
  LipSDP:  sqrt(min rho s.t. M(rho, T) <= 0), LipSDP-Neuron (Fazlyab et al., NeurIPS 2019), in
           passes/lipsdp.py: an SDP (cvxpy + Clarabel) for small dense models, its solution checked in
           float64 so that the printed bound is guaranteed.
`analyze` runs them on a chain here and sends a model that is not a chain (residual joins, concat,
pooling) to passes/lipschitz_dag.py (AutoLip over the DAG, SeqLip on the chains inside it).

`--emit autolip` (`build`) writes, per linear stage i, three ONNX graphs (a dict {suffix: model},
written as OUT.layer<i>.<op|adj|power>.onnx):
  layer<i>.op     u -> A u        (Gemm/MatMul: MatMul by A^T; Conv: Conv without bias)
  layer<i>.adj    v -> A^T v      (MatMul by A; Conv: ConvTranspose, same kernel, with the
                                   output_padding that gives back the input size)
  layer<i>.power  (u0, iterations, tol) -> (sigma, u, sigma_history): an ONNX Loop of power
                  iteration on A^T A, stopping when ||A^T A u|| changes by less than tol relative
                  (tol < 0: run every iteration).
A model that is not a chain (layers.lower_graph) gets the same three graphs per linear node k,
OUT.node<k>.<op|adj|power>.onnx, for the node's inputs stacked -> its output (graph_stages). Every graph carries jacgraph.emit = autolip metadata, which
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
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.passes.seqlip import EXACT_LIMIT, TOP_K, seqlip
from jacgraph.spectral import DENSE_LIMIT, certified_bound, conv_geometry, matrix, one_blas_thread, size


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
        from jacgraph.passes.lipschitz_dag import analyze_graph  # here: that module builds on this one's Report

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

