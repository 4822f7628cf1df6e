"""JFB for implicit networks z* = T(z*, x; θ): a fixed-point graph (ONNX Loop) and the JFB gradient graphs.

    models = build("T.onnx", state="z", readout="R.onnx", loss="cross_entropy")
    # fixed_point: (x, [θ], [z0]) -> (z_star, iterations, residual)
    # jfb_grad:    (z_star, x, [θ], z_bar) -> (x_bar, <θ>_bar)   one T application at z*, z* held constant
    # readout:     (z_star, labels, [φ]) -> (loss, z_bar, <φ>_bar, logits)

The JFB gradient (Fung et al.) backpropagates through T once at z*, with no (I - dT/dz)^-T solve: it is
the implicit gradient with that inverse replaced by the identity, a descent direction when T is
contractive in z. Parameters are graph inputs defaulting to their current values, so a trainer feeds
new weights every step without re-exporting.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, load
from jacgraph.passes import vjp

LOSSES = ("cross_entropy", "mse")
EPS = 1e-12  # guards ||z_k|| = 0 (the first step from zeros): the residual is then huge and the loop goes on


# ---- checks -------------------------------------------------------------------------------------
def _check_T(src: SourceModel, state, inputs):
    names = [i.name for i in src.inputs]
    if state is None:
        raise JacgraphError(f"--emit jfb needs --state, the input of T that holds z. T's inputs are: {', '.join(names)}.")
    if state not in names:
        raise JacgraphError(f"--state {state!r} is not an input of T. T's inputs are: {', '.join(names)}; "
                            "pass the one that carries the fixed-point state z.")
    if not src.is_float(state):
        raise JacgraphError(f"the state input {state!r} is not floating point; a fixed point needs a float state.")
    if len(src.outputs) != 1:
        outs = ", ".join(o.name for o in src.outputs)
        raise JacgraphError(f"T has {len(src.outputs)} outputs ({outs}); jfb needs exactly one, z_next = T(z, x). "
                            "Export T with only the next state as output.")
    out = src.outputs[0].name
    zs, ys = src.shape(state), src.shape(out)
    same = (zs is not None and ys is not None and len(zs) == len(ys)
            and all(not (isinstance(a, int) and isinstance(c, int)) or a == c for a, c in zip(zs, ys))
            and src.dtype(state) == src.dtype(out))
    if not same:
        raise JacgraphError(f"T's output {out!r} has shape {list(ys) if ys else '?'} ({_type(src, out)}) but the state "
                            f"{state!r} has shape {list(zs) if zs else '?'} ({_type(src, state)}); a fixed point "
                            "z = T(z, x) needs them equal. Check --state, or make T return the next state itself.")
    others = [n for n in names if n != state]
    if inputs is None:
        return [n for n in others if src.is_float(n)]
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:  # no input gradient wanted (training): the graph computes parameter gradients only
        return []
    if state in inputs:
        raise JacgraphError(f"--inputs names the state {state!r}; JFB holds z* constant, so only the other inputs "
                            f"({', '.join(others) or 'none'}) get gradients.")
    return src.check_inputs(inputs)


def _type(src, name):
    try:
        return TensorProto.DataType.Name(src.dtype(name)).lower()
    except JacgraphError:
        return "unknown type"


def _wrt(wrt):
    if isinstance(wrt, str) and wrt != "params":  # the CLI passes --wrt as one comma-separated string
        return [n.strip() for n in wrt.split(",") if n.strip()]
    return wrt


# ---- graph surgery on emitted models ------------------------------------------------------------
def _values(graph):
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _rename(model, mapping):
    """Rename values in place (inputs, outputs, initializers, node ends); targets must be unused."""
    g = model.graph
    taken = _values(g) | {o.name for o in g.output}
    clash = [new for old, new in mapping.items() if new != old and new in taken]
    if clash:
        raise JacgraphError(f"internal: the names {clash} already exist in the emitted graph; rename them in T.")
    for vi in list(g.input) + list(g.output):
        vi.name = mapping.get(vi.name, vi.name)
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            node.input[i] = mapping.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = mapping.get(name, name)


def _prune(model):
    """Drop nodes and initializers no output needs (e.g. the primal z_next of a VJP graph nobody reads)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inputs = {i.name for i in g.input}
    inits = [t for t in g.initializer if t.name in needed or t.name in inputs]
    del g.initializer[:]
    g.initializer.extend(inits)


