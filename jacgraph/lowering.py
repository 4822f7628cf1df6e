"""Source-model preprocessing: turn any ONNX export into ops the rule tables know, before a pass runs.

`prepare(proto)` is what SourceModel calls; in order it
1. inlines model-local functions (torch's dynamo exporter writes them; `onnx.inliner`),
2. fixes the input shapes the caller gives (`input_shapes={name: dims}`, the CLI's `--input-shape NAME=DIMS`),
3. expands every op that has no native rule but whose schema defines a function body (Attention,
   RMSNormalization, GroupNormalization, RotaryEmbedding, Mish, SoftmaxCrossEntropyLoss, ...), nested
   bodies included; an op with a native rule keeps it (native rules are faster and the CPA fast path
   reads them), so the tables are read at run time; NATIVE_GAPS lists node forms a rule does not cover;
   inside If/Loop/Scan bodies too,
4. lowers RNN, GRU and LSTM to MatMul/Add/activation ops, unrolled over a static sequence length up to
   UNROLL_MAX steps, else a Scan over time (dynamic lengths; the control-flow rules differentiate it),
   inside bodies too (an exported voice model runs its LSTM in an If branch),
5. folds shape arithmetic whose value is fixed (Shape of a static tensor, integer ops on constants) into
   Constant nodes, bodies included, so Reshape targets computed from Shape -> Slice -> Concat (and an
   expanded body's axes computed from its input's rank) become constants.
Parameters (float initializers) are never folded: a VJP with respect to them must still see them.

`symbolic_types(proto)`: where ONNX shape inference leaves a rank unknown and a rule needs it, SourceModel.rank
tries onnxruntime's symbolic shape inference (it keeps symbolic dims, so a dynamic batch axis stays dynamic).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper, shape_inference

from .errors import JacgraphError

RECURRENCES = ("RNN", "GRU", "LSTM")
UNROLL_MAX = 32  # longer (or dynamic) sequences become a Scan over time instead of T copies of the step
# Ops with a function body that must not be expanded: random ops are refused by the passes with a reason.
NEVER_EXPAND = frozenset({"Bernoulli", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"})
MAX_EXPANSION_DEPTH = 8  # bodies that call function ops (SoftmaxCrossEntropyLoss -> NegativeLogLikelihoodLoss)


def prepare(proto: onnx.ModelProto, input_shapes=None, native=None) -> onnx.ModelProto:
    """The source model with functions inlined, given shapes fixed, function ops expanded, recurrences lowered.

    `native`: op types that have rules (default: those with both a JVP and a VJP rule, plus the
    zero-derivative ops). Returns `proto` itself when there is nothing to do.
    """
    changed, original = False, proto
    if proto.functions:
        proto, changed = _inline_local_functions(proto), True
    if input_shapes:
        proto, changed = fix_input_shapes(proto, input_shapes), True
    keep = native_ops() if native is None else set(native)
    for _ in range(MAX_EXPANSION_DEPTH):
        if not any(_needs_expansion(n, keep, opset_of(proto)) for n in all_nodes(proto.graph)):
            break
        proto, changed = _expand(with_inferred_types(proto), keep), True
    if any(_is_recurrence(n) for n in all_nodes(proto.graph)):
        proto, changed = lower_recurrences(with_inferred_types(proto)), True
    if not changed and not unknown_rank_values(proto):  # every value typed already: inference would add nothing
        return original
    inferred = with_inferred_types(proto)
    if changed or unknown_rank_values(inferred):  # a torch MultiheadAttention export loses ranks that folding finds
        proto = fold_constants(inferred)
        if not changed and proto is inferred:  # nothing folded: hand back the caller's model itself
            return original
    return proto


def native_ops() -> set:
    """Ops that have a rule in both the JVP and the VJP table, and the zero-derivative ops (read at run time)."""
    from .model import CONSTANT_OPS
    from .rules.jvp import JVP
    from .rules.transpose import VJP

    return {op for op in JVP if op in VJP} | set(CONSTANT_OPS)


def _schema(op_type, opset):
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


# Node forms a native rule does not cover, expanded although the op has a rule: LayerNormalization's rule
# gives its Mean/InvStdDev outputs no tangent (JVP) or refuses them (VJP); its function body computes them.
NATIVE_GAPS = {"LayerNormalization": lambda node: any(node.output[1:])}


def _needs_expansion(node, keep, opset) -> bool:
    """A default-domain node whose schema (at `opset`) has a function body and whose op has no rule in `keep`
    (or whose form its rule does not cover: NATIVE_GAPS)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_EXPAND:
        return False
    if node.op_type in keep and not NATIVE_GAPS.get(node.op_type, lambda n: False)(node):
        return False
    schema = _schema(node.op_type, opset)
    return schema is not None and (schema.has_function or schema.has_context_dependent_function)


