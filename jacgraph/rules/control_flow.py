"""Forward- and reverse-mode rules for If, Loop and Scan, nesting included.

A body is differentiated by the passes' own interpreters (jacgraph.passes.jvp.differentiate,
jacgraph.passes.vjp.sweep) run on a child Builder (`b.subgraph(body)`), so a body may hold any op that
has rules, control flow included. Bodies read outer values by name; the emitted bodies read the outer
tangents and cotangents the same way. A control-flow rule takes tangents (returns cotangents) for
`node_inputs(node)`: the node's own inputs, then its outer-scope captures.

Forward mode: If runs both branches' tangent code under the same condition (each branch gets one extra
output per float output, zeros where the branch does not depend on the inputs). Loop and Scan carry the
tangents as extra state (and extra scan inputs/outputs). Integer and bool values (counters, `cond`)
carry no tangent.

Reverse mode: If becomes a second If on the same condition whose branches recompute their primal and
sweep back to the captured values. Loop and Scan store every iteration's incoming state as extra scan
outputs of the forward node; a reverse-sweep Loop then walks the iterations backwards (its trip count
is the number of stored rows, so dynamic trip counts and a data-dependent `cond` need nothing else),
recomputes each iteration's body from its stored state and applies the body's transpose, carrying the
state cotangents and accumulating the cotangents of captured outer values. Scan inputs are read, and
their cotangents written, at the slice each forward iteration used (axes and directions included).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import JacgraphError
from ..model import captures, node_inputs, subgraphs, unsupported_error
from .jvp import JVP, lead, zeros_like
from .transpose import VJP, need

INT64, BOOL = onnx.TensorProto.INT64, onnx.TensorProto.BOOL


# ---- helpers ------------------------------------------------------------------------------------

def _graph(node, name):
    return next(a.g for a in node.attribute if a.name == name)


def _set_attr(node, name, value):
    """Replace (or add) attribute `name` of an emitted node."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def _is_tensor(src, name):
    try:
        return bool(src.dtype(name))
    except JacgraphError:  # a sequence or optional value, or no type at all
        return False


def _type(src, name, leading=()):
    """The tensor type of `name` in `src`, with `leading` axes (the K of stacked tangents) prepended
    (None for a sequence or optional value, or an unknown type)."""
    if not _is_tensor(src, name):
        return None
    shape = src.shape(name)
    return helper.make_tensor_type_proto(src.dtype(name), None if shape is None else [*leading, *shape])


def _value_info(src, name, as_name=None, leading=()):
    return helper.make_value_info(as_name or name, _type(src, name, leading))


def _declare(b, names, likes, leading=()):
    """Record the types of control-flow outputs (like `likes` in the source) that ONNX shape inference leaves
    unknown (a Loop's carried outputs), so an emitted graph read back as a source (jvp of vjp) has them."""
    for name, like in zip(names, likes):
        if name is not None and b.src.shape(like) is not None:
            b.value_info.append(_value_info(b.src, like, name, leading))


def _slice_type(src, name, axis):
    """Type of one scan slice of `name` along `axis`."""
    shape = src.shape(name)
    if shape is None:
        return helper.make_tensor_type_proto(src.dtype(name), None)
    return helper.make_tensor_type_proto(src.dtype(name), [d for i, d in enumerate(shape) if i != axis % len(shape)])


def live_names(src, graph, live, carried=()):
    """Float names of `graph` that depend on `live` (body inputs or outer names); a loop-carried input
    (`carried`: input index, output index) is live once its output is, iterated to a fixed point."""
    live = {n for n in live if src.is_float(n)}
    while True:
        reached = set(live)
        for node in src.nodes:
            if any(n in reached for n in node_inputs(node)):
                reached.update(o for o in node.output if o and src.is_float(o))
        new = {graph.input[i].name for i, o in carried
               if graph.output[o].name in reached and src.is_float(graph.input[i].name)} - live
        if not new:
            return reached
        live |= new


def _check_rules(child, table, live, node):
    missing = table.missing(child.src, sorted(live))
    if missing:
        raise unsupported_error(missing, f"{table.what} (inside {node.op_type} '{node.name or node.output[0]}')")


def _tangent_in(child, env, name):
    """A fresh body input carrying the tangent of body value `name` (entered into `env`)."""
    env[name] = child.fresh(f"{name}_dot")
    child.inputs.append(_value_info(child.src, name, env[name], [child.K] if child.K else []))