def _set_props(model, props):
    old = {p.key: p.value for p in model.metadata_props}
    old.update({k: str(v) for k, v in props.items()})
    del model.metadata_props[:]
    helper.set_model_props(model, old)


def _finish(model):
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- fixed point --------------------------------------------------------------------------------
def _inline_T(b, src, state, z):
    """Emit T's nodes with every value renamed (state -> z); inputs and initializers keep their names."""
    env = {state: z}
    for node in src.nodes:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            new.input[i] = env.get(name, name)
        for i, name in enumerate(node.output):
            if name:
                env[name] = new.output[i] = b.fresh(name)
        new.name = b.fresh(node.name or node.op_type)
        b.nodes.append(new)
    return env[src.outputs[0].name]


def _zeros(b, src, state, others):
    """zeros of the state's shape; symbolic dims are read at run time from an input sharing them."""
    shape, dtype = src.shape(state), src.np_dtype(state)
    if all(isinstance(d, int) for d in shape):
        return b.const(np.zeros(shape, dtype), hint=f"{state}_zeros")
    dims = []
    for j, d in enumerate(shape):
        if isinstance(d, int):
            dims.append(b.ints([d]))
            continue
        found = [(x, k) for x in others for k, e in enumerate(src.shape(x) or []) if e == d and isinstance(d, str)]
        if not found and j == 0:  # an unnamed batch dim: take the batch size of the first input that has one
            found = [(x, 0) for x in others if (src.shape(x) or [1])[0] is not None and not isinstance(src.shape(x)[0], int)]
        if not found:
            raise JacgraphError(f"dimension {j} of the state {state!r} is symbolic ({d!r}) and no other input of T shares "
                                "it, so the zero start cannot be shaped. Export T with a static state shape, a batch "
                                "dim named like x's, or build with z0=True and feed the start.")
        x, k = found[0]
        dims.append(b.shape(x, k, k + 1))
    zero = numpy_helper.from_array(np.zeros(1, dtype))
    return b.op("ConstantOfShape", b.Concat(*dims, axis=0), value=zero)


def _residual(b, z, z_next, rank, dtype):
    """max over samples of ||z_next - z|| / (||z|| + eps), norms over every axis but the first."""
    axes = list(range(1, rank)) if rank >= 2 else None
    diff = b.reduce("ReduceL2", b.Sub(z_next, z), axes, keepdims=0)
    norm = b.reduce("ReduceL2", z, axes, keepdims=0)
    ratio = b.Div(diff, b.Add(norm, b.const(np.asarray(EPS, dtype), hint="eps")))
    return b.reduce("ReduceMax", ratio, None, keepdims=0)


def _unrolled_steps(b, src, state, start, steps):
    """z <- T(z, x) exactly `steps` times, with no Loop (for runtimes without a dynamic Loop)."""
    z = prev = start
    for _ in range(steps):
        prev, z = z, _inline_T(b, src, state, z)
    res = _residual(b, prev, z, len(src.shape(state)), src.np_dtype(state))
    return z, res, b.const(np.asarray(steps, np.int64), hint="iterations_const")


