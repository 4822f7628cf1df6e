"""Numerical checkers shared by the tests and `jacgraph verify`: float64 copies, central differences."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .model import SourceModel
from .reference import _exact_reference_ops, reference_session, run_reference  # noqa: F401  (importable from here too)

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE


def _retype(value_info):
    t = value_info.type.tensor_type
    if t.elem_type in (F32, TensorProto.FLOAT16):
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
        if init.data_type in (F32, TensorProto.FLOAT16) and init.name not in keep:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _retype(vi)
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and node.output[0] in keep:
                continue
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in (F32, TensorProto.FLOAT16):
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float64), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in (F32, TensorProto.FLOAT16):
                attr.i = F64
    del g.value_info[:]
    return m


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


def verify(path, seed: int = 0, h: float = 1e-7) -> dict:
    """Check an emitted JVP model against float64 central differences of its own primal outputs.

    The emitted graph computes y alongside y_dot, so no source model is needed: run a float64 copy
    at x ± h·v and compare (y(x+hv) - y(x-hv)) / 2h with y_dot. Returns {output: relative error}.
    """
    import json

    from .errors import JacgraphError
    from .model import load

    model = load(path)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("jacgraph.emit") != "jvp":
        raise JacgraphError(f"{path} is not a JVP model emitted by jacgraph (no jacgraph.emit=jvp metadata). "
                            "verify checks the output of `jacgraph compile --emit jvp`.")
    K = int(props.get("jacgraph.tangents", 0)) or None
    tangent_inputs = json.loads(props["jacgraph.tangent_inputs"])
    tangent_outputs = json.loads(props["jacgraph.tangent_outputs"])
    m64 = to_float64(model)
    src = SourceModel(m64)
    rng = np.random.default_rng(seed)
    feeds = random_feeds(src, rng)
    dot_names = {d for _, d in tangent_inputs}
    for name in dot_names:
        feeds[name] = rng.standard_normal(feeds[name].shape)
    sess = reference_session(m64)
    out = run_reference(sess, feeds)
    errors = {}
    for k in range(K or 1):
        directions = {x: (feeds[d] if K is None else feeds[d][k]) for x, d in tangent_inputs}
        fd = central_difference(sess, feeds, directions, h)
        for y, y_dot in tangent_outputs:
            got = out[y_dot] if K is None else out[y_dot][k]
            errors[y] = max(errors.get(y, 0.0), relative_error(got, fd[y]))
    return errors