def _is_recurrence(node) -> bool:
    return node.op_type in RECURRENCES and node.domain in ("", "ai.onnx")


def all_graphs(graph):
    """`graph` and every If/Loop/Scan body nested in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from all_graphs(body)


def all_nodes(graph):
    return (node for g in all_graphs(graph) for node in g.node)


def opset_of(proto) -> int:
    return next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), 0)


SHAPE_DATA_LIMIT = 64  # elements: more than any input whose values decide a shape (a shape, axes, pads, scales)


def with_inferred_types(proto, strict=False):
    """Types of intermediate values (context-dependent function bodies and the RNN lowering read them).

    Inference runs on a copy whose large initializers (the weights) are graph inputs of their type and shape:
    it needs their shapes, never their values, and handing them to the C++ inference and back took most of
    its time (2.4 s of thread CPU on a 548 MB VGG-19). The result gets the initializers back, in their order.
    `strict`: onnx's strict mode, and its error is raised (SourceModel reports it) instead of ignored."""
    large = [t for t in proto.graph.initializer if int(np.prod(t.dims)) > SHAPE_DATA_LIMIT]
    light = proto
    if large:
        light = onnx.ModelProto()
        _copy_fields(proto, light, skip="graph")
        _copy_fields(proto.graph, light.graph, skip="initializer")
        light.graph.initializer.extend(t for t in proto.graph.initializer if int(np.prod(t.dims)) <= SHAPE_DATA_LIMIT)
        listed = {i.name for i in proto.graph.input}
        light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in large if t.name not in listed)
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=strict, data_prop=True)
    except Exception:  # strict errors are reported by SourceModel with a clear message; here we only need types
        if strict:
            raise
        return proto
    if large:
        del inferred.graph.input[len(proto.graph.input):]
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(proto.graph.initializer)
    return inferred