def _tangent_out(child, env, name):
    """Tangent of body value `name` as a fresh body output (zeros where nothing reached it)."""
    t = env.get(name)
    out = child.identity_as(t if t is not None else zeros_like(child, name), child.fresh(f"{name}_dot"))
    child.outputs.append(_value_info(child.src, name, out, [child.K] if child.K else []))
    return out


def _body_jvp(b, node, body, outer_tangents, input_types, carried, live_inputs):
    """A child Builder for `body` with the tangent environment of its outer captures and its live names
    (rules checked); the caller adds inputs, runs differentiate() and adds outputs."""
    child = b.subgraph(body, input_types, carried)
    live = live_names(child.src, child.src.graph, set(live_inputs) | set(outer_tangents), carried)
    _check_rules(child, JVP, live, node)
    env = dict(outer_tangents)
    return child, env, live


def _outer_tangents(node, tangents):
    return {c: t for c, t in zip(captures(node), tangents[len(node.input):]) if t is not None}


# ---- forward mode -------------------------------------------------------------------------------

@JVP.register("If")
def if_jvp(b, node, *tangents):
    """Both branches get the tangent code; the If outputs the taken branch's tangents."""
    from jacgraph.passes.jvp import differentiate

    outer = _outer_tangents(node, tangents)
    branches, live_outputs = {}, set()
    for attr in ("then_branch", "else_branch"):
        child, env, live = _body_jvp(b, node, _graph(node, attr), outer, None, (), ())
        branches[attr] = (child, env)
        live_outputs |= {i for i, o in enumerate(child.src.graph.output) if o.name in live or o.name in outer}
    live_outputs = sorted(i for i in live_outputs if b.src.is_float(node.output[i]))
    copy = b.copies[id(node)]
    for attr, (child, env) in branches.items():
        child.inputs.extend(child.src.graph.input)
        child.outputs.extend(child.src.graph.output)
        differentiate(child, env)
        for i in live_outputs:
            _tangent_out(child, env, child.src.graph.output[i].name)
        _set_attr(copy, attr, child.graph(f"{node.name or 'if'}_{attr}_jvp"))
    outs = [None] * len(node.output)
    for i in live_outputs:
        outs[i] = b.fresh(f"{node.output[i]}_dot")
        copy.output.append(outs[i])
    _declare(b, outs, node.output, [b.K] if b.K else [])
    return outs


def _after_its_inputs(b, copy):
    """Move an emitted node to the end of the graph (after tangent inputs emitted once it was copied)."""
    del b.nodes[next(i for i, n in enumerate(b.nodes) if n is copy)]
    b.nodes.append(copy)


def _stack_first(b, t, src, name):
    """Loop/Scan stack tangent slices [K, ...] of body value `name` along axis 0 as [T, K, ...]; swap back
    to [K, T, ...] (and the other way for a tangent scanned along axis 0)."""
    if b.K is None:
        return t
    rank = src.rank(name) + 1
    return b.Transpose(t, perm=[1, 0] + list(range(2, rank + 1)))


@JVP.register("Loop")
def loop_jvp(b, node, *tangents):
    """Float loop-carried values carry their tangent as extra state; float scan outputs get tangent scan outputs."""
    from jacgraph.passes.jvp import differentiate

    body = _graph(node, "body")
    n_state = len(node.input) - 2
    state_in = [body.input[2 + k].name for k in range(n_state)]
    types = [None, None] + [_type(b.src, x) for x in node.input[2:]]
    carried = [(2 + k, 1 + k) for k in range(n_state)]
    given = [x for x, t in zip(state_in, tangents[2:len(node.input)]) if t is not None]
    child, env, live = _body_jvp(b, node, body, _outer_tangents(node, tangents), types, carried, given)
    g = child.src.graph
    active = [k for k in range(n_state) if state_in[k] in live]
    scans = [m for m in range(len(g.output) - 1 - n_state) if g.output[1 + n_state + m].name in live]
    K = [b.K] if b.K else []

    child.inputs.extend(g.input)
    for k in active:
        _tangent_in(child, env, state_in[k])
    differentiate(child, env)
    child.outputs.extend(g.output[:1 + n_state])
    for k in active:
        _tangent_out(child, env, g.output[1 + k].name)
    child.outputs.extend(g.output[1 + n_state:])
    for m in scans:
        _tangent_out(child, env, g.output[1 + n_state + m].name)

    copy = b.copies[id(node)]
    for k in active:
        t = tangents[2 + k]
        copy.input.append(t if t is not None else zeros_like(b, node.input[2 + k]))
    outs = [None] * len(node.output)
    finals = [b.fresh(f"{node.output[k]}_dot") for k in active]
    stacked = [b.fresh(f"{node.output[n_state + m]}_dot") for m in scans]
    del copy.output[n_state:]
    copy.output.extend(finals + list(node.output[n_state:]) + stacked)
    _set_attr(copy, "body", child.graph(f"{node.name or 'loop'}_body_jvp"))
    _after_its_inputs(b, copy)
    for k, t in zip(active, finals):
        outs[k] = t
    for m, t in zip(scans, stacked):
        outs[n_state + m] = _stack_first(b, t, child.src, g.output[1 + n_state + m].name)
    _declare(b, outs, node.output, K)
    return outs


