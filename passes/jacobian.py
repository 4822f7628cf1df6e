"""Whole Jacobians from few probes: x -> (y, J) in one graph.

1. The structural pattern of J(x) (`sparsity`, in jacgraph.sparsity, by the PATTERN rules of
   jacgraph.rules.pattern): which elements of x each output element can depend on, for every x.
2. Colourings of its columns and of its rows (jacgraph.colouring): columns that share no row get one
   colour, and one JVP probe measures them all at once; rows alike, one VJP probe per colour.
3. `build(model)`: probes, then in-graph decompression (J[i, j] read from the one probe that holds it,
   0 off the pattern). Columns: the source's multi-tangent JVP with K = column colours and the seed
   matrix as a constant tangent. Rows (when 4·row colours < column colours, or probes="rows"): the
   primal once and an ONNX Loop over row colours running the VJP's reverse sweep. Outputs: the source
   outputs, then `<y>_jac` with shape y.shape + x.shape (jacfwd's layout), or with sparse=True
   `<y>_jac_values` [nnz] and `<y>_jac_indices` [nnz, 2] (row in y.ravel(), column in x.ravel()).

The pattern and colouring names (sparsity, Pattern, colouring, Colouring, is_valid, PATTERN, ...) stay
importable from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper, numpy_helper

from jacgraph.builder import Builder
from jacgraph.colouring import (GRAPH_EDGE_LIMIT, METHODS, Colouring, colouring, distance2_colouring,  # noqa: F401
                                greedy_colouring, is_valid, row_colouring, seed_matrix, structured_colouring)
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.rules.pattern import PATTERN  # noqa: F401  (public names of this module before the split)
from jacgraph.sparsity import NNZ_LIMIT, Context, Pattern, fixed_source, source_pattern, sparsity  # noqa: F401


@dataclass
class Plan:
    """Everything decided before emitting: the pattern, the column colouring (one JVP probe per colour)
    and the row colouring (one VJP probe per colour)."""
    source: SourceModel
    pattern: Pattern
    columns: Colouring
    rows: Colouring

    def summary(self, probes="columns") -> str:
        P = self.pattern.matrix
        count, kind, full, unit = ((self.columns.count, "JVP", P.shape[1], "column") if probes == "columns"
                                   else (self.rows.count, "VJP", P.shape[0], "row"))
        used = (f"{count} {kind} probes instead of {full} (one per {unit})" if count < full
                else f"{count} {kind} probes (one per {unit}: the pattern allows no compression)")
        return (f"Jacobian {P.shape[0]} x {P.shape[1]}, {P.nnz} structural nonzeros; {self.columns.count} column "
                f"colours ({self.columns.method}; lower bound {self.columns.lower_bound}), {self.rows.count} row "
                f"colours ({self.rows.method}; lower bound {self.rows.lower_bound}); using {used}")


def plan(model, inputs=None, input_shape=None, colouring_method="auto") -> Plan:
    """Pattern and colourings of the model's Jacobian with respect to x (one float input)."""
    from jacgraph.rules.jvp import JVP

    src, x = fixed_source(model, inputs, input_shape)
    JVP.check(src, [x], also=(PATTERN,), what="the Jacobian pass")  # one error for both tables, before any work
    pat = source_pattern(src, x)
    return Plan(src, pat, colouring(pat.matrix, pat.x_shape, colouring_method), row_colouring(pat))


PROBES = ("auto", "columns", "rows")


# One VJP probe (a reverse sweep, one Loop iteration each) against one tangent of the batched JVP: measured
# 1.3-2.2x on conv stacks and CNN heads, up to 7x on tiny models where the Loop's per-iteration overhead
# dominates (examples/jacobian_probes.py, onnxruntime CPU); rows win only when clearly fewer.
ROW_PROBE_COST = 4


def choose_probes(p: Plan, probes="auto") -> str:
    """columns (JVP probes), or rows (VJP probes) when reverse mode covers the model and they are cheaper."""
    if probes not in PROBES:
        raise JacgraphError(f"--probes {probes!r} is not known; use auto, columns or rows.")
    if probes == "columns":
        return probes
    missing = _vjp_missing(p)
    if probes == "rows" and missing:
        raise JacgraphError(f"row probes need reverse mode, which has no rule for {', '.join(sorted(missing))}. "
                            "Use --probes columns (JVP probes).")
    if probes == "rows":
        return probes
    return "rows" if not missing and ROW_PROBE_COST * p.rows.count < p.columns.count else "columns"


def _vjp_missing(p: Plan):
    try:
        from jacgraph.rules.transpose import VJP
    except ImportError:  # reverse mode not installed: column probes only
        return {"(reverse mode)": 1}
    return VJP.missing(p.source, [p.pattern.x])


