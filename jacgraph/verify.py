"""`jacgraph verify`: check an emitted graph numerically, whatever it computes.

The kind comes from the graph's `jacgraph.emit` metadata. Each check returns numbers that can fail:
a NaN or infinite value anywhere is a failure, never a pass, and a check that compared nothing fails.

- jvp: y_dot against float64 central differences of the graph's own primal outputs (y(x+hv)-y(x-hv))/2h.
- hvp: H v against float64 central differences of the graph's own gradient output along v.
- vjp: the dot-product identity <J v, u> = <v, Jᵀu>: Jᵀu is the graph's gradient output for the cotangent
  u, J v the central difference of its own primal outputs (inputs and differentiated parameters moved).
- jacobian: J v from the emitted J against central differences of the graph's own primal outputs.
- recurjac: true Jacobians at points sampled in the ball (uniform, on the boundary, corners), computed
  exactly in float64 with the source's multi-tangent JVP, must lie inside [J_lower, J_upper].
- autolip: op/adj graphs against the layer operator A rebuilt from the source (A u, A^T v at random vectors);
  power graphs: sigma <= ||A u|| at the graph's own output u (power iteration's values only grow towards ||A||).
Everything runs on a float64 copy of the graph (onnx.reference where onnxruntime has no float64 kernel).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import JacgraphError
from .model import SourceModel, load
from .reference import reference_session, run_reference
from .testing import central_difference, random_feeds, relative_error, to_float64

KINDS = ("jvp", "vjp", "hvp", "jacobian", "recurjac", "jfb", "autolip")


@dataclass
class Check:
    """One number compared with its limit; ok only when it is finite and within the limit."""
    name: str
    value: float
    limit: float
    what: str

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.value)) and self.value <= self.limit


class _OrtSession:
    """onnxruntime with the reference evaluator's interface (output_names, run(None, feeds))."""

    def __init__(self, sess):
        self.sess, self.output_names = sess, [o.name for o in sess.get_outputs()]

    def run(self, names, feeds):
        return self.sess.run(names, feeds)


def float64_session(m64: onnx.ModelProto):
    """onnxruntime on the float64 copy where it has every kernel (fast, runs Loop bodies), else onnx.reference
    (float64 Conv, which onnxruntime lacks)."""
    from .runtime import session

    try:
        return _OrtSession(session(m64, provider="CPUExecutionProvider"))
    except JacgraphError:
        return reference_session(m64)


def emitted_kind(model: onnx.ModelProto) -> str:
    return {p.key: p.value for p in model.metadata_props}.get("jacgraph.emit", "")


def verify(path, seed=0, h=1e-7, tol=1e-4, source=None, x0=None, eps=None, samples=2000) -> tuple:
    """(kind, [Check]) for an emitted graph (path or ModelProto)."""
    model = load(path)
    kind = emitted_kind(model)
    if kind not in KINDS:
        what = f"a {kind} graph" if kind else "not a graph emitted by jacgraph (no jacgraph.emit metadata)"
        raise JacgraphError(f"{path if isinstance(path, str) else 'the model'} is {what}; verify checks graphs "
                            f"emitted with --emit {', '.join(KINDS)}.")
    if not (np.isfinite(h) and h > 0):
        raise JacgraphError(f"--h {h} is not a positive finite step; central differences need one, e.g. --h 1e-7.")
    props = {p.key: p.value for p in model.metadata_props}
    rng = np.random.default_rng(seed)
    if kind == "jfb":
        return kind, check_jfb(model, props, source, rng, h, tol)
    if kind == "recurjac":
        if source is None:
            raise JacgraphError("a recurjac bound graph holds no copy of the network it bounds. Give the source "
                                "model with --source MODEL.onnx (and optionally --x0 and --eps).")
        return kind, check_bounds(model, props, source, rng, x0, eps, samples)
    if kind == "autolip":
        if source is None:
            raise JacgraphError("an autolip graph applies one layer's operator of the model; verify rebuilds that "
                                "operator from it. Give the source model with --source MODEL.onnx.")
        return kind, check_autolip(model, props, source, rng, tol)
    m64 = to_float64(model)
    sess = float64_session(m64)
    feeds = random_feeds(SourceModel(m64), rng)
    check = {"jvp": check_jvp, "hvp": check_hvp, "vjp": check_vjp, "jacobian": check_jacobian}[kind]
    checks = check(m64, props, sess, feeds, rng, h, tol)
    return kind, checks  # empty when the graph names nothing to compare: the caller reports that as a failure


