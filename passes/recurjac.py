"""RecurJac: sound elementwise bounds on a network's Jacobian over an input ball, as one ONNX graph.

    model = build("mlp.onnx", norm="inf")            # inputs (x0 [batch, ...], eps [batch]) ->
    J_lower, J_upper = run(model, {"x0": x0, "eps": eps})   # [batch, outputs, inputs] each

For every x with ||x - x0[b]||_p <= eps[b] (p = inf or 2), J_lower[b] <= dy/dx (x) <= J_upper[b]
elementwise, with y and x flattened in C order (per sample, the batch axis dropped). Kinks included:
an interval touching a ReLU kink allows both slopes. `eps` has shape [batch] (one radius per point).

A chain model is lowered to stages z_s = W_s h_{s-1} + b_s, h_s = sigma_s(z_s) (jacgraph.layers; Conv
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

Models that are not a chain (residual joins, Concat/Split/Slice, pooling, MaxPool/ReduceMax) take the
graph lowering (jacgraph.layers.lower_graph, `_DagBounds` below): the same three steps over a DAG of
linear joins and nonlinear nodes, coefficients dense [.., rows, units] and summed over every consumer
at a fork; a max node is relaxed like an activation (lower line through the argmax of the lower
bounds, upper line exact only where one input dominates) with derivatives in {0}, {1} or [0, 1]; in
RecurJac's back-substitution each window's derivative is one-hot on a member that can win (_max_lines), so
an exact tie at eps 0 allows each tied member's derivative, not their sum.
Large operators stay structured there: a recognised convolution patch-wise (jacgraph.structured,
exact float64), anything else sparse (ELL gather-multiply-reduce). A back-substitution with more rows
than fit `memory_limit` at once runs in chunks of rows (an ONNX Loop): every CROWN step, and the
RecurJac step at the input; an inner node's RecurJac step that does not fit keeps the interval step
(sound, looser; listed in the metadata). CROWN runs only for the units that the interval step leaves
straddling a kink (chosen at run time; the others' relaxation is already exact), and a RecurJac step keeps
the coefficients that every output shares apart from low-rank terms over the units with an interval
derivative, when at run time that is less work (_DagBounds._jac_step). The factored step gives the dense
step's bounds (to round-off). CROWN over the undecided units gives the bounds of all rows on a chain; where
a later interval step reads a skipped unit's wider cheap bound (a residual join) they may be wider, never
unsound (examples/bounds_models resnet_cnn, one point at eps 0.3: mean width 0.082658 -> 0.083611).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import helper

from jacgraph.errors import JacgraphError
from jacgraph.layers import is_chain, lower
from jacgraph.model import SourceModel
from jacgraph.rules.bounds import DERIV, RANGE, RELAX, BoundBuilder, Relaxation, bilinear, dual_norm, interval_mul
from jacgraph.structured import KINDS, find_conv

NORMS = ("inf", "2")
METHODS = ("recurjac", "interval")
MEMORY_LIMIT = 2 << 30   # bytes one back-substitution may hold (per coefficient tensor, times TEMPORARIES)
TEMPORARIES = 6          # live tensors of a coefficient's size in one back-substitution step
PROTO_LIMIT = 1 << 30    # bytes of dense lowered weights an emitted graph may embed (protobuf caps at 2 GiB)
DENSE_OP_BYTES = 64 << 20  # a linear operator up to this size is a dense MatMul in the bound graph, else sparse (ELL)
CROWN_UNDECIDED_ONLY = True  # graph lowering: CROWN rows only for units the cheap bound leaves undecided (_undecided)
PIECEWISE_LINEAR = ("relu", "leaky_relu", "hardsigmoid", "clip")  # activations a unit strictly inside one piece decides
FACTORED_JACOBIAN = "auto"  # graph lowering's RecurJac steps: "auto" (run-time If on the work), "always", "never"
TIE_ULPS = 1024  # max node: members within this many ulps of the node's largest bound of the window's max may tie


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
          preactivation_bounds=False, lowering="auto", memory_limit=MEMORY_LIMIT, slope_inputs=False) -> onnx.ModelProto:
    """A graph (x0 [batch, *input], eps [batch]) -> (J_lower, J_upper) [batch, outputs, inputs].

    lowering: "chain" (stages, factored coefficients), "graph" (any DAG jacgraph.layers.lower_graph takes:
    residual joins, concat, pooling, max selections), or "auto" (chain where the model is one).
    preactivation_bounds=True adds outputs z<s>_lower, z<s>_upper [batch, units] for every stage s
    that ends in an activation (graph lowering: every linear node s), the CROWN bounds the derivative
    intervals come from. memory_limit (bytes, graph lowering): a back-substitution that would hold more
    is skipped and that node keeps its interval bounds (sound, looser; listed in the metadata).
    slope_inputs=True (graph lowering; "auto" takes it): the lower-line slopes of the ReLU/LeakyReLU nodes
    become inputs alpha_<k> [batch, units] (default NaN: CROWN's own choice) and outputs slope_<k> give the
    slopes used; every CROWN back-substitution that runs at once over all its rows (not in chunks) takes
    per-bounded-neuron, per-side slopes alpha_<t>_<k>_upper/_lower [batch, n_t, n_k] instead (alpha-CROWN
    proper); slope_inputs="unit": alpha_<k> everywhere. passes/alpha_crown.py optimises them."""
    norm = str(norm)
    if norm not in NORMS:
        raise JacgraphError(f"--norm {norm!r} is not supported; choose inf (an l_inf ball) or 2 (an l_2 ball).")
    if method not in METHODS:
        raise JacgraphError(f"--method {method!r} is not known; choose recurjac or interval.")
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    if lowering not in ("auto", "chain", "graph"):
        raise JacgraphError(f"lowering={lowering!r} is not known; choose auto, chain or graph.")
    if lowering == "chain" and slope_inputs:
        raise JacgraphError("slope inputs (alpha-CROWN) are built by the graph lowering; use lowering='graph' or 'auto'.")
    if lowering == "graph" or (lowering == "auto" and (slope_inputs or not is_chain(src))):
        return _build_graph(src, norm, input_shape, dtype, method, preactivation_bounds, memory_limit, slope_inputs)
    stages = lower(src, input_shape)
    dense = sum(8 * s.in_features * s.out_features for s in stages)
    if lowering == "auto" and dense > PROTO_LIMIT:  # too big for dense stages: sparse operators in the graph pass
        return _build_graph(src, norm, input_shape, dtype, method, preactivation_bounds, memory_limit)
    _check_dense_weights(dense)
    b = BoundBuilder(src, dtype)
    w = _Weights(b, stages)
    n0, m = stages[0].in_features, stages[-1].out_features
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    b.add_input("x0", elem, ["batch", *stages[0].in_shape])
    b.add_input("eps", elem, ["batch"])
    x = b.Reshape("x0", b.ints([0, n0]))
    x3 = b.Unsqueeze(x, b.ints([1]))  # [b, 1, n0]
    eps = b.Reshape("eps", b.ints([-1, 1]))
    pre = _chain_preactivation_bounds(b, w, stages, x3, eps, norm)
    derivs = _chain_derivative_intervals(b, stages, pre)
    G_input = _chain_jacobian(b, w, stages, derivs, method)
    boxes = {s: (*box, stages[s].out_features) for s, box in enumerate(pre)} if preactivation_bounds else {}
    _emit_outputs(b, x, G_input, m, n0, boxes)
    meta = {"jacgraph.emit": "recurjac", "jacgraph.norm": norm, "jacgraph.method": method,
            "jacgraph.input_shape": json.dumps(list(stages[0].in_shape)), "jacgraph.outputs": m}
    return b.build(f"recurjac_{method}", doc=__doc__.splitlines()[0], metadata=meta)


def _chain_preactivation_bounds(b, w, stages, x3, eps, norm):
    """Step 1: (l_s, u_s) [b, n_s] for every stage but an affine last one: CROWN back-substitution of the
    relaxations below stage s to the input, bounded over the ball, intersected with interval bounds."""
    bs_ = Backsub(b)
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
    return pre


def _chain_derivative_intervals(b, stages, pre):
    """Step 2: sigma_s'(z_s) in [dl_s, du_s] [b, 1, n_s] per stage (None for an affine stage)."""
    derivs = []
    for s, stage in enumerate(stages):
        if stage.activation is None:
            derivs.append(None)
        else:
            dl, du = DERIV[stage.activation](b, *pre[s], stage.act_attrs)
            derivs.append((b.Unsqueeze(dl, b.ints([1])), b.Unsqueeze(du, b.ints([1]))))
    return derivs


def _chain_jacobian(b, w, stages, derivs, method):
    """Step 3: bounds on G_s = dy/dh_s from G_last = I down to the input (RecurJac, or the interval chain);
    returns those on dy/dx [b or 1, m, n0]."""
    m = stages[-1].out_features
    bs_ = Backsub(b)
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
    return G[-1]


def _emit_outputs(b, x, G_input, m, n0, boxes):
    """Step 4: the outputs J_lower, J_upper [batch, m, n0] from the bounds G_input on dy/dx, and
    z<k>_lower, z<k>_upper [batch, n] for each k: (lo, hi, n) of `boxes` (the pre-activation bounds)."""
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    shape = b.Concat(b.shape(x, 0, 1), b.ints([m, n0]), axis=0)
    lo, hi = (b.Expand(t, shape) for t in G_input)  # an affine network's bounds carry no batch axis yet
    lo, hi = b.min(lo, hi), b.max(lo, hi)  # where both sides are exact they can cross by round-off
    b.nodes.append(helper.make_node("Identity", [lo], ["J_lower"]))
    b.nodes.append(helper.make_node("Identity", [hi], ["J_upper"]))
    b.add_output("J_lower", elem, ["batch", m, n0])
    b.add_output("J_upper", elem, ["batch", m, n0])
    for k, (lo_k, hi_k, n) in boxes.items():
        for name, t in ((f"z{k}_lower", lo_k), (f"z{k}_upper", hi_k)):
            b.nodes.append(helper.make_node("Identity", [t], [name]))
            b.add_output(name, elem, ["batch", n])


# ---- DAG models (jacgraph.layers.lower_graph): dense coefficients, contributions summed at forks ----


class _Operator:
    """A linear node's matrix M [n_out, n_in] (scipy sparse) in the bound graph, applied to the last axis:
    fwd(X) = X M^T, adj(X) = X M, and the same for |M|, max(M, 0), min(M, 0) (kind abs, pos, neg).

    Small matrices are dense constants (MatMul). A large convolution (BatchNorm folded in or not) is
    applied patch-wise (jacgraph.structured: im2col Gather + MatMul forward, stride-phase Gather + MatMul
    adjoint, exact float64), when M is recognised as one and that is smaller than ELL. Any other large
    matrix (a pooling, a selection) is kept sparse in ELL form, one row of K (index, value) pairs per
    output: Gather the K inputs, multiply, ReduceSum; memory grows with n_out x K, the operator's own
    size (onnxruntime has no float64 Conv kernel, so these are also how a float64 convolution runs).
    `owner.b` is the Builder emitting now (the bound graph's, or a Loop body's)."""

    def __init__(self, owner, M, in_shape=None, out_shape=None):
        self.owner = owner
        self.M = sp.csr_matrix(M)
        self.dense = self.M.shape[0] * self.M.shape[1] * 8 <= DENSE_OP_BYTES
        self.conv = None
        self._consts = {}
        if self.dense:
            self.gathered = 0
            return
        # entries per row of the largest product it forms (fwd: n_out x K, adj: n_in x K^T; patch-wise:
        # positions x taps x C_in forward, positions x taps-per-phase x C_out adjoint)
        self.gathered = max(self.M.shape[0] * _ell_width(self.M), self.M.shape[1] * _ell_width(self.M.T.tocsr()))
        conv = find_conv(self.M, in_shape, out_shape) if in_shape is not None else None
        if conv is not None:
            patch = max(p.gathered() for p in conv.patches())
            if patch < self.gathered:
                self.conv, self.gathered = conv, patch

    @property
    def b(self):
        return self.owner.b

    def _const(self, kind, transpose):
        key = (kind, transpose)
        if key not in self._consts:
            b = self.b
            M = self.M.T.tocsr() if transpose else self.M
            f = KINDS[kind]
            if self.conv is not None:
                patch = self.conv.patches(kind)[int(transpose)]
                self._consts[key] = (patch, [None if a is None else b.const(a.astype(b.dtype) if a.dtype.kind == "f"
                                                                          else a, hint="patch") for a in patch.arrays()])
            elif self.dense:  # X @ M^T (fwd) multiplies by M^T: the transposed matrix's transpose
                self._consts[key] = b.c(np.asarray(f(M.toarray()).T, b.dtype), hint="M")
            else:
                idx, val = _ell(M)
                self._consts[key] = (b.const(idx, hint="ell_idx"), b.c(f(val).astype(b.dtype), hint="ell_val"))
        return self._consts[key]

    def _apply(self, X, kind, transpose):
        b, c = self.b, self._const(kind, transpose)
        if self.conv is not None:
            patch, names = c
            return patch.emit(b, X, names)
        if self.dense:
            return b.MatMul(X, c)
        idx, val = c
        return b.reduce("ReduceSum", b.Mul(b.Gather(X, idx, axis=-1), val), [-1], keepdims=0)

    def fwd(self, X, kind="M"):
        return self._apply(X, kind, False)

    def adj(self, X, kind="M"):
        return self._apply(X, kind, True)

    def work(self) -> int:
        """Multiply-adds per row of applying it: its nonzeros (all entries when dense)."""
        return int(self.M.shape[0] * self.M.shape[1] if self.dense else self.M.nnz)

    def nbytes(self) -> int:
        """Bytes of its constants in the bound graph (four kinds, both directions)."""
        if self.conv is not None:
            return 4 * sum(p.nbytes() for p in self.conv.patches())
        if self.dense:
            return 8 * 8 * self.M.shape[0] * self.M.shape[1]
        return 4 * 16 * (self.M.shape[0] * _ell_width(self.M) + self.M.shape[1] * _ell_width(self.M.T.tocsr()))


def _ell_width(M) -> int:
    return max(int(np.diff(M.indptr).max(initial=0)), 1)


def _ell(M):
    """(indices, values) [rows, K] of a csr matrix; short rows padded with index 0, value 0."""
    K = _ell_width(M)
    counts = np.diff(M.indptr)
    idx, val = np.zeros((M.shape[0], K), np.int64), np.zeros((M.shape[0], K))
    slot = np.arange(M.nnz) - np.repeat(M.indptr[:-1], counts)
    rows = np.repeat(np.arange(M.shape[0]), counts)
    idx[rows, slot], val[rows, slot] = M.indices, M.data
    return idx, val


class _DagBounds:
    """Emits CROWN pre-activation bounds and RecurJac Jacobian bounds for a lowered Graph.

    Every node k gets interval bounds box[k] [b, n_k]; every linear node that feeds a nonlinearity
    gets CROWN bounds by back-substitution over the nodes below it, summing the coefficient of a node
    over all its consumers. Jacobian bounds G[k] on dy/d node_k [b, m, n_k] run from G[out] = I down to
    the input; at a nonlinear node and at the input the interval step is intersected with a
    back-substitution over the nodes above (RecurJac), where the product G_c * sigma' is relaxed
    linearly in G_c (rules/bounds.py bilinear), and so is G_c times a max node's selection (_max_lines)."""

    def __init__(self, b, graph, norm, method, memory_limit, slopes=None):
        self.b, self.g, self.norm, self.method, self.limit = b, graph, norm, method, memory_limit
        self.slopes = slopes or {}  # act node -> its lower-slope input (alpha-CROWN; passes/alpha_crown.py)
        self.nodes = graph.nodes
        self.cons = graph.consumers()
        self.out = len(self.nodes) - 1
        self.m = self.nodes[-1].n
        self._mats = {}
        self.box, self.rel, self.sel, self.deriv, self.G, self.grel = {}, {}, {}, {}, {}, {}
        self.winners = {}  # max node -> (windows [n, K], bool [b, n, K]: the members that can win), _max_lines
        self.interval_only = []  # nodes whose bounds are interval-only: back-substitution over the memory limit
        self.funits, self.Z = {}, {}  # jac_backsub_factored's undecided units (_factor_units) and term maps (_term_maps)

    def op(self, c, k) -> "_Operator":
        """Linear node c's operator on its input k (built once)."""
        if (c, k) not in self._mats:
            node = self.nodes[c]
            self._mats[(c, k)] = _Operator(self, node.mats[node.inputs.index(k)], self.nodes[k].shape, node.shape)
        return self._mats[(c, k)]

    def row_bytes(self, k_range, m=1) -> int:
        """Bytes one coefficient row (times m outputs) holds in a back-substitution over nodes k_range: its
        coefficients are n_j per row, a gathered operator's product (ELL or patch-wise) `gathered` per row, a
        max node's gathered windows (n x K) per row."""
        widest = max((self.nodes[j].n for j in k_range), default=1)
        for c in k_range:
            if self.nodes[c].kind == "linear":
                widest = max([widest] + [self.op(c, j).gathered for j in self.nodes[c].inputs])
            elif self.nodes[c].kind == "max":  # _max_lines gathers every window's members
                widest = max(widest, self.nodes[c].windows.size)
        return 8 * m * widest * TEMPORARIES

    def chunk_rows(self, k_range, m=1) -> int:
        """How many rows of a back-substitution over nodes k_range fit the memory limit at once (0: none)."""
        return int(self.limit // self.row_bytes(k_range, m))

    def working_set(self, points=1) -> float:
        """Estimated peak bytes of the bound graph when run, before anything is emitted: the operators'
        constants about 3 times (numpy, the proto, onnxruntime), the largest back-substitution step as
        forward() and jacobian() will size it (CROWN at once or one chunk of rows; RecurJac's where it
        fits), every node's box and Jacobian bounds, and the results for `points` points. CROWN over the
        undecided units only holds at most the rows counted here, and the factored RecurJac step runs only
        where it holds no more per row than the dense one (_jac_step), so neither raises the estimate."""
        steps = [0]
        for k, node in enumerate(self.nodes[:-1]):
            if node.kind == "linear" and any(self.nodes[c].kind != "linear" for c in self.cons[k]) and \
                    not (self.norm == "inf" and node.inputs == [0]):
                rows = self.chunk_rows(range(k + 1))
                steps.append(min(rows, node.n) * self.row_bytes(range(k + 1)))
            elif node.kind != "linear" and self.method == "recurjac":
                rows = self.chunk_rows(range(k + 1, self.out + 1), self.m)
                if rows >= node.n or (rows and k == 0):
                    steps.append(min(rows, node.n) * self.row_bytes(range(k + 1, self.out + 1), self.m))
        constants = sum(self.op(c, j).nbytes() for c, node in enumerate(self.nodes) if node.kind == "linear"
                        for j in node.inputs)
        per_node = 8.0 * 4 * (self.m + 2) * sum(node.n for node in self.nodes)
        return 3.0 * constants + max(steps) + per_node + 8.0 * 4 * points * self.m * self.nodes[0].n

    # -- forward: interval boxes, CROWN, relaxations --------------------------------------------
    def forward(self, x, eps, x3):
        b = self.b
        for k, node in enumerate(self.nodes):
            if node.kind == "input":
                self.box[k] = (b.Sub(x, eps), b.Add(x, eps))
            elif node.kind == "linear":
                lo = hi = None
                for j in node.inputs:
                    l_j, h_j = self.box[j]
                    mid, half = b.Mul(b.Add(l_j, h_j), b.c(0.5)), b.Mul(b.Sub(h_j, l_j), b.c(0.5))
                    c_, s_ = self.op(k, j).fwd(mid), self.op(k, j).fwd(half, "abs")
                    lo = b.Sub(c_, s_) if lo is None else b.Add(lo, b.Sub(c_, s_))
                    hi = b.Add(c_, s_) if hi is None else b.Add(hi, b.Add(c_, s_))
                bias = b.c(node.bias)
                lo, hi = b.Add(lo, bias), b.Add(hi, bias)
                if k != self.out and any(self.nodes[c].kind != "linear" for c in self.cons[k]):
                    rows = self.chunk_rows(range(k + 1))
                    if self.norm == "inf" and node.inputs == [0]:
                        pass  # affine in the input: over an l_inf ball its interval bound is CROWN's, exactly
                    elif rows:  # in chunks of `rows` rows when not all fit at once
                        pick = self._undecided(k, lo, hi)
                        if pick is None:
                            c_lo, c_hi = self.crown(k, x3, eps, rows)
                        else:
                            c_lo, c_hi = self._crown_picked(k, x3, eps, rows, pick, lo, hi)
                        lo, hi = b.max(lo, c_lo), b.min(hi, c_hi)
                        # two bounds of one point (eps 0) from different sums can cross by round-off: keep l <= u
                        lo, hi = b.min(lo, hi), b.max(lo, hi)
                    else:
                        self.interval_only.append(k)
                self.box[k] = (lo, hi)
            elif node.kind == "act":
                j = node.inputs[0]
                self.box[k] = RANGE[node.activation](b, *self.box[j], node.act_attrs)
                r = RELAX[node.activation](b, *self.box[j], node.act_attrs, slope=self.slopes.get(k))
                self.rel[k] = _relax_rows(b, r, [1])
                dl, du = DERIV[node.activation](b, *self.box[j], node.act_attrs)
                self.deriv[k] = (b.Unsqueeze(dl, b.ints([1])), b.Unsqueeze(du, b.ints([1])))
            else:
                self._max_node(k, node)

    def _max_node(self, k, node):
        """max over windows: lower line z_{i*} (i* = argmax of the lower bounds); upper line z_{i*} where
        i* dominates (l_{i*} > u of every other member, by more than the round-off slack), else the constant
        max u. Derivatives: dy_o/dz_i in [1, 1] where i* dominates, [0, 0] where u_i < max l (i never wins, again
        beyond the slack), [0, 1] otherwise."""
        b = self.b
        lo_j, hi_j = self.box[node.inputs[0]]
        n_in = self.nodes[node.inputs[0]].n
        W = b.const(node.windows.astype(np.int64), hint="windows")
        lw, uw = b.Gather(lo_j, W, axis=1), b.Gather(hi_j, W, axis=1)  # [b, n, K]
        Wx = b.Expand(W, b.shape(lw))
        pos = b.ArgMax(lw, axis=2, keepdims=1)
        istar = b.GatherElements(Wx, pos, axis=2)  # [b, n, 1]
        lmax = b.reduce("ReduceMax", lw, [2], keepdims=1)
        big = b.c(np.finfo(b.dtype).max)
        others = b.reduce("ReduceMax", b.where(b.Equal(Wx, istar), b.Neg(big), uw), [2], keepdims=0)
        umax = b.reduce("ReduceMax", uw, [2], keepdims=0)
        # bounds of one point (eps 0) from sums in different orders break an exact tie by an ulp: members within
        # `slack` of the max may tie with it (can win, are not dominated); looser only within the slack
        slack = b.Mul(b.reduce("ReduceMax", b.max(b.Abs(lo_j), b.Abs(hi_j)), [1], keepdims=1),
                      b.c(TIE_ULPS * np.finfo(b.dtype).eps))  # [b, 1]
        dominant = b.Greater(b.Sub(b.Squeeze(lmax, b.ints([2])), slack), others)  # [b, n]
        fdt = helper.np_dtype_to_tensor_dtype(b.dtype)
        PL = b.Cast(b.Equal(istar, b.const(np.arange(n_in, dtype=np.int64).reshape(1, 1, -1))), to=fdt)
        PU = b.where(b.Unsqueeze(dominant, b.ints([2])), PL, b.c(0.0))
        cmax = b.where(dominant, b.c(0.0), umax)
        # i* can win: also where its u < l by round-off (eps 0), else its derivative interval would be [1, 0]
        possible = b.Or(b.GreaterOrEqual(b.Add(uw, b.Unsqueeze(slack, b.ints([2]))), lmax), b.Equal(Wx, istar))
        DU = b.ScatterElements(b.Mul(PL, b.c(0.0)), Wx, b.Cast(possible, to=fdt), axis=2)
        self.sel[k] = (PU, PL, cmax, PU, DU)
        self.winners[k] = (W, possible)
        self.box[k] = (b.Squeeze(lmax, b.ints([2])), umax)

    def _through(self, k, up, lo, store, C, sides=None):
        """Push coefficients (up, lo) on node k's values one step down (CROWN) into store; C the constants.
        sides: (upper, lower) Relaxations of an act node for the upper and the lower bound, per row (per-neuron
        slopes, passes/alpha_crown.py); default the node's one relaxation, shared by every row and both sides."""
        b = self.b
        node = self.nodes[k]
        pu, nu, pl, nl = b.Relu(up), b.Min(up, b.c(0.0)), b.Relu(lo), b.Min(lo, b.c(0.0))
        j = node.inputs[0]
        if node.kind == "act":
            ru, rl = sides or (self.rel[k], self.rel[k])
            new = (b.Add(b.Mul(pu, ru.aU), b.Mul(nu, ru.aL)), b.Add(b.Mul(pl, rl.aL), b.Mul(nl, rl.aU)))
            dc = (b.reduce("ReduceSum", b.Add(b.Mul(pu, ru.cU), b.Mul(nu, ru.cL)), [-1], keepdims=0),
                  b.reduce("ReduceSum", b.Add(b.Mul(pl, rl.cL), b.Mul(nl, rl.cU)), [-1], keepdims=0))
        else:
            PU, PL, cmax, _, _ = self.sel[k]
            new = (b.Add(b.MatMul(pu, PU), b.MatMul(nu, PL)), b.Add(b.MatMul(pl, PL), b.MatMul(nl, PU)))
            cm = b.Unsqueeze(cmax, b.ints([1]))
            dc = (b.reduce("ReduceSum", b.Mul(pu, cm), [-1], keepdims=0),
                  b.reduce("ReduceSum", b.Mul(nl, cm), [-1], keepdims=0))
        _add_to(store, j, b, *new)
        return _add_pair(b, C, dc)

    def crown(self, t, x3, eps, rows=None):
        """Linear bounds (lo, hi) [b, n_t] on node t's values, back-substituted to the input and bounded over
        the ball; `rows` at a time when given (fewer than n_t: an ONNX Loop over chunks of rows)."""
        n = self.nodes[t].n
        at_once = (rows or n) >= n  # all of t's rows in one step: per-neuron slopes may enter (alpha-CROWN)
        return self._chunked(n, rows or n, lambda eye: self._crown_rows(t, eye, x3, eps, at_once))

    def _undecided(self, k, lo, hi):
        """Bool [b, n_k]: the units of linear node k whose cheap bounds (lo, hi) leave some consumer's
        relaxation undecided (an interval touching a kink of a piecewise-linear activation), or None
        (every unit needs its CROWN row): a smooth activation or a max consumer depends on the exact
        bounds, and so does a max node reading an activation's range (its dominance test: LeNet's conv ->
        ReLU -> max pool, eps 0.02, mean width 44.5 with the cheap bounds there, 21.1 with CROWN's), and
        slope inputs (alpha-CROWN) line up with all rows. A decided unit's relaxation and derivative are
        those of its one linear piece for any tighter bounds, so CROWN could not change them; it keeps its
        cheap bound (sound, possibly wider: only later cheap bounds read it)."""
        b = self.b
        acts = [c for c in self.cons[k] if self.nodes[c].kind != "linear"]
        if not CROWN_UNDECIDED_ONLY or self.slopes or any(self.nodes[d].kind == "max" for c in acts for d in self.cons[c]) \
                or any(self.nodes[c].kind != "act" or self.nodes[c].activation not in PIECEWISE_LINEAR for c in acts):
            return None
        pick = None
        for node in (self.nodes[c] for c in acts):
            dl, du = DERIV[node.activation](b, lo, hi, node.act_attrs)
            t = b.Not(b.Equal(dl, du))
            pick = t if pick is None else b.Or(pick, t)
        return pick

    def _crown_picked(self, t, x3, eps, rows, pick, lo, hi):
        """CROWN rows only for the units `pick` [b, n_t] marks at any point of the batch (NonZero: how many is
        known at run time), at most `rows` at a time; every other unit keeps (lo, hi). Returns [b, n_t] each."""
        b = self.b
        ids = b.Reshape(b.NonZero(b.reduce("ReduceMax", b.Cast(pick, to=onnx.TensorProto.INT32), [0], keepdims=0)),
                        b.ints([-1]))  # [r]
        found = self._chunked(self.nodes[t].n, rows, lambda eye: self._crown_rows(t, eye, x3, eps), ids=ids)
        where = b.Expand(b.Unsqueeze(ids, b.ints([0])), b.shape(found[0]))  # [b, r]
        return tuple(b.ScatterElements(cheap, where, tight, axis=1) for cheap, tight in zip((lo, hi), found))

    def _chunked(self, n, rows, step, lead=1, ids=None):
        """step(eye) -> (lo, hi) [b, (m,) rows] for identity rows eye [(1,) 1, rows, n] (`lead` axes of 1).
        rows >= n: one step over the whole identity. Otherwise the step is emitted once, as the body of a
        Loop over ceil(n / rows) chunks, so peak memory is one chunk's; the body builds its rows with Equal
        (no n x n constant), rows past n are zero and cut off. Returns (lo, hi) [b, (m,) n].
        ids (int64 [r], r known at run time, 0 allowed): only those rows of the identity, returned as
        [b, (m,) r]: at once, or in ceil((r + 1) / rows) chunks of equal size <= rows, padded with index -1
        (a zero row), so that no step sees an empty tensor."""
        b = self.b
        one_hot = lambda g, units: g.Unsqueeze(_one_hot(g, units, n), g.ints(list(range(lead))))  # noqa: E731
        if rows >= n and ids is None:
            return step(b.c(np.eye(n).reshape((1,) * lead + (n, n))))
        if rows >= n:
            found = step(one_hot(b, b.Concat(ids, b.ints([-1]), axis=0)))
            return tuple(b.Slice(t, b.ints([0]), b.shape(ids), b.ints([lead])) for t in found)
        if ids is None:
            chunks, size, end = b.const(np.asarray(-(-n // rows), np.int64), hint="chunks"), rows, b.ints([n])
            size_name = b.const(np.asarray(rows, np.int64), hint="rows")
        else:
            end = b.shape(ids)  # [r]
            c1 = b.Div(b.Add(end, b.ints([rows])), b.ints([rows]))  # floor(r / rows) + 1 >= 1 chunks
            s1 = b.Div(b.Add(end, c1), c1)  # ceil((r + 1) / chunks) <= rows per chunk
            ids = b.Pad(ids, b.Concat(b.ints([0]), b.Sub(b.Mul(c1, s1), end), axis=0), b.const(np.asarray(-1, np.int64)))
            chunks, size, size_name = b.Reshape(c1, b.ints([])), None, b.Reshape(s1, b.ints([]))
        body = b.subgraph(onnx.GraphProto())
        it, cond = body.fresh("chunk"), body.fresh("cond_in")
        first = body.Mul(it, size_name)
        units = body.Range(first, body.Add(first, size_name), body.const(np.asarray(1, np.int64), hint="one"))
        eye = one_hot(body, units if ids is None else body.Gather(ids, units, axis=0))
        self.b = body
        try:
            lo, hi = step(eye)
        finally:
            self.b = b
        elem = helper.np_dtype_to_tensor_dtype(b.dtype)
        outs = [body.Identity(cond), body.Identity(lo), body.Identity(hi)]
        body.inputs.extend([helper.make_tensor_value_info(it, onnx.TensorProto.INT64, []),
                            helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])])
        body.outputs.extend([helper.make_tensor_value_info(outs[0], onnx.TensorProto.BOOL, []),
                             helper.make_tensor_value_info(outs[1], elem, [None] * lead + [size]),
                             helper.make_tensor_value_info(outs[2], elem, [None] * lead + [size])])
        stacked = b.op("Loop", chunks, b.const(np.asarray(True), hint="true"),
                       n_out=2, body=body.graph("rows_chunk"))  # [chunks, b, (m,) rows] each
        perm = list(range(1, lead + 1)) + [0, lead + 1]  # the chunk axis next to the rows
        return tuple(b.Slice(b.Reshape(b.Transpose(t, perm=perm), b.ints([0] * lead + [-1])), b.ints([0]), end,
                             b.ints([lead])) for t in stacked)

    def _crown_rows(self, t, eye, x3, eps, all_rows=False):
        """CROWN for the rows `eye` [1, rows, n_t] of node t (a slice of the identity): (lo, hi) [b, rows].
        all_rows: eye is the whole identity, so per-row slopes (SlopeInputs.relaxations) line up with its rows."""
        b = self.b
        store, C = {t: (eye, eye)}, None
        for k in range(t, -1, -1):
            if k not in store:
                continue
            up, lo = store.pop(k)
            node = self.nodes[k]
            if node.kind == "linear":
                bias = b.c(node.bias)
                C = _add_pair(b, C, (b.MatMul(up, bias), b.MatMul(lo, bias)))
                for j in node.inputs:
                    _add_to(store, j, b, *_both(self.op(k, j).adj, up, lo))
            elif node.kind in ("act", "max"):
                sides = self.slopes.relaxations(self, t, k) if all_rows and self.slopes and node.kind == "act" else None
                C = self._through(k, up, lo, store, C, sides)
            else:
                xv = lambda coef: b.Squeeze(b.MatMul(coef, x3), b.ints([2]))  # noqa: E731  [b, rows]
                e = eps  # [b, 1]
                hi = b.Add(xv(up), b.Mul(e, dual_norm(b, up, self.norm)))
                low = b.Sub(xv(lo), b.Mul(e, dual_norm(b, lo, self.norm)))
                if C is not None:
                    hi, low = b.Add(hi, C[0]), b.Add(low, C[1])
                return low, hi
        raise AssertionError("back-substitution did not reach the input")

    # -- backward: Jacobian bounds ---------------------------------------------------------------
    def jacobian(self):
        b = self.b
        eye = b.c(np.eye(self.m)[None])  # [1, m, m]
        self.G[self.out] = (eye, eye)
        for k in range(self.out - 1, -1, -1):
            L = U = None
            for c in self.cons[k]:
                part = self._part(c, k)
                L, U = part if L is None else (b.Add(L, part[0]), b.Add(U, part[1]))
            if L is None:  # not on a path to the output
                L = U = b.c(np.zeros((1, self.m, self.nodes[k].n)))
            if self.method == "recurjac" and self.nodes[k].kind != "linear":
                n, rows = self.nodes[k].n, self.chunk_rows(range(k + 1, self.out + 1), self.m)
                if rows >= n or (rows and k == 0):  # chunked at the input only: its bounds are the result
                    lo, hi = self._jac_step(k, n, rows)
                    L, U = b.max(L, lo), b.min(U, hi)
                else:
                    self.interval_only.append(k)
            self.G[k] = (L, U)
            if self.nodes[k].kind == "act":
                self.grel[k] = _relax_rows(b, bilinear(b, L, U, *self.deriv[k]), [2])

    def _part(self, c, k):
        """Interval bounds on consumer c's part of dy/d node_k."""
        b = self.b
        Lc, Uc = self.G[c]
        kind = self.nodes[c].kind
        if kind == "linear":
            M = self.op(c, k)
            return (b.Add(M.adj(Lc, "pos"), M.adj(Uc, "neg")), b.Add(M.adj(Uc, "pos"), M.adj(Lc, "neg")))
        if kind == "act":
            return interval_mul(b, Lc, Uc, *self.deriv[c])
        _, _, _, DL, DU = self.sel[c]
        z = b.c(0.0)
        return (b.Add(b.MatMul(b.Relu(Lc), DL), b.MatMul(b.Min(Lc, z), DU)),
                b.Add(b.MatMul(b.Relu(Uc), DU), b.MatMul(b.Min(Uc, z), DL)))

    def jac_backsub(self, k, eye):
        """Bounds on dy/d node_k [b, m, rows] from linear bounds over the nodes above it, up to dy/dy = I, for
        the rows `eye` [1, 1, rows, n_k] of the identity."""
        b = self.b
        store, C = {k: (eye, eye)}, None
        z = b.c(0.0)
        for j in range(k, self.out + 1):
            if j not in store:
                continue
            up, lo = store.pop(j)
            if j == self.out:  # dy_i/dy = e_i: the coefficient of unit i in row i
                sel = b.c(np.eye(self.m).reshape(1, self.m, 1, self.m))
                C = _add_pair(b, C, (b.reduce("ReduceSum", b.Mul(up, sel), [-1], keepdims=0),
                                     b.reduce("ReduceSum", b.Mul(lo, sel), [-1], keepdims=0)))
                continue
            for c in self.cons[j]:
                kind = self.nodes[c].kind
                if kind == "linear":
                    _add_to(store, c, b, *_both(self.op(c, j).fwd, up, lo))
                elif kind == "act":
                    r, (pu, nu, pl, nl) = self.grel[c], (b.Relu(up), b.Min(up, z), b.Relu(lo), b.Min(lo, z))
                    _add_to(store, c, b, b.Add(b.Mul(pu, r.aU), b.Mul(nu, r.aL)), b.Add(b.Mul(pl, r.aL), b.Mul(nl, r.aU)))
                    C = _add_pair(b, C, (b.reduce("ReduceSum", b.Add(b.Mul(pu, r.cU), b.Mul(nu, r.cL)), [-1], keepdims=0),
                                         b.reduce("ReduceSum", b.Add(b.Mul(pl, r.cL), b.Mul(nl, r.cU)), [-1], keepdims=0)))
                else:
                    ru, rl = self._max_lines(c, up, lo)
                    _add_to(store, c, b, ru.aU, rl.aL)
                    C = _add_pair(b, C, (b.reduce("ReduceSum", ru.cU, [-1], keepdims=0),
                                         b.reduce("ReduceSum", rl.cL, [-1], keepdims=0)))
        return C[1], C[0]

    def _max_lines(self, c, up, lo):
        """Max node c in a RecurJac back-substitution: coefficients (up, lo) [b, m, rows, n_in] on dy/d(its input)
        become lines in G_c = dy/d node_c, as Relaxations (upper line of the first, lower of the second).
        dy/dz_i = sum_o G_c[o] D[o, i], D[o] one-hot on a member of window o that can win, so the coefficient of
        G_c[o] is s_o = <lambda, D[o]>, in [min, max] of lambda over o's possible winners, and G_c[o] s_o is
        relaxed linearly in G_c[o] (bilinear). Where one member dominates this is exact; at a tie it allows
        each tied member's derivative (and their convex hull) per window, not their sum."""
        b = self.b
        W, possible = self.winners[c]  # [n, K], bool [b, n, K]
        can = b.Unsqueeze(possible, b.ints([1, 2]))  # [b, 1, 1, n, K]
        big = b.c(np.finfo(b.dtype).max)
        L, U = (b.Unsqueeze(t, b.ints([2])) for t in self.G[c])  # [b, m, 1, n]
        lines = []
        for coef in (up, lo):
            w = b.Gather(coef, W, axis=-1)  # [b, m, rows, n, K]
            s_lo = b.reduce("ReduceMin", b.where(can, w, big), [-1], keepdims=0)
            s_hi = b.reduce("ReduceMax", b.where(can, w, b.Neg(big)), [-1], keepdims=0)
            lines.append(bilinear(b, L, U, s_lo, s_hi))
        return lines

    def jac_backsub_factored(self, k, eye):
        """jac_backsub with its coefficients factored, for nodes above k with no max node: the part that every
        output row i and both sides share, S [b, 1, rows, n_j] (units whose derivative interval is one
        point: relu' in {0} or {1}, the same line for every i), plus one low-rank term per activation node c
        over its undecided units (an interval derivative), X_c [b, m, 2, rows, k_c] times the one-hot of those
        units pushed up to node j (_term_maps, independent of the rows: emitted once, outside the Loop). The
        operators above apply to S once, not to m outputs x 2 sides; only the k_c columns are relaxed per
        output (the chain pass's Backsub does the same). Same bounds as jac_backsub, up to round-off."""
        b = self.b
        store, C, X = {k: eye}, None, {}
        for j in range(k, self.out + 1):
            if j not in store:
                continue
            S = store.pop(j)
            if j == self.out:  # dy_i/dy = e_i: the coefficient of unit i in row i
                diag = b.Unsqueeze(b.reduce("ReduceSum", b.Mul(S, b.c(np.eye(self.m).reshape(1, self.m, 1, self.m))),
                                            [-1], keepdims=0), b.ints([2]))  # [b, m, 1, rows]
                for c, Xc in X.items():
                    if (c, j) not in self.Z:
                        continue
                    Zi = b.Unsqueeze(b.Transpose(self.Z[(c, j)], perm=[0, 2, 1]), b.ints([2, 4]))  # [b, m, 1, k, 1]
                    diag = b.Add(diag, b.Squeeze(b.MatMul(Xc, Zi), b.ints([4])))
                diag = b.Add(diag, b.c(np.zeros((1, 1, 2, 1))))  # both sides present
                C = _add_pair(b, C, _slots(b, diag))
                continue
            for c in self.cons[j]:
                if self.nodes[c].kind == "linear":
                    f = self.op(c, j).fwd(S)
                    store[c] = f if c not in store else b.Add(store[c], f)
                    continue
                u = self.funits[c]
                lam = b.Unsqueeze(b.Gather(S, u["ids"], axis=-1), b.ints([2]))  # [b, 1, 1, rows, k]
                for t, Xt in X.items():
                    if (t, c) in self.Z:
                        lam = b.Add(lam, b.MatMul(Xt, b.Unsqueeze(self.Z[(t, c)], b.ints([1, 2]))))  # [b, m, 2, rows, k]
                mag = b.Abs(lam)
                X[c] = b.Add(b.Mul(lam, u["a"][0]), b.Mul(mag, u["a"][1]))
                dc = b.reduce("ReduceSum", b.Add(b.Mul(lam, u["c"][0]), b.Mul(mag, u["c"][1])), [-1], keepdims=0)
                C = _add_pair(b, C, _slots(b, dc))
                store[c] = b.Mul(S, b.Unsqueeze(u["d0"], b.ints([1])))
        return C[1], C[0]

    def _factor_units(self, c):
        """Act node c's undecided units for jac_backsub_factored, emitted outside any Loop: the units whose
        derivative interval is not one point at some point of the batch (NonZero), plus one padding unit whose
        lines are zero so that no tensor is empty: their indices [k], their lines as (mid, +-radius) of slope
        and intercept [b, m, 2 or 1, 1, k], their count (float [1]), and d0 [b, 1, n]: the point derivative of
        the others, 0 at the undecided ones."""
        b = self.b
        r, (_, du) = self.grel[c], self.deriv[c]  # lines [b, m, 1, n]; du [b, 1, n]
        n = self.nodes[c].n
        some = b.reduce("ReduceMax", b.Reshape(b.Cast(r.sel, to=onnx.TensorProto.INT32), b.ints([-1, n])), [0], keepdims=0)
        found = b.Reshape(b.NonZero(some), b.ints([-1]))
        ids = b.Concat(found, b.ints([0]), axis=0)  # [k]
        valid = b.Concat(b.Expand(b.c(1.0), b.shape(found)), b.c(np.zeros(1)), axis=0)
        line = lambda t: b.Unsqueeze(b.Mul(b.Gather(t, ids, axis=-1), valid), b.ints([2]))  # noqa: E731  [b, m, 1, 1, k]
        aU, aL, cU, cL = (line(t) for t in (r.aU, r.aL, r.cU, r.cL))
        # Lambda+ a1 + Lambda- a2 = Lambda (a1 + a2)/2 + |Lambda| (a1 - a2)/2: the sides differ in the sign of the second
        half = b.c(0.5)
        sides = lambda t: b.Concat(t, b.Neg(t), axis=2)  # noqa: E731
        return {"ids": ids, "a": (b.Mul(b.Add(aU, aL), half), sides(b.Mul(b.Sub(aU, aL), half))),
                "c": (b.Mul(b.Add(cU, cL), half), sides(b.Mul(b.Sub(cU, cL), half))),
                "count": b.Cast(b.shape(ids), to=helper.np_dtype_to_tensor_dtype(b.dtype)),
                "d0": b.where(b.Cast(some, to=onnx.TensorProto.BOOL), b.c(0.0), du)}

    def _term_maps(self, acts):
        """Z[(c, t)]: the one-hot of act c's undecided units pushed up every path to node t's input, scaled by d0 at
        each act between, at t's undecided units [b, k_c, k_t] (t an act above c), or at the output t [b, k_c, m].
        The row-independent half of each term of jac_backsub_factored, emitted once outside the Loop."""
        b, Z = self.b, {}
        for c in acts:
            ids = self.funits[c]["ids"]
            Y = {c: b.Unsqueeze(_one_hot(b, ids, self.nodes[c].n), b.ints([0]))}  # [1, k, n]
            for t in range(c + 1, self.out + 1):
                node = self.nodes[t]
                parts = [self.op(t, i).fwd(Y[i]) if node.kind == "linear" else Y[i] for i in node.inputs if i in Y]
                if not parts:
                    continue
                y = parts[0] if len(parts) == 1 else b.Sum(*parts)
                if node.kind == "linear":
                    Y[t] = y
                else:
                    Z[(c, t)] = b.Gather(y, self.funits[t]["ids"], axis=-1)
                    Y[t] = b.Mul(y, self.funits[t]["d0"])
            if self.out in Y:
                Z[(c, self.out)] = Y[self.out]
        return Z

    def _jac_step(self, k, n, rows):
        """RecurJac's back-substitution for node k's rows, in chunks of `rows` (lo, hi) [b, m, n]: jac_backsub, or
        where no max node lies above k, an If that runs jac_backsub_factored when it does less work (per row,
        2 m x the pairs of undecided-unit counts it multiplies against the operators' nonzeros; at run time)."""
        b = self.b
        dense = lambda: self._chunked(n, rows, lambda eye: self.jac_backsub(k, eye), lead=2)  # noqa: E731
        acts = [c for c in range(k + 1, self.out) if self.nodes[c].kind != "linear"]
        if FACTORED_JACOBIAN == "never" or any(self.nodes[c].kind == "max" for c in acts):
            return dense()
        self.funits = {c: self._factor_units(c) for c in acts}

        def factored():
            self.Z = self._term_maps(acts)  # in the branch that runs it: only then is its work spent
            return self._chunked(n, rows, lambda eye: self.jac_backsub_factored(k, eye), lead=2)

        if FACTORED_JACOBIAN == "always":
            return factored()
        pairs, total = b.c(0.0), b.c(0.0)
        for c in acts:  # at c: its units times those of every term below it, and its own
            pairs, total = b.Add(pairs, b.Mul(self.funits[c]["count"], b.Add(total, b.c(1.0)))), \
                b.Add(total, self.funits[c]["count"])
        above = range(k + 1, self.out + 1)
        work = float(sum(self.op(c, j).work() for c in above if self.nodes[c].kind == "linear" for j in self.nodes[c].inputs))
        m2, widest = 2.0 * self.m, self.row_bytes(above) / (8.0 * TEMPORARIES)
        # multiply-adds: the shared part once per row, the terms' 2m columns per row, the term maps once
        factored_work = b.Add(b.c(n * work), b.Add(b.Mul(pairs, b.c(m2 * n)), b.Mul(total, b.c(work))))
        cheaper = b.Less(factored_work, b.c(m2 * n * work))
        # memory: per row no more than jac_backsub's m x widest (what chunk_rows sized), and the term maps'
        # rows (one widest row each, and its gathered copy) within the limit
        fits = b.And(b.LessOrEqual(b.Add(b.Mul(total, b.c(m2)), b.c(widest)), b.c(self.m * widest)),
                     b.LessOrEqual(b.Mul(total, b.c(16.0 * widest)), b.c(float(self.limit))))
        return self._branch(b.Reshape(b.And(cheaper, fits), b.ints([])), factored, dense)

    def _branch(self, cond, then, other):
        """If(cond) then() else other(), each emitted into its own branch graph and returning (lo, hi)."""
        b, elem, graphs = self.b, helper.np_dtype_to_tensor_dtype(self.b.dtype), []
        for name, emit in (("factored", then), ("dense", other)):
            g = b.subgraph(onnx.GraphProto())
            self.b = g
            try:
                outs = [g.Identity(t) for t in emit()]
            finally:
                self.b = b
            g.outputs.extend(helper.make_tensor_value_info(t, elem, [None] * 3) for t in outs)
            graphs.append(g.graph(f"jacobian_{name}"))
        return tuple(b.op("If", cond, n_out=2, then_branch=graphs[0], else_branch=graphs[1]))


def _add_to(store, k, b, up, lo):
    """store[k] += (up, lo): a node's coefficient is the sum over its consumers."""
    store[k] = (up, lo) if k not in store else (b.Add(store[k][0], up), b.Add(store[k][1], lo))


def _both(f, up, lo):
    """(f(up), f(lo)), f applied once where both are the same tensor (the identity a back-substitution
    starts from, until the first relaxation splits it)."""
    fu = f(up)
    return fu, fu if lo == up else f(lo)


def _one_hot(b, ids, n):
    """Rows [k, n] of the identity for unit indices ids [k] (an index outside 0..n-1: a zero row)."""
    eq = b.Equal(b.Unsqueeze(ids, b.ints([1])), b.const(np.arange(n, dtype=np.int64), hint="units"))
    return b.Cast(eq, to=helper.np_dtype_to_tensor_dtype(b.dtype))


def _slots(b, t):
    """(upper, lower): slots 0 and 1 of axis 2 of t [b, m, 2, ...], that axis dropped."""
    return tuple(b.Squeeze(b.Slice(t, b.ints([s]), b.ints([s + 1]), b.ints([2])), b.ints([2])) for s in (0, 1))


def _add_pair(b, C, dc):
    return dc if C is None else (b.Add(C[0], dc[0]), b.Add(C[1], dc[1]))


def _check_dense_weights(weights):
    """Refuse, before anything is allocated, a bound graph whose dense lowered weights are too big."""
    if weights > PROTO_LIMIT:
        raise JacgraphError(
            f"the bound graph would embed {weights / 2**30:.1f} GiB of lowered weights (chain models: dense "
            f"matrices, input x output features per layer), over the {PROTO_LIMIT / 2**30:.0f} GiB "
            "this pass accepts (and about 4x that in memory when run). Bound a smaller model or a cropped input "
            "(--input-shape), or use `jacgraph lipschitz` for a global bound.")


def graph_working_set(model, input_shape=None, points=1, memory_limit=MEMORY_LIMIT) -> float:
    """Peak bytes a bound over the graph lowering is estimated to hold (_DagBounds.working_set), from shapes;
    model: a source model, or one already lowered (a jacgraph.layers.Graph)."""
    from jacgraph.layers import Graph, lower_graph

    graph = model if isinstance(model, Graph) else lower_graph(model, input_shape)
    return _DagBounds(None, graph, "inf", "recurjac", memory_limit).working_set(points)


def _dense_bytes(graph) -> int:
    """Bytes of the lowered weights the bound graph embeds (dense or ELL, with |M|, M+, M- and transposes)."""
    return sum(_Operator(None, M, graph.nodes[k].shape, node.shape).nbytes()
               for node in graph.nodes for k, M in zip(node.inputs, node.mats))


def _build_graph(src, norm, input_shape, dtype, method, preactivation_bounds, memory_limit, slope_inputs=False):
    from jacgraph.layers import lower_graph
    from jacgraph.passes.alpha_crown import declare_slope_inputs, emit_slope_outputs

    graph = lower_graph(src, input_shape)
    _check_dense_weights(_dense_bytes(graph))
    b = BoundBuilder(src, dtype)
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    n0, m = graph.nodes[0].n, graph.nodes[-1].n
    b.add_input("x0", elem, ["batch", *graph.in_shape])
    b.add_input("eps", elem, ["batch"])
    x = b.Reshape("x0", b.ints([0, n0]))
    eps = b.Reshape("eps", b.ints([-1, 1]))
    slopes = declare_slope_inputs(b, graph, per_neuron=slope_inputs != "unit") if slope_inputs else {}
    dag = _DagBounds(b, graph, norm, method, memory_limit, slopes)
    dag.forward(x, eps, b.Unsqueeze(x, b.ints([2])))
    dag.jacobian()
    boxes = {k: (*dag.box[k], node.n) for k, node in enumerate(graph.nodes[:-1])
             if node.kind == "linear"} if preactivation_bounds else {}
    _emit_outputs(b, x, dag.G[0], m, n0, boxes)
    meta = {"jacgraph.emit": "recurjac", "jacgraph.norm": norm, "jacgraph.method": method,
            "jacgraph.input_shape": json.dumps(list(graph.in_shape)), "jacgraph.outputs": m,
            "jacgraph.lowering": "graph", "jacgraph.interval_only_nodes": json.dumps(dag.interval_only)}
    if slopes:
        meta["jacgraph.slope_inputs"] = emit_slope_outputs(b, dag, slopes)
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
          dtype=np.float64, optimize_slopes=0):
    """Bounds for points x0 ([N, ...] or one point) and radii eps (one or [N]), point by point.
    optimize_slopes=N > 0: N projected-gradient steps on the ReLU lower-line slopes per point (alpha-CROWN,
    passes/alpha_crown.py; the graph lowering), keeping the elementwise best bounds; 0 (default): CROWN's.

    Returns {'J_lower', 'J_upper' [N, outputs, inputs], 'lipschitz' [N, outputs], 'induced' [N], 'eps' [N]}.
    """
    from tqdm import tqdm

    from jacgraph.progress import stage
    from jacgraph.runtime import session

    with stage("loading the model"):
        src = model if isinstance(model, SourceModel) else SourceModel(model)
    if optimize_slopes:
        return _bound_optimised(src, x0, eps, norm, method, input_shape, threads, progress, dtype, optimize_slopes)
    with stage("emitting the bound graph"):  # the lowering inside it names its own stage
        graph = build(src, norm=norm, input_shape=input_shape, dtype=dtype, method=method)
    x0_input = next(i for i in graph.graph.input if i.name == "x0")  # [batch, *input shape]
    in_shape = [d.dim_value for d in x0_input.type.tensor_type.shape.dim[1:]]
    x0, eps = _check_points(x0, eps, in_shape)
    with stage("creating the onnxruntime session (graph optimisation)"):
        sess = session(graph, threads=threads)
    lows, highs = [], []
    show = len(x0) > 1 if progress is None else progress
    for i in tqdm(range(len(x0)), desc="bounding", unit="point", disable=not show, file=sys.stderr):
        with stage(f"running the bound graph: point {i + 1} of {len(x0)}"):  # one session run, opaque inside
            lo, hi = sess.run(None, {"x0": x0[i:i + 1].astype(dtype), "eps": eps[i:i + 1].astype(dtype)})
        lows.append(lo)
        highs.append(hi)
    lo, hi = np.concatenate(lows), np.concatenate(highs)
    per_output, induced = lipschitz(lo, hi, norm)
    return {"J_lower": lo, "J_upper": hi, "lipschitz": per_output, "induced": induced, "eps": eps}


def _bound_optimised(src, x0, eps, norm, method, input_shape, threads, progress, dtype, iterations):
    """bound() with optimised slopes: one SlopeOptimiser (bound graph + gradient graph), run point by point."""
    from tqdm import tqdm

    from jacgraph.passes.alpha_crown import SlopeOptimiser
    from jacgraph.progress import stage

    with stage("emitting the bound graph with slope inputs, its gradient graph and their sessions"):
        opt = SlopeOptimiser(src, norm=norm, method=method, input_shape=input_shape, dtype=dtype, threads=threads)
    x0_input = next(i for i in opt.model.graph.input if i.name == "x0")
    x0, eps = _check_points(x0, eps, [d.dim_value for d in x0_input.type.tensor_type.shape.dim[1:]])
    lows, highs = [], []
    show = len(x0) > 1 if progress is None else progress
    for i in tqdm(range(len(x0)), desc=f"bounding, {iterations} slope steps", unit="point", disable=not show,
                  file=sys.stderr):
        with stage(f"optimising the slopes ({iterations} steps): point {i + 1} of {len(x0)}"):
            lo, hi, _ = opt.run(x0[i:i + 1].astype(dtype), eps[i:i + 1].astype(dtype), iterations)
        lows.append(lo)
        highs.append(hi)
    lo, hi = np.concatenate(lows), np.concatenate(highs)
    per_output, induced = lipschitz(lo, hi, norm)
    return {"J_lower": lo, "J_upper": hi, "lipschitz": per_output, "induced": induced, "eps": eps}
