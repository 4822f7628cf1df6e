"""LipSDP-Neuron (Fazlyab, Robey, Hassani, Morari & Pappas, NeurIPS 2019): a global l2 Lipschitz bound
of a small feed-forward network by semidefinite programming.

For f(x) = W_l phi_l(W_{l-1} ... phi_1(W_0 x + b_0) ...) + b_l, every hidden unit j slope-restricted
in [a_j, b_j] ((phi(u) - phi(v)) / (u - v) in [a_j, b_j]), and any diagonal T = diag(t) >= 0: if
M(rho, t) <= 0 (negative semidefinite) then ||f(x) - f(y)||_2 <= sqrt(rho) ||x - y||_2. M is block
tridiagonal over z = (x_0, x_1, ..., x_l), x_k the output of hidden layer k (n_0 + hidden units rows):
  block (k-1, k-1) += -2 W_{k-1}^T diag(a_k b_k t_k) W_{k-1}
  block (k-1, k)     =  W_{k-1}^T diag((a_k + b_k) t_k)          (and its transpose)
  block (k, k)      += -2 diag(t_k)
  block (0, 0)      += -rho I,      block (l, l) += W_l^T W_l
(the sum over units of t_j times the slope condition (dw - a dv)(dw - b dv) <= 0, an S-procedure).
Minimising rho over (rho, t) is an SDP with N rows but only 1 + (hidden units) variables, each entering
through a matrix of rank <= 2. It is solved by a log-det barrier method over those variables (`barrier`,
numpy only: a Newton step costs O(N r^2), r = n_0 + 2 x hidden units); cvxpy with Clarabel, then SCS, are the
fallbacks when it fails or its t fails the check below (they need `pip install cvxpy clarabel`).

Scaling: multiplying W_{k-1} by 2^f and dividing the slope box of layer k by 2^f leaves M unchanged,
and scaling any W_k by c scales the optimal sqrt(rho) by c; both are exact for powers of two, so the
SDP is solved for weights and slopes normalised to about 1 and the bound is scaled back exactly.

Guarantee: the solver returns an approximately feasible point, so its sqrt(rho) (`value`) is an
estimate. The printed bound is verified: the solver's t (clipped to >= 0) is kept, rho' is computed
from the Schur complement (with M(rho') <= -mu I as the target), and M(rho') is checked in float64 with
numpy's eigvalsh: its largest eigenvalue must be below -margin, margin = 16 N eps (||M||_F + ||M_abs||_F)
covering the rounding of forming M (M_abs: the same sums of absolute values) and of the eigenvalue
solver (backward stable). Then sqrt(rho') is a guaranteed bound. If no rho' passes, only the estimate
is reported. The SDP is solved with M <= -delta I (delta = 1e-7 in normalised units, 1e-5 for SCS) so
that the solver's t has room to pass the check.

Size: the limits below were set for Clarabel, whose interior-point step over an N x N cone (after chordal
decomposition, one cone per pair of consecutive blocks) costs about the fourth to sixth power of its size.
Models with more than ROW_LIMIT rows (n_0 + hidden units) or a pair n_{k-1} + n_k above PAIR_LIMIT are refused
(measured with Clarabel on one CPU core: a 64-16x9 MLP, 208 rows and pairs <= 80, ~7 s; the same with width 32,
352 rows, 100 s and 2 GB). The input block counts as min(n_0, n_1) rows: a wide first layer is first reduced to
its row space (reduce_input), so LipSDP's own 784-50-10 MNIST net is a 100-row SDP: Clarabel 70 s, the
barrier method 1.4-2.8 s on the shared 2-core VM (docs/benchmarks/bounds.md).
"""
from __future__ import annotations

import importlib.util
import math
import time
import warnings

import numpy as np

from jacgraph.errors import JacgraphError
from jacgraph.spectral import one_blas_thread