def _nonfinite_outputs(out: dict) -> list:
    return [name for name, v in out.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
            and not np.all(np.isfinite(v))]


def _nonfinite_check(out) -> list:
    bad = _nonfinite_outputs(out)
    return [Check(f"{name} finite", float("inf"), 0.0, "output holds NaN or inf") for name in bad]


def check_jvp(m64, props, sess, feeds, rng, h, tol) -> list:
    """y_dot against central differences of y."""
    pairs = [(y, y_dot, y) for y, y_dot in json.loads(props["jacgraph.tangent_outputs"])]
    return _directional(props, sess, feeds, rng, h, tol, pairs, "y_dot")


def check_hvp(m64, props, sess, feeds, rng, h, tol) -> list:
    """H v against central differences of the graph's own gradient output: (∇f(x+hv) - ∇f(x-hv)) / 2h."""
    grads = dict(json.loads(props["jacgraph.gradient_outputs"]))
    pairs = [(x, x_hvp, grads[x]) for x, x_hvp in json.loads(props["jacgraph.hvp_outputs"])]
    return _directional(props, sess, feeds, rng, h, tol, pairs, "H v")


def _directional(props, sess, feeds, rng, h, tol, pairs, what) -> list:
    """For each (name, tangent output, output): the tangent output (every one of K stacked tangents) against
    the central difference of the output along the random tangent inputs."""
    K = int(props.get("jacgraph.tangents", 0)) or None
    tangent_inputs = json.loads(props["jacgraph.tangent_inputs"])
    for _, d in tangent_inputs:
        feeds[d] = rng.standard_normal(feeds[d].shape)
    out = run_reference(sess, feeds)
    errors = {}
    for k in range(K or 1):
        directions = {x: (feeds[d] if K is None else feeds[d][k]) for x, d in tangent_inputs}
        fd = central_difference(sess, feeds, directions, h)
        for name, tangent, differenced in pairs:
            got = out[tangent] if K is None else out[tangent][k]
            errors.setdefault(name, []).append(compared(name, got, fd[differenced], tol, "").value)
    return _nonfinite_check(out) + [
        Check(name, _worst(e), tol, f"relative error of {what} vs float64 central differences")
        for name, e in errors.items()]


def compared(name, actual, expected, tol, what) -> Check:
    """The relative error as a Check; comparing empty arrays compares nothing, which fails."""
    if np.size(expected) == 0 or np.size(actual) == 0:
        return Check(name, float("inf"), tol, "compared nothing (an empty output)")
    return Check(name, relative_error(actual, expected), tol, what)


def _worst(errors) -> float:
    errors = np.asarray(errors, np.float64)
    return float("inf") if not np.all(np.isfinite(errors)) else float(errors.max())


def check_vjp(m64, props, sess, feeds, rng, h, tol) -> list:
    """<J v, u> = <v, Jᵀu> with u the random cotangent inputs."""
    cotangents = [(y, feeds[bar]) for y, bar in json.loads(props["jacgraph.cotangent_inputs"])]
    return _dot_product(m64, sess, feeds, cotangents, json.loads(props["jacgraph.gradient_outputs"]), rng, h, tol)


