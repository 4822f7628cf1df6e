"""Read-only view of a source model: order, shapes, dtypes, attributes with defaults, constants."""
from __future__ import annotations

import os
from collections import Counter
from functools import cached_property

import networkx as nx
import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, shape_inference, version_converter

from . import lowering
from .errors import JacgraphError
from .rules.registry import ZERO_DERIVATIVE_OPS, op_key, unsupported_error  # noqa: F401  (unsupported_error: re-exported)

MIN_OPSET = 13  # older models are converted up first: axes-as-inputs and Split/Squeeze forms settle at 13

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

# Continuous piecewise-affine ops: the fast JVP freezes their state at x.
CPA_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "HardSigmoid", "Abs", "Max", "Min", "MaxPool",
    "GlobalMaxPool", "ReduceMax", "ReduceMin",
}
# Ops that are affine in their differentiable inputs (bias/additive inputs aside).
AFFINE_OPS = {
    "Gemm", "MatMul", "Conv", "ConvTranspose", "BatchNormalization", "AveragePool",
    "GlobalAveragePool", "ReduceSum", "ReduceMean", "Add", "Sub", "Sum", "Mean", "Neg", "Concat",
    "Split", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Slice", "Gather",
    "Resize", "Identity", "Dropout", "Expand", "Tile", "CumSum", "DepthToSpace", "SpaceToDepth",
    "Trilu", "Einsum",
}
# Ops on integer/shape paths or constant producers; their outputs carry no tangent.
CONSTANT_OPS = ZERO_DERIVATIVE_OPS


