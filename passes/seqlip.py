"""SeqLip (Scaman & Virmaux, NeurIPS 2018): a Lipschitz bound of a chain of dense layers, tighter than AutoLip.

With A_i = U_i S_i V_i^T, S~ = S for the first and last layer and sqrt(S) between, and box_i the range of
act_i' ({0,1} for ReLU), SeqLip is  prod_i max_{s in box_i} ||S~_{i+1} V_{i+1}^T diag(s) U_i S~_i|| * max|act_last'|.
The norm is convex in s, so each pair's maximum over the box is at a vertex: exact search over the 2^n vertices
for n <= exact_limit units (default 16, at most 24), greedy search on the top-k singular directions beyond (an
estimate, not a bound). The guaranteed bound uses, beyond the limit, the midpoint bound
|m| ||A B|| + |r| min(||A|| ||B||, sum_j ||a_j|| ||b_j||) with s = m + r t, |t| <= 1; it never exceeds AutoLip.

Used by passes/lipschitz.py (chains) and passes/lipschitz_dag.py (the chains inside a DAG).
"""
from __future__ import annotations

import math
import time

import numpy as np

from jacgraph.errors import JacgraphError
from jacgraph.spectral import EPS, stacked_norms

EXACT_LIMIT = 16            # SeqLip searches all 2^n activation patterns up to this many units
EXACT_CAP = 24              # beyond this the exact search would take hours
TOP_K = 10                  # singular directions kept by the greedy SeqLip search


def _pair_exact(A, B, lo, hi, chunk=4096) -> float:
    """max over s in {lo, hi}^n of ||A diag(s) B||_2, by enumerating every vertex."""
    n = A.shape[1]
    base = lo * (A @ B)
    outer = (hi - lo) * np.einsum("rj,js->jrs", A, B)
    best = 0.0
    for start in range(0, 1 << n, chunk):
        codes = np.arange(start, min(start + chunk, 1 << n))
        bits = ((codes[:, None] >> np.arange(n)) & 1).astype(np.float64)
        M = base + np.tensordot(bits, outer, axes=1)
        best = max(best, float(stacked_norms(M).max()))
    return best


def _pair_greedy(A, B, lo, hi, top_k=TOP_K, screen=32) -> float:
    """A vertex s found by local search on the top-k singular directions (start: the rank-1 optimum; each
    step takes the best single flip among the `screen` with the largest first-order gain), and
    ||A diag(s) B||_2 there: a lower estimate of the pair's maximum, not a bound."""
    n = A.shape[1]
    Ak, Bk = A[:top_k], B[:, :top_k]
    c = Ak[0] * Bk[:, 0]
    starts = [np.where(c > 0, hi, lo), np.where(c < 0, hi, lo)]
    s = max(starts, key=lambda v: abs(float(v @ c))).astype(np.float64)
    outer = np.einsum("rj,js->jrs", Ak, Bk)
    M = np.einsum("rj,j,js->rs", Ak, s, Bk)
    value = np.linalg.norm(M, 2)
    for _ in range(4 * n):
        flips = np.where(s == hi, lo - hi, hi - lo)
        U, _, Vt = np.linalg.svd(M)
        gain = flips * (U[:, 0] @ Ak) * (Bk @ Vt[0])  # d sigma_max for each flip, to first order
        pick = np.argsort(gain)[::-1][:screen]
        candidates = M[None] + flips[pick, None, None] * outer[pick]
        norms = np.linalg.norm(candidates, ord=2, axis=(1, 2))
        j = int(np.argmax(norms))
        if norms[j] <= value * (1 + 1e-12):
            break
        s[pick[j]] += flips[pick[j]]
        M, value = candidates[j], norms[j]
    return float(np.linalg.norm((A * s) @ B, 2))


def _pair_midpoint_bound(A, B, lo, hi) -> float:
    """A guaranteed bound on max over s in [lo, hi]^n of ||A diag(s) B||_2 without search: with
    s = m + r t, |t| <= 1, it is at most |m| ||A B|| + |r| min(||A|| ||B||, sum_j ||a_j|| ||b_j||)."""
    m, r = (lo + hi) / 2, (hi - lo) / 2
    spread = min(np.linalg.norm(A, 2) * np.linalg.norm(B, 2),
                 float(np.linalg.norm(A, axis=0) @ np.linalg.norm(B, axis=1)))
    whole = max(abs(lo), abs(hi)) * np.linalg.norm(A, 2) * np.linalg.norm(B, 2)
    return float(min(abs(m) * np.linalg.norm(A @ B, 2) + abs(r) * spread, whole))


def seqlip(mats, boxes, last_slope=1.0, exact_limit=EXACT_LIMIT, top_k=TOP_K, greedy=True) -> dict:
    """SeqLip over dense layer matrices; boxes[i] is the slope range of the activation after layer i.

    value: the product of pair maxima (exact search up to exact_limit units, greedy beyond: then an
    estimate). bound: guaranteed, the product of exact pair maxima, and beyond the limit of the
    midpoint bound, plus a float64 rounding allowance. greedy=False skips the greedy search (value: the bound)."""
    if exact_limit > EXACT_CAP:
        raise JacgraphError(f"--exact-limit {exact_limit} would search 2^{exact_limit} patterns per pair; "
                            f"the most that finishes is {EXACT_CAP}.")
    svd = [np.linalg.svd(W, full_matrices=False) for W in mats]
    top = [float(S[0]) if S.size else 0.0 for _, S, _ in svd]
    k = len(mats)
    # computed SVD factors reproduce W up to c n eps ||W|| (backward stable), so the product of pair norms
    # is off by at most k c n eps times the product of the layer norms: added to the bound
    n_max = max(max(W.shape) for W in mats)
    autolip = float(np.prod(top)) * math.prod(max(abs(lo), abs(hi)) for lo, hi in boxes[:-1]) * last_slope
    allowance = 16 * k * n_max * EPS * autolip
    if k == 1:
        return {"value": last_slope * top[0], "bound": last_slope * top[0] + allowance, "exact": True, "pairs": []}
    pairs, value, bound, exact = [], last_slope, last_slope, True
    for i in range(k - 1):
        t0 = time.perf_counter()
        U1, S1, _ = svd[i]
        _, S2, V2t = svd[i + 1]
        B = U1 * (S1 if i == 0 else np.sqrt(S1))
        A = (S2 if i + 1 == k - 1 else np.sqrt(S2))[:, None] * V2t
        lo, hi = boxes[i]
        n = A.shape[1]
        if lo == hi:
            v = pair_bound = abs(lo) * float(np.linalg.norm(A @ B, 2))
            how = "linear"
        elif n <= exact_limit:
            v = pair_bound = _pair_exact(A, B, lo, hi)
            how = "exact"
        else:
            pair_bound = _pair_midpoint_bound(A, B, lo, hi)
            if greedy:
                v, how = _pair_greedy(A, B, lo, hi, top_k), f"greedy top-{top_k} (estimate)"
            else:
                v, how = pair_bound, "midpoint bound"
            exact = False
        pairs.append({"pair": [i, i + 1], "units": n, "value": v, "bound": pair_bound, "method": how,
                      "seconds": time.perf_counter() - t0})
        value *= v
        bound *= pair_bound
    return {"value": value, "bound": bound + allowance, "exact": exact, "pairs": pairs}
