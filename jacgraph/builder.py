"""The one object that emits nodes, constants and fresh names into a new graph."""
from __future__ import annotations

import itertools
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import JacgraphError, internal_error
from .model import SourceModel, Subgraph, subgraph_names

def _min_inputs(op_type, opset, domain) -> int:
    try:
        return onnx.defs.get_schema(op_type, opset, domain).min_input
    except onnx.defs.SchemaError:
        return 0


class Builder:
    """Emits into a new graph that starts empty; source value names are reserved so copies keep them.

    `b.Relu(x)` emits one node and returns its output name (a list for n_out > 1). Names of new
    values come from `fresh`. `K` is the number of stacked tangents (None: tangents have the
    primal's shape; an int: they carry a leading axis of that size).
    """

    def __init__(self, src: SourceModel, K: int | None = None):
        self.src = src
        self.K = K
        self.opset = src.opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = list(src.graph.initializer)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # types ONNX shape inference cannot find (Loop state outputs)
        self.copies: dict[int, onnx.NodeProto] = {}
        self._taken = set(src.producer) | set(src.initializers) | {i.name for i in src.graph.input}
        self._taken |= {n.name for n in src.graph.node} | subgraph_names(src.graph)
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}
        self.root = self  # constants live in the top-level graph; a child Builder for a body shares them
        self.source = None  # the source node whose rule is running (passes set it)
        self.origin: dict = {}  # emitted node name -> that source node

    # ---- names --------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        name = hint
        while name in self._taken:
            name = f"{hint}_{next(self._counter)}"
        self._taken.add(name)
        return name

    # ---- nodes --------------------------------------------------------------------------------
    def op(self, op_type, *inputs, n_out=1, domain="", **attrs):
        outputs = [self.fresh(f"{op_type.lower()}") for _ in range(n_out)]
        inputs = ["" if i is None else i for i in inputs]
        required = _min_inputs(op_type, self.opset, domain)  # (Loop's cond slot stays, even when empty)
        while len(inputs) > required and inputs[-1] == "":  # an omitted trailing optional input is left off: the
            inputs.pop()                    # slot may not exist at the model's opset (Pad's axes before 18: Swin)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        name = self.fresh(f"jg_{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        self.origin[name] = self.source  # the source node whose rule emitted it (named in internal errors)
        return outputs[0] if n_out == 1 else outputs

    def apply(self, rule, node, *states):
        """rule(self, node, *states), remembering `node` as the source of what it emits; an exception that is
        not a JacgraphError (a bug in the rule or a library) becomes the one-paragraph error naming the node."""
        self.source = node
        try:
            return rule(self, node, *states)
        except JacgraphError:
            raise
        except Exception as e:
            raise internal_error("a rule raised an unexpected exception", e, node) from None

    def identity_as(self, value: str, name: str) -> str:
        """Emit Identity(value) under a given name (a graph output, or a body value rules read by name)."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("jg_Identity")))
        return name

    def __getattr__(self, op_type):
        if op_type[:1].isupper():  # b.Conv(...), b.Relu(...): sugar for b.op("Conv", ...)
            return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)
        raise AttributeError(op_type)

    def copy(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """Emit a source node unchanged (same names); rules may append outputs to the copy."""
        new = onnx.NodeProto()
        new.CopyFrom(node)
        self.nodes.append(new)
        self.copies[id(node)] = new
        return new

    def remove_copy(self, node: onnx.NodeProto):
        """Take back the copy of a source node, for a rule that computes the node's outputs itself in its place."""
        self.nodes.remove(self.copies.pop(id(node)))

    def extra_output(self, node: onnx.NodeProto, index: int, hint: str) -> str:
        """Name of optional output `index` of the copied `node`, added to the copy if the source left it off."""
        copied = self.copies[id(node)]
        while len(copied.output) <= index:
            copied.output.append("")
        if not copied.output[index]:
            copied.output[index] = self.fresh(hint)
        return copied.output[index]

    # ---- constants ----------------------------------------------------------------------------
    def const(self, value, dtype=None, hint="const") -> str:
        """An initializer holding `value` (deduplicated by value, dtype and shape)."""
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and not isinstance(value, np.ndarray) and arr.dtype == np.float64:
            raise TypeError("pass dtype for float constants: use b.scalar(v, like=name)")
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.root.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), hint="ints")

    def scalar(self, value, like: str) -> str:
        """A scalar float constant of the same dtype as source value `like`."""
        return self.const(np.asarray(value, dtype=self.src.np_dtype(like)), hint="scalar")

    # ---- opset-dependent forms ----------------------------------------------------------------
    def reduce(self, op_type, x, axes, keepdims=1):
        """Reduce over `axes` (list of ints or a tensor name; None = all axes) in this opset's form."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, x, keepdims=keepdims)
        if axes_as_input:
            return self.op(op_type, x, axes if isinstance(axes, str) else self.ints(axes), keepdims=keepdims)
        if isinstance(axes, str):
            raise JacgraphError(f"{op_type} with computed axes needs opset 18; re-export with opset_version >= 18.")
        return self.op(op_type, x, keepdims=keepdims, axes=list(axes))

    def shape(self, x, start=0, end=None):
        """Shape(x)[start:end] as an int64 tensor."""
        if start == 0 and end is None:
            return self.Shape(x)
        if self.opset >= 15:
            return self.op("Shape", x, start=start, end=end)
        return self.Slice(self.Shape(x), self.ints([start]), self.ints([end if end is not None else 2**62]))

    def split(self, x, sizes, axis=0):
        if self.opset >= 18:
            return self.op("Split", x, self.ints(sizes), axis=axis, n_out=len(sizes), num_outputs=None)
        return self.op("Split", x, self.ints(sizes), axis=axis, n_out=len(sizes))

    # ---- graph --------------------------------------------------------------------------------
    def add_input(self, name, elem_type, shape):
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self._taken.add(name)

    def add_output(self, name, elem_type, shape):
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def subgraph(self, graph: onnx.GraphProto, input_types=None, carried=()) -> "Builder":
        """A child Builder that emits the body of a Loop/Scan/If (jacgraph.model.Subgraph: `input_types`, `carried`).

        Its `src` views `graph` inside this builder's scope: bodies read outer values (primal, tangent or
        cotangent names of this graph) by name, without declaring them. The child shares this builder's
        names, constants and K; `b.graph(name)` returns the body it emitted.
        """
        child = type(self).__new__(type(self))  # a BoundBuilder's body keeps its dtype helpers (c, where, max)
        child.__dict__.update(self.__dict__)
        child.src = Subgraph(graph, self.src, input_types, carried)
        child.nodes, child.inputs, child.outputs, child.value_info, child.copies = [], [], [], [], {}
        child.initializers = list(graph.initializer)
        return child

    def graph(self, name: str) -> onnx.GraphProto:
        """The body this child Builder emitted (its inputs and outputs as added)."""
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers, value_info=self.value_info)

    def build(self, graph_name: str, doc: str = "", metadata: dict | None = None) -> onnx.ModelProto:
        from .runtime import max_ir_version

        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers, doc_string=doc,
                                  value_info=self.value_info)
        opsets = [helper.make_opsetid(i.domain, i.version) for i in self.src.proto.opset_import]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="jacgraph")
        model.ir_version = min(onnx.IR_VERSION, max_ir_version())
        model.functions.extend(self.src.proto.functions)
        helper.set_model_props(model, {k: str(v) for k, v in (metadata or {}).items()})
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # a rule emitted an invalid node: name the source node it was emitted for
            found = re.search(r"[Nn]ode name: ([^\s)]+)|Node\(([^)]+)\)|Name: (\S+)", str(e))
            emitted = next((g for g in found.groups() if g), None) if found else None
            raise internal_error(f"the emitted graph fails onnx.checker at node {emitted or '?'}", e,
                                 self.origin.get(emitted)) from None
        return model