def load(model) -> onnx.ModelProto:
    """A ModelProto from a path, bytes or ModelProto; a JacgraphError for anything that is not ONNX."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        data, where = bytes(model), "the given bytes"
    else:
        path = os.fspath(model)
        if not os.path.exists(path):
            raise JacgraphError(f"{path}: no such file. Check the path; jacgraph reads .onnx model files.")
        if os.path.isdir(path):
            raise JacgraphError(f"{path} is a folder, not an ONNX file. Give the path of the .onnx file.")
        try:
            with open(path, "rb") as f:
                data, where = f.read(), path
        except OSError as e:
            raise JacgraphError(f"{path} cannot be read ({e.strerror or type(e).__name__}). Check its permissions.") from None
    if not data:
        raise JacgraphError(f"{where} is empty. Re-export the model (e.g. torch.onnx.export) and try again.")
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise JacgraphError(
            f"{where} is not an ONNX model or is truncated ({type(e).__name__}). "
            "Re-export it, or check that the file was copied whole.") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise JacgraphError(f"{where} parsed but holds no ONNX graph. It is probably not an ONNX model file; re-export it.")
    _check_text(proto.graph, where)
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(proto)):
        _load_external_data(proto, where, None if where == "the given bytes" else os.path.dirname(os.path.abspath(path)))
    return proto


def _check_text(graph, where):
    """protobuf hands back bytes, not str, for a name that is not UTF-8: a damaged file, refused here once."""
    for node in graph.node:
        texts = [node.op_type, node.domain, node.name, *node.input, *node.output, *(a.name for a in node.attribute)]
        if not all(isinstance(t, str) for t in texts):
            raise JacgraphError(f"{where} holds a node whose op type or names are not valid UTF-8 text, so the file is "
                                "damaged. Re-export the model, or check that the file was copied whole.")
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                _check_text(sub, where)
    names = [v.name for v in (*graph.input, *graph.output, *graph.value_info)] + [t.name for t in graph.initializer]
    if not all(isinstance(n, str) for n in names):
        raise JacgraphError(f"{where} holds value names that are not valid UTF-8 text, so the file is damaged. "
                            "Re-export the model, or check that the file was copied whole.")


def _load_external_data(proto, where, folder):
    """Read weights kept beside the model (torch.onnx.export's default writes MODEL.onnx.data) into the proto."""
    files = sorted({entry.value for t in external_data_helper._get_all_tensors(proto)
                    for entry in t.external_data if entry.key == "location"})
    if folder is None:
        raise JacgraphError(f"{where} keep their weights in external data file(s) ({', '.join(files)}), which bytes "
                            "cannot carry. Pass the model's path instead, or onnx.load(path) first.")
    try:
        external_data_helper.load_external_data_for_model(proto, folder)
    except Exception as e:
        raise JacgraphError(
            f"{where} keeps its weights in external data file(s) {', '.join(files)}, expected in {folder}, and they "
            f"could not be read ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}). "
            "Keep the .onnx.data file beside the .onnx file under the name it was exported with.") from None


def _opset_of(proto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return MIN_OPSET


def _old_hardmax_as_2d(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Hardmax before opset 13 acts on x coerced to 2-D at `axis`; onnx's version converter keeps the node as it
    is, which changes its meaning (outputs then differ by 1). Spell the old meaning out before converting."""
    if _opset_of(proto) >= 13 or not any(n.op_type == "Hardmax" for n in proto.graph.node):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    for node in proto.graph.node:
        if node.op_type != "Hardmax" or node.domain not in ("", "ai.onnx"):
            out.graph.node.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        x, y = node.input[0], node.output[0]
        shape, flat, hard = f"{y}__jg_shape", f"{y}__jg_2d", f"{y}__jg_hardmax_2d"
        out.graph.node.extend([helper.make_node("Shape", [x], [shape]), helper.make_node("Flatten", [x], [flat], axis=axis),
                               helper.make_node("Hardmax", [flat], [hard], axis=1),
                               helper.make_node("Reshape", [hard, shape], [y], name=node.name)])
    return out


def _convert_up(proto: onnx.ModelProto, opset: int = MIN_OPSET) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(_old_hardmax_as_2d(proto), opset)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JacgraphError(
            f"the model uses opset {_opset_of(proto)} and converting it to opset {opset} failed ({reason}). "
            f"Re-export it with opset_version >= {opset}.") from None


def upgrade_opset(model, opset: int) -> onnx.ModelProto:
    """The model (path, bytes, ModelProto or SourceModel) converted up to `opset`; never down."""
    proto = model.proto if isinstance(model, SourceModel) else load(model)
    return proto if _opset_of(proto) >= opset else _convert_up(proto, opset)


def _inference_reason(error) -> str:
    """The first informative line of an onnx InferenceError (strict mode prefixes a generic line)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    specific = [ln[ln.index("(op_type:"):].replace("[ShapeInferenceError] ", "") for ln in lines if "(op_type:" in ln]
    return (specific or lines or [type(error).__name__])[0]


def _shape_of(type_proto) -> tuple | None:
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


class SourceModel:
    """A source model, never mutated: nodes in topological order, value types, attributes, constants."""

    _readers = None  # (nodes, len(nodes), outputs, len(outputs), {value: its readers}), made by readers()

    def __init__(self, model, input_shapes=None, native=None, prepare=True):
        """`input_shapes` {input: dims} fixes dynamic input dims; `native` the op types with rules (function ops
        outside it are expanded; default: jacgraph.lowering.native_ops()); prepare=False skips jacgraph.lowering."""
        proto = onnx.ModelProto()
        proto.CopyFrom(load(model))
        if _opset_of(proto) < MIN_OPSET:
            proto = _convert_up(proto)
        if prepare:  # function bodies, RNN/GRU/LSTM, fixed input shapes: see jacgraph.lowering
            proto = lowering.prepare(proto, input_shapes=input_shapes, native=native)
        try:  # strict: a MatMul/Gemm/Add whose shapes do not fit is an error here, not a crash in onnxruntime later
            proto = lowering.with_inferred_types(proto, strict=True)  # the weights handed over as typed inputs (faster)
        except Exception as e:
            raise JacgraphError(f"ONNX shape inference failed on the model: {_inference_reason(e)}. The shapes of that "
                                "node's inputs do not fit together; check the input shapes the model declares, "
                                "or re-export it.") from None
        if prepare:  # a value whose rank ONNX's inference lost: no entry (rank() asks symbolic inference on demand)
            proto = lowering.drop_shapeless(proto)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0]
            raise JacgraphError(f"the model is not valid ONNX: {first}. Re-export it or repair it with onnx.checker's hint.") from None
        self.proto = proto
        self.graph = proto.graph
        self.opset = _opset_of(proto)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.initializers]
        self.outputs = list(self.graph.output)
        self._types = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            self._types[vi.name] = vi.type
        for t in self.graph.initializer:
            self._types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        _fill_state_shapes(self.graph, self._types)
        self.producer = {out: node for node in self.graph.node for out in node.output if out}
        self.nodes = self._topological_order()
        self._check_conv_channels()

    def _check_conv_channels(self):
        """ONNX shape inference does not compare a Conv's weight with its input's channels; onnxruntime fails at run time."""
        for node in self.nodes:
            if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
                continue
            x_shape, w_shape = self.shape(node.input[0]), self.shape(node.input[1])
            if not x_shape or not w_shape or len(x_shape) < 2 or not isinstance(x_shape[1], int) \
                    or not all(isinstance(d, int) for d in w_shape[:2]):
                continue
            group = self.attrs(node).get("group", 1)
            expected = w_shape[1] * group if node.op_type == "Conv" else w_shape[0]
            if x_shape[1] != expected:
                raise JacgraphError(
                    f"{node.op_type} '{node.name or node.output[0]}' gets an input with {x_shape[1]} channels but its "
                    f"weight {list(w_shape)} (group={group}) expects {expected}. The model cannot run; re-export it.")

    def _topological_order(self):
        g = nx.DiGraph()
        nodes = list(self.graph.node)
        g.add_nodes_from(range(len(nodes)))
        index = {id(n): i for i, n in enumerate(nodes)}
        for i, node in enumerate(nodes):
            for name in node_inputs(node):  # a body's outer-scope reads order its node too
                if name in self.producer and id(self.producer[name]) in index:
                    g.add_edge(index[id(self.producer[name])], i)
        try:
            order = list(nx.lexicographical_topological_sort(g))
        except nx.NetworkXUnfeasible:
            raise JacgraphError("the model's graph has a cycle. ONNX graphs must be acyclic; re-export the model.") from None
        return [nodes[i] for i in order]

    # ---- values -------------------------------------------------------------------------------
    def shape(self, name) -> tuple | None:
        """Static shape: ints for known dims, str/None for symbolic ones; None if even the rank is unknown."""
        t = self._types.get(name)
        return _shape_of(t) if t is not None and t.HasField("tensor_type") else None

    def rank(self, name) -> int:
        shape = self.shape(name)
        if shape is None and self._add_symbolic_shapes():
            shape = self.shape(name)
        if shape is None:
            node = self.producer.get(name)
            made_by = f", the output of {node.op_type} node '{node.name or name}'," if node is not None else ""
            raise JacgraphError(f"the rank of tensor '{name}'{made_by} is unknown after ONNX and symbolic shape "
                                f"inference. {lowering.input_shape_hint(self.proto)}")
        return len(shape)

    def _add_symbolic_shapes(self) -> bool:
        """Once, when a rank is missing: onnxruntime's symbolic shape inference (seconds on a large model)."""
        if getattr(self, "_symbolic_tried", False):
            return False
        self._symbolic_tried = True
        found = {n: t for n, t in lowering.symbolic_types(self.proto).items() if self.shape(n) is None}
        self._types.update(found)
        return bool(found)

    def dtype(self, name) -> int:
        t = self._types.get(name)
        if t is None or not t.HasField("tensor_type"):
            raise JacgraphError(f"the element type of tensor '{name}' is unknown after shape inference. "
                                f"{lowering.input_shape_hint(self.proto)}")
        return t.tensor_type.elem_type

    def np_dtype(self, name):
        return helper.tensor_dtype_to_np_dtype(self.dtype(name))

    def is_float(self, name) -> bool:
        t = self._types.get(name)
        return t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type in FLOAT_TYPES

    def const(self, name):
        """The value of an initializer or Constant output as a numpy array, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            return np.asarray(helper.get_attribute_value(attr))
        return None

    # ---- nodes --------------------------------------------------------------------------------
    def attrs(self, node) -> dict:
        """Node attributes with the operator schema's defaults filled in."""
        out = {}
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
            for name, attr in schema.attributes.items():
                if attr.default_value.type != onnx.AttributeProto.UNDEFINED:
                    out[name] = helper.get_attribute_value(attr.default_value)
        except onnx.defs.SchemaError:
            pass
        for a in node.attribute:
            out[a.name] = helper.get_attribute_value(a)
        for k, v in out.items():
            if isinstance(v, bytes):
                out[k] = v.decode()
        return out

    def readers(self, name) -> list:
        """The nodes that read `name` (subgraph captures included), and None for each graph output it is. The map
        is made on first use and made again whenever self.nodes or self.outputs is no longer the list it was made
        from (replaced, or of another length), so it describes the nodes the passes walk, never older ones."""
        made = self._readers
        if made is None or made[0] is not self.nodes or made[1] != len(self.nodes) \
                or made[2] is not self.outputs or made[3] != len(self.outputs):
            found = {}
            for node in self.nodes:
                for read in set(node_inputs(node)):
                    found.setdefault(read, []).append(node)
            for out in self.outputs:
                found.setdefault(out.name, []).append(None)
            made = self._readers = (self.nodes, len(self.nodes), self.outputs, len(self.outputs), found)
        return made[4].get(name, [])

    def op_counts(self) -> Counter:
        return Counter(op_key(n) for n in self.nodes)

    @cached_property
    def non_cpa_ops(self) -> list:
        """Op types depending on the float inputs that are neither affine in them, CPA, nor shape ops (sorted).

        Mul/Div by a value that does not depend on the inputs, and Where on a constant condition, count as affine.
        """
        active, found = set(self.float_inputs()), set()
        for node in self.nodes:
            live = [bool(i) and i in active for i in node_inputs(node)]  # a body's captures count
            if not any(live):
                continue
            active.update(o for o in node.output if o)
            affine_here = ((node.op_type == "Mul" and sum(live) == 1) or (node.op_type == "Div" and not live[1])
                           or (node.op_type == "Where" and not live[0]) or node.op_type in ("Cast", "GatherElements"))
            if not (affine_here or node.op_type in CPA_OPS | AFFINE_OPS | CONSTANT_OPS):
                found.add(node.op_type)
        return sorted(found)

    @property
    def is_cpa(self) -> bool:
        """True when the model has a float input and every op depending on it is affine, CPA, or a shape op
        (a model with integer inputs only has nothing to differentiate, so it is not called CPA)."""
        return bool(self.float_inputs()) and not self.non_cpa_ops

    def active_nodes(self, wrt):
        """Nodes whose float outputs depend on the names in `wrt` (forward reachability)."""
        active, nodes = set(wrt), []
        for node in self.nodes:
            if any(i in active for i in node_inputs(node)):
                nodes.append(node)
                active.update(o for o in node.output if o)
        return nodes

    def float_inputs(self):
        return [i.name for i in self.inputs if self.is_float(i.name)]

    def check_inputs(self, names):
        """Validate user-chosen differentiable inputs: they exist and are floating point."""
        known = [i.name for i in self.inputs]
        missing = [n for n in names if n not in known]
        if missing:
            raise JacgraphError(f"--inputs names {', '.join(map(repr, missing))}, which the model does not have. "
                                f"Its inputs are: {', '.join(known)}.")
        not_float = [n for n in names if not self.is_float(n)]
        if not_float:
            raise JacgraphError(f"input(s) {', '.join(map(repr, not_float))} are not floating point, so they have no "
                                f"derivative. Choose float inputs with --inputs (float inputs: {', '.join(self.float_inputs()) or 'none'}).")
        if not names:
            raise JacgraphError("the model has no floating-point input to differentiate with respect to.")
        return list(names)


# ---- control flow: bodies of Loop / Scan / If -----------------------------------------------------

def subgraphs(node) -> list:
    """The graphs held in `node`'s attributes (a Loop/Scan body, an If's two branches)."""
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _local_names(graph) -> set:
    return {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output if o}


def free_names(graph) -> list:
    """Names `graph` reads from enclosing scopes without declaring them (outer-scope captures), in first-use order."""
    local, seen = _local_names(graph), {}
    for node in graph.node:
        for name in node_inputs(node):
            if name and name not in local:
                seen.setdefault(name)
    for out in graph.output:
        if out.name not in local:
            seen.setdefault(out.name)
    return list(seen)


def captures(node) -> list:
    """Outer-scope names the subgraphs of `node` read, in first-use order (empty for ops without subgraphs)."""
    seen = {}
    for graph in subgraphs(node):
        seen.update(dict.fromkeys(free_names(graph)))
    return list(seen)


def node_inputs(node) -> list:
    """Every value `node` reads: its inputs, then its bodies' outer-scope captures. Passes hand control-flow
    rules tangents in this order and take cotangents back in it."""
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return list(node.input)
    return list(node.input) + captures(node)


def subgraph_names(graph) -> set:
    """Every value and node name defined inside the subgraphs of `graph`'s nodes, at any depth."""
    names = set()
    for node in graph.node:
        for sub in subgraphs(node):
            names |= _local_names(sub) | {n.name for n in sub.node if n.name} | subgraph_names(sub)
    return names


def _infer_body(graph, outer, input_types):
    """`graph` with undeclared input types filled from `input_types` and its value types re-inferred."""
    body = onnx.GraphProto()
    body.CopyFrom(graph)
    for vi, t in zip(body.input, input_types):
        declared = vi.type.tensor_type
        if t is not None and (not declared.elem_type or not declared.HasField("shape")):
            vi.type.CopyFrom(t)
    declared = [vi for vi in body.value_info if _shape_of(vi.type) is not None]  # (types jacgraph recorded)
    del body.value_info[:]
    captured = [n for n in free_names(body) if n in outer._types]
    # small outer constants (axes, shapes, indices) go in as values: shape inference reads them
    known = {n: outer.const(n) for n in captured}
    known = {n: numpy_helper.from_array(v, n) for n, v in known.items() if v is not None and v.size <= 64}
    outer_values = [helper.make_value_info(n, outer._types[n]) for n in captured if n not in known]
    wrapper = helper.make_graph(body.node, "body", list(body.input) + outer_values, body.output,
                                list(body.initializer) + list(known.values()), value_info=declared)
    model = helper.make_model(wrapper, opset_imports=outer.proto.opset_import)
    model.functions.extend(outer.proto.functions)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # the declared types stay; rules that need a rank say so
        body.value_info.extend(declared)
        return body
    body.value_info.extend(vi for vi in inferred.value_info if vi.name not in {i.name for i in body.input})
    for out, found in zip(body.output, inferred.output):  # inference types the body's outputs in place
        if _shape_of(out.type) is None and found.type.HasField("tensor_type") and _shape_of(found.type) is not None:
            out.type.CopyFrom(found.type)
    return body


def _fill_state_shapes(graph, types):
    """ONNX shape inference leaves the loop-carried outputs of a Loop/Scan without a shape; where the body
    declares the state it returns with the initial value's shape, the final value has that shape too."""
    for node in graph.node:
        if node.op_type not in ("Loop", "Scan"):
            continue
        body = subgraphs(node)[0]
        scanned = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        first_in, first_out = (2, 1) if node.op_type == "Loop" else (0, 0)
        for k in range(len(node.input) - first_in - scanned):
            final, start = node.output[k], node.input[first_in + k]
            if not final or start not in types or (final in types and _shape_of(types[final]) is not None):
                continue
            shape = _shape_of(types[start])
            if shape is not None and _shape_of(body.output[first_out + k].type) == shape:
                types[final] = types[start]


class Subgraph(SourceModel):
    """A Loop/Scan/If body seen like a model: its nodes in order, the types of its values and of the
    enclosing scopes' values it reads, and constants from every scope.

    `input_types` (a TypeProto or None per body input) fills in what the body leaves undeclared (ONNX does
    not carry a Loop's initial state shapes into its body); `carried` lists (input index, output index)
    pairs of loop-carried values: a dim that the body changes from one iteration to the next is left unknown.
    """

    def __init__(self, graph, outer: SourceModel, input_types=None, carried=()):
        self.outer, self.proto, self.opset = outer, outer.proto, outer.opset
        types = list(input_types or [])
        inferred = _infer_body(graph, outer, types)  # re-inferred in its scope: ONNX leaves some types out
        self.reshaped = {}  # carried input name -> (its shape before, after one iteration)
        for i, o in carried:
            given, got = _shape_of(inferred.input[i].type), self._inferred_shape(inferred, inferred.output[o].name)
            if given is None or got is None or given == got or i >= len(types) or types[i] is None:
                continue
            if len(given) != len(got) or any(isinstance(a, int) and isinstance(c, int) and a != c
                                              for a, c in zip(given, got)):
                self.reshaped[inferred.input[i].name] = (given, got)
            relaxed = onnx.TypeProto()  # the dims that change stay unknown
            relaxed.CopyFrom(types[i])
            if len(given) != len(got):
                relaxed.tensor_type.ClearField("shape")
            for d, a, c in zip(relaxed.tensor_type.shape.dim, given, got):
                if a != c:
                    d.Clear()
            types[i] = relaxed
        graph = _infer_body(graph, outer, types) if types != list(input_types or []) else inferred
        self.graph = graph
        self.initializers = {**outer.initializers, **{t.name: t for t in graph.initializer}}
        self.inputs, self.outputs = list(graph.input), list(graph.output)
        self._types = dict(outer._types)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._types[vi.name] = vi.type
        for t in graph.initializer:
            self._types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        _fill_state_shapes(graph, self._types)
        self.producer = {**outer.producer, **{out: n for n in graph.node for out in n.output if out}}
        self.nodes = self._topological_order()

    @staticmethod
    def _inferred_shape(graph, name):
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            if vi.name == name and vi.type.HasField("tensor_type"):
                return _shape_of(vi.type)
        return None