ROW_LIMIT = 256      # rows of the LMI (inputs + hidden units) we hand to the SDP solver
PAIR_LIMIT = 128     # rows of one consecutive pair of blocks n_{k-1} + n_k (one PSD cone after decomposition)
AUTO_PAIR_LIMIT = 96  # the same under --method all, which should not start a multi-minute SDP unasked
# the SDP asks for M <= -delta I (normalised units): room for the solver's residual to pass the float64 check
# (SCS, first order, leaves residuals ~1e-4 relative: with 1e-7 its T failed the check on the digits MLP)
DELTA = {"BARRIER": 1e-7, "CLARABEL": 1e-7, "SCS": 1e-5}
# our barrier method first (seconds); cvxpy's Clarabel, then SCS, when it fails or its T fails the check
SOLVERS = ["BARRIER", "CLARABEL", "SCS"]
TAU_STEP = 10  # the barrier method's central-path parameter grows by this factor per round
T_CAP = 1e6  # the barrier method's upper limit on each multiplier t_j (normalised units; the 784-50-10 net's largest is 2.4)
EPS = np.finfo(np.float64).eps


def too_big(sizes, pair_limit=PAIR_LIMIT) -> str | None:
    """Why the SDP is too large (None when it fits); sizes = [n_0, n_1, ..., n_l], the input and hidden widths
    (the input block counts as at most n_1 rows: reduce_input restricts it to W_0's row space)."""
    if len(sizes) == 1:  # no hidden layer: no SDP, the layer's norm
        return None
    sizes = [min(sizes[0], sizes[1])] + list(sizes[1:])
    pair = max(a + b for a, b in zip(sizes, sizes[1:]))
    if sum(sizes) > ROW_LIMIT or pair > pair_limit:
        return (f"the LipSDP matrix would have {sum(sizes)} rows (inputs + hidden units; limit {ROW_LIMIT}) and its "
                f"largest pair of consecutive layers {pair} units (limit {pair_limit})")
    return None


def reduce_input(mats):
    """(mats', factor, rest) for a first layer wider than it is tall (n_0 > n_1): W_0 = U S V^T, A = W_0 V
    [n_1, n_1]. f(x) = F(W_0 x + b_0) and g(u) = F(A u + b_0) satisfy J_f = J_F W_0 = J_g V^T + J_F E with
    E = W_0 - A V^T (float64 round-off only), so Lip(f) <= Lip(g) * factor + Lip(F) * rest with
    factor >= ||V|| = sqrt(||V^T V||) and rest >= ||E||; the LMI shrinks from n_0 + ... to n_1 + ... rows,
    exactly (in real arithmetic, on W_0's null space the LMI is -rho I and uncoupled). None: no reduction."""
    W0 = np.asarray(mats[0], np.float64)
    if W0.shape[1] <= W0.shape[0]:
        return None
    V = np.linalg.svd(W0, full_matrices=False)[2].T  # [n_0, n_1], orthonormal columns
    A = W0 @ V
    gram_err = np.linalg.norm(V.T @ V - np.eye(V.shape[1])) + 16 * V.size * EPS
    rest = 2 * np.linalg.norm(W0 - A @ V.T) + 16 * W0.shape[1] * EPS * np.linalg.norm(W0)
    return [A] + list(mats[1:]), math.sqrt(1 + gram_err) * (1 + 4 * EPS), rest


def widths(mats) -> list:
    """[n_0, n_1, ..., n_l]: the input width and every hidden width (the LMI's blocks)."""
    return [mats[0].shape[1]] + [W.shape[0] for W in mats[:-1]]


def normalise(mats, boxes):
    """(mats', boxes', e) with 2^e * LipSDP(mats', boxes') = LipSDP(mats, boxes): slopes and norms near 1,
    by powers of two only (exact in float64)."""
    mats, boxes, e = [np.asarray(W, np.float64) for W in mats], [tuple(map(float, b)) for b in boxes], 0
    for k in range(len(mats) - 1):  # move the slope scale of hidden layer k+1 into W_k
        f = _exponent(max(abs(boxes[k][0]), abs(boxes[k][1])))
        mats[k] = np.ldexp(mats[k], f)
        boxes[k] = (math.ldexp(boxes[k][0], -f), math.ldexp(boxes[k][1], -f))
    for k, W in enumerate(mats):
        g = _exponent(np.linalg.norm(W, 2))
        mats[k] = np.ldexp(W, -g)
        e += g
    return mats, boxes, e


