"""Column colourings of a sparsity pattern: columns that share no row get one colour (one probe each).

The structured colouring by (index mod R) on every axis of x, with R one more than the widest spread of
a row along that axis, is optimal for convolution/pooling chains (the receptive-field windows are
cliques). Unless it already meets the clique bound (the longest row), networkx greedy 'largest_first' on
the column-intersection graph, or a direct distance-2 greedy on the pattern when that graph is too large,
is tried too; the fewest colours win. Used by the Jacobian pass and by Jacobian sensing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import JacgraphError


GRAPH_EDGE_LIMIT = 4_000_000  # above this many column-pair products, skip networkx and colour the pattern directly


@dataclass
class Colouring:
    """colours[j] for every column; `count` colours (probes); the method that won; the clique lower bound
    (the longest row: no colouring has fewer colours); and the count of every method tried."""
    colours: np.ndarray
    count: int
    method: str
    lower_bound: int
    counts: dict


def is_valid(P, colours) -> bool:
    """No row holds two columns of one colour."""
    P = sp.csr_matrix(P)
    row_of = np.repeat(np.arange(P.shape[0]), np.diff(P.indptr))
    pairs = row_of.astype(np.int64) * (int(colours.max(initial=0)) + 1) + colours[P.indices]
    return np.unique(pairs).size == pairs.size


def structured_colouring(P, shape):
    """colour(j) = (j_a mod R_a) over every axis a of x, R_a = 1 + the widest spread along a within one row.
    Valid by construction: two columns of one colour differ by a multiple of R_a >= spread + 1 on some
    axis (or not at all), so no row holds both."""
    P = sp.csr_matrix(P)
    coords = np.unravel_index(np.arange(P.shape[1]), shape)
    nonempty = np.diff(P.indptr) > 0
    starts = P.indptr[:-1][nonempty]
    R = []
    for a, d in enumerate(shape):
        if P.nnz == 0:
            R.append(1)
            continue
        c = coords[a][P.indices]
        spread = np.maximum.reduceat(c, starts) - np.minimum.reduceat(c, starts)
        R.append(int(min(d, spread.max() + 1)))
    colours = np.zeros(P.shape[1], np.int64)
    for a, r in enumerate(R):
        colours = colours * r + coords[a] % r
    _, colours = np.unique(colours, return_inverse=True)
    return colours.astype(np.int64)


def greedy_colouring(P):
    """networkx greedy 'largest_first' on the column-intersection graph (columns adjacent when they share a row)."""
    import networkx as nx

    P = sp.csr_matrix(P, dtype=np.float32)
    G = (P.T @ P).tocoo()
    graph = nx.Graph()
    graph.add_nodes_from(range(P.shape[1]))
    off = G.row < G.col
    graph.add_edges_from(zip(G.row[off].tolist(), G.col[off].tolist()))
    colour = nx.greedy_color(graph, strategy="largest_first")
    return np.array([colour[j] for j in range(P.shape[1])], np.int64)


def distance2_colouring(P):
    """Greedy distance-2 colouring straight on the pattern, columns in decreasing order of their row lengths'
    sum (an upper bound on the degree); never builds the intersection graph."""
    P = sp.csr_matrix(P, dtype=np.float32)
    Pc = P.tocsc()
    row_len = np.diff(P.indptr)
    weight = np.asarray(Pc.multiply(row_len[:, None]).sum(axis=0)).ravel() if P.nnz else np.zeros(P.shape[1])
    colours = np.full(P.shape[1], -1, np.int64)
    for j in np.argsort(-weight, kind="stable"):
        rows = Pc.indices[Pc.indptr[j]:Pc.indptr[j + 1]]
        if rows.size:
            neighbours = np.concatenate([P.indices[P.indptr[r]:P.indptr[r + 1]] for r in rows])
            used = colours[neighbours]
            taken = np.zeros(neighbours.size + 1, bool)
            taken[used[(used >= 0) & (used <= neighbours.size)]] = True
            colours[j] = int(np.argmin(taken))
        else:
            colours[j] = 0
    return colours


def _count(colours):
    return int(colours.max()) + 1 if colours.size else 0


METHODS = ("auto", "structured", "greedy", "distance2")


def colouring(P, shape=None, method="auto") -> Colouring:
    """Colour the columns of pattern P (m x n); `shape` is x's shape (for the structured colouring).

    auto: the structured colouring first; if it does not reach the clique lower bound (the longest
    row), networkx greedy largest_first, or distance-2 greedy when the intersection graph is too big;
    the fewest colours win. Any other method runs alone."""
    if method not in METHODS:
        raise JacgraphError(f"colouring method {method!r} is not known; use one of {', '.join(METHODS)}.")
    P = sp.csr_matrix(P, dtype=bool)
    row_len = np.diff(P.indptr)
    lower = int(row_len.max(initial=0))
    small = int((row_len.astype(np.int64) ** 2).sum()) <= GRAPH_EDGE_LIMIT
    found = {}
    for m in (("structured", "greedy", "distance2") if method == "auto" else (method,)):
        if method == "auto" and found and min(map(_count, found.values())) <= lower:
            break  # optimal: no colouring beats the longest row
        if m == "structured" and shape is not None:
            found[m] = structured_colouring(P, shape)
        elif m == "greedy" and (small or method == "greedy"):
            found[m] = greedy_colouring(P)
        elif m == "distance2" and (method == "distance2" or "greedy" not in found):
            found[m] = distance2_colouring(P)
    if not found:
        found["distance2"] = distance2_colouring(P)
    best = min(found, key=lambda m: _count(found[m]))
    colours = found[best]
    assert is_valid(P, colours), "a colouring put two columns of one row in one colour"
    return Colouring(colours, _count(colours), best, lower, {m: _count(c) for m, c in found.items()})


def row_colouring(pattern, method="auto") -> Colouring:
    """Colours of the rows of J (one VJP probe per colour): the column colouring of Jᵀ."""
    shape = pattern.outputs[0][1] if len(pattern.outputs) == 1 else (pattern.matrix.shape[0],)
    return colouring(pattern.matrix.T.tocsr(), shape, method)


def seed_matrix(colours, count, shape, dtype=np.float32):
    """S[k] = indicator of colour k, shaped like x: the K tangents of the compressed JVP."""
    n = colours.size
    S = np.zeros((count, n), dtype)
    S[colours, np.arange(n)] = 1
    return S.reshape((count,) + tuple(shape))