def _scan_layout(b, node):
    """A Scan's body, counts (scan inputs, states, scan outputs), per-axis attributes with their defaults, and
    the body's input types (states as given, scan inputs as one slice)."""
    attrs = b.src.attrs(node)
    body = _graph(node, "body")
    n_in = attrs["num_scan_inputs"]
    n_state = len(node.input) - n_in
    n_out = len(body.output) - n_state
    in_axes = [int(a) for a in attrs.get("scan_input_axes") or [0] * n_in]
    in_dirs = [int(d) for d in attrs.get("scan_input_directions") or [0] * n_in]
    out_axes = [int(a) for a in attrs.get("scan_output_axes") or [0] * n_out]
    out_dirs = [int(d) for d in attrs.get("scan_output_directions") or [0] * n_out]
    types = [_type(b.src, s) for s in node.input[:n_state]] + \
            [_slice_type(b.src, x, a) for x, a in zip(node.input[n_state:], in_axes)]
    return body, n_in, n_state, n_out, in_axes, in_dirs, out_axes, out_dirs, types


@JVP.register("Scan")
def scan_jvp(b, node, *tangents):
    """States carry their tangent as extra state; scan inputs/outputs get tangent scan inputs/outputs (axes shift by K)."""
    from jacgraph.passes.jvp import differentiate

    body, n_in, n_state, n_out, in_axes, in_dirs, out_axes, out_dirs, types = _scan_layout(b, node)
    xs = list(node.input[n_state:])
    carried = [(k, k) for k in range(n_state)]
    given = [i.name for i, t in zip(body.input, tangents[:len(node.input)]) if t is not None]
    child, env, live = _body_jvp(b, node, body, _outer_tangents(node, tangents), types, carried, given)
    g = child.src.graph
    active = [k for k in range(n_state) if g.input[k].name in live]
    moving = [m for m in range(n_in) if tangents[n_state + m] is not None]
    scans = [m for m in range(n_out) if g.output[n_state + m].name in live]
    K = [b.K] if b.K else []
    # a tangent axis: K comes first. Axis 0 stays axis 0 with K swapped behind it, the form onnx's reference
    # evaluator runs (it scans along axis 0 only)
    shift = lambda a: a + lead(b) if a > 0 else a  # noqa: E731

    child.inputs.extend(g.input[:n_state])
    for k in active:
        _tangent_in(child, env, g.input[k].name)
    child.inputs.extend(g.input[n_state:])
    for m in moving:
        _tangent_in(child, env, g.input[n_state + m].name)
    differentiate(child, env)
    child.outputs.extend(g.output[:n_state])
    for k in active:
        _tangent_out(child, env, g.output[k].name)
    child.outputs.extend(g.output[n_state:])
    for m in scans:
        _tangent_out(child, env, g.output[n_state + m].name)

    copy = b.copies[id(node)]
    state_t = [tangents[k] if tangents[k] is not None else zeros_like(b, node.input[k]) for k in active]
    del copy.input[:]
    x_t = [tangents[n_state + m] if in_axes[m] else _stack_first(b, tangents[n_state + m], child.src, g.input[n_state + m].name)
           for m in moving]
    copy.input.extend(list(node.input[:n_state]) + state_t + xs + x_t)
    finals = [b.fresh(f"{node.output[k]}_dot") for k in active]
    scanned = [b.fresh(f"{node.output[n_state + m]}_dot") for m in scans]
    del copy.output[:]
    copy.output.extend(list(node.output[:n_state]) + finals + list(node.output[n_state:]) + scanned)
    _set_attr(copy, "num_scan_inputs", n_in + len(moving))
    _set_attr(copy, "scan_input_axes", in_axes + [shift(in_axes[m]) for m in moving])
    _set_attr(copy, "scan_input_directions", in_dirs + [in_dirs[m] for m in moving])
    _set_attr(copy, "scan_output_axes", out_axes + [shift(out_axes[m]) for m in scans])
    _set_attr(copy, "scan_output_directions", out_dirs + [out_dirs[m] for m in scans])
    _set_attr(copy, "body", child.graph(f"{node.name or 'scan'}_body_jvp"))
    _after_its_inputs(b, copy)
    outs = [None] * len(node.output)
    for k, t in zip(active, finals):
        outs[k] = t
    for m, t in zip(scans, scanned):
        outs[n_state + m] = t if out_axes[m] else _stack_first(b, t, child.src, g.output[n_state + m].name)
    _declare(b, outs, node.output, K)
    return outs