def _exponent(x) -> int:
    return int(round(math.log2(x))) if x > 0 else 0


def lmi(mats, boxes, rho, t, absolute=False) -> np.ndarray:
    """M(rho, t) in float64 (absolute=True: the same sums with |terms|, for the rounding allowance)."""
    sizes = widths(mats)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    M = np.zeros((offsets[-1], offsets[-1]))
    f = np.abs if absolute else (lambda a: a)
    M[:sizes[0], :sizes[0]] -= f(rho) * np.eye(sizes[0])
    start = 0
    for k in range(1, len(mats)):
        W, (a, b), tk = f(mats[k - 1]), boxes[k - 1], t[start:start + sizes[k]]
        start += sizes[k]
        p, q = slice(offsets[k - 1], offsets[k]), slice(offsets[k], offsets[k + 1])
        M[p, p] -= 2 * W.T @ (f(a * b * tk)[:, None] * W)
        M[p, q] += W.T * f((a + b) * tk)[None, :]
        M[q, p] += W * f((a + b) * tk)[:, None]
        M[q, q] -= 2 * np.diag(f(tk))
    last = slice(offsets[-2], offsets[-1])
    M[last, last] += mats[-1].T @ mats[-1] if not absolute else np.abs(mats[-1]).T @ np.abs(mats[-1])
    return M


def _problem(mats, boxes, delta):
    """The SDP: minimise rho subject to M(rho, t) <= -delta I, t >= 0, as a cvxpy Problem."""
    import cvxpy as cp
    import scipy.sparse as sp

    n_hidden = sum(W.shape[0] for W in mats[:-1])
    N = sum(widths(mats))
    # M is affine in v = (rho, t): vec(M) = vec(M(0, 0)) + G v, column j = vec(M(e_j) - M(0))
    base = lmi(mats, boxes, 0.0, np.zeros(n_hidden))
    cols = [sp.csc_matrix((lmi(mats, boxes, 1.0, np.zeros(n_hidden)) - base).reshape(-1, 1, order="F"))]
    for j in range(n_hidden):
        e = np.zeros(n_hidden)
        e[j] = 1.0
        cols.append(sp.csc_matrix((lmi(mats, boxes, 0.0, e) - base).reshape(-1, 1, order="F")))
    G = sp.hstack(cols).tocsc()
    v = cp.Variable(1 + n_hidden, nonneg=True)
    M = cp.reshape(G @ v, (N, N), order="F") + base
    problem = cp.Problem(cp.Minimize(v[0]), [M << -delta * np.eye(N)])
    return problem, v


def solve(mats, boxes, solver, delta=None):
    """(rho, t, status) of the SDP with one solver (BARRIER, CLARABEL or SCS); None if it finds no solution."""
    if solver == "BARRIER":
        return barrier(mats, boxes, DELTA[solver] if delta is None else delta)
    import cvxpy as cp

    problem, v = _problem(mats, boxes, DELTA[solver] if delta is None else delta)
    try:
        with warnings.catch_warnings():  # "solution may be inaccurate": the float64 check decides
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver)
    except cp.error.SolverError:
        return None
    if problem.status not in ("optimal", "optimal_inaccurate") or v.value is None:
        return None
    return float(v.value[0]), np.asarray(v.value[1:], np.float64), problem.status