def _solver_loop(b, src, state, start, tol, max_iter):
    """An ONNX Loop iterating z <- T(z, x) until the residual is <= tol or max_iter steps: (z_star, residual, iterations)."""
    dtype, elem, zshape = src.np_dtype(state), src.dtype(state), list(src.shape(state))
    body = b.subgraph(onnx.GraphProto())  # the Loop body, emitted through a child Builder
    it, cond, z_in, res_in, k_in = (body.fresh(n) for n in ("iter", "cond_in", f"{state}_k", "res_in", "k_in"))
    z_next = _inline_T(body, src, state, z_in)
    res = _residual(body, z_in, z_next, len(zshape), dtype)
    go_on = body.Greater(res, body.const(np.asarray(tol, dtype), hint="tol"))
    k_out = body.Add(it, body.const(np.asarray(1, np.int64), hint="one"))
    outs = [body.Identity(go_on), body.Identity(z_next), body.Identity(res), body.Identity(k_out)]
    body.inputs.extend([helper.make_tensor_value_info(it, TensorProto.INT64, []),
                        helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
                        helper.make_tensor_value_info(z_in, elem, zshape),
                        helper.make_tensor_value_info(res_in, elem, []),
                        helper.make_tensor_value_info(k_in, TensorProto.INT64, [])])
    body.outputs.extend([helper.make_tensor_value_info(outs[0], TensorProto.BOOL, []),
                         helper.make_tensor_value_info(outs[1], elem, zshape),
                         helper.make_tensor_value_info(outs[2], elem, []),
                         helper.make_tensor_value_info(outs[3], TensorProto.INT64, [])])
    return b.op("Loop", b.const(np.asarray(max_iter, np.int64), hint="max_iter"), b.const(np.asarray(True), hint="true"),
                start, b.const(np.asarray(np.inf, dtype), hint="inf"), b.const(np.asarray(0, np.int64), hint="zero"),
                n_out=3, body=body.graph("fixed_point_step"))


def build_fixed_point(src, state, params, tol=1e-4, max_iter=100, fixed_iterations=None, z0=None):
    """(x, ..., [θ], [z0]) -> (z_star, iterations, residual): the start (zeros or z0), then N unrolled steps or a Loop."""
    others = [i.name for i in src.inputs if i.name != state]
    b = Builder(src)
    elem, zshape = src.dtype(state), list(src.shape(state))
    for inp in src.inputs:
        if inp.name != state:
            b.inputs.append(inp)
    for p in params:
        b.add_input(p, src.dtype(p), list(src.initializers[p].dims))
    if z0:
        start = b.fresh(f"{state}0")
        b.add_input(start, elem, zshape)
    else:
        start = _zeros(b, src, state, others)
    if fixed_iterations is not None:
        z_star, res, iters = _unrolled_steps(b, src, state, start, fixed_iterations)
    else:
        z_star, res, iters = _solver_loop(b, src, state, start, tol, max_iter)

    names = {}
    for key, value, typ, shape in ((f"{state}_star", z_star, elem, zshape), ("iterations", iters, TensorProto.INT64, []),
                                   ("residual", res, elem, [])):
        names[key] = b.fresh(key)
        b.nodes.append(helper.make_node("Identity", [value], [names[key]], name=b.fresh("jg_output")))
        b.add_output(names[key], typ, shape)
    n = fixed_iterations if fixed_iterations is not None else max_iter
    form = (f"{fixed_iterations} unrolled steps" if fixed_iterations is not None
            else f"Loop to tol {tol:g} or {max_iter} steps")
    metadata = {"jacgraph.emit": "jfb", "jacgraph.jfb.graph": "fixed_point", "jacgraph.state": state,
                "jacgraph.tol": tol, "jacgraph.max_iter": n, "jacgraph.fixed_iterations": fixed_iterations or 0,
                "jacgraph.wrt": json.dumps(params), "jacgraph.outputs": json.dumps(list(names.values())),
                "jacgraph.summary": f"jfb fixed_point: {form}; outputs {', '.join(names.values())}"}
    return b.build(f"{src.graph.name}_fixed_point", doc=f"fixed point of {src.graph.name} (jacgraph)",
                   metadata=metadata)


