"""The HVP pass: (x, v) -> (y, ∇f(x), H(x) v), the Hessian-vector product by forward-over-reverse.

f is the scalar output itself (one float output holding one element), or ⟨y, ȳ⟩ for a cotangent ȳ
given as an input (`y_bar=True`, or automatically when no output is a scalar): then ∇f = J(x)ᵀȳ and
H v = d/dε J(x + εv)ᵀȳ. The pass composes the two others: the VJP pass emits x -> J(x)ᵀȳ, and the
JVP pass differentiates that graph in direction v (its rules cover every op the VJP graph uses).
With `tangents=K`, v carries a leading axis of K directions and so does H v.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.passes import jvp, vjp


@dataclass
class HVPResult:
    """The emitted model and the names a caller needs (its metadata only documents them)."""
    model: onnx.ModelProto
    tangent_inputs: dict     # differentiated input x -> its direction input x_dot (v)
    cotangent_inputs: dict   # output y -> its cotangent input y_bar (empty for a scalar output)
    gradient_outputs: dict   # x -> x_bar, the gradient ∇f (J(x)ᵀȳ)
    hvp_outputs: dict        # x -> x_hvp, H v


def build(model, inputs=None, y_bar=None, tangents=None, strategy=jvp.DEFAULT_STRATEGY) -> onnx.ModelProto:
    """The HVP model (what `jacgraph compile --emit hvp` writes); see `emit`."""
    return emit(model, inputs, y_bar, tangents, strategy).model


def _scalar_output(src: SourceModel):
    """The one float output if it holds exactly one element (static shape), else None."""
    floats = [y.name for y in src.outputs if src.is_float(y.name)]
    if len(floats) != 1:
        return None
    shape = src.shape(floats[0])
    ok = shape is not None and all(isinstance(d, int) for d in shape) and int(np.prod(shape, dtype=np.int64)) == 1
    return floats[0] if ok else None


def _fix_cotangent(proto: onnx.ModelProto, bar: str, src: SourceModel, y: str) -> onnx.ModelProto:
    """The VJP model with its cotangent input `bar` turned into the constant 1 (f = y for a scalar y)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [i for i in out.graph.input if i.name != bar]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    one = np.ones([int(d) for d in src.shape(y)], dtype=src.np_dtype(y))
    out.graph.initializer.append(numpy_helper.from_array(one, bar))
    return out


def _rename_outputs(proto: onnx.ModelProto, keep: dict):
    """Keep only the graph outputs in `keep` (old name -> new name), renaming them where the name changes; the
    Identity nodes that produced dropped outputs go too."""
    graph = proto.graph
    dropped = {o.name for o in graph.output} - set(keep)
    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in dropped)]
    for node in nodes:
        for i, name in enumerate(node.output):
            if name in keep:
                node.output[i] = keep[name]
    outputs = [o for o in graph.output if o.name in keep]
    for o in outputs:
        o.name = keep[o.name]
    del graph.node[:], graph.output[:]
    graph.node.extend(nodes)
    graph.output.extend(outputs)


def _fresh(proto, hint):
    taken = {v for n in proto.graph.node for v in list(n.input) + list(n.output)}
    taken |= {v.name for v in list(proto.graph.input) + list(proto.graph.output)} | {t.name for t in proto.graph.initializer}
    name, k = hint, 0
    while name in taken:
        k += 1
        name = f"{hint}_{k}"
    return name


def emit(model, inputs=None, y_bar=None, tangents=None, strategy=jvp.DEFAULT_STRATEGY) -> HVPResult:
    """Emit the HVP model.

    Inputs: the source inputs, then `<y>_bar` per float output when f = ⟨y, ȳ⟩, then `<x>_dot` (v) per
    differentiated input. Outputs: the source outputs, `<x>_bar` (∇f), `<x>_hvp` (H v).
    y_bar: None picks the constant 1 when the model has one float output of one element and a cotangent
    input otherwise; True always takes the cotangent as an input; False insists on a scalar output.
    """
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    xs = src.check_inputs(inputs if inputs else src.float_inputs())
    scalar = None if y_bar else _scalar_output(src)
    if y_bar is False and scalar is None:
        raise JacgraphError("the HVP of a model whose output is not one scalar needs a cotangent: f = <y, y_bar>. "
                            "Drop y_bar=False (or pass --y-bar), or export the model with a scalar (loss) output.")
    reverse = vjp.emit(src, inputs=xs)
    vjp_model, cotangents = reverse.model, dict(reverse.cotangent_inputs)
    if scalar is not None:
        vjp_model = _fix_cotangent(vjp_model, cotangents.pop(scalar), src, scalar)
        cotangents = {}
    forward = jvp.emit(vjp_model, inputs=xs, tangents=tangents, strategy=strategy)
    proto = forward.model
    gradients = {x: reverse.gradient_outputs[x] for x in xs}
    hvps = {x: _fresh(proto, f"{x}_hvp") for x in xs}
    keep = {y.name: y.name for y in src.outputs}
    keep.update({g: g for g in gradients.values()})
    keep.update({forward.tangent_outputs[gradients[x]]: hvps[x] for x in xs})
    _rename_outputs(proto, keep)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {
        "jacgraph.emit": "hvp", "jacgraph.tangents": str(tangents or 0),
        "jacgraph.tangent_inputs": json.dumps([[x, forward.tangent_inputs[x]] for x in xs]),
        "jacgraph.cotangent_inputs": json.dumps(list(cotangents.items())),
        "jacgraph.gradient_outputs": json.dumps(list(gradients.items())),
        "jacgraph.hvp_outputs": json.dumps(list(hvps.items())),
        "jacgraph.summary": f"hvp: H v for {len(xs)} input(s) by forward-over-reverse, f = "
                            + (f"{scalar} (scalar output)" if scalar else "<y, y_bar> (cotangent inputs "
                               + ", ".join(cotangents.values()) + ")")})
    proto.graph.name = f"{src.graph.name}_hvp"
    proto.graph.doc_string = f"Hessian-vector product of {src.graph.name} (jacgraph)"
    onnx.checker.check_model(proto, full_check=True)
    return HVPResult(proto, dict(forward.tangent_inputs), cotangents, gradients, hvps)