@dataclass
class JacobianResult:
    """The emitted model and the names a caller needs (its metadata only documents them)."""
    model: onnx.ModelProto
    x: str  # the input J is taken with respect to
    rows: dict  # float output y -> its number of elements (its rows of J)
    jacobian_outputs: dict  # y -> [y_jac] (dense) or [y_jac_values, y_jac_indices] (sparse)


def build(model, sparse=False, inputs=None, input_shape=None, colouring_method="auto", probes="auto") -> onnx.ModelProto:
    """The model that `jacgraph compile --emit jacobian` writes; see `emit`."""
    return emit(model, sparse, inputs, input_shape, colouring_method, probes).model


def emit(model, sparse=False, inputs=None, input_shape=None, colouring_method="auto", probes="auto") -> JacobianResult:
    """x -> (y, J) from compressed probes, decompressed in-graph: one multi-tangent JVP with a constant
    tangent per column colour, or (rows, when 4·row colours < column colours) an ONNX Loop of one VJP per
    row colour."""
    p = model if isinstance(model, Plan) else plan(model, inputs, input_shape, colouring_method)
    kind = choose_probes(p, probes)
    src, pat, x = p.source, p.pattern, p.pattern.x
    b, tables = _column_probes(p) if kind == "columns" else _row_probes(p)
    col, K = (p.columns, p.columns.count) if kind == "columns" else (p.rows, p.rows.count)
    b.outputs.extend(src.outputs)
    n = pat.matrix.shape[1]
    elem, dtype = src.dtype(x), src.np_dtype(x)
    jac_outputs = []
    for y, shape, r0, r1 in pat.outputs:
        block = pat.matrix[r0:r1]
        flat = tables[y]  # columns: y_dot [K, m] flattened; rows: x_bar [K, n] flattened
        # Every structural entry is one element of the compressed table: gather exactly those, then scatter
        # them into zeros (gathering a whole [m, n] spread and masking it cost m·n and dominated the run;
        # onnxruntime's 1-D GatherElements/ScatterElements are ~5x faster than Gather/ScatterND here).
        coo = block.tocoo()
        at = (col.colours[coo.col] * (r1 - r0) + coo.row.astype(np.int64) if kind == "columns"
              else col.colours[r0 + coo.row] * n + coo.col.astype(np.int64))
        values = b.fresh(f"{y}_jac_values")
        b.nodes.append(helper.make_node("GatherElements", [flat, b.const(at, hint=f"{y}_jac_gather")], [values],
                                        name=b.fresh("jg_GatherElements"), axis=0))
        if sparse:
            indices = b.fresh(f"{y}_jac_indices")
            pairs = np.stack([coo.row, coo.col], axis=1).astype(np.int64)
            b.nodes.append(helper.make_node("Identity", [b.const(pairs, hint=f"{y}_pattern")], [indices],
                                            name=b.fresh("jg_Identity")))
            b.add_output(values, elem, [int(coo.nnz)])
            b.add_output(indices, onnx.TensorProto.INT64, [int(coo.nnz), 2])
            jac_outputs.append([y, values, indices])
        else:
            size = (r1 - r0) * n
            zeros = b.ConstantOfShape(b.ints([size]), value=numpy_helper.from_array(np.zeros(1, dtype)))
            where = b.const(coo.row.astype(np.int64) * n + coo.col, hint=f"{y}_jac_scatter")
            dense = b.ScatterElements(zeros, where, values, axis=0)
            name = b.fresh(f"{y}_jac")
            b.nodes.append(helper.make_node("Reshape", [dense, b.ints(list(shape) + list(pat.x_shape))], [name],
                                            name=b.fresh("jg_Reshape")))
            b.add_output(name, elem, list(shape) + list(pat.x_shape))
            jac_outputs.append([y, name])
    metadata = {"jacgraph.emit": "jacobian", "jacgraph.probes": kind, "jacgraph.colours": K,
                "jacgraph.colouring": col.method, "jacgraph.column_colours": p.columns.count,
                "jacgraph.row_colours": p.rows.count, "jacgraph.summary": p.summary(kind),
                "jacgraph.input": x, "jacgraph.input_shape": json.dumps(list(pat.x_shape)),
                "jacgraph.sparse": int(bool(sparse)), "jacgraph.nnz": int(pat.matrix.nnz),
                "jacgraph.columns": n, "jacgraph.rows": json.dumps([[y, r1 - r0] for y, _, r0, r1 in pat.outputs]),
                "jacgraph.jacobian_outputs": json.dumps(jac_outputs)}
    what = "JVP" if kind == "columns" else "VJP"
    emitted = b.build(f"{src.graph.name}_jacobian", doc=f"Jacobian of {src.graph.name} from {K} compressed {what} "
                      f"probes (jacgraph)", metadata=metadata)
    return JacobianResult(emitted, x, {y: r1 - r0 for y, _, r0, r1 in pat.outputs},
                          {y: names for y, *names in jac_outputs})