# ---- JFB gradient -------------------------------------------------------------------------------
def build_grad(src, state, xs, wrt):
    """VJP of one T application wrt x and θ only: z* is an input with no cotangent path (held constant)."""
    result = vjp.emit(src, inputs=xs or [state], wrt=wrt)
    grad, params = result.model, result.params
    (y, y_bar), = result.cotangent_inputs.items()
    grads = [[n, bar] for n, bar in result.gradient_outputs.items() if n != state]
    keep = {bar for _, bar in grads}
    outs = [o for o in grad.graph.output if o.name in keep]
    del grad.graph.output[:]
    grad.graph.output.extend(outs)
    _prune(grad)
    star, bar = f"{state}_star", f"{state}_bar"
    _rename(grad, {state: star, y_bar: bar})
    _set_props(grad, {"jacgraph.emit": "jfb", "jacgraph.jfb.graph": "jfb_grad", "jacgraph.state": state,
                      "jacgraph.cotangent_inputs": json.dumps([[y, bar]]), "jacgraph.gradient_outputs": json.dumps(grads),
                      "jacgraph.summary": f"jfb jfb_grad: ({star}, {', '.join(xs)}, {bar}) -> "
                                          f"{len(xs)} input and {len(params)} parameter gradient(s)"})
    return _finish(grad), params


# ---- readout + loss -----------------------------------------------------------------------------
def _with_loss(rsrc: SourceModel, loss):
    """R's graph with a `labels` input and a scalar `loss` output (mean over the batch, like PyTorch's default)."""
    m = onnx.ModelProto()
    m.CopyFrom(rsrc.proto)
    g = m.graph
    taken = _values(g)
    labels = "labels" if "labels" not in taken else "labels_input"
    name = "loss" if "loss" not in taken else "loss_value"
    logits = rsrc.outputs[0].name
    shape = list(rsrc.shape(logits) or [])
    nodes = []
    if loss == "cross_entropy":
        if len(shape) != 2:
            raise JacgraphError(f"cross_entropy needs the readout to output (batch, classes) logits; {logits!r} has shape "
                                f"{shape}. Flatten the readout output, or use --loss mse.")
        g.input.append(helper.make_tensor_value_info(labels, TensorProto.INT64, shape[:1]))
        g.initializer.append(numpy_helper.from_array(np.asarray([1], np.int64), "jg_ce_axis"))
        nodes += [helper.make_node("LogSoftmax", [logits], ["jg_logp"], axis=1),
                  helper.make_node("Unsqueeze", [labels, "jg_ce_axis"], ["jg_labels_col"]),
                  helper.make_node("GatherElements", ["jg_logp", "jg_labels_col"], ["jg_picked"], axis=1),
                  helper.make_node("ReduceMean", ["jg_picked"], ["jg_mean"], keepdims=0),
                  helper.make_node("Neg", ["jg_mean"], [name])]
    else:
        g.input.append(helper.make_tensor_value_info(labels, rsrc.dtype(logits), shape))
        nodes += [helper.make_node("Sub", [logits, labels], ["jg_err"]),
                  helper.make_node("Mul", ["jg_err", "jg_err"], ["jg_sq"]),
                  helper.make_node("ReduceMean", ["jg_sq"], [name], keepdims=0)]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(name, rsrc.dtype(logits), []))
    return m, labels, name


