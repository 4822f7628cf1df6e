"""The sparse interpreters: the structural pattern of J(x), propagated through a graph by the PATTERN rules.

`sparsity(model)` gives a boolean scipy.sparse matrix (rows: every element of every float output, in
output order; columns: the elements of x). Each rule of jacgraph.rules.pattern gives a connectivity
matrix C from a node's output elements to its inputs' elements. Forward: D_out = C @ D_in, D_v saying
which elements of x each element of v depends on; reverse: R_in += Cᵀ @ R_out, which output elements
depend on each element of v. The narrower one runs (reverse when J has fewer rows than columns).
Input shapes are fixed first (`fixed_source`) and shape subgraphs constant-folded, so every shape is static.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import numpy_helper

from .errors import JacgraphError
from .model import SourceModel, node_inputs
from .rules.pattern import PATTERN, Chain, run_node


NNZ_LIMIT = 60_000_000  # entries of one dependency matrix (~0.5 GB in CSR) before the pass gives up with an error


def fixed_source(model, inputs=None, input_shape=None):
    """(SourceModel with static input shapes, name of x). Symbolic dims become 1 unless input_shape says."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    wrt = src.check_inputs(inputs if inputs else src.float_inputs())
    if len(wrt) != 1:
        raise JacgraphError(f"the model has {len(wrt)} float inputs ({', '.join(wrt)}); a Jacobian is taken with "
                            "respect to one. Choose it with --inputs NAME (inputs=[NAME]).")
    x = wrt[0]
    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    for inp in proto.graph.input:
        if inp.name in src.initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name == x and input_shape is not None:
            if len(input_shape) != len(dims) or any(d.HasField("dim_value") and d.dim_value != s
                                                    for d, s in zip(dims, input_shape)):
                declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                raise JacgraphError(f"x has shape {list(input_shape)} but the model's input '{x}' is declared "
                                    f"{declared}. Give an x of the declared shape (symbolic dims may take any size).")
            for d, s in zip(dims, input_shape):
                d.Clear()
                d.dim_value = int(s)
        for d in dims:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    del proto.graph.value_info[:]
    fixed = _fold_constants(SourceModel(proto))
    for name in _active_values(fixed, x):
        shape = fixed.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise JacgraphError(f"the shape of '{name}' is not static after fixing the input shape to "
                                f"{list(fixed.shape(x))}; the Jacobian pass needs static shapes. Re-export the "
                                "model with static shapes (no data-dependent reshapes).")
    return fixed, x


def _fold_constants(src: SourceModel) -> SourceModel:
    """Replace every node whose value is fixed once the input shapes are (shape arithmetic, constant
    subgraphs such as exported F.pad's pads) by an initializer, so shape inference sees static shapes."""
    values = {name: src.const(name) for name in src.initializers}
    keep, outputs = [], {o.name for o in src.outputs}
    for node in src.nodes:
        shape = src.shape(node.input[0]) if node.input and node.op_type in ("Shape", "Size") else None
        static = shape is not None and all(isinstance(d, int) for d in shape)
        if node.op_type == "Shape" and static:
            attrs = src.attrs(node)
            outs = [np.array(shape[attrs.get("start", 0):attrs.get("end")], np.int64)]
        elif node.op_type == "Size" and static:
            outs = [np.array(int(np.prod(shape)), np.int64)]
        elif node.op_type == "Constant" or (node.input and all(not i or i in values for i in node_inputs(node))
                                            and node.domain in ("", "ai.onnx") and "Random" not in node.op_type):
            try:
                outs = run_node(src, node, {i: values[i] for i in node.input if i})
            except Exception:  # an op the reference evaluator cannot run stays in the graph, unfolded
                keep.append(node)
                continue
        else:
            keep.append(node)
            continue
        if any(o in outputs for o in node.output):
            keep.append(node)
            continue
        values.update((o, np.asarray(v)) for o, v in zip(node.output, outs) if o)
    if len(keep) == len(src.nodes):
        return src
    used = {i for node in keep for i in node_inputs(node)} | outputs  # bodies' captures too
    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    del proto.graph.node[:], proto.graph.initializer[:], proto.graph.value_info[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items() if name in used)
    for inp in [i for i in proto.graph.input if i.name in src.initializers and i.name not in used]:
        proto.graph.input.remove(inp)
    return SourceModel(proto)