# ---- reverse mode -------------------------------------------------------------------------------

@VJP.register("If")
def if_vjp(b, node, *cts):
    """An If on the same condition: each branch recomputes its primal and sweeps back to the captured values."""
    wanted = [c for c in captures(node) if need(b, c)]
    if not wanted:
        return [None] * len(node_inputs(node))
    branches = {}
    for attr in ("then_branch", "else_branch"):
        child = _reverse_body(b, node, _graph(node, attr), None, (), wanted)
        seeds = {o.name: [g] for o, g in zip(child.src.graph.output, cts) if g is not None}
        found = _sweep_body(child, seeds, wanted)
        for c in wanted:
            child.outputs.append(_value_info(b.src, c, child.identity_as(found[c], child.fresh(f"{c}_bar"))))
        branches[attr] = child.graph(f"{node.name or 'if'}_{attr}_vjp")
    copy = b.copies[id(node)]
    for attr in branches:
        _set_attr(copy, attr, _with_fresh_names(b, _graph(copy, attr)))
    outs = b.op("If", node.input[0], n_out=len(wanted), **branches)
    outs = [outs] if len(wanted) == 1 else outs
    _declare(b, outs, wanted)
    return [None] + [dict(zip(wanted, outs)).get(c) for c in captures(node)]


def _reverse_body(b, node, body, input_types, carried, live_inputs):
    """A child Builder for `body` that wants cotangents for the names depending on `live_inputs`."""
    child = b.subgraph(body, input_types, carried)
    child.active = live_names(child.src, child.src.graph, live_inputs, carried) | set(live_inputs)
    _check_rules(child, VJP, child.active, node)
    return child


def _sweep_body(child, seeds, names):
    """Recompute the body's primal, sweep its transpose from `seeds` ({name: [cotangent]}) and return the
    cotangents reaching `names` (zeros where none does)."""
    from jacgraph.passes.vjp import summed_cotangent, sweep

    for n in child.src.nodes:
        child.copy(n)
    cts = {k: list(v) for k, v in seeds.items()}
    sweep(child, child.src.active_nodes(sorted(child.active)), cts)
    found = {}
    for name in names:
        ct = summed_cotangent(child, cts, name)
        found[name] = ct if ct is not None else zeros_like(child, name)
    return found


