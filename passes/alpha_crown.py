"""Optimised relaxation slopes (alpha-CROWN, Xu et al., ICLR 2021) for the RecurJac bound graph.

    opt = SlopeOptimiser(model, norm="inf")            # builds the bound graph and its gradient graph once
    lo, hi, history = opt.run(x0, eps, iterations=20)  # x0 [batch, *input], eps [batch]

CROWN relaxes an unstable ReLU unit (l < 0 < u) by its chord above and a line a z below, for any slope a
in [0, 1] (LeakyReLU with slope s: a in [s, 1]); every choice gives sound bounds, so the slopes are free
parameters. `recurjac.build(slope_inputs=True)` makes them inputs of the bound graph (default NaN: CROWN's
adaptive choice, the piece closer to the interval):

- per bounded neuron and side (slopes="neuron", the default): in every CROWN back-substitution that runs at
  once over all the rows of its start node t, the slopes of each ReLU/LeakyReLU node k below t are inputs
  alpha_<t>_<k>_upper and alpha_<t>_<k>_lower [batch, n_t, n_k]: one slope per (unit of t, unit of k) for
  t's upper bounds and another for its lower bounds, as alpha-CROWN proper has;
- per unit: alpha_<k> [batch, n_k], shared by every row and side, in back-substitutions that run in chunks of
  rows (large CNNs, an ONNX Loop: a per-row input would have to be sliced per chunk, and n_t x n_k slopes
  would not fit the memory the chunking is there to save), and for (start node, ReLU node) pairs past the
  per-neuron budget (memory_limit / PER_NEURON_SHARE at PER_NEURON_BYTES a slope); slopes="unit" uses them
  everywhere.

Outputs slope_<k> [batch, n_k] give CROWN's slopes (where alpha_<k> is NaN) and slope_objective [batch] the
sum of the widths u - l of the pre-activation bounds of every linear node that feeds a nonlinearity. Then,
per batch of points:

1. Start from CROWN's slopes (slope_<k>; per-neuron inputs get them on every row).
2. The gradient of slope_objective w.r.t. the alpha inputs comes from jacgraph's own VJP pass over the
   bound graph (pruned to that output), run in onnxruntime.
3. Adam steps on the slopes in numpy, projected into the valid range after each step. A per-neuron slope is
   its node's shared slope plus its own offset (`run`): the shared part follows the gradient summed over all
   rows and sides (offsets held at 0 give the shared mode exactly), the offsets refine it per bound.
4. Every iterate's bounds are sound, so the result is the elementwise best over the iterates (the max
   of the lower bounds, the min of the upper ones).

Why the pre-activation widths and not J's: in a ReLU network the Jacobian bounds depend on the slopes
only through which units the pre-activation bounds make stable (relu' in {0}, {1} or [0, 1], a step
function of l and u), so their gradient w.r.t. the slopes is zero almost everywhere; narrower l, u are
what turns units stable. With per-neuron slopes each row and side of a start node has its own slopes, so
minimising the sum minimises every bound on its own (for the first relaxed layer the problem is convex;
examples/alpha_crown_gap.py solves it exactly as LPs); with shared slopes one choice must serve them all.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jacgraph.errors import JacgraphError
from jacgraph.lowering import reads
from jacgraph.layers import Graph, lower_graph
from jacgraph.passes import recurjac, vjp
from jacgraph.rules.bounds import RELAX, SLOPED, slope_range
from jacgraph.runtime import session

OBJECTIVE = "slope_objective"
# The memory guard's estimate for a bound with optimised slopes, as a multiple of the plain bound's: the
# gradient graph keeps the back-substitution's values for its reverse sweep. Measured peak RSS above the
# plain bound's: 1.1x (densenet_cnn), 1.4x (inception_cnn), 1.6x (resnet_cnn), >= 1.5x (LeNet, stopped).
MEMORY_FACTOR = 3
# Bytes one per-neuron slope costs while optimising, in the graphs (input, clipped slope, intercept and their
# temporaries, kept for the reverse sweep) and in numpy (offset, Adam's moments, gradient): measured ~270 on
# resnet_cnn (1.31M per-neuron slopes, peak RSS 1063 MB against 715 MB with shared slopes, 3 steps).
PER_NEURON_BYTES = 320
# Per-neuron slopes of one bound graph may take at most memory_limit / PER_NEURON_SHARE bytes (256 MiB at the
# default 2 GiB); further (start node, ReLU node) pairs keep the shared slopes.
PER_NEURON_SHARE = 8


# ---- the graph side (called by recurjac._build_graph) -------------------------------------------

def slope_spec(graph) -> dict:
    """{alpha_<k>: {"node": k, "output": "slope_<k>", "range": [s_0, s_1], "shape": [n_k]}} for every
    ReLU/LeakyReLU node k of a lowered graph (jacgraph.layers.lower_graph): the shared slope inputs a bound graph
    of it has ("shape": one point's, without the batch axis)."""
    return {f"alpha_{k}": {"node": k, "output": f"slope_{k}", "range": list(slope_range(node.activation, node.act_attrs)),
                           "shape": [node.n]}
            for k, node in enumerate(graph.nodes) if node.kind == "act" and node.activation in SLOPED}


class SlopeInputs(dict):
    """{ReLU/LeakyReLU node k: its shared slope input alpha_<k>} (what a back-substitution in chunks of rows
    uses), and, when per_neuron, the per-bounded-neuron inputs alpha_<t>_<k>_upper / _lower [batch, n_t, n_k]
    (the lower-line slopes of node k in the CROWN bound of each unit of linear node t, one set for its upper
    and one for its lower bound), declared when a back-substitution running at once over all of t's rows
    asks for them (`relaxations`)."""

    def __init__(self, b, graph, shared, per_neuron):
        super().__init__(shared)
        self.b, self.graph, self.per_neuron = b, graph, per_neuron
        self._made, self._bytes = {}, 0

    def relaxations(self, dag, t, k):
        """(upper side, lower side) Relaxations [b, n_t, n_k] of act node k for node t's CROWN bound, from the
        per-neuron inputs; None where slopes are shared (not per_neuron, or no slope to choose at k)."""
        node = self.graph.nodes[k]
        if not self.per_neuron or k not in self:
            return None
        if (t, k) not in self._made:
            cost = PER_NEURON_BYTES * 2 * self.graph.nodes[t].n * node.n
            if self._bytes + cost > dag.limit // PER_NEURON_SHARE:
                return None  # over the budget: this pair keeps the shared slopes
            self._bytes += cost
            b = self.b
            l, u = (b.Unsqueeze(v, b.ints([1])) for v in dag.box[node.inputs[0]])  # [b, 1, n_k]
            sides = []
            for side in ("upper", "lower"):
                name = f"alpha_{t}_{k}_{side}"
                _declare(b, name, [f"rows_{t}", node.n])  # rows_t = n_t; a named dim lets the NaN default broadcast
                sides.append(RELAX[node.activation](b, l, u, node.act_attrs, slope=name))
            self._made[(t, k)] = tuple(sides)
        return self._made[(t, k)]

    def spec(self) -> dict:
        """slope_spec's {alpha_<k>: ...} for the shared inputs, plus {alpha_<t>_<k>_<side>: {"node": k, "start": t,
        "side": side, "output": slope_<k>, "range": ..., "shape": [n_t, n_k]}} for each per-neuron input declared,
        in the order of the graph's inputs."""
        shared = slope_spec(self.graph)
        spec = {name: shared[name] for name in self.values()}
        for t, k in self._made:
            for side in ("upper", "lower"):
                spec[f"alpha_{t}_{k}_{side}"] = {**shared[f"alpha_{k}"], "start": t, "side": side,
                                                 "shape": [self.graph.nodes[t].n, self.graph.nodes[k].n]}
        return spec


def _declare(b, name, dims):
    """A float input name ["batch", *dims] defaulting to NaN (CROWN's choice) of shape [1, .., 1, dims[-1]]: a
    per-neuron input's row axis is broadcast (a named dim), so its default costs n_k numbers, not n_t x n_k."""
    b.add_input(name, helper.np_dtype_to_tensor_dtype(b.dtype), ["batch", *dims])
    b.initializers.append(numpy_helper.from_array(np.full([1] * len(dims) + [dims[-1]], np.nan, b.dtype), name))


def declare_slope_inputs(b, graph, per_neuron=True) -> SlopeInputs:
    """An input alpha_<k> [batch, n_k] for every ReLU/LeakyReLU node k, defaulting to NaN (CROWN's choice);
    per_neuron: also per-bounded-neuron inputs, as back-substitutions ask for them (SlopeInputs)."""
    shared = {}
    for name, s in slope_spec(graph).items():
        _declare(b, name, [graph.nodes[s["node"]].n])
        shared[s["node"]] = name
    return SlopeInputs(b, graph, shared, per_neuron)


def emit_slope_outputs(b, dag, slopes: SlopeInputs) -> str:
    """Outputs slope_<k> [batch, n_k] (the lower slopes used) and slope_objective [batch]; returns the
    metadata that describes every slope input (SlopeInputs.spec as JSON), which SlopeOptimiser reads back."""
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    spec = slopes.spec()
    for k, name in slopes.items():
        b.nodes.append(helper.make_node("Identity", [b.Squeeze(dag.rel[k].aL, b.ints([1]))], [spec[name]["output"]]))
        b.add_output(spec[name]["output"], elem, ["batch", dag.nodes[k].n])
    widths = [b.reduce("ReduceSum", b.Sub(dag.box[k][1], dag.box[k][0]), [1], keepdims=0)
              for k, node in enumerate(dag.nodes[:-1])
              if node.kind == "linear" and any(dag.nodes[c].kind != "linear" for c in dag.cons[k])]
    if not widths:  # every ReLU reads the input itself: its box is the ball's, no slope moves anything
        widths = [b.reduce("ReduceSum", b.Mul(dag.box[0][0], b.c(0.0)), [1], keepdims=0)]
    b.nodes.append(helper.make_node("Identity", [b.Sum(*widths) if len(widths) > 1 else widths[0]], [OBJECTIVE]))
    b.add_output(OBJECTIVE, elem, ["batch"])
    return json.dumps(spec)


def per_neuron_bytes(graph: Graph, memory_limit=recurjac.MEMORY_LIMIT) -> float:
    """Bytes the per-neuron slopes of an optimised bound of a lowered graph may take: every (linear node t feeding a
    nonlinearity, ReLU/LeakyReLU node k before it) pair at PER_NEURON_BYTES per slope, both sides, capped by the
    budget SlopeInputs keeps to. An upper bound: chunked and unreachable pairs count."""
    cons = graph.consumers()
    sloped = [k for k, node in enumerate(graph.nodes) if node.kind == "act" and node.activation in SLOPED]
    starts = [t for t, node in enumerate(graph.nodes[:-1])
              if node.kind == "linear" and any(graph.nodes[c].kind != "linear" for c in cons[t])]
    total = sum(PER_NEURON_BYTES * 2.0 * graph.nodes[t].n * graph.nodes[k].n for t in starts for k in sloped if k < t)
    return min(total, memory_limit // PER_NEURON_SHARE)


def working_set(model, input_shape=None, points=1, memory_limit=recurjac.MEMORY_LIMIT) -> float:
    """Bytes an optimised bound is estimated to hold (for the memory guard, before building), from one lowering:
    MEMORY_FACTOR times the bound graph's working set (the gradient graph keeps the back-substitution's values for
    its reverse sweep) plus the per-neuron slopes."""
    graph = lower_graph(model, input_shape)
    return (MEMORY_FACTOR * recurjac.graph_working_set(graph, points=points, memory_limit=memory_limit)
            + per_neuron_bytes(graph, memory_limit))


# ---- the optimiser ------------------------------------------------------------------------------

def prune(model: onnx.ModelProto, outputs) -> onnx.ModelProto:
    """A copy of `model` computing only `outputs`: the nodes they need, the initializers those read,
    every graph input kept (and no initializer left as a default for an input)."""
    g = model.graph
    need, keep = set(outputs), []
    for node in reversed(g.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in reads([node]) if i)  # a Loop body (chunked CROWN) reads outer values too
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {i.name for i in g.input}
    del out.graph.node[:], out.graph.output[:], out.graph.initializer[:]
    out.graph.node.extend(reversed(keep))
    out.graph.output.extend(o for o in g.output if o.name in outputs)
    out.graph.initializer.extend(t for t in g.initializer if t.name in need and t.name not in inputs)
    return out


class SlopeOptimiser:
    """The bound graph with slope inputs and its gradient graph, built once, run for any batch of points.

    slopes="neuron" (default): per-bounded-neuron, per-side slopes in every CROWN back-substitution that runs
    at once, shared per-unit ones in those that run in chunks of rows (large CNNs); "unit": shared everywhere."""

    def __init__(self, model, norm="inf", method="recurjac", input_shape=None, dtype=np.float64,
                 memory_limit=recurjac.MEMORY_LIMIT, threads=None, slopes="neuron"):
        if slopes not in ("neuron", "unit"):
            raise JacgraphError(f"SlopeOptimiser(slopes={slopes!r}): no such slope mode. Choose 'neuron' (the default: "
                                "one slope per bounded neuron and side) or 'unit' (one slope per unit, shared by every "
                                "bound: less memory, looser bounds).")
        self.model = recurjac.build(model, norm=norm, method=method, input_shape=input_shape, dtype=dtype,
                                    lowering="graph", slope_inputs=slopes, memory_limit=memory_limit,
                                    preactivation_bounds=True)  # z<k>_lower/upper: which units are unstable
        meta = {p.key: p.value for p in self.model.metadata_props}  # absent: no ReLU/LeakyReLU, nothing to optimise
        self.spec = json.loads(meta.get("jacgraph.slope_inputs", "{}"))  # every alpha input, as the build declared it
        self.dtype = np.dtype(dtype)
        self.bounds = session(self.model, threads=threads)
        if self.spec:
            grad = vjp.emit(prune(self.model, [OBJECTIVE]), inputs=list(self.spec))
            self.gradient_model = grad.model
            self.bar = grad.cotangent_inputs[OBJECTIVE]
            self.grad_outputs = [grad.gradient_outputs[a] for a in self.spec]
            self.gradient = session(grad.model, threads=threads)

    def objective_and_gradient(self, x0, eps, alpha):
        """slope_objective [batch] and its gradient w.r.t. each alpha input, from the VJP graph."""
        feeds = {"x0": np.asarray(x0, self.dtype), "eps": np.asarray(eps, self.dtype).reshape(-1)}
        feeds[self.bar] = np.ones(len(feeds["eps"]), self.dtype)
        obj, *grads = self.gradient.run([OBJECTIVE] + self.grad_outputs, {**feeds, **alpha})
        return obj, dict(zip(self.spec, grads))

    def _shared(self) -> dict:
        """{slope_<k>: node k's shared input alpha_<k>}: the parameter each per-neuron input of k adds its offset to."""
        return {s["output"]: a for a, s in self.spec.items() if "start" not in s}

    def slopes(self, params):
        """The alpha inputs from the optimised parameters: a shared input is its parameter, a per-neuron one
        alpha_<t>_<k>_<side> is node k's shared parameter (on every row) plus its own offset parameter."""
        base = self._shared()
        return {a: params[a] if "start" not in s else params[base[s["output"]]][:, None] + params[a]
                for a, s in self.spec.items()}

    def run(self, x0, eps, iterations=20, lr=0.1, lr_offset=0.05, betas=(0.9, 0.999)):
        """(J_lower, J_upper, history): the elementwise best bounds over `iterations` projected Adam steps
        from CROWN's slopes (iterations=0: CROWN's bounds); history is slope_objective [iterations + 1, batch]
        (zeros [1, batch] when the model has no ReLU/LeakyReLU to optimise).

        A per-neuron slope is node k's shared slope plus a per-neuron offset (SlopeOptimiser.slopes): the shared
        part steps (lr) along the gradient summed over every row and side, which with the offsets held at zero
        (lr_offset=0) is the shared mode exactly; the offsets step with lr_offset from zero. Measured: Adam on
        the per-neuron slopes alone (no shared part) ends wider than the shared mode on densenet_cnn (eps 0.1,
        20 steps: mean width 0.007024 against 0.006928; docs/benchmarks/bounds.md, "Optimised slopes")."""
        feeds = {"x0": np.asarray(x0, self.dtype), "eps": np.asarray(eps, self.dtype).reshape(-1)}
        if not self.spec:  # no ReLU/LeakyReLU: nothing to optimise (and no objective output)
            lo, hi = self.bounds.run(["J_lower", "J_upper"], feeds)
            return lo, hi, np.zeros((1, len(feeds["eps"])))
        used = sorted({s["output"] for s in self.spec.values()})
        first = self.bounds.run(["J_lower", "J_upper", OBJECTIVE] + used, feeds)
        best_lo, best_hi, obj = first[:3]
        start = dict(zip(used, first[3:]))  # CROWN's slopes [batch, n_k]
        base = self._shared()
        params = {a: start[s["output"]] if "start" not in s else np.zeros((len(feeds["eps"]), *s["shape"]))
                  for a, s in self.spec.items()}
        history = [obj]
        m = {a: np.zeros_like(v) for a, v in params.items()}
        v = {a: np.zeros_like(t) for a, t in params.items()}
        for t in range(1, iterations + 1):
            _, grads = self.objective_and_gradient(feeds["x0"], feeds["eps"], self.slopes(params))
            for a, s in self.spec.items():  # a shared parameter moves every per-neuron slope of its node
                if "start" in s:
                    grads[base[s["output"]]] = grads[base[s["output"]]] + grads[a].sum(axis=1)
            for a, g in grads.items():  # Adam, then the projection: every slope in [s_0, s_1]
                m[a] = betas[0] * m[a] + (1 - betas[0]) * g
                v[a] = betas[1] * v[a] + (1 - betas[1]) * g * g
                rate = lr_offset if "start" in self.spec[a] else lr
                params[a] = params[a] - rate * (m[a] / (1 - betas[0] ** t)) / (np.sqrt(v[a] / (1 - betas[1] ** t)) + 1e-8)
            for a, s in sorted(self.spec.items(), key=lambda item: "start" in item[1]):  # shared first, then offsets
                shift = 0.0 if "start" not in s else params[base[s["output"]]][:, None]
                params[a] = np.clip(params[a], s["range"][0] - shift, s["range"][1] - shift)
            lo, hi, obj = self.bounds.run(["J_lower", "J_upper", OBJECTIVE], {**feeds, **self.slopes(params)})
            best_lo, best_hi = np.maximum(best_lo, lo), np.minimum(best_hi, hi)
            history.append(obj)
        return best_lo, best_hi, np.array(history)