# ---- the SDP by a log-det barrier method over its few variables ----------------------------------------
#
# The LMI has N rows but only 1 + (hidden units) variables, and each variable's matrix is of rank <= 2:
# unit j of hidden layer k (row w_j of W_{k-1} in block k-1, e_j in block k) enters as
#   t_j [w_j e_j] [[-2 a b, a + b], [a + b, -2]] [w_j e_j]^T,
# rho as -rho I on the input block. With S(v) = -M(v) - delta I = S0 + U diag_i(v_i C_i) U^T, the barrier
# -log det S(v) has gradient -tr(C_i K_ii) and Hessian tr(C_i K_ij C_j K_ji) in K = U^T S^-1 U
# ([r, r], r = N_0 + 2 x hidden units): a Newton step costs O(N r^2), where an interior-point
# solver over the N x N cone factorises an N(N+1)/2-square matrix per step (Clarabel: 70 s on the 100-row
# reduced 784-50-10 net). Its accuracy does not matter for the guarantee: certify() checks the t it returns.

def _low_rank(mats, boxes, delta):
    """(S0, U [N, r], C [r, r] block diagonal, group [r]): S(v) = S0 + U (C * v[group]) U^T = -M(v) - delta I."""
    sizes = widths(mats)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    N = int(offsets[-1])
    S0 = -delta * np.eye(N)
    S0[offsets[-2]:, offsets[-2]:] -= mats[-1].T @ mats[-1]
    cols, blocks, group = [np.eye(N)[:, :sizes[0]]], [np.eye(sizes[0])], [0] * sizes[0]
    for k in range(1, len(mats)):
        W, (a, b) = mats[k - 1], boxes[k - 1]
        C = -np.array([[-2 * a * b, a + b], [a + b, -2.0]])  # dS/dt_j = -dM/dt_j
        for j in range(sizes[k]):
            u = np.zeros((N, 2))
            u[offsets[k - 1]:offsets[k], 0] = W[j]
            u[offsets[k] + j, 1] = 1.0
            cols.append(u)
            blocks.append(C)
            group += [len(blocks) - 1] * 2
    from scipy.linalg import block_diag

    return S0, np.hstack(cols), block_diag(*blocks), np.asarray(group)


def _newton_path(S0, U, C, group, cost, v, nonneg, done, tau=1.0, rtol=1e-9, max_steps=1000):
    """Minimise cost @ v subject to S(v) > 0 and 0 < v[nonneg] < T_CAP along the barrier path
    tau cost @ v - log det S(v) - sum log v[nonneg] (T_CAP - v[nonneg]), tau x 10 per round, from a strictly
    feasible v. The cap keeps the path finite where S grows without bound in t (a linear unit, slope box a = b).
    Stops when done(v) or the barrier's duality gap (N + nonneg)/tau is below rtol |cost @ v|;
    returns (v, steps, converged: not stopped by max_steps), None if a step breaks down."""
    m = len(v)
    UC = U @ C  # C is block diagonal over the groups: (U * x[group]) @ C = UC * x[group]
    onehot = np.zeros((len(group), m))
    onehot[np.arange(len(group)), group] = 1.0
    nu = U.shape[0] + 2 * int(nonneg.sum())

    def S_of(x):
        return S0 + (UC * x[group]) @ U.T

    def phi(x):
        if np.any(x[nonneg] <= 0) or np.any(x[nonneg] >= T_CAP):
            return np.inf
        try:
            L = np.linalg.cholesky(S_of(x))
        except np.linalg.LinAlgError:
            return np.inf
        return tau * cost @ x - 2 * np.log(np.diag(L)).sum() - np.log(x[nonneg] * (T_CAP - x[nonneg])).sum()

    steps = 0
    while steps < max_steps:
        for _ in range(50):  # Newton steps at this tau
            steps += 1
            L = np.linalg.cholesky(S_of(v))
            KC = np.linalg.solve(L, U).T @ np.linalg.solve(L, UC)  # U^T S^-1 U C
            inv = np.where(nonneg, 1 / np.where(nonneg, v, 1.0), 0.0)
            room = np.where(nonneg, 1 / np.where(nonneg, T_CAP - v, 1.0), 0.0)
            grad = tau * cost - np.bincount(group, np.diag(KC), minlength=m) - inv + room
            H = onehot.T @ (KC * KC.T) @ onehot + np.diag(inv ** 2 + room ** 2)
            try:
                dv = -np.linalg.solve(H, grad)
            except np.linalg.LinAlgError:
                return None
            decrement = -grad @ dv
            # damped Newton (the barrier is self-concordant): a step of 1/(1 + lambda) stays inside the feasible
            # set, so no step runs off along a direction in which the barrier is unbounded
            f0, step = phi(v), 1.0 if decrement < 1 / 16 else 1 / (1 + math.sqrt(decrement))
            while phi(v + step * dv) > f0 - 0.25 * step * decrement and step > 1e-12:
                step /= 2
            if step <= 1e-12:
                break
            v = v + step * dv
            if done(v):
                return v, steps, True
            if decrement < 1e-10:
                break
        if nu / tau < rtol * max(abs(cost @ v), 1e-300):
            return v, steps, True
        tau *= TAU_STEP
    return v, steps, False


