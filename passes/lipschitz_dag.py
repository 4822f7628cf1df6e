"""AutoLip and SeqLip over a DAG (residual joins, concatenation, pooling, max selections): the l2 Lipschitz
bounds of a model that is not a chain, lowered by jacgraph.layers.lower_graph into linear nodes (a join of
several inputs included), elementwise activations and max selections.

AutoLip bounds each node from its inputs' bounds (graph_lipschitz); SeqLip (passes/seqlip.py) runs on the chains
of one-input linear nodes and activations inside the DAG (_chain_terms) and AutoLip's rules combine them, so the
SeqLip bound is never above AutoLip's. `passes.lipschitz.analyze` sends every model that is not a chain here
(analyze_graph); LipSDP needs a chain.
"""
from __future__ import annotations

import math
import time

import numpy as np

from jacgraph.errors import JacgraphError
from jacgraph.passes.lipschitz import Report, max_slope, slope_box
from jacgraph.passes.seqlip import EXACT_LIMIT, TOP_K, seqlip
from jacgraph.spectral import max_overlap, norm_estimate, sparse_bound

MAX_CHAIN = 4               # SeqLip on a DAG: matrices per chain (each length is one more SeqLip of its SVDs)
CHAIN_DENSE_LIMIT = 1 << 22  # and the largest matrix in a chain (entries; its SVD takes seconds)


def graph_lipschitz(graph, chains=False, exact_limit=EXACT_LIMIT, top_k=TOP_K) -> dict:
    """Per node k, a bound L_k on the l2 Lipschitz constant of x -> node_k(x) (and an estimate E_k):

      linear node   sum_j ||M_kj|| L_j, or ||[M_k1 .. M_kJ]|| sqrt(sum_j L_j^2) when smaller
                    (||sum_j M_j d_j|| <= ||[M_j]|| ||stacked d||, ||stacked d||^2 = sum_j ||d_j||^2)
      activation    max |sigma'| L_j
      max node      sqrt(c) L_j, c the largest number of windows one input is in
                    (sum_o max_{i in W_o} d_i^2 <= sum_o sum_{i in W_o} d_i^2 <= c ||d||^2).
    A residual block h + f(h) is one linear node whose inputs are h and f's last activation, so its
    identity and f's matrix are bounded jointly where they are one operator.

    chains=True also gives SeqLip over the DAG (result["seqlip"]): a second bound S_k by the same rules,
    except that a linear node's term M_kj h_j, h_j = act(A h_start + b) reached through a chain of one-input
    linear nodes and activations (_chain_terms), is bounded by SeqLip of that chain times S_start when smaller
    than ||M_kj|| S_j. So S_k <= L_k at every node: SeqLip on a DAG is never above AutoLip."""
    import scipy.sparse as sp

    L, E, S, layers_, chain_rows = [1.0], [1.0], [1.0], [], []
    for k, node in enumerate(graph.nodes[1:], start=1):
        j = node.inputs[0] if node.inputs else None
        if node.kind == "act":
            slope = max_slope(node.activation, node.act_attrs)
            L.append(slope * L[j])
            E.append(slope * E[j])
            S.append(slope * S[j])
        elif node.kind == "max":
            c = math.sqrt(max_overlap(node.windows))
            L.append(c * L[j])
            E.append(E[j])  # no estimate from below beyond the input's
            S.append(c * S[j])
        else:
            t0 = time.perf_counter()
            bounds = [sparse_bound(M) for M in node.mats]
            parts = [b_ for b_, _ in bounds]
            stacked = sp.hstack(node.mats) if len(node.mats) > 1 else node.mats[0]
            joint, how = sparse_bound(stacked) if len(node.mats) > 1 else bounds[0]
            total = sum(b_ * L[i] for b_, i in zip(parts, node.inputs))
            estimate = sum(norm_estimate(M) * E[i] for M, i in zip(node.mats, node.inputs))
            terms = [b_ * S[i] for b_, i in zip(parts, node.inputs)]
            if chains:
                for t, (i, M) in enumerate(zip(node.inputs, node.mats)):
                    for start, mats, boxes in _chain_terms(graph, i, M):
                        t1 = time.perf_counter()
                        r = seqlip(mats, boxes, 1.0, exact_limit, top_k, greedy=False)
                        methods = sorted({p["method"] for p in r["pairs"]})
                        chain_rows.append({"pair": [start, k], "units": sum(A.shape[0] for A in mats[:-1]),
                                           "value": r["value"], "bound": r["bound"],
                                           "method": f"chain of {len(mats)}: {', '.join(methods)}",
                                           "seconds": time.perf_counter() - t1})
                        terms[t] = min(terms[t], r["bound"] * S[start])
            if len(node.mats) > 1:
                total = min(total, joint * math.sqrt(sum(L[i] ** 2 for i in node.inputs)))
            L.append(total)
            E.append(min(estimate, total))
            S.append(min(sum(terms), joint * math.sqrt(sum(S[i] ** 2 for i in node.inputs)), total))
            layers_.append({"layer": k, "op": "linear" if len(parts) == 1 else f"join of {len(parts)}",
                            "in": [graph.nodes[i].n for i in node.inputs], "out": [node.n],
                            "activation": None, "norm_estimate": norm_estimate(stacked),
                            "iterations": 0, "bound": joint, "bound_method": how,
                            "power_seconds": 0.0, "bound_seconds": time.perf_counter() - t0})
    result = {"bound": L[-1], "estimate": E[-1], "layers": layers_}
    if chains:
        result["seqlip"] = {"bound": S[-1], "value": S[-1], "exact": all("midpoint" not in r["method"] for r in chain_rows),
                            "dag": True, "pairs": chain_rows, "exact_limit": exact_limit}
    return result