def _with_fresh_names(b, graph):
    """A copy of `graph` whose own values (inputs, node outputs, initializers, nested bodies' too) have fresh
    names. The reverse sweep recomputes a body under its source names; the forward copy is renamed so that
    no name is defined in two sibling bodies (onnx's shape inference with data propagation refuses that)."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    mapping = {}

    def collect(g):
        for name in [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]:
            if name and name not in mapping:
                mapping[name] = b.fresh(name)
        for n in g.node:
            for sub in subgraphs(n):
                collect(sub)

    def rename(g):
        for value in list(g.input) + list(g.output) + list(g.value_info) + list(g.initializer):
            value.name = mapping.get(value.name, value.name)
        for n in g.node:
            for names in (n.input, n.output):
                renamed = [mapping.get(v, v) for v in names]
                del names[:]
                names.extend(renamed)
            for sub in subgraphs(n):
                rename(sub)

    collect(out)
    rename(out)
    return out


def _store_states(b, node, fwd_body, stored):
    """Add every iteration's incoming `stored` body values to the forward node's copy as scan outputs.
    Returns the names of the stacked values in this graph."""
    copy = b.copies[id(node)]
    body = b.subgraph(fwd_body)
    for n in body.src.nodes:
        body.copy(n)
    body.inputs.extend(body.src.graph.input)
    body.outputs.extend(body.src.graph.output)
    outs = []
    for name in stored:
        kept = body.identity_as(name, body.fresh(f"{name}_kept"))
        body.outputs.append(_value_info(body.src, name, kept))
        outs.append(b.fresh(f"{name}_stored"))
    copy.output.extend(outs)
    _declare(b, outs, stored, [None])
    _set_attr(copy, "body", _with_fresh_names(b, body.graph(f"{node.name or node.op_type.lower()}_body_stored")))
    if node.op_type == "Scan":
        attrs = b.src.attrs(node)
        for key in ("scan_output_axes", "scan_output_directions"):
            if attrs.get(key):
                _set_attr(copy, key, [int(v) for v in attrs[key]] + [0] * len(stored))
    return outs


def _check_storable(b, node, body_src, state):
    """The reverse sweep stacks each iteration's state into one tensor: every carried value must be a tensor
    whose shape stays the same from one iteration to the next."""
    where = f"{node.op_type} '{node.name or node.output[0]}'"
    for body_in, _, position, _ in state:
        start = node_inputs(node)[position]
        if not _is_tensor(b.src, start):
            raise JacgraphError(
                f"{where} carries '{start}', which is not a tensor (a sequence or optional value). The VJP pass "
                "stores every iteration's carried state as one stacked tensor; carry tensors instead (e.g. a "
                "preallocated tensor updated with ScatterND rather than a growing sequence).")
        if body_in in body_src.reshaped:
            before, after = body_src.reshaped[body_in]
            raise JacgraphError(
                f"{where} changes the shape of its carried value '{start}' from {list(before)} to {list(after)} "
                "in one iteration. The VJP pass stores every iteration's state as one stacked tensor, which "
                "needs one shape; preallocate the value at its final size (the JVP pass handles this loop).")


def _reverse_sweep(b, node, body, types, state, xs, ys, cts, stored, fixed=()):
    """The reverse sweep of a Loop/Scan: a Loop over the stored iterations, last first.

    state: (body input, body output, position of the initial value in node.input, final value) per
    loop-carried value; xs: (position in node.input, body slice, axis, direction) per scan input; ys:
    (body slice, axis, direction, cotangent of the outer Y or None) per scan output; stored: body inputs
    recorded per iteration (with `fixed`: body inputs bound to a constant, Loop's cond). Returns the
    cotangents by position in node_inputs(node) (initial states, scan inputs, captured outer values).
    """
    reads = node_inputs(node)
    wanted = [c for c in captures(node) if need(b, c)]
    given = [s[0] for s in state if need(b, reads[s[2]])] + [x[1] for x in xs if need(b, reads[x[0]])] + wanted
    carried = [(_index(body.input, s[0]), _index(body.output, s[1])) for s in state]
    child = _reverse_body(b, node, body, types, carried, given)
    active = [s for s in state if s[0] in child.active]
    moving = [x for x in xs if need(b, reads[x[0]])]
    seeded = [y for y in ys if y[3] is not None]
    if not (active or moving or wanted):
        return {}
    _check_storable(b, node, child.src, state)
    stored_names = _store_states(b, node, body, stored)
    # the trip count: rows stored by the forward node, or the length of a scan input
    trips = b.Gather(b.Shape(stored_names[0] if stored_names else reads[xs[0][0]]),
                     b.const(np.int64(0 if stored_names else xs[0][2])))

    src = child.src
    step, cond = child.fresh("reverse_step"), child.fresh("reverse_cond")
    ct_in = {s[0]: child.fresh(f"{s[0]}_bar") for s in active}
    acc_in = {c: child.fresh(f"{c}_bar_sum") for c in wanted}
    child.inputs.extend([helper.make_tensor_value_info(step, INT64, []), helper.make_tensor_value_info(cond, BOOL, [])])
    child.inputs.extend(_value_info(src, s[0], ct_in[s[0]]) for s in active)
    child.inputs.extend(_value_info(src, c, acc_in[c]) for c in wanted)
    t = child.Sub(child.Sub(trips, child.const(np.int64(1))), step)  # the forward iteration this step undoes
    index = lambda direction: t if direction == 0 else step  # noqa: E731  (the slice iteration t read)
    for name in stored:
        child.identity_as(child.Gather(stored_names[stored.index(name)], t, axis=0), name)
    for x in xs:
        child.identity_as(child.Gather(reads[x[0]], index(x[3]), axis=x[2]), x[1])
    for name, value in fixed:
        child.identity_as(child.const(value), name)
    seeds = {}
    for s in active:
        seeds.setdefault(s[1], []).append(ct_in[s[0]])
    for y in seeded:
        seeds.setdefault(y[0], []).append(child.Gather(y[3], index(y[2]), axis=y[1]))
    found = _sweep_body(child, seeds, [s[0] for s in active] + wanted + [x[1] for x in moving])
    child.outputs.append(helper.make_tensor_value_info(child.identity_as(cond, child.fresh("reverse_cond_out")), BOOL, []))
    for s in active:
        child.outputs.append(_value_info(src, s[0], child.identity_as(found[s[0]], child.fresh(f"{s[0]}_bar_next"))))
    for c in wanted:
        total = child.Add(acc_in[c], found[c])
        child.outputs.append(_value_info(src, c, child.identity_as(total, child.fresh(f"{c}_bar_next"))))
    for x in moving:
        child.outputs.append(_value_info(src, x[1], child.identity_as(found[x[1]], child.fresh(f"{x[1]}_bar"))))

    states = [cts.get(s[3]) if cts.get(s[3]) is not None else zeros_like(b, s[3]) for s in active]
    states += [zeros_like(b, c) for c in wanted]
    # (an explicit cond: onnx's reference evaluator runs no iteration when it is omitted)
    outs = b.op("Loop", trips, b.const(np.array(True)), *states, n_out=len(states) + len(moving),
                body=child.graph(f"{node.name or node.op_type.lower()}_body_vjp"))
    outs = [outs] if isinstance(outs, str) else outs
    for i, x in enumerate(moving):  # rows come out last iteration first; put them back on the scan axis
        rows = outs[len(states) + i]
        if x[3] == 0:
            rows = b.Slice(rows, b.ints([-1]), b.ints([-2**63]), b.ints([0]), b.ints([-1]))
        rank = b.src.rank(reads[x[0]])
        axis = x[2] % rank
        if axis:
            rows = b.Transpose(rows, perm=list(range(1, axis + 1)) + [0] + list(range(axis + 1, rank)))
        outs[len(states) + i] = rows
    positions = [s[2] for s in active] + [reads.index(c, len(node.input)) for c in wanted] + [x[0] for x in moving]
    _declare(b, outs, [reads[i] for i in positions])
    return dict(zip(positions, outs))


def _index(values, name):
    return next(i for i, v in enumerate(values) if v.name == name)


@VJP.register("Loop")
def loop_vjp(b, node, *cts):
    """Store each iteration's (iteration number, carried state), then sweep the iterations backwards."""
    body = _graph(node, "body")
    n_state = len(node.input) - 2
    g_in, g_out = body.input, body.output
    types = [None, None] + [_type(b.src, x) for x in node.input[2:]]
    state = [(g_in[2 + k].name, g_out[1 + k].name, 2 + k, node.output[k]) for k in range(n_state)]
    ys = [(g_out[1 + n_state + m].name, 0, 0, cts[n_state + m]) for m in range(len(node.output) - n_state)]
    stored = [g_in[0].name] + [g_in[2 + k].name for k in range(n_state)]
    result = _reverse_sweep(b, node, body, types, state, [], ys, dict(zip(node.output, cts)), stored,
                            fixed=[(g_in[1].name, np.array(True))])
    return [result.get(i) for i in range(len(node_inputs(node)))]


@VJP.register("Scan")
def scan_vjp(b, node, *cts):
    """Store each iteration's incoming states, then a Scan in the opposite direction applies the body's transpose."""
    body, n_in, n_state, n_out, in_axes, in_dirs, out_axes, out_dirs, types = _scan_layout(b, node)
    g_in, g_out = body.input, body.output
    state = [(g_in[k].name, g_out[k].name, k, node.output[k]) for k in range(n_state)]
    xs = [(n_state + m, g_in[n_state + m].name, in_axes[m], in_dirs[m]) for m in range(n_in)]
    ys = [(g_out[n_state + m].name, out_axes[m], out_dirs[m], cts[n_state + m]) for m in range(n_out)]
    stored = [g_in[k].name for k in range(n_state)]
    result = _reverse_sweep(b, node, body, types, state, xs, ys, dict(zip(node.output, cts)), stored)
    return [result.get(i) for i in range(len(node_inputs(node)))]