def barrier(mats, boxes, delta):
    """(rho, t, status) of the SDP by _newton_path: phase 1 finds a strictly feasible (rho, t) (minimising s
    with S + s I > 0 until s < 0), phase 2 minimises rho. None if phase 1 finds no feasible point."""
    with one_blas_thread():  # its many small products: 60 s -> 1.7 s on the loaded 2-core VM
        return _barrier(mats, boxes, delta)


def _barrier(mats, boxes, delta):
    S0, U, C, group = _low_rank(mats, boxes, delta)
    N, m = U.shape[0], int(group.max()) + 1
    # phase 1: one more variable s with S(v) + s I; start at rho = t = 1
    v = np.ones(m)
    start = S0 + (U * v[group]) @ C @ U.T
    s0 = max(0.0, -float(np.linalg.eigvalsh(start)[0])) + 1.0
    from scipy.linalg import block_diag

    U1, C1, group1 = np.hstack([U, np.eye(N)]), block_diag(C, np.eye(N)), np.concatenate([group, np.full(N, m)])
    nonneg1 = np.r_[False, np.ones(m - 1, bool), False]
    found = _newton_path(S0, U1, C1, group1, np.eye(m + 1)[m], np.r_[v, s0], nonneg1, lambda x: x[m] < 0)
    if found is None or found[0][m] >= 0:
        return None
    v, steps1 = found[0][:m], found[1]
    found = _newton_path(S0, U, C, group, np.eye(m)[0], v, nonneg1[:m], lambda x: False)
    if found is None:
        return None
    v, steps2, converged = found
    status = "optimal" if converged else "step limit reached"
    return float(v[0]), np.asarray(v[1:], np.float64), f"{status} ({steps1} + {steps2} Newton steps)"


def margin(M, M_abs) -> float:
    """Allowance for float64 rounding of forming M and of its eigenvalues: 16 N eps (||M||_F + ||M_abs||_F)."""
    return 16 * M.shape[0] * EPS * (np.linalg.norm(M) + np.linalg.norm(M_abs))


def certify(mats, boxes, t, tries=8):
    """Smallest rho' found with lambda_max(M(rho', t)) < -margin in float64 (None if R, M's hidden block, is not
    negative enough): rho' = mu + lambda_max(P - Q (R + mu I)^{-1} Q^T), the Schur complement of M + mu I."""
    t = np.maximum(np.asarray(t, np.float64), 0.0)
    n0 = mats[0].shape[1]
    M0 = lmi(mats, boxes, 0.0, t)
    P, Q, R = M0[:n0, :n0], M0[:n0, n0:], M0[n0:, n0:]
    mu = 2 * margin(M0, lmi(mats, boxes, 0.0, t, absolute=True))
    for _ in range(tries):  # mu from 2 margins up to ~5e8 margins when the check keeps failing
        try:
            C = np.linalg.cholesky(-(R + mu * np.eye(R.shape[0])))
        except np.linalg.LinAlgError:
            return None
        K = np.linalg.solve(C, Q.T)  # Q (R + mu I)^{-1} Q^T = -K^T K
        rho = max(mu + float(np.linalg.eigvalsh(P + K.T @ K)[-1]), 0.0) * (1 + 4 * EPS)
        M = lmi(mats, boxes, rho, t)
        if float(np.linalg.eigvalsh(M)[-1]) < -margin(M, lmi(mats, boxes, rho, t, absolute=True)):
            return rho
        mu *= 16
    return None


