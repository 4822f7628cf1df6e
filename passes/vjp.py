"""The VJP pass: (x, [params], y_bar) -> (y, x_bar, [param_bar]) with x_bar = J(x)ᵀ y_bar, by jacgraph.rules.transpose.

The primal graph is copied whole, then a reverse sweep over the source nodes (reverse topological
order) applies one rule per node, accumulating cotangents of values used several times with Sum.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import onnx
from onnx import helper

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, node_inputs
from jacgraph.rules import control_flow  # noqa: F401  (registers If/Loop/Scan into the JVP and VJP tables)
from jacgraph.rules.jvp import zeros_like
from jacgraph.rules.transpose import VJP


def float_params(src: SourceModel):
    return [name for name in src.initializers if src.is_float(name)]


def resolve_wrt(src: SourceModel, wrt):
    """Initializer names to differentiate: None, 'params' (every float initializer) or a list of names."""
    if wrt is None:
        return []
    valid = float_params(src)
    if wrt == "params":
        return valid
    names = [wrt] if isinstance(wrt, str) else list(wrt)
    unknown = [n for n in names if n not in valid]
    if unknown:
        listed = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + f", ... ({len(valid)} in all)"
        raise JacgraphError(f"--wrt names {', '.join(map(repr, unknown))}, which is not a floating-point initializer "
                            f"of the model. Use --wrt params for all of them, or names from: {listed or '(none)'}.")
    return names


def summed_cotangent(b, cts, name):
    """The cotangent of `name`: its terms in `cts` summed (once), None when no rule reached it."""
    terms = cts.get(name)
    if not terms:
        return None
    if len(terms) > 1:
        cts[name] = [b.Sum(*terms)]
    return cts[name][0]


def sweep(b, nodes, cts):
    """Apply the transpose rule of each of `nodes` (topological order) in reverse; `cts` maps a source value
    name to its cotangent terms and is updated for the names in b.active. Control-flow rules call this on a
    child Builder for each body, whose outer-scope captures come back after the node's own inputs."""
    for node in reversed(nodes):
        out_cts = [summed_cotangent(b, cts, o) if o else None for o in node.output]
        if all(c is None for c in out_cts):
            continue
        in_cts = b.apply(VJP[node.op_type], node, *out_cts)
        for name, ct in zip(node_inputs(node), in_cts):
            if name and ct is not None and name in b.active and b.src.is_float(name):
                cts.setdefault(name, []).append(ct)


@dataclass
class VJPResult:
    """The emitted model and the names a caller building on it needs (its metadata only documents them)."""
    model: onnx.ModelProto
    cotangent_inputs: dict  # float output y -> its cotangent input y_bar
    gradient_outputs: dict  # differentiated input or parameter -> its gradient output
    params: list  # the parameters differentiated (with wrt="params": those some output depends on)


def build(model, inputs=None, wrt=None) -> onnx.ModelProto:
    """The VJP model (what `jacgraph compile --emit vjp` writes); see `emit`."""
    return emit(model, inputs, wrt).model


def emit(model, inputs=None, wrt=None) -> VJPResult:
    """Emit the VJP model.

    Inputs: the source inputs, then the `wrt` initializers as inputs defaulting to their current
    values, then `<y>_bar` per float output. Outputs: the source outputs, then `<x>_bar` per
    differentiated input, then `<param>_bar` per parameter. wrt="params" keeps the float initializers
    that some output depends on differentiably (a rule gives them a cotangent).
    """
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    xs = src.check_inputs(inputs if inputs else src.float_inputs())
    params = resolve_wrt(src, wrt)
    VJP.check(src, xs + params)

    b = Builder(src)
    b.active = set(xs + params)
    active_nodes = src.active_nodes(xs + params)
    for node in active_nodes:
        b.active.update(o for o in node.output if o)

    for inp in src.graph.input:
        if inp.name not in src.initializers:
            b.inputs.append(inp)
    for p in params:  # an input of the same name as an initializer: the initializer is its default value
        b.add_input(p, src.dtype(p), list(src.initializers[p].dims))
    for node in src.nodes:
        b.copy(node)

    cts = {}  # source value name -> cotangent names to sum

    def cotangent(name):
        return summed_cotangent(b, cts, name)

    bar_inputs = []
    for y in src.outputs:
        if src.is_float(y.name):
            name = b.fresh(f"{y.name}_bar")
            b.add_input(name, src.dtype(y.name), list(src.shape(y.name) or []))
            cts.setdefault(y.name, []).append(name)
            bar_inputs.append([y.name, name])

    sweep(b, active_nodes, cts)

    if wrt == "params":  # keep only the initializers a rule reached
        params = [p for p in params if cts.get(p)]
        b.inputs = [i for i in b.inputs if i.name not in src.initializers or i.name in params]

    b.outputs.extend(src.outputs)
    grads = []
    for name in xs + params:
        ct = cotangent(name)
        if ct is None:
            ct = zeros_like(b, name)
        out = b.fresh(f"{name}_bar")
        b.nodes.append(helper.make_node("Identity", [ct], [out], name=b.fresh("jg_output")))
        shape = list(src.shape(name) or []) if name not in src.initializers else list(src.initializers[name].dims)
        b.add_output(out, src.dtype(name), shape)
        grads.append([name, out])
    metadata = {"jacgraph.emit": "vjp", "jacgraph.inputs": json.dumps(xs), "jacgraph.wrt": json.dumps(params),
                "jacgraph.cotangent_inputs": json.dumps(bar_inputs),
                "jacgraph.gradient_outputs": json.dumps(grads),
                "jacgraph.summary": f"vjp: gradients for {len(xs)} input(s) and {len(params)} parameter(s), "
                                    f"cotangent inputs {', '.join(bar for _, bar in bar_inputs) or '(none)'}"}
    model = b.build(f"{src.graph.name}_vjp", doc=f"VJP of {src.graph.name} (jacgraph)", metadata=metadata)
    return VJPResult(model, dict(bar_inputs), dict(grads), params)
