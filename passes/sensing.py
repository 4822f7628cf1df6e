"""Jacobian sensing of a black box: J(x0) from forward calls only (Choromanski & Sindhwani, 2017).

The model is only ever called forward (onnxruntime), never differentiated. Every call evaluates
f(x0 + h·d_p) with a colour-structured random perturbation d_p[j] = g_p[colour(j)], g_p ~ N(0, I_K):
one random value per colour of the column colouring of J's pattern. Row i of J then satisfies

    f_i(x0 + h·d_p) = f_i(x0) + h · Σ_{j in S_i} J[i, j] g_p[colour(j)]        (S_i: row i's support)

and, because the columns of S_i have distinct colours, the regressors of each row are independent
Gaussians: |S_i| + 1 unknowns (f_i(x0) is one of them, so no call is special and any call may be
corrupted), recovered from N calls by least squares, or with `robust` by L1 regression followed by a
least-squares refit on the calls it did not flag. L1 regression recovers the row exactly when a small
fraction of calls is arbitrarily corrupted; least squares spreads every corrupted call over every
coefficient. The robust fit (_fit_robust) first finds the corrupted calls of all rows that share a
design matrix together (a corrupted call corrupts every output of that call) by trimmed least
squares, refits each row on the calls it keeps, and certifies each refit as an L1 fit by its duality
gap; a row that fails gets the exact L1 vertex (_l1_vertex), and where that fails ADMM over the
rows left, then the HiGHS linear program.

The pattern is the structural one (derived from the graph by jacgraph/sparsity.py, no calls) or, for a
true black box, dense (every output may depend on every input: n colours). The fewest calls that can
work are colours + 1. Forward differences are exact for affine maps at any step; otherwise the step
trades truncation (O(h)) against float32 rounding (~1e-7·|f|/h).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, load
from jacgraph.progress import stage

PATTERNS = ("structural", "dense")
CLIP = 1e3  # robust scales: the robust fit's certificate and ADMM see calls clipped there (see _normalised)
OUTLIER_CUT = 5.0  # residuals beyond 5 robust standard deviations (1.4826·MAD) are flagged as corrupted
GAP = 1e-3  # relative duality gap at which a robust fit counts as an L1 minimiser of the clipped calls
IRLS_STEPS = 40  # reweighted least-squares steps before the exact L1 fit's simplex pivots (see _l1_vertex)
PROJECTIONS = 200  # at most, to bring the certificate's dual point into the box |ν| <= 1 (see _certified)


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
    corrupted_calls: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # those calls' numbers (from 0)
    fallback_rows: int = 0  # robust rows not certified on the fast path: solved by the exact L1 fit, ADMM or HiGHS


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


# ---- the robust fit ---------------------------------------------------------------------------------

class _Design:
    """The design A (N calls x s unknowns) that a group of rows shares, with the Cholesky factor of
    A[keep]ᵀA[keep] for each set of calls kept so far. Each is made from the one Gram matrix AᵀA less the
    few calls left out (k·s² work for k calls instead of N·s²); rows that keep the same calls share it."""

    CACHE_BYTES = 2 ** 28  # the factors kept at once (a dense 768-input row: 4.7 MB each)

    def __init__(self, A):
        self.A = A
        self.gram = A.T @ A
        self._factors, self._traces = {}, {}

    def factor(self, keep):
        """scipy's cho_factor of A[keep]ᵀA[keep]; None where that is (near) rank-deficient."""
        from scipy.linalg import LinAlgError, cho_factor

        key = keep.tobytes()
        if key not in self._factors:
            if len(self._factors) * self.gram.nbytes > self.CACHE_BYTES:
                self._factors.clear()
            out = ~keep
            gram = (self.gram - self.A[out].T @ self.A[out] if out.sum() < keep.sum()
                    else self.A[keep].T @ self.A[keep])
            try:
                self._factors[key] = cho_factor(gram)
            except LinAlgError:
                self._factors[key] = None
        return self._factors[key]

    def solve(self, keep, Y):
        """Least squares of the columns of Y on the calls kept."""
        from scipy.linalg import cho_solve

        factor = self.factor(keep)
        if factor is None:  # (near) rank-deficient: the slower, stabler solver
            return np.linalg.lstsq(self.A[keep], Y[keep], rcond=None)[0]
        return cho_solve(factor, self.A[keep].T @ Y[keep])

    def slope_trace(self, keep):
        """tr((A[keep]ᵀA[keep])⁻¹) over the slope coefficients (the intercept, last, left out)."""
        from scipy.linalg import solve_triangular

        key = keep.tobytes()
        if key not in self._traces:
            factor = self.factor(keep)
            if factor is None:
                self._traces[key] = float(np.trace(np.linalg.pinv(self.A[keep].T @ self.A[keep])[:-1, :-1]))
            else:  # UᵀU = A[keep]ᵀA[keep] (scipy's default, upper): the inverse's diagonal is U⁻¹'s row norms
                inverse_factor = solve_triangular(factor[0], np.eye(len(self.gram)), lower=factor[1])
                rows = inverse_factor[:-1] if not factor[1] else inverse_factor.T[:-1]
                self._traces[key] = float((rows ** 2).sum())
        return self._traces[key]