def _dot_product(m64, sess, feeds, cotangents, grads, rng, h, tol) -> list:
    """<J v, u> = <v, Jᵀu>: Jᵀu from the graph's gradient outputs (grads: [name, gradient output]), J v by
    central differences of the outputs in `cotangents` ([output, u]) with every differentiated name moved."""
    if not cotangents or not grads:
        return []
    inits = {t.name: t for t in m64.graph.initializer}
    for name, _ in grads:  # differentiated parameters are inputs whose default is the initializer
        if name not in feeds and name in inits:
            feeds[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
    out = run_reference(sess, feeds)
    v = {name: rng.standard_normal(np.shape(feeds[name])) for name, _ in grads}
    Jv = central_difference(sess, feeds, v, h)
    return _nonfinite_check(out) + [_identity([(Jv[y], u) for y, u in cotangents],
                                              [(v[name], out[bar]) for name, bar in grads], tol,
                                              f"dot-product identity over {len(grads)} gradient(s), J v by float64 "
                                              "central differences")]


def _identity(jv_u, v_jtu, tol, what) -> Check:
    """<J v, u> = <v, Jᵀu> as a Check, both sides sums of products over the pairs in jv_u and v_jtu."""
    lhs, rhs = (sum(float(np.sum(a * b)) for a, b in side) for side in (jv_u, v_jtu))
    # scale without cancellation: the sums of absolute products bound both sides
    scale = max(*(sum(float(np.sum(np.abs(a * b))) for a, b in side) for side in (jv_u, v_jtu)), 1e-30)
    return Check("<J v, u> = <v, Jᵀu>", abs(lhs - rhs) / scale, tol, what)


def check_jacobian(m64, props, sess, feeds, rng, h, tol) -> list:
    x = props["jacgraph.input"]
    rows = dict(json.loads(props["jacgraph.rows"]))
    out = run_reference(sess, feeds)
    checks = _nonfinite_check(out)
    for trial in range(2):
        v = rng.standard_normal(feeds[x].shape)
        fd = central_difference(sess, feeds, {x: v}, h)
        for y, *names in json.loads(props["jacgraph.jacobian_outputs"]):
            J = _dense(out, names, rows[y], v.size)
            checks.append(compared(f"{y} (direction {trial})", J @ v.ravel(), fd[y].ravel(), tol,
                                   "relative error of J v vs float64 central differences"))
    return checks


def _dense(out, names, m, n):
    if len(names) == 1:
        return np.asarray(out[names[0]], np.float64).reshape(m, n)
    J = np.zeros((m, n))
    values, idx = out[names[0]], out[names[1]]
    np.add.at(J, (idx[:, 0], idx[:, 1]), values)
    return J


# ---- JFB ------------------------------------------------------------------------------------------

def check_jfb(model, props, source, rng, h, tol) -> list:
    """fixed_point: z_star is T applied `iterations` times from the start, and a converged loop's last step is
    within its tol; jfb_grad: the dot-product identity against central differences of one T step at z*
    (inputs and parameters moved, z* held); both need T (--source). readout: the dot-product identity of its
    loss (u = 1) against central differences of the graph's own loss output."""
    graph = props.get("jacgraph.jfb.graph")
    if graph == "readout":  # d loss / d (z*, readout parameters): the loss is the graph's first output, u = 1
        m64 = to_float64(model)
        inputs = {i.name for i in m64.graph.input}
        grads = [[n if n in inputs else f"{n}_star", bar] for n, bar in json.loads(props["jacgraph.gradient_outputs"])]
        sess, feeds = float64_session(m64), random_feeds(SourceModel(m64), rng)
        return _dot_product(m64, sess, feeds, [(m64.graph.output[0].name, 1.0)], grads, rng, h, tol)
    if graph not in ("fixed_point", "jfb_grad") or source is None:
        raise JacgraphError(f"verify checks a JFB fixed_point or jfb_grad graph given T with --source T.onnx; this is "
                            f"the {graph} graph{'' if source is not None else ' and no --source was given'}.")
    T64, state = to_float64(load(source)), props["jacgraph.state"]
    _check_jfb_source(model, props, source, state)
    m64 = to_float64(model)
    feeds = random_feeds(SourceModel(m64), rng)
    return (_check_fixed_point if graph == "fixed_point" else _check_jfb_grad)(m64, props, T64, state, feeds, rng, h, tol)


def _check_jfb_source(model, props, source, state):
    """T (--source) must be the step the JFB graph was compiled from: an input `state` of z*'s shape and an output of
    that shape, its other inputs among the graph's with their shapes, and every differentiated parameter among its
    initializers with the graph's shape (else replaying T fails in onnxruntime or on a missing name)."""
    T, g = SourceModel(source), SourceModel(model)
    graph_inputs = {i.name for i in g.graph.input}

    def fits(a, b):
        return a is not None and b is not None and len(a) == len(b) and all(
            x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))

    def shown(shape):
        return "unknown" if shape is None else f"[{', '.join(map(str, shape))}]"

    z_shape, wrong = g.shape(f"{state}_star"), []
    names = [i.name for i in T.inputs]
    if state not in names:
        wrong.append(f"it has no input named {state!r} (the state; its inputs: {', '.join(names) or 'none'})")
    for name in names:
        want = z_shape if name == state else g.shape(name) if name in graph_inputs else None
        if name != state and name not in graph_inputs:
            wrong.append(f"its input {name!r} is not an input of the graph")
        elif not fits(T.shape(name), want):
            wrong.append(f"its input {name!r} has shape {shown(T.shape(name))}, the graph's {shown(want)}")
    out = T.graph.output[0].name if T.graph.output else None
    if out is not None and not fits(T.shape(out), z_shape):
        wrong.append(f"its output {out!r} has shape {shown(T.shape(out))}, the state's {shown(z_shape)}")
    for p in json.loads(props.get("jacgraph.wrt", "[]")):
        if p not in T.initializers:
            wrong.append(f"it has no parameter {p!r}")
        elif not fits(tuple(T.initializers[p].dims), g.shape(p)):
            wrong.append(f"its parameter {p!r} has shape {shown(tuple(T.initializers[p].dims))}, "
                         f"the graph's {shown(g.shape(p))}")
    if wrong:
        raise JacgraphError(f"--source is not the step T this JFB graph was compiled from: {'; '.join(wrong)}. "
                            "Give the model passed to `jacgraph compile --emit jfb`.")