def _active_values(src, x):
    names = [x]
    for node in src.active_nodes([x]):
        names += [o for o in node.output if o and src.is_float(o)]
    return names


class Context:
    """What pattern rules read: static shapes and the values of x-independent (integer) inputs."""

    def __init__(self, src: SourceModel, x: str):
        self.src, self.x = src, x
        self.depends = set(_active_values(src, x)) | {o for n in src.active_nodes([x]) for o in n.output}
        self._values = {}

    def shape(self, name):
        return tuple(self.src.shape(name))

    def size(self, name):
        return int(np.prod(self.shape(name), dtype=np.int64))

    def value(self, name):
        """Value of a tensor that does not depend on x's values (constants, shape arithmetic)."""
        if name in self._values:
            return self._values[name]
        value = self.src.const(name)
        if value is None:
            node = self.src.producer.get(name)
            if node is None:
                raise JacgraphError(f"'{name}' is a model input that a shape or index computation needs; the "
                                    "Jacobian pass needs it to be a constant (an initializer).")
            if node.op_type == "Shape":
                attrs = self.src.attrs(node)
                value = np.array(self.shape(node.input[0])[attrs.get("start", 0):attrs.get("end")], np.int64)
            elif node.op_type == "Size":
                value = np.array(self.size(node.input[0]), np.int64)
            elif node.input and any(i in self.depends and self.src.is_float(i) for i in node.input if i):
                raise JacgraphError(f"'{name}' (from {node.op_type} '{node.name}') is computed from x's values and "
                                    "used as an index or shape, so the sparsity of the Jacobian depends on x; the "
                                    "Jacobian pass supports only structure fixed by the graph.")
            else:
                outs = run_node(self.src, node, {i: self.value(i) for i in node.input if i})
                self._values.update(zip(node.output, outs))
                value = self._values[name]
        self._values[name] = value
        return value


def _binary(m):
    """Keep the pattern only: products count paths, and counts never cancel."""
    m = sp.csr_matrix(m)
    m.data = np.ones_like(m.data, dtype=np.float32)
    return m


@dataclass
class Pattern:
    """The structural pattern of J(x): `matrix` (m x n, bool CSR), the outputs' row blocks, x's name and shape."""
    matrix: sp.csr_matrix
    x: str
    x_shape: tuple
    outputs: list = field(default_factory=list)  # [(name, shape, first row, last row + 1)]


def sparsity(model, inputs=None, input_shape=None, direction=None) -> Pattern:
    """The structural sparsity pattern of the Jacobian of every float output with respect to x.

    direction: 'forward' (input dependencies per value element), 'reverse' (output dependencies), or
    None for the cheaper one (reverse when J has fewer rows than columns). Both give the same pattern."""
    src, x = fixed_source(model, inputs, input_shape)
    return source_pattern(src, x, direction)


def source_pattern(src, x, direction=None) -> Pattern:
    PATTERN.check(src, [x])
    active = src.active_nodes([x])
    ctx = Context(src, x)
    n = ctx.size(x)
    floats = [y.name for y in src.outputs if src.is_float(y.name)]
    if not floats:
        raise JacgraphError("the model has no floating-point output, so its Jacobian is empty. Export the model "
                            "with its float outputs.")
    m = sum(ctx.size(y) for y in floats)
    # The same connectivity matrices serve both directions; propagate along the narrower side of J
    # (forward: one n-wide dependency row per value element; reverse: one m-wide row), which keeps
    # deep CNNs with few outputs cheap.
    reachable = _reaching(src, active, set(floats))
    if direction not in (None, "forward", "reverse"):
        raise JacgraphError(f"direction {direction!r} is not known; use forward, reverse or None (automatic).")
    if direction == "reverse" or (direction is None and m < n):
        rows = _reverse(ctx, [nd for nd in active if id(nd) in reachable], floats, m)
        P = rows.T.tocsr()
    else:
        P = _forward(ctx, [nd for nd in active if id(nd) in reachable], floats, n)
    P = P.astype(bool)
    P.sort_indices()
    outputs, row = [], 0
    for y in floats:
        outputs.append((y, ctx.shape(y), row, row + ctx.size(y)))
        row += ctx.size(y)
    return Pattern(P, x, tuple(src.shape(x)), outputs)