def lipsdp(mats, boxes, last_slope=1.0, solver=None, reduce=True) -> dict:
    """LipSDP-Neuron over dense layer matrices; boxes[k] is the slope range of the activation after layer k.

    value: sqrt(rho) of the solver (an estimate); bound: sqrt(rho') verified in float64 (None if the check
    fails), both times 2^e (normalisation) and the last activation's slope."""
    t0 = time.perf_counter()
    reduced = reduce_input(mats) if reduce and len(mats) > 1 else None
    if reduced is not None:  # LipSDP on g(u) = F(A u + b_0), then back to f (see reduce_input)
        from jacgraph.spectral import gram_bound

        result = lipsdp(reduced[0], boxes, last_slope, solver)
        lip_F = last_slope * math.prod(gram_bound(W) * max(abs(a), abs(b)) for W, (a, b) in zip(mats[1:], boxes))
        for key in ("value", "bound"):
            if result[key] is not None:
                result[key] = (result[key] * reduced[1] + lip_F * reduced[2]) * (1 + 4 * EPS)
        result.update(rows=sum(widths(reduced[0])), input_reduced_from=mats[0].shape[1],
                      seconds=time.perf_counter() - t0)
        return result
    reason = too_big(widths(mats))
    if reason:
        raise JacgraphError(f"{reason}: too large for the semidefinite program. Use --method seqlip or "
                            "--method autolip for this model.")
    scale = last_slope * (1 + 8 * EPS)  # the rounding of sqrt and of the products below
    if len(mats) == 1:  # no hidden layer: the norm itself, certified by Gram iteration
        from jacgraph.spectral import gram_bound

        b = float(gram_bound(mats[0]) * scale)
        return {"value": b, "bound": b, "guaranteed": True, "solver": None, "status": "linear",
                "rows": sum(widths(mats)), "seconds": time.perf_counter() - t0}
    m, bx, e = normalise(mats, boxes)
    if any(not np.any(W) for W in m):  # a zero layer: the network is constant
        return {"value": 0.0, "bound": 0.0, "guaranteed": True, "solver": None, "status": "zero layer",
                "rows": sum(widths(mats)), "seconds": time.perf_counter() - t0}
    found, tried = None, []
    for name in ([solver] if solver else SOLVERS):  # the next solver only when one fails or is not verified
        if name != "BARRIER" and importlib.util.find_spec("cvxpy") is None:
            tried.append(f"{name}: not installed (pip install cvxpy clarabel)")
            continue
        result = solve(m, bx, name)
        tried.append(f"{name}: {'no solution' if result is None else result[2]}")
        if result is None:
            continue
        t1 = time.perf_counter()
        found = (name, *result, certify(m, bx, result[1]))
        if found[-1] is not None:
            break
    if found is None:
        raise JacgraphError(f"the LipSDP semidefinite program was not solved ({'; '.join(tried)}); "
                            "use --method seqlip or --method autolip.")
    name, rho, _, status, verified = found
    value = float(math.ldexp(math.sqrt(max(rho, 0.0)), e) * scale)
    bound = None if verified is None else float(math.ldexp(math.sqrt(verified), e) * scale)
    return {"value": value, "bound": bound, "guaranteed": bound is not None, "solver": name, "status": status,
            "rows": sum(widths(mats)), "solve_seconds": t1 - t0, "check_seconds": time.perf_counter() - t1,
            "seconds": time.perf_counter() - t0}