def _step(T64, state, z, feeds, params=None):
    """One T step in float64: T(z, x) with T's other inputs from feeds and its parameters (optionally) replaced."""
    if params:
        T64 = onnx.ModelProto.FromString(T64.SerializeToString())
        for i, t in enumerate(T64.graph.initializer):
            if t.name in params:
                T64.graph.initializer[i].CopyFrom(numpy_helper.from_array(params[t.name], t.name))
    names = [i.name for i in T64.graph.input if i.name not in {t.name for t in T64.graph.initializer}]
    out = run_reference(float64_session(T64), {n: (z if n == state else feeds[n]) for n in names})
    return out[T64.graph.output[0].name]


def _check_fixed_point(m64, props, T64, state, feeds, rng, h, tol) -> list:
    out = run_reference(float64_session(m64), feeds)
    z_star, iterations = out["z_star"], int(out["iterations"])
    T_inputs = {i.name for i in T64.graph.input}
    z = next((v for k, v in feeds.items() if k not in T_inputs), np.zeros_like(z_star))  # z0, or zeros
    for _ in range(iterations):
        previous, z = z, _step(T64, state, z, feeds)
    checks = _nonfinite_check(out) + [compared(f"z_star = T^{iterations}(start)", z_star, z, tol,
                                               "relative error vs T iterated in float64 from the start")]
    converged = not int(props.get("jacgraph.fixed_iterations", 0)) and iterations < int(props["jacgraph.max_iter"])
    if converged and iterations:
        axes = tuple(range(1, z.ndim)) or None
        step = np.max(np.linalg.norm((z - previous).reshape(len(z), -1) if axes else z - previous, axis=-1)
                      / (np.linalg.norm(previous.reshape(len(z), -1) if axes else previous, axis=-1) + 1e-12))
        checks.append(Check("last step within the loop's tol", float(step), float(props["jacgraph.tol"]),
                            "relative change of the last T step (float64), which the loop stopped on"))
    return checks


