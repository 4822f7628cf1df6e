"""RecurJac: sound elementwise bounds on a network's Jacobian over an input ball, as one ONNX graph.

    model = build("mlp.onnx", norm="inf")            # inputs (x0 [batch, ...], eps [batch]) ->
    J_lower, J_upper = run(model, {"x0": x0, "eps": eps})   # [batch, outputs, inputs] each

For every x with ||x - x0[b]||_p <= eps[b] (p = inf or 2), J_lower[b] <= dy/dx (x) <= J_upper[b]
elementwise, with y and x flattened in C order (per sample, the batch axis dropped). Kinks included:
an interval touching a ReLU kink allows both slopes. `eps` has shape [batch] (one radius per point).

The model is lowered to stages z_s = W_s h_{s-1} + b_s, h_s = sigma_s(z_s) (jacgraph.layers; Conv
becomes its dense matrix). The graph then computes, in `dtype` (float64 by default):

1. Pre-activation bounds l_s <= z_s <= u_s, CROWN-style: back-substitute the linear relaxations
   aL z + cL <= sigma(z) <= aU z + cU (rules/bounds.py RELAX) from layer s to the input and bound the
   resulting linear function over the ball with the dual norm; intersected with interval bounds.
2. Derivative intervals sigma_s'(z_s) in [dl_s, du_s] (rules/bounds.py DERIV).
3. The RecurJac backward recursion (Zhang, Zhang & Hsieh, AAAI 2019) for G_s = dy/dh_s, from
   G_last = I down to the input: G_{s-1} = (G_s * sigma_s') W_s. Each entry's bound is back-substituted
   through all the layers above, treating the product g * d of a Jacobian entry and a derivative as
   linear in g (rules/bounds.py bilinear): exact where the unit is stable or the sign of g is known
   (the layer merges into the next one), a chord only where neither is known (widening there).
   The result is intersected with the plain interval step. `method="interval"` stops at that step:
   the interval chain of Fast-Lip, same pre-activation bounds.

Cost: back-substituted coefficients are kept factored as a matrix shared by every output row and by
upper and lower bound (stable units merge into it), plus one low-rank term per layer over the
units selected as unstable (TopK of a mask, so the graph keeps static ranks and handles a batch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from jacgraph.cli import atomic_output
from jacgraph.errors import JacgraphError
from jacgraph.layers import lower
from jacgraph.model import SourceModel
from jacgraph.rules.bounds import DERIV, RANGE, RELAX, BoundBuilder, Relaxation, bilinear, dual_norm, interval_mul

NORMS = ("inf", "2")
METHODS = ("recurjac", "interval")


# ---- factored back-substitution ----------------------------------------------------------------

@dataclass
class Coef:
    """Coefficients Lambda[b, i, slot, row, unit] of linear bounds over the current layer's units.

    Lambda = S^T (shared by every output row i and both slots, slot 0 = upper, 1 = lower bound)
             + sum_t X_t @ Y_t^T, plus the constants C[b, i, slot, row].
    S is [unit, row] or [b, unit, row]; X_t is [b, i, slot, row, k]; Y_t is [b, unit, k], or a
    one-hot selection given by indices [b, k] (a term not yet pushed through a linear map).
    """
    S: str
    batched: bool
    terms: list = field(default_factory=list)  # (X, Y or None, idx or None)
    C: str | None = None


class Backsub:
    def __init__(self, b: BoundBuilder):
        self.b = b

    def _add(self, x, y):
        return y if x is None else self.b.Add(x, y)

    def apply(self, coef: Coef, v):
        """<Lambda, v> over units for v [b or 1, i or 1, unit]: [b, i, slot, row] (plus C)."""
        b = self.b
        out = b.Unsqueeze(b.MatMul(v, coef.S), b.ints([2]))  # [b, i, 1, row]
        for X, Y, idx in coef.terms:
            if Y is None:
                full = b.Expand(v, b.Concat(b.shape(X, 0, 2), b.shape(v, 2, 3), axis=0))
                w = b.GatherElements(full, b.Expand(b.Unsqueeze(idx, b.ints([1])), b.Concat(
                    b.shape(X, 0, 2), b.shape(idx, 1, 2), axis=0)), axis=2)
            else:
                w = b.MatMul(v, Y)  # [b, i, k]
            out = b.Add(out, b.Squeeze(b.MatMul(X, b.Unsqueeze(w, b.ints([2, 4]))), b.ints([4])))
        out = b.Add(out, b.c(np.zeros((1, 1, 2, 1))))  # both slots present even with no term yet
        return out if coef.C is None else b.Add(out, coef.C)

    def full(self, coef: Coef):
        """Lambda as a dense [b, i, slot, row, unit] tensor (i and slot may be broadcast axes)."""
        b = self.b
        St = b.Transpose(coef.S, perm=[0, 2, 1] if coef.batched else [1, 0])
        out = b.Unsqueeze(St, b.ints([1, 2] if coef.batched else [0, 1, 2]))
        for X, Y, idx in coef.terms:
            assert Y is not None, "a one-hot term is pushed through a linear map before the input"
            out = b.Add(out, b.MatMul(X, b.Unsqueeze(b.Transpose(Y, perm=[0, 2, 1]), b.ints([1, 2]))))
        return out

    def linear(self, coef: Coef, Mc, bias=None):
        """Substitute units = M @ next_units + bias (M, bias: tensor names; bias [1, 1, unit]):
        S <- M S, Y_t <- M Y_t, C += <Lambda, bias>."""
        b = self.b
        C = coef.C if bias is None else self.apply(coef, bias)
        terms = []
        for X, Y, idx in coef.terms:
            if Y is None:  # one-hot columns idx: M's columns, no multiply
                Y = b.Transpose(b.Gather(Mc, idx, axis=1), perm=[1, 0, 2])
            else:
                Y = b.MatMul(Mc, Y)
            terms.append((X, Y, None))
        return Coef(b.MatMul(Mc, coef.S), coef.batched, terms, C)

    def relax(self, coef: Coef, r: Relaxation):
        """Replace each unit's value by its relaxation lines (aU, cU, aL, cL of shape [b, i, unit]):
        upper slot: Lambda+ (aU, cU) + Lambda- (aL, cL); lower slot the other way round.

        Unselected units have one line shared by every row: S and Y_t are scaled by it. Selected units
        (at most k per point, k = the batch's largest count, from TopK) get a new low-rank term."""
        b = self.b
        zero = b.c(0.0)
        selF = b.reduce("ReduceMax", b.Cast(r.sel, to=helper.np_dtype_to_tensor_dtype(b.dtype)), [1], keepdims=0)
        sel = b.Cast(selF, to=onnx.TensorProto.BOOL)  # [b, unit]
        first = lambda t: b.Gather(t, b.const(np.array(0, np.int64)), axis=1)  # noqa: E731  row 0 of [b, i, unit]
        d0 = b.where(sel, zero, first(r.aU))
        c0 = b.where(sel, zero, first(r.cU))
        C = self._add(coef.C, self.apply(Coef(coef.S, coef.batched, coef.terms), b.Unsqueeze(c0, b.ints([1]))))
        # the selected units, padded with unselected ones (whose lines are zeroed below) to a common k
        count = b.reduce("ReduceMax", b.reduce("ReduceSum", selF, [1], keepdims=0), None, keepdims=0)
        k = b.Reshape(b.Cast(b.max(count, b.c(1.0)), to=onnx.TensorProto.INT64), b.ints([1]))
        _, idx = b.op("TopK", selF, k, axis=1, n_out=2)  # [b, k]
        idx3 = b.Unsqueeze(idx, b.ints([2]))
        if coef.batched:
            cols = b.GatherND(coef.S, idx3, batch_dims=1)  # [b, k, row]
        else:
            cols = b.Gather(coef.S, idx, axis=0)
        lam = b.Unsqueeze(b.Transpose(cols, perm=[0, 2, 1]), b.ints([1, 2]))  # [b, 1, 1, row, k]
        for X, Y, _ in coef.terms:
            assert Y is not None, "two relaxations in a row: a linear map goes between them"
            Yk = b.GatherND(Y, idx3, batch_dims=1)  # [b, k, k_t]
            lam = b.Add(lam, b.MatMul(X, b.Unsqueeze(b.Transpose(Yk, perm=[0, 2, 1]), b.ints([1, 2]))))
        full_shape = b.shape(b.Add(b.Add(r.aU, r.aL), b.Add(r.cU, r.cL)))  # [b, i, unit]
        index = b.Expand(b.Unsqueeze(idx, b.ints([1])), b.Concat(b.Slice(full_shape, b.ints([0]), b.ints([2])),
                                                                 b.shape(idx, 1, 2), axis=0))  # [b, i, k]
        keep = b.Unsqueeze(sel, b.ints([1]))

        def gathered(t):  # [b, i, unit] -> the selected units [b, i, 1, 1, k]; padding contributes nothing
            g = b.GatherElements(b.where(keep, b.Expand(t, full_shape), zero), index, axis=2)
            return b.Unsqueeze(g, b.ints([2, 3]))

        aU, aL, cU, cL = (gathered(t) for t in (r.aU, r.aL, r.cU, r.cL))
        # Lambda+ a1 + Lambda- a2 = Lambda (a1 + a2)/2 + |Lambda| (a1 - a2)/2: one Abs, slots differ in sign only
        half = b.c(0.5)
        a_mid, c_mid = b.Mul(b.Add(aU, aL), half), b.Mul(b.Add(cU, cL), half)
        a_rad, c_rad = b.Mul(b.Sub(aU, aL), half), b.Mul(b.Sub(cU, cL), half)
        a_rad, c_rad = b.Concat(a_rad, b.Neg(a_rad), axis=2), b.Concat(c_rad, b.Neg(c_rad), axis=2)
        mag = b.Abs(lam)
        X = b.Add(b.Mul(lam, a_mid), b.Mul(mag, a_rad))  # [b, i, 2, row, k]
        col = lambda t: b.Transpose(t, perm=[0, 1, 2, 4, 3])  # noqa: E731  [.., 1, k] -> [.., k, 1]
        C = b.Add(C, b.Squeeze(b.Add(b.MatMul(lam, col(c_mid)), b.MatMul(mag, col(c_rad))), b.ints([4])))
        d = b.Unsqueeze(d0, b.ints([2]))  # [b, unit, 1]
        terms = [(Xt, b.Mul(Yt, d), None) for Xt, Yt, _ in coef.terms]
        return Coef(b.Mul(coef.S, d), True, terms + [(X, None, idx)], C)


# ---- the pass ----------------------------------------------------------------------------------

def _relax_rows(b, r: Relaxation, axes):
    """Give a per-unit relaxation [b, unit] the row axis i: [b, 1, unit]."""
    u = lambda t: b.Unsqueeze(t, b.ints(axes))  # noqa: E731
    return Relaxation(u(r.aU), u(r.cU), u(r.aL), u(r.cL), u(r.sel))


class _Weights:
    """Each stage's W and b stored once; transposes, |W| and W+- are nodes (onnxruntime folds them)."""

    def __init__(self, b, stages):
        self.b = b
        self.W = [b.c(np.asarray(s.matrix(), b.dtype), hint=f"W{i}") for i, s in enumerate(stages)]
        self.bias = [np.asarray(s.bias, b.dtype) for s in stages]
        self._cache = {}

    def __call__(self, kind, s):
        key = (kind, s)
        if key not in self._cache:
            b, W = self.b, self.W[s]
            self._cache[key] = {"W": lambda: W, "T": lambda: b.Transpose(W, perm=[1, 0]),
                                "absT": lambda: b.Transpose(b.Abs(W), perm=[1, 0]),
                                "pos": lambda: b.Relu(W), "neg": lambda: b.Min(W, b.c(0.0)),
                                "b": lambda: b.c(self.bias[s].reshape(1, 1, -1))}[kind]()
        return self._cache[key]


def build(model, norm="inf", input_shape=None, dtype=np.float64, method="recurjac",
          preactivation_bounds=False) -> onnx.ModelProto:
    """A graph (x0 [batch, *input], eps [batch]) -> (J_lower, J_upper) [batch, outputs, inputs].

    preactivation_bounds=True adds outputs z<s>_lower, z<s>_upper [batch, units] for every stage s
    that ends in an activation (the CROWN bounds the derivative intervals come from)."""
    norm = str(norm)
    if norm not in NORMS:
        raise JacgraphError(f"--norm {norm!r} is not supported; choose inf (an l_inf ball) or 2 (an l_2 ball).")
    if method not in METHODS:
        raise JacgraphError(f"--method {method!r} is not known; choose recurjac or interval.")
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    stages = lower(src, input_shape)
    b = BoundBuilder(src, dtype)
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    w = _Weights(b, stages)
    n0, m = stages[0].in_features, stages[-1].out_features
    b.add_input("x0", elem, ["batch", *stages[0].in_shape])
    b.add_input("eps", elem, ["batch"])
    x = b.Reshape("x0", b.ints([0, n0]))
    x3 = b.Unsqueeze(x, b.ints([1]))  # [b, 1, n0]
    eps = b.Reshape("eps", b.ints([-1, 1]))
    bs_ = Backsub(b)

    # 1. pre-activation bounds, CROWN-style back-substitution, intersected with interval bounds
    pre, rel = [], []
    for s, stage in enumerate(stages):
        if stage.activation is None and s == len(stages) - 1:
            break
        coef = Coef(w("T", s), False, C=b.Unsqueeze(w("b", s), b.ints([2])))
        for j in range(s - 1, -1, -1):
            coef = bs_.relax(coef, rel[j])
            coef = bs_.linear(coef, w("T", j), w("b", j))
        val = bs_.apply(coef, x3)  # [b, 1, 2, n_s]
        rad = b.Mul(b.Unsqueeze(eps, b.ints([1, 2])), dual_norm(b, bs_.full(coef), norm))
        hi = b.Squeeze(b.Slice(b.Add(val, rad), b.ints([0]), b.ints([1]), b.ints([2])), b.ints([1, 2]))
        lo = b.Squeeze(b.Slice(b.Sub(val, rad), b.ints([1]), b.ints([2]), b.ints([2])), b.ints([1, 2]))
        if s > 0:  # interval bound through the previous activation's range
            prev = stages[s - 1]
            r_lo, r_hi = RANGE[prev.activation](b, *pre[-1], prev.act_attrs)
            mid, half = b.Mul(b.Add(r_lo, r_hi), b.c(0.5)), b.Mul(b.Sub(r_hi, r_lo), b.c(0.5))
            centre = b.Add(b.MatMul(mid, w("T", s)), b.c(w.bias[s]))
            spread = b.MatMul(half, w("absT", s))
            lo, hi = b.max(lo, b.Sub(centre, spread)), b.min(hi, b.Add(centre, spread))
        pre.append((lo, hi))
        if stage.activation is not None:
            rel.append(_relax_rows(b, RELAX[stage.activation](b, lo, hi, stage.act_attrs), [1]))

    # 2. derivative intervals [b, 1, n_s]
    derivs = []
    for s, stage in enumerate(stages):
        if stage.activation is None:
            derivs.append(None)
        else:
            dl, du = DERIV[stage.activation](b, *pre[s], stage.act_attrs)
            derivs.append((b.Unsqueeze(dl, b.ints([1])), b.Unsqueeze(du, b.ints([1]))))

    # 3. G_s = dy/dh_s bounds, from G_last = I down to the input
    eye = b.c(np.eye(m).reshape(1, m, m))
    G = {len(stages) - 1: (eye, eye)}
    grel = {}
    for s in range(len(stages) - 1, -1, -1):
        L, U = G[s]
        if derivs[s] is None:
            P = (L, U)
        else:
            P = interval_mul(b, L, U, *derivs[s])
            grel[s] = bilinear(b, L, U, *derivs[s])
        Wp, Wn = w("pos", s), w("neg", s)
        lo = b.Add(b.MatMul(P[0], Wp), b.MatMul(P[1], Wn))
        hi = b.Add(b.MatMul(P[1], Wp), b.MatMul(P[0], Wn))
        if method == "recurjac":
            coef = Coef(w("W", s), False)
            for j in range(s, len(stages)):
                if j > s:
                    coef = bs_.linear(coef, w("W", j))
                if j in grel:
                    coef = bs_.relax(coef, grel[j])
            val = bs_.apply(coef, b.c(np.eye(m).reshape(1, m, m)))  # [b, i, 2, row]
            up = b.Squeeze(b.Slice(val, b.ints([0]), b.ints([1]), b.ints([2])), b.ints([2]))
            dn = b.Squeeze(b.Slice(val, b.ints([1]), b.ints([2]), b.ints([2])), b.ints([2]))
            lo, hi = b.max(lo, dn), b.min(hi, up)
        G[s - 1] = (lo, hi)

    shape = b.Concat(b.shape(x, 0, 1), b.ints([m, n0]), axis=0)
    lo, hi = (b.Expand(t, shape) for t in G[-1])  # an affine network's bounds carry no batch axis yet
    lo, hi = b.min(lo, hi), b.max(lo, hi)  # where both sides are exact they can cross by round-off
    b.nodes.append(helper.make_node("Identity", [lo], ["J_lower"]))
    b.nodes.append(helper.make_node("Identity", [hi], ["J_upper"]))
    b.add_output("J_lower", elem, ["batch", m, n0])
    b.add_output("J_upper", elem, ["batch", m, n0])
    if preactivation_bounds:
        for s, (lo_s, hi_s) in enumerate(pre):
            for name, t in ((f"z{s}_lower", lo_s), (f"z{s}_upper", hi_s)):
                b.nodes.append(helper.make_node("Identity", [t], [name]))
                b.add_output(name, elem, ["batch", stages[s].out_features])
    meta = {"jacgraph.emit": "recurjac", "jacgraph.norm": norm, "jacgraph.method": method,
            "jacgraph.input_shape": json.dumps(list(stages[0].in_shape)), "jacgraph.outputs": m}
    return b.build(f"recurjac_{method}", doc=__doc__.splitlines()[0], metadata=meta)


# ---- running it: local Lipschitz constants, `jacgraph bound` -----------------------------------

def lipschitz(J_lower, J_upper, norm="inf"):
    """From elementwise bounds [..., outputs, inputs]: (per-output bounds [..., outputs] on
    max ||grad y_i||_q over the ball, q the dual of p; a bound [...] on the induced p-norm of J).

    |J| <= M = max(|J_lower|, |J_upper|) entrywise, and both norms grow with |entries|:
    ||J_i||_q <= ||M_i||_q; ||J||_inf->inf = max_i ||J_i||_1 <= max_i ||M_i||_1; ||J||_2 <= || |J| ||_2 <= ||M||_2.
    """
    M = np.maximum(np.abs(J_lower), np.abs(J_upper))
    if str(norm) == "inf":
        per_output = M.sum(axis=-1)
        return per_output, per_output.max(axis=-1)
    return np.sqrt((M * M).sum(axis=-1)), np.linalg.norm(M, ord=2, axis=(-2, -1))


def _check_points(x0, eps, in_shape):
    x0 = np.asarray(x0, np.float64)
    if x0.shape == tuple(in_shape):
        x0 = x0[None]
    if x0.ndim != len(in_shape) + 1 or x0.shape[1:] != tuple(in_shape):
        raise JacgraphError(f"x0 has shape {x0.shape}, but the model takes inputs of shape {tuple(in_shape)} per "
                            f"sample. Give one point of shape {tuple(in_shape)} or a batch [N, {', '.join(map(str, in_shape))}].")
    if not np.all(np.isfinite(x0)):
        raise JacgraphError(f"x0 holds {int(np.sum(~np.isfinite(x0)))} NaN or infinite value(s); the ball around it "
                            "is undefined. Replace them with finite numbers.")
    eps = np.broadcast_to(np.asarray(eps, np.float64), (x0.shape[0],)) if np.ndim(eps) <= 1 else None
    if eps is None or not np.all(np.isfinite(eps)) or np.any(eps < 0):
        raise JacgraphError(f"eps must be a finite radius >= 0 (one, or one per point); got {eps!r}. "
                            "eps = 0 bounds the Jacobian at x0 itself.")
    return x0, eps.copy()


def bound(model, x0, eps, norm="inf", method="recurjac", input_shape=None, threads=None, progress=None,
          dtype=np.float64):
    """Bounds for points x0 ([N, ...] or one point) and radii eps (one or [N]), point by point.

    Returns {'J_lower', 'J_upper' [N, outputs, inputs], 'lipschitz' [N, outputs], 'induced' [N], 'eps' [N]}.
    """
    from tqdm import tqdm

    from jacgraph.runtime import session

    src = model if isinstance(model, SourceModel) else SourceModel(model)
    graph = build(src, norm=norm, input_shape=input_shape, dtype=dtype, method=method)
    in_shape = json.loads({p.key: p.value for p in graph.metadata_props}["jacgraph.input_shape"])
    x0, eps = _check_points(x0, eps, in_shape)
    sess = session(graph, threads=threads)
    lows, highs = [], []
    show = len(x0) > 1 if progress is None else progress
    for i in tqdm(range(len(x0)), desc="bounding", unit="point", disable=not show, file=sys.stderr):
        lo, hi = sess.run(None, {"x0": x0[i:i + 1].astype(dtype), "eps": eps[i:i + 1].astype(dtype)})
        lows.append(lo)
        highs.append(hi)
    lo, hi = np.concatenate(lows), np.concatenate(highs)
    per_output, induced = lipschitz(lo, hi, norm)
    return {"J_lower": lo, "J_upper": hi, "lipschitz": per_output, "induced": induced, "eps": eps}


def _save_npz_atomic(path, arrays):
    with atomic_output(path, ".npz", "--out") as tmp:
        np.savez(tmp, **arrays)


def _load_x0(path):
    if not os.path.isfile(path):
        raise JacgraphError(f"--x0 {path}: no such file. Save the point(s) with numpy.save('x.npy', x0).")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise JacgraphError(f"--x0 {path} is not a .npy array ({type(e).__name__}). Save it with numpy.save.") from None


def cmd_bound(args) -> int:
    from jacgraph.cli import parse_shape

    x0 = _load_x0(args.x0)
    if args.eps < 0 or not np.isfinite(args.eps):
        raise JacgraphError(f"--eps {args.eps} is not a radius; give a finite eps >= 0.")
    shape = parse_shape(args.input_shape) if args.input_shape else None
    r = bound(args.model, x0, args.eps, norm=args.norm, method=args.method, input_shape=shape, threads=args.threads)
    if args.out:
        _save_npz_atomic(args.out, {**r, "norm": np.array(args.norm), "method": np.array(args.method)})
    q = {"inf": "1", "2": "2"}[args.norm]
    if args.json:
        print(json.dumps({"norm": args.norm, "dual_norm": q, "method": args.method, "eps": r["eps"].tolist(),
                          "lipschitz": r["lipschitz"].tolist(), "induced": r["induced"].tolist(),
                          "mean_width": (r["J_upper"] - r["J_lower"]).mean(axis=(1, 2)).tolist()}, indent=2))
        return 0
    for n in range(len(r["eps"])):
        print(f"point {n}: l_{args.norm} ball of radius {r['eps'][n]:g}, {args.method} bounds, "
              f"mean width {np.mean(r['J_upper'][n] - r['J_lower'][n]):.4g}")
        for i, L in enumerate(r["lipschitz"][n]):
            print(f"  output {i}: local Lipschitz bound (max ||grad y_{i}||_{q}) {L:.6g}")
        print(f"  whole Jacobian: ||J||_{args.norm}->{args.norm} <= {r['induced'][n]:.6g}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_command(subparsers):
    p = subparsers.add_parser("bound", help="sound Jacobian bounds and local Lipschitz constants over an input ball")
    p.add_argument("model")
    p.add_argument("--x0", required=True, help=".npy file: one point (the model's per-sample shape) or a batch [N, ...]")
    p.add_argument("--eps", required=True, type=float, help="radius of the ball around each point (>= 0)")
    p.add_argument("--norm", choices=NORMS, default="inf", help="the ball's norm (default inf)")
    p.add_argument("--method", choices=METHODS, default="recurjac",
                   help="recurjac (default) or interval (the plain interval chain, for comparison)")
    p.add_argument("--input-shape", help="fixed input shape when the model's is symbolic, e.g. 1,3,32,32")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--out", help="write J_lower, J_upper, lipschitz, induced, eps to this .npz")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bound)