def _copy_fields(src, dst, skip):
    """src's fields into dst, except the field named `skip` (never copied)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _inline_local_functions(proto):
    proto = _copy(proto)
    defaults = {(f.domain, f.name): f.attribute_proto for f in proto.functions}
    for node in [n for g in [proto.graph, *proto.functions] for n in g.node]:  # onnx's inliner skips defaults
        given = {a.name for a in node.attribute}
        node.attribute.extend(a for a in defaults.get((node.domain, node.op_type), []) if a.name not in given)
    try:
        inlined = onnx.inliner.inline_local_functions(proto, convert_version=True)
    except Exception as e:
        raise JacgraphError(f"the model's local functions ({', '.join(sorted({f.name for f in proto.functions}))}) "
                            f"could not be inlined ({type(e).__name__}: {_first_line(e)}). Re-export the model "
                            "without local functions (torch.onnx.export(..., dynamo=False)).") from None
    del inlined.functions[:]
    return inlined


EXPANDED_DOMAIN = "jacgraph.expanded"  # each expanded node becomes a call of its own local function, then inlined


def _expand(proto, keep):
    """Replace every node (bodies included) that _needs_expansion by its schema function body (fresh names,
    attributes resolved).

    The body is built per node (context-dependent functions depend on the input types and attributes, and
    onnx's schema inliner cannot type a skipped optional input), held as a model-local function and inlined.
    """
    proto = _copy(proto)
    opset = opset_of(proto)
    types = {}
    for g in all_graphs(proto.graph):
        types.update((vi.name, vi.type) for vi in list(g.input) + list(g.value_info) + list(g.output))
        types.update((t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims))) for t in g.initializer)
    for index, node in enumerate(list(all_nodes(proto.graph))):
        if not _needs_expansion(node, keep, opset):
            continue
        schema = _schema(node.op_type, opset)
        given = {a.name for a in node.attribute}  # a body reads omitted attributes by reference: the schema defaults
        node.attribute.extend(a.default_value for name, a in schema.attributes.items()
                              if name not in given and a.default_value.type != onnx.AttributeProto.UNDEFINED)
        body = onnx.FunctionProto()
        try:
            if schema.has_function:
                version = max(v for v in schema.function_opset_versions if v <= opset)
                body.ParseFromString(schema.get_function_with_opset_version(version))
            else:
                version = max(v for v in schema.context_dependent_function_opset_versions if v <= opset)
                input_types = [types.get(name, onnx.TypeProto()).SerializeToString() for name in node.input]
                body.ParseFromString(schema.get_context_dependent_function_with_opset_version(
                    version, node.SerializeToString(), input_types))
        except Exception as e:
            raise JacgraphError(f"{node.op_type} '{node.name or node.output[0]}' has no native rule and its ONNX "
                                f"function body could not be built ({type(e).__name__}: {_first_line(e)}). Check "
                                "the input types the model declares for it.") from None
        body.domain, body.name = EXPANDED_DOMAIN, f"{node.op_type}_{index}"
        node.domain, node.op_type = body.domain, body.name
        proto.functions.append(body)
    proto.opset_import.append(helper.make_opsetid(EXPANDED_DOMAIN, 1))
    expanded = _inline_local_functions(proto)
    del expanded.opset_import[:]
    expanded.opset_import.extend(imp for imp in proto.opset_import if imp.domain != EXPANDED_DOMAIN)
    return expanded


def _first_line(error) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else "no detail"


# ---- input shapes ---------------------------------------------------------------------------------

def fix_input_shapes(proto, input_shapes) -> onnx.ModelProto:
    """A copy whose graph inputs named in `input_shapes` have those static dims (symbolic ones replaced)."""
    proto = _copy(proto)
    inputs = {i.name: i for i in proto.graph.input}
    unknown = [name for name in input_shapes if name not in inputs]
    if unknown:
        raise JacgraphError(f"--input-shape names {', '.join(map(repr, unknown))}, which the model does not have as "
                            f"inputs. Its inputs are: {', '.join(i.name for i in proto.graph.input)}.")
    for name, dims in input_shapes.items():
        dims = [d if isinstance(d, str) else int(d) for d in dims]  # a name keeps that axis symbolic (a batch axis)
        shown = f"{name}={','.join(map(str, dims))}"
        if any(isinstance(d, int) and d < 1 for d in dims):
            raise JacgraphError(f"--input-shape {shown} has a dim below 1; give positive sizes.")
        t = inputs[name].type.tensor_type
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        if t.HasField("shape") and (len(declared) != len(dims) or any(
                isinstance(d, int) and d != s for d, s in zip(declared, dims))):
            raise JacgraphError(f"--input-shape {shown} does not fit the declared shape {declared} of input "
                                f"'{name}'; give one size per axis, and change only symbolic dims.")
        t.ClearField("shape")
        for d in dims:
            if isinstance(d, str):
                t.shape.dim.add().dim_param = d
            else:
                t.shape.dim.add().dim_value = d
    del proto.graph.value_info[:]
    return proto


def with_input_shapes(model, input_shapes) -> onnx.ModelProto:
    """`model` (path, bytes, ModelProto or SourceModel) with input dims fixed and the shape arithmetic folded."""
    from .model import SourceModel, load

    return prepare(model.proto if isinstance(model, SourceModel) else load(model), input_shapes=input_shapes)


def _is_static(type_proto) -> bool:
    t = type_proto.tensor_type
    return (type_proto.HasField("tensor_type") and t.HasField("shape")
            and all(d.HasField("dim_value") for d in t.shape.dim))


def _copy(proto):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _static_shapes(proto) -> dict:
    values = [vi for g in all_graphs(proto.graph) for vi in list(g.input) + list(g.value_info) + list(g.output)]
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in values if _is_static(vi.type)}


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def fold_constants(proto) -> onnx.ModelProto:
    """Fold nodes whose outputs are fixed (Shape/Size of a static tensor, ops on non-parameter constants),
    inside If/Loop/Scan bodies too (an expanded function body there computes its axes from shapes).

    Float initializers are parameters and never count as constants here, so nothing that reads a weight
    is folded (the VJP with respect to parameters still sees them). `proto` must carry inferred value_info.
    """
    graph, changed = _fold_graph(proto.graph, {}, _static_shapes(proto), opset_of(proto))
    if not changed:
        return proto
    out = _copy(proto)
    out.graph.CopyFrom(graph)
    return out


def _fold_graph(graph, outer_values, shapes, opset):
    """(graph with its fixed values as Constant nodes, whether anything changed); `outer_values` are the
    enclosing scopes' constants, which a body may read."""
    from onnx.reference import ReferenceEvaluator

    values = dict(outer_values)
    values.update((t.name, numpy_helper.to_array(t)) for t in graph.initializer if t.data_type not in FLOAT_TYPES)
    outputs = {o.name for o in graph.output}
    keep, folded, changed = [], {}, False
    for node in graph.node:
        outs = None
        bodies = [a for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if bodies:
            node = _copy_node(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    body, body_changed = _fold_graph(attr.g, values, shapes, opset)
                    attr.g.CopyFrom(body)
                    changed |= body_changed
        elif node.op_type == "Constant" and node.attribute[0].name == "value":
            outs = [numpy_helper.to_array(node.attribute[0].t)]  # no evaluator needed (exports hold hundreds)
        elif node.domain not in ("", "ai.onnx") or "Random" in node.op_type or node.op_type == "Bernoulli" \
                or any(o in outputs for o in node.output):
            pass
        elif node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            shape = shapes[node.input[0]]
            if node.op_type == "Size":
                outs = [np.array(int(np.prod(shape)), np.int64)]
            else:
                attrs = {a.name: a.i for a in node.attribute}
                outs = [np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)]
        elif all(not i or i in values for i in node.input):
            try:
                outs = ReferenceEvaluator(node, opsets={"": opset}).run(None, {i: values[i] for i in node.input if i})
            except Exception:  # an op the reference evaluator cannot run stays in the graph, unfolded
                outs = None
        if outs is None:
            keep.append(node)
            continue
        for name, value in zip(node.output, outs):
            if name:
                values[name] = folded[name] = np.asarray(value)
    if not folded and not changed:
        return graph, False
    used = reads(keep) | outputs
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    del out.node[:], out.value_info[:]
    out.node.extend(constant_nodes([numpy_helper.from_array(v, name) for name, v in folded.items() if name in used]))
    out.node.extend(keep)
    return out, True


def _copy_node(node):
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def constant_nodes(tensors):
    """Constant nodes for folded or lowering-made values: as initializers they would count as parameters
    (the VJP's wrt="params" differentiates every float initializer)."""
    return [helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_const") for t in tensors]


def reads(nodes) -> set:
    """Names the nodes read, inside their If/Loop/Scan bodies too (bodies read outer values by name)."""
    return {i for n in all_nodes(helper.make_graph(nodes, "reads", [], [])) for i in n.input}


# ---- unknown ranks --------------------------------------------------------------------------------

def unknown_rank_values(proto) -> list:
    """Node outputs whose type or rank shape inference left unknown, in graph order."""
    known = {vi.name for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    known |= {t.name for t in proto.graph.initializer}
    return [o for n in proto.graph.node for o in n.output if o and o not in known and n.op_type != "Constant"
            and not _non_tensor_output(n)]


def _non_tensor_output(node) -> bool:
    return node.op_type.startswith("Sequence") or node.op_type in ("SplitToSequence", "Optional", "OptionalGetElement")


def drop_shapeless(proto) -> onnx.ModelProto:
    """`proto` without value_info entries that have a type but no shape (ONNX's inference writes them where it
    loses the rank; the checker refuses them). SourceModel.rank finds those ranks on demand (symbolic_types)."""
    shapeless = [vi for vi in proto.graph.value_info
                 if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    if not shapeless:
        return proto
    out = _copy(proto)
    names = {vi.name for vi in shapeless}
    kept = [vi for vi in out.graph.value_info if vi.name not in names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def symbolic_types(proto) -> dict:
    """{value: TypeProto with a shape} from onnxruntime's symbolic shape inference, for the values whose rank
    ONNX's inference left unknown; {} when it gives up. Seconds on a large model: called only on demand."""
    if not unknown_rank_values(proto):
        return {}
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(_copy(proto), auto_merge=True, guess_output_rank=True)
    except Exception:  # symbolic inference gives up on some graphs; the caller then refuses with a clear message
        return {}
    if inferred is None:
        return {}
    return {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}


def dynamic_inputs(proto) -> list:
    """'name=d0,d1,...' hints (symbolic dims shown as their names) for inputs with a non-static shape."""
    inits = {t.name for t in proto.graph.initializer}
    hints = []
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name not in inits and not _is_static(i.type):
            shown = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            hints.append(f"{i.name}={','.join(shown) or 'DIMS'}")
    return hints


def input_shape_hint(proto) -> str:
    hints = dynamic_inputs(proto)
    if not hints:
        return "Re-export the model with static shapes."
    return ("Fix the input shapes: pass " + " ".join(f"--input-shape {h}" for h in hints)
            + " with the symbolic dims replaced by sizes (library: input_shapes={name: dims}).")



# ---- RNN, GRU, LSTM -------------------------------------------------------------------------------

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# activation -> (uses alpha, uses beta, default alpha, default beta), as onnxruntime reads activation_alpha/beta
ACTIVATIONS = {
    "relu": (False, False, 0, 0), "tanh": (False, False, 0, 0), "sigmoid": (False, False, 0, 0),
    "softsign": (False, False, 0, 0), "softplus": (False, False, 0, 0), "affine": (True, True, 1.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0), "thresholdedrelu": (True, False, 1.0, 0), "elu": (True, False, 1.0, 0),
    "scaledtanh": (True, True, 1.0, 1.0), "hardsigmoid": (True, True, 0.2, 0.5),
}


def lower_recurrences(proto) -> onnx.ModelProto:
    """Every RNN/GRU/LSTM node replaced by its equations: unrolled over time, or a Scan (Recurrence.scan);
    those inside If/Loop/Scan bodies too (an exported voice model runs its LSTM in an If branch)."""
    from .builder import Builder
    from .model import SourceModel

    src = SourceModel(proto, prepare=False)
    b = Builder(src)
    _lower_nodes(b, src.nodes)
    out = _copy(src.proto)
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    used = reads(b.nodes)
    made = [t for t in b.initializers if t.name not in src.initializers and t.name in used]
    out.graph.node.extend(constant_nodes(made) + b.nodes)
    out.graph.initializer.extend(src.graph.initializer)
    return out


def _lower_nodes(b, nodes):
    for node in nodes:
        if _is_recurrence(node):
            Recurrence(b, b.src, node).emit()
            continue
        copied = b.copy(node)
        for attr in copied.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and any(_is_recurrence(n) for n in all_nodes(attr.g)):
                attr.g.CopyFrom(_lower_body(b, attr.g))


def _lower_body(b, graph):
    """An If/Loop/Scan body with its recurrences lowered, in the body's scope. The constants the lowering
    makes go to the outer graph (bodies read outer values), so none is defined only inside one body."""
    child = b.subgraph(graph)
    _lower_nodes(child, child.src.nodes)
    b.initializers.extend(child.initializers[len(graph.initializer):])
    return helper.make_graph(child.nodes, graph.name, list(graph.input), list(graph.output), list(graph.initializer))


class Recurrence:
    """One RNN/GRU/LSTM node as primitive ops, following the ONNX operator spec's equations.

    Time-major internally: X [T, batch, input], states [batch, hidden]. `sequence_lens` masks each step
    with Where: past a sequence's end the state keeps its value and Y is zero; the reverse direction
    meets the padding steps first, so its state stays at the initial one until the sequence starts.
    """

    def __init__(self, b, src, node):
        self.b, self.src, self.node, self.op = b, src, node, node.op_type
        attrs = src.attrs(node)
        self.name = node.name or node.output[0]
        self.layout = attrs.get("layout", 0)
        self.direction = attrs.get("direction", "forward")
        self.clip = attrs.get("clip")
        self.lbr = attrs.get("linear_before_reset", 0)
        if attrs.get("input_forget", 0):
            raise JacgraphError(f"LSTM '{self.name}' couples its input and forget gates (input_forget=1), which "
                                "jacgraph does not lower. Export the LSTM without input_forget.")
        inputs = list(node.input) + [""] * 8
        self.X, self.W, self.R, self.B, self.seq_lens, self.h0 = inputs[:6]
        self.c0, self.P = (inputs[6], inputs[7]) if self.op == "LSTM" else ("", "")
        x_shape = src.shape(self.X)
        if x_shape is None or len(x_shape) != 3:
            raise JacgraphError(f"{self.op} '{self.name}': the shape of its input '{self.X}' is unknown after shape "
                                f"inference. {input_shape_hint(src.proto)}")
        T = x_shape[1 if self.layout else 0]
        self.T = T if isinstance(T, int) and T <= UNROLL_MAX else None  # None: a Scan over time
        self.dtype = src.np_dtype(self.X)
        self.x_tm = self.X  # X time-major: emit() transposes a layout=1 input
        self.hidden = attrs.get("hidden_size") or src.shape(self.R)[-1]
        self.directions = 2 if self.direction == "bidirectional" else 1
        given = {a.name for a in node.attribute}  # the schema's default list is written for two directions
        names = attrs["activations"] if "activations" in given else DEFAULT_ACTIVATIONS[self.op] * self.directions
        per_dir = len(DEFAULT_ACTIVATIONS[self.op])
        if len(names) != per_dir * self.directions:
            raise JacgraphError(f"{self.op} '{self.name}' lists {len(names)} activations; it needs {per_dir} per "
                                f"direction ({per_dir * self.directions}). Re-export the model.")
        alphas, betas = iter(attrs.get("activation_alpha") or []), iter(attrs.get("activation_beta") or [])
        self.activations = []
        for name in names:
            name = name.decode() if isinstance(name, bytes) else name
            key = name.lower()
            if key not in ACTIVATIONS:
                raise JacgraphError(f"{self.op} '{self.name}' uses activation {name!r}, which ONNX does not define; "
                                    f"use one of {', '.join(sorted(ACTIVATIONS))}.")
            use_a, use_b, alpha, beta = ACTIVATIONS[key]
            self.activations.append((key, next(alphas, alpha) if use_a else None, next(betas, beta) if use_b else None))

    # ---- small emit helpers ----
    def scalar(self, v):
        return self.b.const(np.asarray(v, dtype=self.dtype), hint="scalar")

    def act(self, x, index, clip=True):
        b = self.b
        key, alpha, beta = self.activations[index]
        if self.clip is not None and clip:
            x = b.Clip(x, self.scalar(-self.clip), self.scalar(self.clip))
        if key == "affine":
            return b.Add(b.Mul(x, self.scalar(alpha)), self.scalar(beta))
        if key == "scaledtanh":
            return b.Mul(b.Tanh(b.Mul(x, self.scalar(beta))), self.scalar(alpha))
        if key == "hardsigmoid":
            return b.op("HardSigmoid", x, alpha=float(alpha), beta=float(beta))
        if key in ("leakyrelu", "thresholdedrelu", "elu"):
            op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[key]
            return b.op(op, x, alpha=float(alpha))
        return b.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
                     "softplus": "Softplus"}[key], x)

    def per_direction(self, value, d):
        """value[d] for a [num_directions, ...] tensor (Slice + Squeeze: their reverse rules need no scatter)."""
        b = self.b
        return b.Squeeze(b.Slice(value, b.ints([d]), b.ints([d + 1]), b.ints([0])), b.ints([0]))

    def time_steps(self, value):
        """[value[0], ..., value[T-1]] for a time-major [T, ...] tensor."""
        b = self.b
        parts = b.split(value, [1] * self.T, axis=0) if self.T > 1 else [value]
        return [b.Squeeze(p, b.ints([0])) for p in parts]

    def gate_slices(self, x, n):
        """x [batch, n*hidden] split into n [batch, hidden] gates."""
        return self.b.split(x, [self.hidden] * n, axis=1) if n > 1 else [x]

    def initial_state(self, name, d):
        b = self.b
        if name:
            state = b.Transpose(name, perm=[1, 0, 2]) if self.layout else name
            return self.per_direction(state, d)
        batch = b.Slice(b.Shape(self.x_tm), b.ints([1]), b.ints([2]))
        zero = np.zeros(1, dtype=self.dtype)
        shape = b.Concat(batch, b.ints([self.hidden]), axis=0)
        return b.op("ConstantOfShape", shape, value=numpy_helper.from_array(zero))

    # ---- the equations ----
    def emit(self):
        b = self.b
        self.x_tm = b.Transpose(self.X, perm=[1, 0, 2]) if self.layout else self.X
        mask = None
        if self.seq_lens:  # [T, batch, 1] booleans: step t is inside sequence b
            if self.T is not None:
                steps = b.const(np.arange(self.T, dtype=np.int64).reshape(self.T, 1, 1), hint="steps")
            else:
                length = b.Squeeze(b.Slice(b.Shape(self.x_tm), b.ints([0]), b.ints([1])), b.ints([0]))
                one = b.const(np.array(1, np.int64))
                steps = b.Unsqueeze(b.Range(b.const(np.array(0, np.int64)), length, one), b.ints([1, 2]))
            lens = b.Unsqueeze(b.Cast(self.seq_lens, to=onnx.TensorProto.INT64), b.ints([0, 2]))
            mask = b.Less(steps, lens)
        ys, hs, cs = [], [], []
        for d in range(self.directions):
            reverse = self.direction == "reverse" or d == 1
            xw, w = self.direction_weights(d)
            h = self.initial_state(self.h0, d)
            c = self.initial_state(self.c0, d) if self.op == "LSTM" else None
            if self.T is None:
                y, h, c = self.scan(xw, mask, h, c, w, d, reverse)
                ys.append(b.Unsqueeze(y, b.ints([1])))  # [T, 1, batch, H]
            else:
                masks = self.time_steps(mask) if mask is not None else [None] * self.T
                y_steps, xw_steps = [None] * self.T, self.time_steps(xw)
                for t in (range(self.T - 1, -1, -1) if reverse else range(self.T)):
                    y_steps[t], h, c = self.masked_step(xw_steps[t], masks[t], h, c, w, d)
                ys.append(b.Concat(*[b.Unsqueeze(y, b.ints([0, 1])) for y in y_steps], axis=0))
            hs.append(b.Unsqueeze(h, b.ints([0])))
            cs.append(b.Unsqueeze(c, b.ints([0])) if c is not None else None)
        outputs = list(self.node.output) + [""] * 3
        results = [ys, hs, cs]
        for name, parts, axis in zip(outputs[:3], results, (1, 0, 0)):
            if not name:
                continue
            value = b.Concat(*parts, axis=axis) if len(parts) > 1 else parts[0]
            if self.layout:
                value = b.Transpose(value, perm=[2, 0, 1, 3] if parts is ys else [1, 0, 2])
            self.bind(value, name)

    def masked_step(self, x_t, mask_t, h, c, w, d):
        """(y_t, h_t, c_t): past a sequence's end (mask_t false) the state keeps its value and y_t is zero."""
        b = self.b
        h_new, c_new = self.step(x_t, h, c, w, d)
        if mask_t is None:
            return h_new, h_new, c_new
        c_new = b.Where(mask_t, c_new, c) if c is not None else None
        return b.Where(mask_t, h_new, self.scalar(0.0)), b.Where(mask_t, h_new, h), c_new

    def scan(self, xw, mask, h, c, w, d, reverse):
        """(Y [T, batch, H], h_T, c_T) by a Scan over time (the length is dynamic, or too long to unroll).

        The body is emitted through the same Builder and moved into the Scan: it reads R, the biases and
        the constants from the outer scope."""
        b, H, dt = self.b, self.hidden, helper.np_dtype_to_tensor_dtype(self.dtype)
        start = len(b.nodes)
        h_in, x_in = b.fresh("h_prev"), b.fresh("x_t")
        c_in = b.fresh("c_prev") if c is not None else None
        m_in = b.fresh("mask_t") if mask is not None else None
        y, h_out, c_out = self.masked_step(x_in, m_in, h_in, c_in, w, d)
        if y == h_out:  # a body output is listed once: the scan output gets its own name
            y = b.Identity(y)
        body_nodes = b.nodes[start:]
        del b.nodes[start:]
        states = [h_in] + ([c_in] if c is not None else [])
        scanned = [(x_in, GATES[self.op] * H)] + ([(m_in, 1)] if mask is not None else [])
        inputs = [helper.make_tensor_value_info(n, dt, [None, H]) for n in states]
        inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.BOOL if n == m_in else dt, [None, width])
                   for n, width in scanned]
        returned = [h_out] + ([c_out] if c is not None else []) + [y]
        outputs = [helper.make_tensor_value_info(n, dt, [None, H]) for n in returned]
        body = helper.make_graph(body_nodes, b.fresh(f"{self.op.lower()}_step"), inputs, outputs)
        outs = b.op("Scan", *([h] + ([c] if c is not None else []) + [xw] + ([mask] if mask is not None else [])),
                    n_out=len(outputs), body=body, num_scan_inputs=len(scanned),
                    scan_input_directions=[int(reverse)] * len(scanned), scan_output_directions=[int(reverse)])
        return outs[-1], outs[0], outs[1] if c is not None else None

    def bind(self, value, name):
        """The lowering's value under the source's output name."""
        self.b.Identity(value)
        self.b.nodes[-1].output[0] = name

    def direction_weights(self, d):
        """(X W^T + biases [T, batch, G*H] for all steps at once, the recurrent weights the step reads)."""
        b, H, G = self.b, self.hidden, GATES[self.op]
        xw = b.MatMul(self.x_tm, b.Transpose(self.per_direction(self.W, d), perm=[1, 0]))
        w = {"R": b.Transpose(self.per_direction(self.R, d), perm=[1, 0]), "peep": None, "rbh": None}
        if self.B:
            wb, rb = b.split(self.per_direction(self.B, d), [G * H, G * H], axis=0)
            if self.op == "GRU" and self.lbr:  # the hidden gate keeps its recurrent bias inside r * (...)
                rbz_rbr, w["rbh"] = b.split(rb, [2 * H, H], axis=0)
                wb = b.Add(wb, b.Concat(rbz_rbr, b.const(np.zeros(H, self.dtype)), axis=0))
                rb = None
            xw = b.Add(xw, wb if rb is None else b.Add(wb, rb))
        if self.op == "GRU":
            w["R"], w["Rh"] = b.split(w["R"], [2 * H, H], axis=1)
        if self.P:
            w["peep"] = self.gate_slices(b.Unsqueeze(self.per_direction(self.P, d), b.ints([0])), 3)
        return xw, w

    def step(self, x_t, h, c, w, d):
        """(h_t, c_t) from x_t W^T + biases, by the ONNX spec's equations for this op."""
        b = self.b
        f = len(DEFAULT_ACTIVATIONS[self.op]) * d  # this direction's first activation
        if self.op == "RNN":
            return self.act(b.Add(x_t, b.MatMul(h, w["R"])), f), None
        if self.op == "GRU":  # z and r share f: one activation over both (fewer, wider nodes run faster)
            x_zr, xh = b.split(x_t, [2 * self.hidden, self.hidden], axis=1)
            z, r = self.gate_slices(self.act(b.Add(x_zr, b.MatMul(h, w["R"])), f), 2)
            if self.lbr:
                hh = b.MatMul(h, w["Rh"])
                cand = self.act(b.Add(xh, b.Mul(r, hh if w["rbh"] is None else b.Add(hh, w["rbh"]))), f + 1)
            else:
                cand = self.act(b.Add(xh, b.MatMul(b.Mul(r, h), w["Rh"])), f + 1)
            # H_t = (1 - z) * cand + z * h = cand + z * (h - cand)
            return b.Add(cand, b.Mul(z, b.Sub(h, cand))), None
        gates = b.Add(x_t, b.MatMul(h, w["R"]))
        if w["peep"] is None:  # i, o, f share f: one activation over all three
            iof, gc = b.split(gates, [3 * self.hidden, self.hidden], axis=1)
            i, o, fg = self.gate_slices(self.act(iof, f), 3)
            c_new = b.Add(b.Mul(fg, c), b.Mul(i, self.act(gc, f + 1)))
        else:  # peepholes: i and f read c_{t-1}, o reads c_t
            gi, go, gf, gc = self.gate_slices(gates, 4)
            pi, po, pf = w["peep"]
            i, fg = self.act(b.Add(gi, b.Mul(pi, c)), f), self.act(b.Add(gf, b.Mul(pf, c)), f)
            c_new = b.Add(b.Mul(fg, c), b.Mul(i, self.act(gc, f + 1)))
            o = self.act(b.Add(go, b.Mul(po, c_new)), f)
        return b.Mul(o, self.act(c_new, f + 2, clip=False)), c_new