def _check_jfb_grad(m64, props, T64, state, feeds, rng, h, tol) -> list:
    (y, bar), = json.loads(props["jacgraph.cotangent_inputs"])
    grads = json.loads(props["jacgraph.gradient_outputs"])
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in T64.graph.initializer}
    out = run_reference(float64_session(m64), feeds)
    v = {n: rng.standard_normal(np.shape(feeds[n] if n in feeds else inits[n])) for n, _ in grads}
    z_star = feeds[f"{state}_star"]
    sides = []
    for sign in (1, -1):
        moved = {n: (feeds[n] if n in feeds else inits[n]) + sign * h * v[n] for n, _ in grads}
        sides.append(_step(T64, state, z_star, {**feeds, **moved}, {n: moved[n] for n in moved if n in inits}))
    Jv = (sides[0] - sides[1]) / (2 * h)
    return _nonfinite_check(out) + [_identity([(Jv, feeds[bar])], [(v[n], out[b]) for n, b in grads], tol,
                                              f"one T step at z* held, over {len(grads)} gradient(s), J v by float64 "
                                              "central differences of T")]


# ---- bounds -----------------------------------------------------------------------------------------

def check_bounds(model, props, source, rng, x0, eps, samples) -> list:
    """Sampled true Jacobians (float64, exact for the network at each point) inside the emitted bounds. The source
    is read once and checked against the graph's declared shapes before the graph runs (a wrong --source is an
    error at once, not after a long run)."""
    from .runtime import session

    in_shape = tuple(json.loads(props["jacgraph.input_shape"]))
    src, outputs = SourceModel(source), _bound_outputs(model)
    _check_bound_source(src, in_shape, outputs)
    norm = props.get("jacgraph.norm", "inf")
    x0 = rng.standard_normal((1, *in_shape)) if x0 is None else np.asarray(x0, np.float64)
    if x0.shape == in_shape:
        x0 = x0[None]
    if x0.shape[1:] != in_shape:
        raise JacgraphError(f"--x0 has shape {list(x0.shape)}, but the bound graph takes points of shape "
                            f"{list(in_shape)} (or a batch [N, {', '.join(map(str, in_shape))}]).")
    eps = np.full(len(x0), 0.1 if eps is None else float(eps))
    lo, hi = session(model).run(None, {"x0": x0.astype(_input_dtype(model)), "eps": eps.astype(_input_dtype(model))})[:2]
    checks = [Check("bounds finite", 0.0 if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) else float("inf"),
                    0.0, "J_lower and J_upper hold no NaN or inf"),
              Check("J_lower <= J_upper", float(max(np.max(lo - hi), 0.0)), 0.0, "largest crossing of the bounds")]
    if outputs is None:
        _check_bound_source(src, in_shape, lo.shape[1])
    jacobian = _true_jacobian(source, in_shape, src)
    slack = (1e-9 if _input_dtype(model) == np.float64 else 1e-5) * max(1.0, float(np.max(np.abs(hi))),
                                                                         float(np.max(np.abs(lo))))
    outside, worst, counts = 0, 0.0, [0, 0]
    per_point = max(1, -(-samples // len(x0)))
    for i in range(len(x0)):
        points = x0[i] + eps[i] * _ball_directions(rng, per_point, in_shape, norm)
        sampled = jacobian(points)
        kinks = _kink_points(jacobian, points, sampled, rng)
        for k, J in enumerate((sampled, jacobian(kinks))):
            if not len(J):  # no kink found (an affine model, or a ball inside one region): the samples still count
                continue
            excess = np.where(np.isfinite(J), np.maximum(lo[i] - J, J - hi[i]), np.inf).reshape(len(J), -1)
            outside += int(np.sum(np.any(excess > slack, axis=1)))
            worst = max(worst, float(np.max(excess, initial=0.0)))
            counts[k] += len(J)
    checks.append(Check("sampled Jacobians outside the bounds", float(outside), 0.0,
                        f"of {counts[0]} points in the l_{norm} ball(s) (uniform, boundary, corners) and {counts[1]} "
                        f"either side of a kink; largest excess {worst:.2e}, rounding slack {slack:.1e}"))
    return checks


def _bound_outputs(model) -> int | None:
    """The number of outputs the bound graph bounds, from its first output J_lower's declared [batch, outputs,
    inputs]; None where that is not a number (then the source is checked against the output of a run)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 3 and dims[1].HasField("dim_value") else None


def _check_bound_source(src: SourceModel, in_shape, outputs):
    """The source must be the network the bound graph was compiled from: one float input of the graph's point
    shape, `outputs` output values (else its Jacobians cannot be compared, and onnxruntime fails on them)."""
    inputs = src.float_inputs()
    sample = (src.shape(inputs[0]) or (None,))[1:] if len(inputs) == 1 else None
    out = (src.shape(src.graph.output[0].name) or (None,))[1:] if len(src.graph.output) == 1 else None
    known = sample is not None and out is not None and all(isinstance(d, int) for d in (*sample, *out))
    if known and (int(np.prod(sample)) != int(np.prod(in_shape)) or outputs is not None and int(np.prod(out)) != outputs):
        raise JacgraphError(f"--source takes inputs of shape {list(sample)} and gives {int(np.prod(out))} outputs per "
                            f"point, but the bound graph is for points of shape {list(in_shape)} and {outputs} "
                            "outputs: give the model the graph was compiled from.")
    if len(inputs) != 1:
        raise JacgraphError(f"--source has {len(inputs)} float inputs; a bound graph bounds a network of one input. "
                            "Give the model the graph was compiled from.")


def check_autolip(model, props, source, rng, tol) -> list:
    """op / adj: the graph against A / A^T (A rebuilt from the source) at 3 random vectors. power: its sigma is at
    most ||A u|| for its output u, with 1e-9 relative for rounding: the iterates' values only grow (moments of
    A^T A are log-convex), so sigma_k^2 = ||A^T A u_{k-1}|| <= ||A u_k||^2 <= ||A||^2; sigma > 0 unless A = 0;
    and sigma >= ||A u|| (1 - 1e-3), so a sigma scaled down or left short of convergence fails.
    The graph runs as emitted in onnxruntime: float32 Conv graphs in float32 (onnxruntime has no float64
    ConvTranspose and onnx.reference's fails on grouped ones), with 1e-5 instead of 1e-9 for float32 rounding."""
    from .passes.lipschitz import emitted_operator
    from .runtime import session

    A = emitted_operator(source, props)
    sess, names, dtype = session(model), [i.name for i in model.graph.input], _input_dtype(model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    graph = props.get("jacgraph.autolip.graph")
    M = A.T if graph == "adj" else A
    if int(np.prod(shape)) != M.shape[1]:
        raise JacgraphError(f"the graph takes {int(np.prod(shape))} values but the source's operator {M.shape[1]}: "
                            "give the model it was compiled from as --source.")
    if graph in ("op", "adj"):
        U = rng.standard_normal((3, M.shape[1]))
        got = np.stack([np.ravel(sess.run(None, {names[0]: u.reshape(shape).astype(dtype)})[0]) for u in U])
        return [compared("A u" if graph == "op" else "A^T v", got, U @ M.T, tol,
                         "relative error against the operator rebuilt from the source, 3 random vectors")]
    sigma, u, _ = sess.run(None, {names[0]: rng.standard_normal(shape).astype(dtype),
                                  names[1]: np.asarray(1000, np.int64), names[2]: np.asarray(1e-13, dtype)})
    u = np.ravel(u).astype(np.float64)
    rayleigh = float(np.linalg.norm(A @ u) / np.linalg.norm(u))
    slack = 1e-9 if dtype == np.float64 else 1e-5
    return [Check("sigma <= ||A u||", float(sigma) / rayleigh - 1 if rayleigh > 0 else float("inf"), slack,
                  f"sigma {float(sigma):.10g}, ||A u|| {rayleigh:.10g} at the graph's own u (power iteration)"),
            Check("sigma > 0", 0.0 if float(sigma) > 0 or not np.any(A) else float("inf"), 0.0,
                  "a nonzero operator has a positive norm"),
            # iterated to convergence (or 1000 steps), sigma_k and ||A u_k|| differ by about one step's change;
            # a sigma scaled or left short of ||A u|| fails here
            Check("sigma >= ||A u|| (1 - 1e-3)", 1 - float(sigma) / rayleigh if rayleigh > 0 else 0.0, 1e-3,
                  "power iteration converged at the graph's own u")]


def _kink_points(jacobian, points, sampled, rng, pairs=200, steps=20):
    """Points just either side of where the Jacobian jumps (an activation switching) on segments between
    sampled points, found by bisecting on the Jacobian itself, so no model internals are needed. The segments
    lie in the ball (it is convex); a bound that is loose everywhere else is most often tight here."""
    order = rng.permutation(len(points))
    a, b = points[order[:-1]], points[order[1:]]
    Ja = sampled[order[:-1]]
    jumps = np.flatnonzero(np.any(np.abs(Ja - sampled[order[1:]]) > 1e-12, axis=(1, 2)))[:pairs]
    if not len(jumps):
        return points[:0]
    a, b, Ja = a[jumps], b[jumps], Ja[jumps]
    t_lo, t_hi = np.zeros(len(a)), np.ones(len(a))
    shape = (-1,) + (1,) * (points.ndim - 1)
    for _ in range(steps):
        mid = (t_lo + t_hi) / 2
        same = np.all(np.abs(jacobian(a + mid.reshape(shape) * (b - a)) - Ja) <= 1e-12, axis=(1, 2))
        t_lo, t_hi = np.where(same, mid, t_lo), np.where(same, t_hi, mid)
    return np.concatenate([a + t.reshape(shape) * (b - a) for t in (t_lo, t_hi)])


def _input_dtype(model):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


def _ball_directions(rng, count, shape, norm):
    """Offsets in the unit ball: a third uniform inside, a third on the boundary, a third at corners (inf) or
    on coordinate axes (2), the points where a bound is most likely to be tight."""
    n = int(np.prod(shape))
    k = max(1, count // 3)
    if norm == "inf":
        inside = rng.uniform(-1, 1, (k, n))
        boundary = rng.uniform(-1, 1, (k, n))
        boundary[np.arange(k), rng.integers(0, n, k)] = rng.choice([-1.0, 1.0], k)
        extreme = rng.choice([-1.0, 1.0], (count - 2 * k, n))
    else:
        g = rng.standard_normal((count - k, n))
        sphere = g / np.linalg.norm(g, axis=1, keepdims=True)
        inside, boundary = sphere[:k] * rng.uniform(0, 1, (k, 1)) ** (1 / n), sphere[k:2 * k]
        extreme = np.zeros((count - 2 * k, n))
        extreme[np.arange(len(extreme)), rng.integers(0, n, len(extreme))] = rng.choice([-1.0, 1.0], len(extreme))
    return np.concatenate([inside, boundary, extreme]).reshape((-1, *shape))


POINTS_PER_RUN = 64  # sampled points per run of the float64 Jacobian graph, fewer where RUN_VALUES caps them
RUN_VALUES = 1 << 27  # float64 values (1 GiB) the tangents of one run may hold, counted over the source's values
AGREEMENT = 1e-12  # relative: a batched run reproduces the one-point runs up to float64 rounding, or is not used


def _true_jacobian(source, in_shape, src: SourceModel | None = None):
    """points [P, *in_shape] -> J [P, outputs, inputs], from the source's float64 JVP with one tangent
    per input element (onnxruntime in float64 where it has the kernels, else onnx.reference), up to
    POINTS_PER_RUN points per run. A source whose input has a fixed batch of 1 runs on a copy of itself with a
    free batch axis, once that copy has given the same outputs and Jacobians as the source itself (one point
    per run) on the first points asked for; otherwise (an exporter's Reshape to [1, -1] fails or differs
    there) one point per run, as the source is written. src: SourceModel(source) where the caller has it."""
    src = src or SourceModel(source)
    x = src.float_inputs()[0]
    declared = src.shape(x) or ()
    single, per_run = _jvp_runner(src, x, in_shape), _points_per_run(src, in_shape)
    if not (declared and declared[0] == 1):
        return lambda points: _in_runs(single, points, per_run)
    batched, trusted = _free_batch_runner(source, x, in_shape), []

    def jacobians(points):
        if not trusted:
            trusted.append(batched is not None and _agrees(batched, single, points[:3]))
        return _in_runs(batched, points, per_run) if trusted[0] else _in_runs(single, points, 1)
    return jacobians


def _jvp_runner(src, x, in_shape):
    """points [P, *in_shape] -> (y [P, outputs], J [P, outputs, inputs]) in one run of the float64 JVP of src."""
    from .passes import jvp

    n = int(np.prod(in_shape))
    result = jvp.emit(src, inputs=[x], tangents=n)
    y, y_dot = next(iter(result.tangent_outputs.items()))
    sess, x_dot = float64_session(to_float64(result.model)), result.tangent_inputs[x]
    eye = np.eye(n).reshape(n, 1, *in_shape)

    def run(points):
        tangent = np.broadcast_to(eye, (n, len(points), *in_shape)).copy()
        Y, Y_dot = sess.run([y, y_dot], {x: points, x_dot: tangent})
        return (np.asarray(Y).reshape(len(points), -1),
                np.moveaxis(np.asarray(Y_dot).reshape(n, len(points), -1), 0, 2))  # [P, outputs, n]
    return run


def _free_batch_runner(source, x, in_shape):
    """_jvp_runner of a copy of the source whose input x has a free batch axis (the source as loaded, so shape
    arithmetic is redone per batch); None where that copy does not build."""
    copy = onnx.ModelProto()
    copy.CopyFrom(load(source))
    (vi,) = [i for i in copy.graph.input if i.name == x]
    vi.type.tensor_type.shape.dim[0].Clear()
    vi.type.tensor_type.shape.dim[0].dim_param = "points"
    for out in copy.graph.output:  # their declared batch of 1 no longer holds
        out.type.tensor_type.ClearField("shape")
    del copy.graph.value_info[:]
    try:
        return _jvp_runner(SourceModel(copy), x, in_shape)
    except Exception:  # whatever fails here, the source as written still runs, one point at a time
        return None


def _agrees(batched, single, points) -> bool:
    """The batched runner gives every point's output and Jacobian as one-point runs do (AGREEMENT relative)."""
    try:
        got = batched(points)
    except Exception:  # a copy that cannot run a batch (Reshape to [1, -1] then Gemm) is not used
        return False
    want = [np.concatenate(part) for part in zip(*(single(points[i:i + 1]) for i in range(len(points))))]
    return all(a.shape == b.shape and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
               and np.max(np.abs(a - b), initial=0.0) <= AGREEMENT * max(1.0, np.max(np.abs(b), initial=0.0))
               for a, b in zip(got, want))


def _points_per_run(src, in_shape) -> int:
    """POINTS_PER_RUN, or fewer where the tangents of every value of the source (one per input element, per
    point) would pass RUN_VALUES."""
    n = int(np.prod(in_shape))
    values = [vi.name for vi in list(src.graph.input) + list(src.graph.value_info) + list(src.graph.output)]
    per_point = n * sum(int(np.prod([d for d in (src.shape(v) or ())[1:] if isinstance(d, int)])) for v in values)
    return int(max(1, min(POINTS_PER_RUN, RUN_VALUES // max(per_point, 1))))


def _in_runs(run, points, per_run):
    """The Jacobians at points [P, ...], per_run points per run."""
    n = int(np.prod(points.shape[1:]))
    out = [run(points[s:s + per_run])[1] for s in range(0, len(points), per_run)]
    return np.concatenate(out) if out else np.zeros((0, 0, n))
