"""Operator-norm certificates shared by the Lipschitz passes (passes/lipschitz.py, passes/lipsdp.py).

Upper bounds on ||A||_2 that are guaranteed in float64 (each adds an allowance for its own rounding):
  gram_bound        Gram iteration (Delattre et al., ICML 2023) on a dense matrix: the iterates
                    ||G_t||_F^(1/2^t) decrease to ||A|| from above.
  conv_fft_bound    a Conv's norm through the stride-1 circular convolution on the padded grid (the zero-padded,
                    strided Conv is a restriction of it), exact frequency by frequency.
  certified_bound   the smaller of the two for a lowered stage (jacgraph.layers.Stage).
  sparse_bound      a scipy sparse operator: Gram iteration when it fits densely, else sqrt(||M||_1 ||M||_inf).
  max_overlap       MaxPool's l2 constant is sqrt(the largest number of windows any input is in).
Estimates from below (not bounds): norm_estimate (Lanczos SVD), stacked_norms (many small matrices at once).
conv_geometry resolves a Conv's window attributes for a fixed input shape (also ConvTranspose's output_padding).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .errors import JacgraphError
from .rules.registry import resolve_window

DENSE_LIMIT = 1 << 24       # entries of a layer matrix we materialise (128 MiB in float64)
EPS = np.finfo(np.float64).eps


def one_blas_thread():
    """A context with one BLAS thread (threadpoolctl when installed, else nothing changes). The Lipschitz analyses
    make many products of small and medium matrices, where OpenBLAS's spinning threads cost more than they give
    on a loaded machine: on the shared 2-core VM at load 11, SeqLip on the 1x8x8 ResNet-style DAG took 14 s with
    two threads and 1.0 s with one; the LipSDP barrier solve of the 784-50-10 net 60 s and 1.7 s."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# ---- lowered stages (jacgraph.layers.Stage) ---------------------------------------------------------
def matrix(stage) -> np.ndarray:
    m = stage.matrix() if callable(getattr(stage, "matrix", None)) else stage.weight
    return np.asarray(m, dtype=np.float64)


def size(stage) -> int:
    return int(np.prod(stage.in_shape)) * int(np.prod(stage.out_shape))


def conv_geometry(conv, in_shape) -> dict:
    """Explicit Conv attributes (auto_pad resolved) for a per-sample input shape (C, *spatial)."""
    W = np.asarray(conv["W"])
    attrs = conv["attrs"]
    k = list(attrs.get("kernel_shape") or W.shape[2:])
    nd = len(k)
    n = list(in_shape[1:])
    geometry = resolve_window(attrs, k, n)
    strides, dilations, pads = geometry.strides, geometry.dilations, geometry.pads
    # ConvTranspose gives back size s*(out-1) + d*(k-1) + 1 - pads + output_padding; make it n
    extent = [n[i] + pads[i] + pads[i + nd] - dilations[i] * (k[i] - 1) - 1 for i in range(nd)]
    return {"W": W, "kernel_shape": k, "strides": strides, "dilations": dilations, "pads": pads,
            "group": int(attrs.get("group", 1)), "output_padding": [e % s for e, s in zip(extent, strides)]}


# ---- certified bounds --------------------------------------------------------------------------
def gram_bound(W, max_steps=40) -> float:
    """Upper bound on ||W||_2 by Gram iteration: H_1 = W W^T, H_{t+1} = H_t^2 have ||H_t||_2 = ||W||^(2^t)
    and ||W|| <= ||H_t||_F^(1/2^t), a sequence that decreases to ||W||. Rescaled each step (the scale is
    kept as a log) so nothing overflows."""
    W = np.asarray(W, dtype=np.float64)
    scale = float(np.max(np.abs(W))) if W.size else 0.0
    if scale == 0.0:
        return 0.0
    W = W / scale
    best = float(np.linalg.norm(W))  # t = 0: the Frobenius norm
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    log_scale = 0.0
    for t in range(1, max_steps):
        f = float(np.linalg.norm(G))
        bound = math.exp((log_scale + math.log(f)) / 2 ** t)
        if bound >= best * (1 - 4 * EPS):
            best = min(best, bound)
            break
        best = bound
        G = G / f
        log_scale = 2 * (log_scale + math.log(f))
        G = G @ G  # G is symmetric from t = 1 on: G^T G = G G
    # float64 rounding: a product's Frobenius norm is off by at most n*sqrt(r)*eps relative (componentwise
    # bound |fl(XY) - XY| <= n eps |X||Y|, Higham Thm 3.5, and ||G^2||_F >= ||G||_F^2/sqrt(r) for PSD G of
    # rank r); step t's error is divided by 2^t when the root is taken, so the sum stays below 2 n sqrt(r) eps
    return best * scale * (1 + 16 * max(W.shape) * min(W.shape) * EPS)