def _reaching(src, nodes, targets):
    """ids of the nodes in `nodes` from which some name in `targets` can be reached."""
    wanted, keep = set(targets), set()
    for node in reversed(nodes):
        if any(o in wanted for o in node.output if o):
            keep.add(id(node))
            wanted.update(i for i in node.input if i)
    return keep


def _connections(ctx, node, live):
    """[(input name, offset, size)] for the node's x-dependent inputs and [(output, [F...])] with
    C = F[0] @ F[1] @ ... the connectivity from each output element to the stacked input elements."""
    ids, blocks, offset = [], [], 0
    for name in node.input:
        if name and name in live:
            size = ctx.size(name)
            ids.append(offset + 1 + np.arange(size, dtype=np.int64).reshape(ctx.shape(name)))
            blocks.append((name, offset, size))
            offset += size
        else:
            shape = ctx.shape(name) if name and ctx.src.shape(name) is not None else ()
            ids.append(np.zeros(shape, np.int64))
    conns = []
    for name, conn in zip(node.output, PATTERN[node.op_type](ctx, node, ids)):
        if name and conn is not None and ctx.src.is_float(name):
            if isinstance(conn, Chain):
                conn[-1].resize((conn[-1].shape[0], offset))
            else:
                r, c = conn
                conn = [sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(ctx.size(name), offset))]
            conns.append((name, conn))
    return blocks, conns


def _guard(D, name):
    if D.nnz > NNZ_LIMIT:
        raise JacgraphError(f"the dependency pattern at '{name}' has {D.nnz:,} entries (limit {NNZ_LIMIT:,}): "
                            "this Jacobian is too large to hold. Take it on a smaller input or a sub-model "
                            "(onnx.utils.extract_model), or use `jacgraph compile --emit jvp --tangents K`.")
    return D


def _forward(ctx, nodes, floats, n):
    """D_v (size(v) x n): which elements of x each element of v depends on; D_out = C @ D_in."""
    env = {ctx.x: sp.identity(n, dtype=np.float32, format="csr")}
    last_use = {name: k for k, node in enumerate(nodes) for name in node.input}
    for k, node in enumerate(nodes):
        blocks, conns = _connections(ctx, node, env)
        if not blocks:
            continue
        D_in = sp.vstack([env[name] for name, _, _ in blocks], format="csr")
        for name, chain in conns:
            D = D_in
            for F in reversed(chain):
                D = _guard(_binary(F @ D), name)
            env[name] = D
        for name in node.input:  # free patterns no later node reads
            if last_use.get(name) == k and name != ctx.x and name not in floats:
                env.pop(name, None)
    return sp.vstack([env.get(y, sp.csr_matrix((ctx.size(y), n), dtype=np.float32)) for y in floats], format="csr")


def _reverse(ctx, nodes, floats, m):
    """R_v (size(v) x m): which output elements depend on each element of v; R_in += Cᵀ @ R_out."""
    live = {ctx.x} | {o for node in nodes for o in node.output if o and ctx.src.is_float(o)}
    R, row = {}, 0
    for y in floats:
        R[y] = sp.identity(m, dtype=np.float32, format="csr")[row:row + ctx.size(y)]
        row += ctx.size(y)
    for node in reversed(nodes):
        R_out = {o: R[o] for o in node.output if o in R}
        for o in R_out:
            if o not in floats:  # every consumer has been seen
                del R[o]
        if not R_out:
            continue
        blocks, conns = _connections(ctx, node, live)
        terms = []
        for name, chain in conns:
            if name in R_out:
                T = R_out[name]
                for F in chain:
                    T = _guard(_binary(F.T.tocsr() @ T), name)
                terms.append(T)
        if not blocks or not terms:
            continue
        grad = sp.csr_matrix(sum(terms[1:], terms[0]))
        for name, offset, size in blocks:
            part = grad[offset:offset + size]
            R[name] = _guard(_binary(part if name not in R else R[name] + part), name)
    return R.get(ctx.x, sp.csr_matrix((ctx.size(ctx.x), m), dtype=np.float32))
