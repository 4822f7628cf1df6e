"""Jacobian sensing of a black box: J(x0) from forward calls only (Choromanski & Sindhwani, 2017).

The model is only ever called forward (onnxruntime), never differentiated. Every call evaluates
f(x0 + h·d_p) with a colour-structured random perturbation d_p[j] = g_p[colour(j)], g_p ~ N(0, I_K):
one random value per colour of the column colouring of J's pattern. Row i of J then satisfies

    f_i(x0 + h·d_p) = f_i(x0) + h · Σ_{j in S_i} J[i, j] g_p[colour(j)]        (S_i: row i's support)

and, because the columns of S_i have distinct colours, the regressors of each row are independent
Gaussians: |S_i| + 1 unknowns (f_i(x0) is one of them, so no call is special and any call may be
corrupted), recovered from N calls by least squares, or with `robust` by L1 regression (ADMM over
all rows that share a design matrix, each row certified by its duality gap, the HiGHS linear
program where that fails) followed by a least-squares refit on the calls it did not flag. L1
regression recovers the row exactly when a small fraction of calls is arbitrarily corrupted; least
squares spreads every corrupted call over every coefficient.

The pattern is the structural one (derived from the graph by jacgraph/sparsity.py, no calls) or, for a
true black box, dense (every output may depend on every input: n colours). The fewest calls that can
work are colours + 1. Forward differences are exact for affine maps at any step; otherwise the step
trades truncation (O(h)) against float32 rounding (~1e-7·|f|/h).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, load

PATTERNS = ("structural", "dense")
CLIP = 1e3  # robust scales: the ADMM of the robust fit sees calls clipped there (see _fit_l1_rows)
OUTLIER_CUT = 5.0  # residuals beyond 5 robust standard deviations (1.4826·MAD) are flagged as corrupted


@dataclass
class Sensed:
    """J (scipy.sparse CSR on the structural pattern, a numpy array for the dense one; rows: the float
    outputs' elements in output order, columns: x's elements), and how it was obtained."""
    J: object
    calls: int
    colours: int
    min_calls: int
    pattern: str
    robust: bool
    step: float
    estimated_error: float | None  # relative, from the residuals of the calls kept: an estimate, not a bound
    flagged_calls: int  # calls the robust fit flagged as corrupted in at least half of the rows
    nonfinite_calls: int = 0  # calls that returned NaN/inf, left out of every fit


# ---- the black box ----------------------------------------------------------------------------------

def _load_x0(x0):
    if isinstance(x0, (str, os.PathLike)):
        path = os.fspath(x0)
        if not os.path.isfile(path):
            raise JacgraphError(f"--x0 {path}: no such file. Save the point with numpy.save('x.npy', x).")
        try:
            x0 = np.load(path, allow_pickle=False)
        except Exception as e:
            raise JacgraphError(f"--x0 {path} is not a .npy array ({type(e).__name__}). Save it with "
                                "numpy.save('x.npy', x).") from None
    x0 = np.asarray(x0)
    if not np.issubdtype(x0.dtype, np.number):
        raise JacgraphError(f"x0 has dtype {x0.dtype}; it must be a numeric array.")
    if not np.all(np.isfinite(x0)):
        raise JacgraphError("x0 holds NaN or infinite values; give a finite point.")
    return x0


def _choose_input(src: SourceModel, x0, inputs):
    floats = src.float_inputs()
    if not floats:
        names = ", ".join(f"{i.name} ({np.dtype(src.np_dtype(i.name)).name})" for i in src.inputs) or "none"
        raise JacgraphError(f"the model has no floating-point input (inputs: {names}), so it has no Jacobian to "
                            "sense. Sense a model whose input x is float (e.g. feed embeddings, not token ids).")
    wanted = inputs if inputs else floats
    src.check_inputs(wanted)
    if len(wanted) != 1 or len(src.inputs) != 1:
        raise JacgraphError(f"the model has inputs {', '.join(i.name for i in src.inputs)}; sensing perturbs one "
                            "float input and feeds nothing else. Make the other inputs initializers (constants) of "
                            "the model, or extract a one-input sub-model with onnx.utils.extract_model.")
    x = wanted[0]
    declared = src.shape(x) or ()
    if len(declared) != x0.ndim or any(isinstance(d, int) and d != s for d, s in zip(declared, x0.shape)):
        shown = [d if isinstance(d, int) else (d or "?") for d in declared]
        raise JacgraphError(f"--x0 has shape {list(x0.shape)} but the model's input '{x}' is declared {shown}. "
                            "Save an x0 of the declared shape (symbolic dimensions may take any size).")
    return x


def black_box(model, x_name, dtype):
    """f(x) -> all float outputs, flattened and concatenated (float64), through one onnxruntime session."""
    sess = runtime.session(model)
    names = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]

    def f(x):
        outs = sess.run(names, {x_name: np.asarray(x, dtype)})
        return np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in outs])
    return f


# ---- patterns and probes ----------------------------------------------------------------------------

def support(model, x0, pattern="structural", inputs=None):
    """The structural pattern (CSR bool, m x n), the colour of every column, and the number of colours."""
    from jacgraph import colouring, sparsity

    pat = sparsity.sparsity(model, inputs=inputs, input_shape=x0.shape)
    col = colouring.colouring(pat.matrix, pat.x_shape)
    return pat.matrix, col.colours, col.count


def _fit_ls(A, y):
    z, *_ = np.linalg.lstsq(A, y, rcond=None)
    return z, np.ones(len(y), bool)


def _inliers(A, y, z):
    """Calls whose residual under z is within OUTLIER_CUT robust standard deviations (1.4826·MAD). An L1
    fit interpolates s calls exactly, so the scale comes from the other N - s residuals."""
    s = A.shape[1]
    r = np.abs(A @ z - y)
    scale = 1.4826 * np.median(np.sort(r)[s:])
    return r <= OUTLIER_CUT * max(scale, 1e-12 * max(np.abs(y).max(), 1e-300))


def _refit(A, y, keep, factors):
    """Least squares on the calls kept, repeated until the calls it keeps are the calls it was fitted on
    (at most a few rounds); None when that does not settle. `factors` caches the Cholesky factor of
    A[keep]ᵀA[keep] per kept set (rows with the same corrupted calls share it)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    for _ in range(5):
        if keep.sum() <= A.shape[1]:
            return None
        key = keep.tobytes()
        if key not in factors:
            try:
                factors[key] = cho_factor(A[keep].T @ A[keep])
            except LinAlgError:  # (near) rank-deficient: the slower, stabler solver
                factors[key] = None
        z = (cho_solve(factors[key], A[keep].T @ y[keep]) if factors[key] is not None
             else _fit_ls(A[keep], y[keep])[0])
        again = _inliers(A, y, z)
        if np.array_equal(again, keep):
            return z, keep
        keep = again
    return None