def build_readout(readout, loss, state, zshape, star, bar):
    rsrc = SourceModel(readout)
    if len(rsrc.inputs) != 1 or len(rsrc.outputs) != 1:
        raise JacgraphError(f"the readout must have one input (z*) and one output (logits or predictions); it has "
                            f"inputs {[i.name for i in rsrc.inputs]} and outputs {[o.name for o in rsrc.outputs]}.")
    r_in, logits = rsrc.inputs[0].name, rsrc.outputs[0].name
    rshape = rsrc.shape(r_in) or []
    if len(rshape) != len(zshape) or any(isinstance(a, int) and isinstance(c, int) and a != c
                                         for a, c in zip(rshape, zshape)):
        raise JacgraphError(f"the readout's input {r_in!r} has shape {list(rshape)} but T's state has shape {list(zshape)}; "
                            "the readout must take z* as it is.")
    with_loss, labels, loss_name = _with_loss(rsrc, loss)
    result = vjp.emit(with_loss, inputs=[r_in], wrt="params")
    grad, params, grads = result.model, result.params, result.gradient_outputs
    (loss_bar,) = result.cotangent_inputs.values()
    g = grad.graph
    # d loss / d loss = 1: the cotangent input becomes a constant, so the graph takes (z*, labels) only
    kept = [i for i in g.input if i.name != loss_bar]
    del g.input[:]
    g.input.extend(kept)
    one = np.asarray(1, helper.tensor_dtype_to_np_dtype(rsrc.dtype(logits)))
    g.initializer.append(numpy_helper.from_array(one, loss_bar))
    g.output.append(helper.make_tensor_value_info(logits, rsrc.dtype(logits), list(rsrc.shape(logits) or [])))
    mapping = {r_in: star, grads[r_in]: bar}
    _rename(grad, mapping)
    grad_pairs = [[state, bar]] + [[p, grads[p]] for p in params]
    _set_props(grad, {"jacgraph.emit": "jfb", "jacgraph.jfb.graph": "readout", "jacgraph.loss": loss,
                      "jacgraph.labels": labels, "jacgraph.gradient_outputs": json.dumps(grad_pairs),
                      "jacgraph.cotangent_inputs": "[]",
                      "jacgraph.summary": f"jfb readout: ({star}, {labels}) -> ({loss_name}, {bar}, "
                                          f"{len(params)} parameter gradient(s), {logits}); loss {loss}"})
    return _finish(grad)


# ---- the pass -----------------------------------------------------------------------------------
def build(model, state=None, inputs=None, tol=1e-4, max_iter=100, fixed_iterations=None, z0=None,
          readout=None, loss=None, wrt="params") -> dict:
    """{"fixed_point", "jfb_grad"[, "readout"]: ModelProto} for T(z, x) with state input `state`."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    xs = _check_T(src, state, inputs)
    if readout is not None and loss is None:
        raise JacgraphError(f"--readout needs --loss ({' or '.join(LOSSES)}): the readout graph returns the loss and its "
                            "gradient z_bar.")
    if loss is not None and readout is None:
        raise JacgraphError("--loss needs --readout R.onnx, the model that maps z* to predictions.")
    if loss is not None and loss not in LOSSES:
        raise JacgraphError(f"--loss {loss!r} is not known; use one of {', '.join(LOSSES)}.")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise JacgraphError(f"--max-iter must be a positive integer, got {max_iter!r}.")
    if fixed_iterations is not None and not (isinstance(fixed_iterations, int) and fixed_iterations >= 1):
        raise JacgraphError(f"--fixed-iterations must be a positive integer, got {fixed_iterations!r}.")
    if not tol >= 0:
        raise JacgraphError(f"--tol must be >= 0, got {tol!r}.")
    if readout is not None:
        readout = load(readout)

    grad, params = build_grad(src, state, xs, _wrt(wrt))
    out = {"fixed_point": build_fixed_point(src, state, params, tol, max_iter, fixed_iterations, z0), "jfb_grad": grad}
    if readout is not None:
        out["readout"] = build_readout(readout, loss, state, list(src.shape(state)), f"{state}_star", f"{state}_bar")
    return out


def solve(sess, feeds: dict) -> dict:
    """Run a fixed_point session; warns when it stopped at max_iter above tolerance (non-convergence is never silent)."""
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    meta = sess.get_modelmeta().custom_metadata_map
    tol, max_iter = float(meta.get("jacgraph.tol", 0)), int(meta.get("jacgraph.max_iter", 0))
    iters, res = int(out[names[1]]), float(out[names[2]])
    if iters >= max_iter and res > tol and not int(meta.get("jacgraph.fixed_iterations", 0)):
        warnings.warn(f"fixed point did not converge: {iters} iterations (max_iter), residual {res:.3g} > tol {tol:g}. "
                      "Raise max_iter, or make T more contractive.", RuntimeWarning, stacklevel=2)
    return out