def _chain_terms(graph, j, M, max_maps=MAX_CHAIN):
    """The chains that end in the term M h_j of a linear node: [(start, mats, boxes)], one per length, each the
    path h_start -> A_1 -> act_1 -> ... -> A_r -> act_r = h_j -> M through activations whose input is a linear
    node of one input (dense matrices only, at most CHAIN_DENSE_LIMIT entries; at most max_maps matrices)."""
    def dense(A):
        return np.asarray(A.toarray(), np.float64) if A.shape[0] * A.shape[1] <= CHAIN_DENSE_LIMIT else None

    found, mats, boxes, cur = [], [dense(M)], [(1.0, 1.0)], j
    while mats[0] is not None and graph.nodes[cur].kind == "act" and len(mats) < max_maps:
        act = graph.nodes[cur]
        p = graph.nodes[act.inputs[0]]
        if p.kind != "linear" or len(p.inputs) != 1:
            break
        A = dense(p.mats[0])
        if A is None:
            break
        mats.insert(0, A)
        boxes.insert(0, slope_box(act.activation, act.act_attrs))
        cur = p.inputs[0]
        found.append((cur, list(mats), list(boxes)))
    return found


def analyze_graph(src, method, input_shape, exact_limit=EXACT_LIMIT, top_k=TOP_K) -> Report:
    """AutoLip and SeqLip (on the chains inside it, graph_lipschitz) for a model that is not a chain; LipSDP
    needs a chain of dense layers."""
    from jacgraph import layers

    if method == "lipsdp":
        raise JacgraphError("--method lipsdp needs a plain chain of layers; this model has residual joins, "
                            "concatenation or pooling. Use --method seqlip or autolip (they bound any such DAG).")
    t0 = time.perf_counter()
    graph = layers.lower_graph(src, tuple(input_shape) if input_shape else None)
    result = graph_lipschitz(graph, chains=method in ("seqlip", "all"), exact_limit=exact_limit, top_k=top_k)
    seq = result.pop("seqlip", None)
    report = Report(layers=result.pop("layers") if method != "seqlip" else [])
    seconds = time.perf_counter() - t0
    if method in ("autolip", "all"):
        report.autolip = {**result, "seconds": seconds}
    if seq is not None:
        report.seqlip = {**seq, "seconds": seconds}
    if method == "all":
        report.lipsdp = {"skipped": "LipSDP needs a plain chain of layers; this model is a DAG"}
    return report