def conv_fft_bound(geometry, in_shape) -> float:
    """Upper bound on a Conv's operator norm: the norm of the stride-1 circular convolution on the padded
    grid N = n + pads (no wrap-around reaches a kept output, so the zero-padded strided Conv is an
    isometric embedding, this circular Conv, and a coordinate selection), which is exactly the largest
    singular value over frequencies of the kernel's Fourier transform, an [M, C] matrix per frequency."""
    W, g = geometry["W"].astype(np.float64), geometry["group"]
    nd = len(geometry["kernel_shape"])
    grid = [in_shape[1 + i] + geometry["pads"][i] + geometry["pads"][i + nd] for i in range(nd)]
    M, Cg = W.shape[:2]
    padded = np.zeros((M, Cg, *grid))
    taps = tuple(slice(0, (k - 1) * d + 1, d) for k, d in zip(geometry["kernel_shape"], geometry["dilations"]))
    padded[(slice(None), slice(None), *taps)] = W
    spectrum = np.fft.fftn(padded, axes=tuple(range(2, 2 + nd)))
    spectrum = spectrum.reshape(g, M // g, Cg, -1).transpose(0, 3, 1, 2).reshape(-1, M // g, Cg)
    best = float(np.linalg.norm(spectrum, ord=2, axis=(1, 2)).max())
    # the FFT's rounding is O(eps log N) relative per entry; a generous allowance keeps it an upper bound
    return best * (1 + 16 * (Cg + M + sum(grid)) * EPS)


def certified_bound(stage) -> tuple:
    """(bound, how): Gram iteration on the dense matrix when it fits, the Fourier bound for big Convs."""
    found = []
    if size(stage) <= DENSE_LIMIT:
        found.append((gram_bound(matrix(stage)), "gram"))
    if getattr(stage, "conv", None) is not None:
        shape = stage.conv.get("in_shape", stage.in_shape)
        found.append((conv_fft_bound(conv_geometry(stage.conv, shape), shape), "fourier"))
    if not found:
        raise JacgraphError(f"a layer of {size(stage)} matrix entries is too large to bound (limit {DENSE_LIMIT}) "
                            "and is not a Conv; reduce the model or file an issue.")
    return min(found)


# ---- sparse operators (DAG nodes) -----------------------------------------------------------------
def sparse_bound(M) -> tuple:
    """(certified bound on ||M||_2, how) for a scipy sparse matrix: Gram iteration on the dense matrix
    when it fits, else sqrt(||M||_1 ||M||_inf) (Hoelder; exact for selections and averages)."""
    M = M.tocsr()
    absM = abs(M)
    col, row = np.asarray(absM.sum(axis=0)).ravel(), np.asarray(absM.sum(axis=1)).ravel()
    holder = math.sqrt(float(col.max(initial=0)) * float(row.max(initial=0)))
    if M.shape[0] * M.shape[1] <= DENSE_LIMIT:
        return min((gram_bound(M.toarray()), "gram"), (holder * (1 + 4 * EPS * max(M.shape)), "hoelder"))
    return holder * (1 + 4 * EPS * max(M.shape)), "hoelder"


def norm_estimate(M) -> float:
    """||M||_2 by a Lanczos SVD (an estimate from below, not a bound)."""
    from scipy.sparse.linalg import svds

    if min(M.shape) < 3:
        return float(np.linalg.norm(M.toarray(), 2))
    return float(svds(M.astype(np.float64), k=1, return_singular_vectors=False, random_state=0)[0])


def max_overlap(windows) -> int:
    """The largest number of windows any input belongs to (each window's members counted once)."""
    counts = np.zeros(int(windows.max()) + 1, np.int64)
    for row in windows:
        counts[np.unique(row)] += 1
    return int(counts.max())


def stacked_norms(M) -> np.ndarray:
    """||M[i]||_2 for a stack of small matrices: the top eigenvalue of the smaller Gram matrix (faster than SVD;
    its relative error for the top singular value is a few eps, within the rounding allowance)."""
    G = M @ M.transpose(0, 2, 1) if M.shape[1] <= M.shape[2] else M.transpose(0, 2, 1) @ M
    return np.sqrt(np.maximum(np.linalg.eigvalsh(G)[:, -1], 0.0))