def _fit_l1(A, y):
    """min ‖A z - y‖₁ (HiGHS linear program, sparse), then least squares on the calls that are not outliers."""
    from scipy.optimize import linprog

    N, s = A.shape
    centre = np.median(y)  # keeps the LP's absolute tolerances small next to the signal
    # A z - y = p - q with p, q >= 0: min Σ p + q, equality rows [A, I, -I]
    A_eq = sp.hstack([sp.csr_matrix(A), sp.identity(N, format="csr"), -sp.identity(N, format="csr")], format="csr")
    c = np.concatenate([np.zeros(s), np.ones(2 * N)])
    res = linprog(c, A_eq=A_eq, b_eq=y - centre, bounds=[(None, None)] * s + [(0, None)] * (2 * N), method="highs")
    if res.status != 0:
        raise JacgraphError(f"the L1 regression did not solve ({res.message}). Increase --budget.")
    z = res.x[:s]
    z[-1] += centre  # the last column is the intercept f_i(x0)
    keep = _inliers(A, y, z)
    if keep.sum() > s:
        z, _ = _fit_ls(A[keep], y[keep])
    return z, keep


def _fit_l1_rows(A, Y, iterations=2000, check_every=25, gap=1e-3):
    """Robust fits of the columns of Y that share the design A (N x s), all at once.

    ADMM on min ‖A z - y‖₁ (split r = A z - y; the z-step is the projection A M onto A's range,
    M = (AᵀA)⁻¹Aᵀ from one Cholesky factorisation shared by every row and iteration; the r-step is
    a soft threshold), each row's residual scale normalised to 1, its calls clipped at ±CLIP robust
    scales, the penalty rebalanced as it runs. Every `check_every` iterations each row's duality gap
    is measured: its multiplier, projected onto null(Aᵀ) and scaled into |ν| <= 1, is a feasible
    point of the dual max -bᵀν, so -bᵀν bounds the clipped problem's optimum from below. A row whose
    objective is within a relative `gap` of that bound, with every fitted value well inside the clip
    (so its residuals keep their signs and the clipped and original problems agree), is solved: its
    outlier flags are read off the residuals, the least-squares refit on the calls kept must
    reproduce them (_refit) and be as good an L1 fit as the certified one. A row that does not get
    there falls back to the exact linear program (_fit_l1).
    """
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    s, R = A.shape[1], Y.shape[1]
    Z, keeps = np.zeros((s, R)), [None] * R
    try:
        M = cho_solve(cho_factor(A.T @ A), A.T)
    except LinAlgError:  # a (near) rank-deficient design: the linear program for every row
        iterations = 0
        M = np.zeros((s, A.shape[0]))
    factors = {}
    centre = np.median(Y, axis=0)
    scale = 1.4826 * np.median(np.abs(Y - centre), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    B = (Y - centre) / scale
    # ADMM runs on B clipped to ±CLIP robust scales (corrupted calls may lie 1e7 scales out, which stalls
    # it): an L1 fit depends on a residual only through its sign, so a minimiser of the clipped problem
    # whose fitted values stay inside the clip (checked, with a factor 2 margin) minimises the original
    clipped = np.clip(B, -CLIP, CLIP)
    fit, resid, dual = np.zeros_like(B), clipped.copy(), np.zeros_like(B)  # A z, r, scaled multiplier u
    rho = np.ones(R)
    open_rows = np.arange(R)
    for it in range(1, iterations + 1):
        b, r, u = clipped[:, open_rows], resid[:, open_rows], dual[:, open_rows]
        f = A @ (M @ (b + r - u))
        r_new = f - b + u
        r_new = np.sign(r_new) * np.maximum(np.abs(r_new) - 1.0 / rho[open_rows], 0.0)
        u = u + f - b - r_new
        primal, change = np.linalg.norm(f - b - r_new, axis=0), np.linalg.norm(r_new - r, axis=0) * rho[open_rows]
        factor = np.where(primal > 10 * change, 2.0, np.where(change > 10 * primal, 0.5, 1.0))
        rho[open_rows] *= factor
        fit[:, open_rows], resid[:, open_rows], dual[:, open_rows] = f, r_new, u / factor
        if it % check_every:
            continue
        nu = dual[:, open_rows] * rho[open_rows]
        nu -= A @ (M @ nu)
        nu /= np.maximum(np.abs(nu).max(axis=0), 1.0)
        objective = np.abs(fit[:, open_rows] - clipped[:, open_rows]).sum(axis=0)
        bound = -(clipped[:, open_rows] * nu).sum(axis=0)
        inside = np.abs(fit[:, open_rows]).max(axis=0) < CLIP / 2  # every residual keeps its sign
        for j, obj, low, ok in zip(open_rows, objective, bound, inside):
            if ok and obj - low <= gap * max(obj, 1e-12):
                z = M @ (fit[:, j] * scale[j] + centre[j])
                refit = _refit(A, Y[:, j], _inliers(A, Y[:, j], z), factors)
                # the refit must be as good an L1 fit of the clipped calls as the certified one
                better = refit is not None and np.abs(A @ refit[0] - (clipped[:, j] * scale[j] + centre[j])).sum() \
                    <= (obj + gap * obj) * scale[j]
                keeps[j] = refit if better else False
        open_rows = np.array([j for j in open_rows if keeps[j] is None], int)
        if not len(open_rows):
            break
    for j in range(R):
        if keeps[j]:
            Z[:, j], keeps[j] = keeps[j]
        else:
            Z[:, j], keeps[j] = _fit_l1(A, Y[:, j])
    return Z, keeps


def sense(model, x0, budget=None, robust=False, pattern="structural", step=None, seed=0, inputs=None,
          corrupt=None, progress=True) -> Sensed:
    """Recover J(x0) from `budget` forward calls (default 2·(colours + 1), or 4·colours with robust).

    corrupt(call_index, y) -> y, if given, replaces what the black box returned (to simulate noisy or
    faulty calls in tests and examples).
    """
    if pattern not in PATTERNS:
        raise JacgraphError(f"--pattern {pattern!r} is not known; use structural (from the graph) or dense.")
    proto = load(model)
    src = SourceModel(proto)
    x0 = _load_x0(x0)
    x = _choose_input(src, x0, inputs)
    dtype = src.np_dtype(x)
    f = black_box(proto, x, dtype)
    x0 = x0.astype(dtype)
    P, colours, K = _structure(proto, x0, pattern, x)
    min_calls = K + 1
    budget = _checked_budget(budget, K, robust)
    rng = np.random.default_rng(seed)
    step = _checked_step(step, x0)
    G, Y, nonfinite = _probe(f, x0, rng.standard_normal((budget, K)), colours, step, corrupt, progress, min_calls)
    m = Y.shape[1]
    if P is None:
        P = sp.csr_matrix(np.ones((m, K), bool))
    if P.shape[0] != m:
        raise JacgraphError(f"the model returned {m} output values but its pattern has {P.shape[0]} rows; the "
                            "declared output shapes do not match what onnxruntime computes. Use --pattern dense.")
    res = _recover(P, colours, G, Y, step, robust, pattern, len(Y), K, min_calls, progress)
    res.calls, res.nonfinite_calls = budget, nonfinite
    return res


def _structure(proto, x0, pattern, x):
    """(P, colours, K): the Jacobian's sparsity pattern (None for dense: the rows are known after the first call),
    each input's colour, and the number of colours."""
    if pattern == "dense":
        return None, np.arange(x0.size), int(x0.size)
    try:
        return support(proto, x0, pattern, [x])
    except JacgraphError as e:
        raise JacgraphError(f"{e} For a model whose structure jacgraph cannot read, use --pattern dense "
                            "(no structure assumed; needs more calls).") from None


def _checked_budget(budget, K, robust) -> int:
    min_calls = K + 1  # K colours + f(x0), which is unknown too
    if budget is None:
        return 4 * K if robust else 2 * min_calls
    if budget < min_calls:
        raise JacgraphError(f"--budget {budget} is below the minimum of {min_calls} calls for this pattern "
                            f"({K} colours + 1, since f(x0) is unknown too). Give --budget {min_calls} or more "
                            f"(about {4 * K} with --robust).")
    return budget


def _checked_step(step, x0) -> float:
    if step is None:
        return 1e-3 * max(1.0, float(np.sqrt(np.mean(np.asarray(x0, np.float64) ** 2))))
    if not (np.isfinite(step) and step > 0):
        raise JacgraphError(f"--step {step} is not a positive number; give the perturbation size, e.g. --step 1e-3.")
    return step


def _probe(f, x0, G, colours, step, corrupt, progress, min_calls):
    """Call the black box at x0 + step·G[p] (spread over the colours); (G, Y, calls left out) over the finite calls."""
    from tqdm import tqdm

    Y = []
    for p in tqdm(range(len(G)), desc="jacgraph sense: forward calls", unit="call", file=sys.stderr, leave=False,
                  disable=None if progress is None else not progress):
        d = G[p][colours]
        y = f(x0 + (step * d).reshape(x0.shape).astype(x0.dtype))
        if corrupt is not None:
            y = np.asarray(corrupt(p, y), np.float64)
        Y.append(y)
    Y = np.stack(Y)
    finite = np.all(np.isfinite(Y), axis=1)  # a call that returned NaN/inf says nothing: leave it out
    if finite.sum() < min_calls:
        raise JacgraphError(f"only {int(finite.sum())} of {len(G)} calls returned finite values, fewer than the "
                            f"{min_calls} needed. Check the model at x0, or raise --budget.")
    return G[finite], Y[finite], int((~finite).sum())


def _recover(P, colours, G, Y, step, robust, pattern, budget, K, min_calls, progress=False) -> Sensed:
    """Per-row regression. Rows with the same colour sequence share their design matrix [G[:, colours], 1],
    so least squares solves each such group at once."""
    P = sp.csr_matrix(P)
    m, n = P.shape
    groups = {}
    for i in range(m):
        key = colours[P.indices[P.indptr[i]:P.indptr[i + 1]]].tobytes()
        groups.setdefault(key, []).append(i)
    values = np.zeros(P.nnz)
    variance, flagged = 0.0, np.zeros(budget)
    from tqdm import tqdm

    bar = tqdm(total=m, desc="jacgraph sense: robust fits", unit="row", file=sys.stderr, leave=False,
               disable=True if not robust else (None if progress is None else not progress))
    for rows in groups.values():
        cols = colours[P.indices[P.indptr[rows[0]]:P.indptr[rows[0] + 1]]]
        A = np.hstack([G[:, cols], np.ones((budget, 1))])
        if robust:
            Z, keeps = _fit_l1_rows(A, Y[:, rows])
            bar.update(len(rows))
        else:
            Z = np.linalg.lstsq(A, Y[:, rows], rcond=None)[0]
            keeps = [np.ones(budget, bool)] * len(rows)
        for i, z, keep in zip(rows, Z.T, keeps):
            values[P.indptr[i]:P.indptr[i + 1]] = z[:-1] / step
            flagged += ~keep
            dof = int(keep.sum()) - A.shape[1]
            if dof <= 0 or variance is None:
                variance = None
                continue
            r = A[keep] @ z - Y[keep, i]
            trace = _cov_trace(A, keep)
            variance += float(r @ r) / dof * trace / step ** 2
    bar.close()
    J = sp.csr_matrix((values, P.indices.copy(), P.indptr.copy()), shape=(m, n))
    norm = float(np.linalg.norm(values))
    estimate = None if variance is None else float(np.sqrt(variance) / max(norm, 1e-300))
    return Sensed(J if pattern == "structural" else J.toarray(), budget, K, min_calls, pattern, robust, step,
                  estimate, int((flagged >= m / 2).sum()))


_TRACES: dict = {}


def _cov_trace(A, keep):
    """tr((AᵀA)⁻¹) over the slope coefficients (the intercept left out), for the calls kept."""
    key = (A.tobytes(), keep.tobytes())
    if key not in _TRACES:
        if len(_TRACES) > 4096:
            _TRACES.clear()
        gram = A[keep].T @ A[keep]
        try:
            inverse = np.linalg.inv(gram)
        except np.linalg.LinAlgError:
            inverse = np.linalg.pinv(gram)
        _TRACES[key] = float(np.trace(inverse[:-1, :-1]))
    return _TRACES[key]