def _column_probes(p: Plan):
    """The source's JVP with K = column colours and the seed matrix as a constant tangent: y_dot[k] = J S[k]."""
    from jacgraph.passes import jvp

    src, pat, col, x = p.source, p.pattern, p.columns, p.pattern.x
    K = max(col.count, 1)
    probes = jvp.emit(src, inputs=[x], tangents=K)
    x_dot, y_dots = probes.tangent_inputs[x], probes.tangent_outputs
    inner = SourceModel(probes.model)
    b = Builder(inner)
    b.inputs.extend(i for i in inner.inputs if i.name != x_dot)
    b.initializers.append(numpy_helper.from_array(seed_matrix(col.colours, K, pat.x_shape, src.np_dtype(x)), x_dot))
    for node in inner.nodes:
        b.copy(node)
    return b, {y: b.Reshape(y_dots[y], b.ints([-1])) for y, *_ in pat.outputs}


def _row_probes(p: Plan):
    """The primal once, then an ONNX Loop over row colours whose body is the VJP's reverse sweep (reading
    the primal values from the outer graph) with y_bar = the colour's indicator: x_bar[k] = Jᵀ S[k]."""
    from jacgraph.passes import vjp

    src, pat, col, x = p.source, p.pattern, p.rows, p.pattern.x
    K = max(col.count, 1)
    sweep = vjp.emit(src, inputs=[x])
    y_bars, x_bar = sweep.cotangent_inputs, sweep.gradient_outputs[x]
    inner = SourceModel(sweep.model)
    b = Builder(inner)
    b.inputs.extend(i for i in inner.inputs if i.name not in y_bars.values())
    primal_names = set(src.producer) | set(src.initializers)
    body = []
    for node in inner.nodes:  # copies of source nodes (maybe with extra outputs) run once, outside the loop
        if any(o in primal_names for o in node.output):
            b.copy(node)
        else:
            body.append(node)
    it, cond = b.fresh("row_colour"), b.fresh("cond")
    seeds = []
    for y, shape, r0, r1 in pat.outputs:
        S = np.zeros((K, r1 - r0), src.np_dtype(y))
        S[col.colours[r0:r1], np.arange(r1 - r0)] = 1
        table = b.const(S.reshape((K,) + tuple(shape)), hint=f"{y}_row_seeds")
        seeds.append(helper.make_node("Gather", [table, it], [y_bars[y]], name=b.fresh("jg_Gather"), axis=0))
    cond_out = b.fresh("cond_out")
    graph = helper.make_graph(
        seeds + body + [helper.make_node("Identity", [cond], [cond_out], name=b.fresh("jg_Identity"))],
        "row_probes",
        [helper.make_tensor_value_info(it, onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info(x_bar, src.dtype(x), list(pat.x_shape))])
    stacked = b.op("Loop", b.const(np.array(K, np.int64), hint="row_colours"), "", body=graph)  # [K, *x.shape]
    flat = b.Reshape(stacked, b.ints([-1]))
    return b, {y: flat for y, *_ in pat.outputs}


def jacobian(model, x, sparse=False, inputs=None, probes="auto"):
    """J(x) of every float output (rows stacked in output order) w.r.t. x: an (m, n) numpy array, or with
    sparse=True a scipy.sparse CSR matrix; computed by the emitted graph in onnxruntime."""
    from jacgraph import runtime

    x = np.asarray(x)
    result = emit(model, sparse=sparse, inputs=inputs, input_shape=x.shape, probes=probes)
    emitted, name = result.model, result.x
    sess = runtime.session(emitted)
    others = [i.name for i in sess.get_inputs() if i.name != name]
    if others:
        raise JacgraphError(f"the model has other inputs ({', '.join(others)}); jacobian() feeds only x. Make them "
                            "initializers of the model, or compile with --emit jacobian and feed them yourself.")
    x_type = {i.name: i for i in emitted.graph.input}[name].type.tensor_type.elem_type
    out = runtime.run(sess, {name: x.astype(helper.tensor_dtype_to_np_dtype(x_type))})
    n, rows = int(x.size), result.rows
    blocks = []
    for y, names in result.jacobian_outputs.items():
        if not sparse:
            blocks.append(out[names[0]].reshape(rows[y], n))
        else:
            values, idx = out[names[0]], out[names[1]]
            blocks.append(sp.csr_matrix((values, (idx[:, 0], idx[:, 1])), shape=(rows[y], n)))
    return np.concatenate(blocks, axis=0) if not sparse else sp.vstack(blocks, format="csr")
