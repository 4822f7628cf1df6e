"""Numerical checkers shared by the tests and `jacgraph verify`: float64 copies, central differences."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .model import SourceModel
from .reference import _exact_reference_ops, reference_session, run_reference  # noqa: F401  (importable from here too)

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
NARROW = (F32, TensorProto.FLOAT16, TensorProto.BFLOAT16)  # float types the float64 copy widens


def _retype(value_info):
    t = value_info.type.tensor_type
    if t.elem_type in NARROW:
        t.elem_type = F64


def _fixed_float32_inputs(model: onnx.ModelProto) -> set:
    """Names fed to inputs whose schema type is tensor(float) itself, not a type variable (Resize's scales)."""
    opset = {imp.domain or "": imp.version for imp in model.opset_import}
    fixed = set()
    for node in model.graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset.get(node.domain or "", 1), node.domain or "")
        except onnx.defs.SchemaError:
            continue
        for i, name in enumerate(node.input):
            formal = schema.inputs[min(i, len(schema.inputs) - 1)] if schema.inputs else None
            if name and formal is not None and formal.type_str == "tensor(float)":
                fixed.add(name)
    return fixed


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy: initializers, constants, casts and declared types float32 -> float64.

    Inputs the operator schema fixes to float32 (Resize's scales) keep their type.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep = _fixed_float32_inputs(m)
    for i, init in enumerate(g.initializer):
        if init.data_type in NARROW and init.name not in keep:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _retype(vi)
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and node.output[0] in keep:
                continue
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in NARROW:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in NARROW:
                attr.i = F64
            elif attr.type == onnx.AttributeProto.GRAPH:  # Loop/Scan/If bodies: the same widening
                attr.g.CopyFrom(_subgraph_to_float64(m, attr.g))
    del g.value_info[:]
    return m


def _subgraph_to_float64(model, graph):
    wrapper = onnx.ModelProto()
    wrapper.opset_import.extend(model.opset_import)
    wrapper.graph.CopyFrom(graph)
    return to_float64(wrapper).graph


def random_feeds(src: SourceModel, rng, batch=1, dtype=np.float64) -> dict:
    """Standard-normal values for every float input (symbolic dims set to `batch`)."""
    feeds = {}
    for inp in src.inputs:
        shape = [d if isinstance(d, int) else batch for d in (src.shape(inp.name) or [])]
        if src.is_float(inp.name):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=src.np_dtype(inp.name))
    return feeds


def central_difference(sess, feeds: dict, directions: dict, h: float = 1e-6) -> dict:
    """(f(x + h v) - f(x - h v)) / 2h for every output; O(h²) truncation, float64 round-off ~1e-16/h."""
    plus = {k: v + h * directions[k] if k in directions else v for k, v in feeds.items()}
    minus = {k: v - h * directions[k] if k in directions else v for k, v in feeds.items()}
    fp, fm = run_reference(sess, plus), run_reference(sess, minus)
    return {k: (fp[k] - fm[k]) / (2 * h) for k in fp if np.issubdtype(np.asarray(fp[k]).dtype, np.floating)}


def relative_error(actual, expected) -> float:
    """‖a - e‖ / max(‖e‖, 1e-30) (a zero expected value asks for an exactly zero actual one)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def check_jvp(source: onnx.ModelProto, emitted: onnx.ModelProto, feeds: dict, directions: dict, h: float = 1e-6):
    """Run the emitted JVP (float64, reference evaluator) and central differences of the source.

    Returns {output: relative error of y_dot}; both models must already be float64.
    """
    src_sess, jvp_sess = reference_session(source), reference_session(emitted)
    fd = central_difference(src_sess, feeds, directions, h)
    jvp_feeds = dict(feeds)
    dot_inputs = [i.name for i in emitted.graph.input][len(feeds):]
    for name, value in zip(dot_inputs, directions.values()):
        jvp_feeds[name] = value
    out = run_reference(jvp_sess, jvp_feeds)
    names = [o.name for o in source.graph.output]
    dots = [o.name for o in emitted.graph.output][len(names):]
    return {y: relative_error(out[d], fd[y]) for y, d in zip(names, dots)}