def _normalised(Y):
    """(centre, scale, C): each column's median and robust scale (1.4826·MAD), and the columns in those units
    clipped at ±CLIP (corrupted calls may lie 1e7 scales out). An L1 fit depends on a residual only through
    its sign, so a minimiser of the clipped problem whose fitted values stay inside the clip minimises the
    original one too."""
    centre = np.median(Y, axis=0)
    scale = 1.4826 * np.median(np.abs(Y - centre), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return centre, scale, np.clip((Y - centre) / scale, -CLIP, CLIP)


def _inliers(A, Y, Z):
    """Per column of Y (N x R): the calls whose residual under Z is within OUTLIER_CUT robust standard
    deviations (1.4826·MAD). An L1 fit interpolates s calls exactly, so the scale comes from the other
    N - s residuals."""
    s = A.shape[1]
    R = np.abs(A @ Z - Y)
    scale = 1.4826 * np.median(np.sort(R, axis=0)[s:], axis=0)
    return R <= OUTLIER_CUT * np.maximum(scale, 1e-12 * np.maximum(np.abs(Y).max(axis=0), 1e-300))


def _by_kept(keep, columns):
    """(kept calls, the columns among `columns` that keep exactly those) for each distinct set."""
    kinds, which = np.unique(keep[:, columns].T, axis=0, return_inverse=True)
    for k, kept in enumerate(kinds):
        yield kept, columns[which.ravel() == k]


def _refit(design, Y, keep):
    """Least squares of each column of Y on its kept calls (keep: N x R), repeated until the calls it keeps
    are the calls it was fitted on (at most 5 rounds). Returns (Z, keep, settled): settled marks the
    columns that got there."""
    s, R = design.A.shape[1], Y.shape[1]
    Z, keep, settled = np.zeros((s, R)), keep.copy(), np.zeros(R, bool)
    open_rows = np.arange(R)
    for _ in range(5):
        open_rows = open_rows[keep[:, open_rows].sum(axis=0) > s]  # fewer calls than unknowns: not settled
        if not len(open_rows):
            break
        for kept, cols in _by_kept(keep, open_rows):
            Z[:, cols] = design.solve(kept, Y[:, cols])
        again = _inliers(design.A, Y[:, open_rows], Z[:, open_rows])
        done = np.all(again == keep[:, open_rows], axis=0)
        settled[open_rows[done]] = True
        keep[:, open_rows] = again
        open_rows = open_rows[~done]
    return Z, keep, settled


def _common_inliers(design, C, rounds=30):
    """The calls that fit every column of C at once, by trimmed least squares: fit all columns on the calls
    kept, keep the calls whose residual is within OUTLIER_CUT robust standard deviations in every column,
    repeat until that set repeats. A corrupted call corrupts every output of that call, so all rows point at
    it; the first fits are smeared by the corrupted calls, and each round fewer are left to smear them."""
    A = design.A
    keep = np.ones(len(A), bool)
    for _ in range(rounds):
        R = np.abs(A @ design.solve(keep, C) - C)
        scale = 1.4826 * np.median(R[keep], axis=0)
        again = np.all(R <= OUTLIER_CUT * np.maximum(scale, 1e-12), axis=1)
        if again.sum() <= A.shape[1] or np.array_equal(again, keep):
            break
        keep = again
    return keep


def _certified(design, C, F, keep, gap):
    """Per column: is F = A z (in the units of C, N x R) a minimiser of ‖A z - c‖₁ over the clipped calls C,
    to within a relative duality gap `gap`, with every fitted value well inside the clip (so its residuals
    keep their signs and the clipped and original problems agree)? The dual point: ν = sign(F - C) on the
    calls the column leaves out and, on those it keeps, a ν_K with A_Kᵀν_K = -A_Oᵀν_O, so that Aᵀν = 0: the
    least-norm one, or where that leaves the box |ν| <= 1, alternating projections onto the box and that
    affine set (at most PROJECTIONS). Scaled into |ν| <= 1, -cᵀν is a lower bound on the optimum
    (‖A z - c‖₁ >= νᵀ(A z - c) = -cᵀν). When z is the least-squares fit on the calls kept, ν_K lies in A_K's
    range, orthogonal to the kept residuals r_K, so unless the scaling shrinks ν the gap is Σ|r_K|."""
    from scipy.linalg import cho_solve

    A = design.A
    ok = np.zeros(C.shape[1], bool)
    for kept, cols in _by_kept(keep, np.arange(C.shape[1])):
        factor = design.factor(kept)
        if factor is None:
            continue
        out = ~kept
        nu = np.zeros((len(A), len(cols)))
        nu[out] = np.sign(F[out][:, cols] - C[out][:, cols])
        target = -A[out].T @ nu[out]  # A_Kᵀν_K must equal this
        inside = -A[kept] @ cho_solve(factor, -target)  # the least-norm ν_K
        for _ in range(PROJECTIONS):  # alternating projections onto the box and the affine set, while outside
            if np.abs(inside).max() <= 1:
                break
            box = np.clip(inside, -1.0, 1.0)
            inside = box - A[kept] @ cho_solve(factor, A[kept].T @ box - target)
        nu[kept] = inside
        ok[cols] = _within_gap(F[:, cols], C[:, cols], nu, gap)[0]
    return ok


def _within_gap(F, C, nu, gap):
    """(ok, objective ‖F - C‖₁) per column, for a ν with Aᵀν = 0: scaled into |ν| <= 1 it is dual feasible, so
    -cᵀν bounds the optimum from below; ok where the objective is within a relative `gap` of that bound and every
    fitted value F lies well inside the clip (so its residuals keep their signs)."""
    nu = nu / np.maximum(np.abs(nu).max(axis=0), 1.0)
    objective = np.abs(F - C).sum(axis=0)
    bound = -(C * nu).sum(axis=0)
    ok = (np.abs(F).max(axis=0) < CLIP / 2) & (objective - bound <= gap * np.maximum(objective, 1e-12))
    return ok, objective


def _fit_robust(design, Y, tick=None):
    """Robust fits of the columns of Y that share `design`, all at once: (Z, keep (N x R), rows that fell back).
    tick(k), if given, is told each time k more rows are done (the progress bar).

    1. The calls that fit every row (_common_inliers: trimmed least squares over all rows together).
    2. Each row's outlier flags under the least-squares fit on those calls, and its least-squares refit on
       the calls it keeps, repeated until the refit keeps the calls it was fitted on (_refit).
    3. Each refit certified as an L1 fit of the clipped calls to within a relative duality gap GAP
       (_certified). A row that fails any step gets the exact L1 fit of _l1_vertex (IRLS, then simplex pivots
       to a certified vertex), and where that fails the ADMM (_fit_l1_rows), then the HiGHS linear program.
    """
    A = design.A
    centre, scale, C = _normalised(Y)
    common = _common_inliers(design, C)
    Z, keep, settled = _refit(design, Y, _inliers(A, Y, design.solve(common, Y)))
    ok = settled & _certified(design, C, (A @ Z - centre) / scale, keep, GAP)
    tick = tick or (lambda k: None)
    tick(int(ok.sum()))
    failed = np.flatnonzero(~ok)
    for k, j in enumerate(failed):  # e.g. clean rows: the refit keeps every call, so its gap is Σ|r|
        with stage(f"exact L1 fit (IRLS, simplex pivots), row {k + 1} of the {len(failed)} not certified"):
            z = _l1_vertex(A, Y[:, j])
        if z is not None:
            Z[:, j], keep[:, j] = _refit_inliers(A, Y[:, j], z)
            ok[j] = True
            tick(1)
    if not ok.all():
        with stage(f"ADMM over the {int((~ok).sum())} rows not certified (of {len(ok)})"):
            Z[:, ~ok], keep[:, ~ok] = _fit_l1_rows(A, Y[:, ~ok], design=design, tick=tick)
    return Z, keep, len(failed)


def _fit_l1(A, y):
    """min ‖A z - y‖₁ exactly (the HiGHS linear program), then least squares on the calls that are not outliers."""
    return _refit_inliers(A, y, _l1_highs(A, y))


def _refit_inliers(A, y, z):
    """(least squares on the calls that are not outliers under the L1 fit z, those calls)."""
    keep = _inliers(A, y[:, None], z[:, None])[:, 0]
    if keep.sum() > A.shape[1]:
        z = np.linalg.lstsq(A[keep], y[keep], rcond=None)[0]
    return z, keep


def _l1_highs(A, y, tolerance=1e-7):
    """min ‖A z - y‖₁ by the HiGHS linear program (sparse primal), to HiGHS's primal and dual feasibility
    `tolerance` (its default 1e-7; near-degenerate rows can stop one pivot short of the minimiser there)."""
    from scipy.optimize import linprog

    N, s = A.shape
    centre = np.median(y)  # keeps the LP's absolute tolerances small next to the signal
    # A z - y = p - q with p, q >= 0: min Σ p + q, equality rows [A, I, -I]
    A_eq = sp.hstack([sp.csr_matrix(A), sp.identity(N, format="csr"), -sp.identity(N, format="csr")], format="csr")
    c = np.concatenate([np.zeros(s), np.ones(2 * N)])
    res = linprog(c, A_eq=A_eq, b_eq=y - centre, bounds=[(None, None)] * s + [(0, None)] * (2 * N), method="highs",
                  options={"primal_feasibility_tolerance": tolerance, "dual_feasibility_tolerance": tolerance})
    if res.status != 0:
        raise JacgraphError(f"the L1 regression did not solve ({res.message}). Increase --budget.")
    z = res.x[:s]
    z[-1] += centre  # the last column is the intercept f_i(x0)
    return z


def _irls(A, y, steps=IRLS_STEPS):
    """An approximate L1 fit by iteratively reweighted least squares (weights 1/max(|r|, δ), δ halved each step
    down to 1e-6 of the median residual): the start of _l1_vertex's pivots."""
    from scipy.linalg import cho_factor, cho_solve

    z, delta = np.linalg.lstsq(A, y, rcond=None)[0], None
    for _ in range(steps):
        r = np.abs(A @ z - y)
        median = np.median(r)
        if r.max() <= 1e-12 * max(np.abs(y).max(), 1e-300):  # rounding level: nothing left to reweight
            break
        delta = median if delta is None else max(delta / 2, 1e-6 * median)
        w = 1.0 / np.maximum(r, delta)
        try:
            z = cho_solve(cho_factor((A * w[:, None]).T @ A), A.T @ (w * y))
        except np.linalg.LinAlgError:
            break
    return z


def _l1_vertex(A, y):
    """min ‖A z - y‖₁ exactly, or None: from IRLS's fit, the s calls with the smallest residuals as the basis B
    (z interpolates them: A_B z = y_B), then simplex pivots (Barrodale-Roberts: the basis call whose multiplier
    leaves |ν| <= 1 leaves, the weighted median of the breakpoints on that edge enters) until the optimality
    certificate holds: ν solving A_Bᵀν = -A_Nᵀ sign(r_N) has |ν| <= 1 (+1e-9 for rounding), so 0 is in the
    subdifferential and z is a minimiser. A_B⁻¹ is updated by Sherman-Morrison per pivot and the certificate is
    rechecked on a fresh LU factorisation. None after 10·s pivots or a singular basis."""
    from scipy.linalg import LinAlgError, lu_factor, lu_solve

    N, s = A.shape
    z = _irls(A, y)
    r = A @ z - y
    if np.abs(r).max() <= 1e-12 * max(np.abs(y).max(), 1e-300):
        return z  # every residual at rounding level: the objective is 0, its lower bound
    B = np.argsort(np.abs(r))[:s]
    pivots, limit = 0, 10 * s
    while pivots <= limit:
        try:
            inverse = np.linalg.inv(A[B])
        except LinAlgError:
            return None
        z = inverse @ y[B]
        for _ in range(50):  # pivots on the updated inverse, then a fresh one
            r = A @ z - y
            r[B] = 0.0
            nu = -inverse.T @ (A.T @ np.sign(r))
            k = int(np.argmax(np.abs(nu)))
            if abs(nu[k]) <= 1 + 1e-9:
                break
            d = inverse[:, k]  # the edge: A_B d = e_k, call B[k]'s residual grows by t
            g = A @ d
            g[B] = 0.0
            g[B[k]] = 1.0
            on_edge = np.flatnonzero(g)
            t = -r[on_edge] / g[on_edge]
            order = np.argsort(t)
            weight = np.cumsum(np.abs(g[on_edge])[order])
            median = order[np.searchsorted(weight, weight[-1] / 2)]  # the best step along the edge
            enter = on_edge[median]
            if enter == B[k]:
                return None
            z = z + t[median] * d
            row = A[enter] @ inverse
            row[k] -= 1.0
            inverse -= np.outer(d, row) / (A[enter] @ d)
            B[k] = enter
            pivots += 1
        else:
            continue
        try:
            lu = lu_factor(A[B])
        except (LinAlgError, ValueError):
            return None
        z = lu_solve(lu, y[B])
        r = A @ z - y
        r[B] = 0.0
        certified = np.abs(lu_solve(lu, -(A.T @ np.sign(r)), trans=1)).max() <= 1 + 1e-9
        return z if certified else None
    return None


def _fit_l1_rows(A, Y, iterations=2000, check_every=25, gap=GAP, design=None, tick=None):
    """Robust fits of the columns of Y that share the design A (N x s) by ADMM, all at once: (Z, keep).

    ADMM on min ‖A z - y‖₁ (split r = A z - y; the z-step is the projection A M onto A's range,
    M = (AᵀA)⁻¹Aᵀ from the design's one Cholesky factorisation; the r-step is a soft threshold), on the
    clipped calls of _normalised, the penalty rebalanced as it runs. Every `check_every` iterations each
    row's duality gap is measured: its multiplier, projected onto null(Aᵀ) and scaled into |ν| <= 1, is a
    feasible point of the dual max -bᵀν, so -bᵀν bounds the clipped problem's optimum from below. A row
    whose objective is within a relative `gap` of that bound, with every fitted value well inside the clip,
    is solved: its outlier flags are read off the residuals, the least-squares refit on the calls kept must
    reproduce them (_refit) and be as good an L1 fit as the certified one. A row that does not get there
    falls back to the exact linear program (_fit_l1).
    """
    from scipy.linalg import cho_solve

    design, tick = design or _Design(A), tick or (lambda k: None)
    N, s, R = A.shape[0], A.shape[1], Y.shape[1]
    Z, keeps = np.zeros((s, R)), np.zeros((N, R), bool)
    solved = np.zeros(R, bool)
    chol = design.factor(np.ones(N, bool))
    if chol is None:  # a (near) rank-deficient design: the linear program for every row
        iterations = 0
        M = np.zeros((s, N))
    else:
        M = cho_solve(chol, A.T)
    centre, scale, clipped = _normalised(Y)
    fit, resid, dual = np.zeros_like(clipped), clipped.copy(), np.zeros_like(clipped)  # A z, r, scaled multiplier u
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
        within, objective = _within_gap(fit[:, open_rows], clipped[:, open_rows], nu, gap)
        closed = []
        for j, obj, ok in zip(open_rows, objective, within):
            if ok:
                z = M @ (fit[:, j] * scale[j] + centre[j])
                z, keep, settled = _refit(design, Y[:, [j]], _inliers(A, Y[:, [j]], z[:, None]))
                # the refit must be as good an L1 fit of the clipped calls as the certified one
                better = settled[0] and np.abs(A @ z[:, 0] - (clipped[:, j] * scale[j] + centre[j])).sum() \
                    <= (obj + gap * obj) * scale[j]
                if better:
                    Z[:, j], keeps[:, j], solved[j] = z[:, 0], keep[:, 0], True
                    tick(1)
                closed.append(j)  # solved, or left to the linear program
        open_rows = np.setdiff1d(open_rows, closed)
        if not len(open_rows):
            break
    left = np.flatnonzero(~solved)
    for k, j in enumerate(left):
        with stage(f"HiGHS linear program, row {k + 1} of {len(left)} that ADMM did not certify"):
            Z[:, j], keeps[:, j] = _fit_l1(A, Y[:, j])  # _fit_robust tried the vertex first
        tick(1)
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
    with stage("creating the onnxruntime session"):
        f = black_box(proto, x, dtype)
    x0 = x0.astype(dtype)
    with stage(f"the {pattern} pattern and its colouring"):
        P, colours, K = _structure(proto, x0, pattern, x)
    min_calls = K + 1
    budget = _checked_budget(budget, K, robust)
    rng = np.random.default_rng(seed)
    step = _checked_step(step, x0)
    G, Y, finite = _probe(f, x0, rng.standard_normal((budget, K)), colours, step, corrupt, progress, min_calls)
    m = Y.shape[1]
    if P is None:
        P = sp.csr_matrix(np.ones((m, K), bool))
    if P.shape[0] != m:
        raise JacgraphError(f"the model returned {m} output values but its pattern has {P.shape[0]} rows; the "
                            "declared output shapes do not match what onnxruntime computes. Use --pattern dense.")
    res = _recover(P, colours, G, Y, step, robust, pattern, len(Y), K, min_calls, progress)
    res.calls, res.nonfinite_calls = budget, budget - len(finite)
    res.corrupted_calls = finite[res.corrupted_calls]  # numbered among all the calls made
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
    """Call the black box at x0 + step·G[p] (spread over the colours); (G, Y, the calls' numbers) over the
    calls that returned finite values."""
    from tqdm import tqdm

    Y = []
    for p in tqdm(range(len(G)), desc="jacgraph sense: forward calls", unit="call", file=sys.stderr, leave=False,
                  disable=None if progress is None else not progress):
        d = G[p][colours]
        with stage(f"forward call {p + 1} of {len(G)}"):
            y = f(x0 + (step * d).reshape(x0.shape).astype(x0.dtype))
        if corrupt is not None:
            y = np.asarray(corrupt(p, y), np.float64)
        Y.append(y)
    Y = np.stack(Y)
    finite = np.all(np.isfinite(Y), axis=1)  # a call that returned NaN/inf says nothing: leave it out
    if finite.sum() < min_calls:
        raise JacgraphError(f"only {int(finite.sum())} of {len(G)} calls returned finite values, fewer than the "
                            f"{min_calls} needed. Check the model at x0, or raise --budget.")
    return G[finite], Y[finite], np.flatnonzero(finite)


def _recover(P, colours, G, Y, step, robust, pattern, budget, K, min_calls, progress=False) -> Sensed:
    """Per-row regression. Rows with the same colour sequence share their design matrix [G[:, colours], 1],
    so each such group is solved at once (least squares, or _fit_robust)."""
    P = sp.csr_matrix(P)
    m, n = P.shape
    groups = {}
    for i in range(m):
        key = colours[P.indices[P.indptr[i]:P.indptr[i + 1]]].tobytes()
        groups.setdefault(key, []).append(i)
    values = np.zeros(P.nnz)
    variance, flagged, fallback = 0.0, np.zeros(budget), 0
    from tqdm import tqdm

    bar = tqdm(total=m, desc="jacgraph sense: robust fits", unit="row", file=sys.stderr, leave=False,
               disable=True if not robust else (None if progress is None else not progress))
    done = 0
    for rows in groups.values():
        cols = colours[P.indices[P.indptr[rows[0]]:P.indptr[rows[0] + 1]]]
        with stage(f"{'robust' if robust else 'least-squares'} fits: {done} of {m} rows done"):
            design = _Design(np.hstack([G[:, cols], np.ones((budget, 1))]))
            A = design.A
            if robust:
                Z, keeps, failed = _fit_robust(design, Y[:, rows], tick=bar.update)
                fallback += failed
            else:
                Z = np.linalg.lstsq(A, Y[:, rows], rcond=None)[0]
                keeps = np.ones((budget, len(rows)), bool)
        done += len(rows)
        for i, z, keep in zip(rows, Z.T, keeps.T):
            values[P.indptr[i]:P.indptr[i + 1]] = z[:-1] / step
            flagged += ~keep
            dof = int(keep.sum()) - A.shape[1]
            if dof <= 0 or variance is None:
                variance = None
                continue
            r = (A @ z - Y[:, i])[keep]
            variance += float(r @ r) / dof * design.slope_trace(keep) / step ** 2
    bar.close()
    J = sp.csr_matrix((values, P.indices.copy(), P.indptr.copy()), shape=(m, n))
    norm = float(np.linalg.norm(values))
    estimate = None if variance is None else float(np.sqrt(variance) / max(norm, 1e-300))
    corrupted = np.flatnonzero(flagged >= m / 2)
    return Sensed(J if pattern == "structural" else J.toarray(), budget, K, min_calls, pattern, robust, step,
                  estimate, len(corrupted), corrupted_calls=corrupted, fallback_rows=fallback)
