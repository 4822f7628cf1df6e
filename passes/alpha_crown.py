"""Optimised relaxation slopes (the alpha-CROWN idea) for the RecurJac bound graph.

    opt = SlopeOptimiser(model, norm="inf")            # builds the bound graph and its gradient graph once
    lo, hi, history = opt.run(x0, eps, iterations=20)  # x0 [batch, *input], eps [batch]

CROWN relaxes an unstable ReLU unit (l < 0 < u) by its chord above and a line a z below, for any slope a
in [0, 1] (LeakyReLU with slope s: a in [s, 1]); every choice gives sound bounds, so the slopes are free
parameters (alpha-CROWN, Xu et al., ICLR 2021). `recurjac.build(slope_inputs=True)` makes them inputs
alpha_<k> [batch, units] of the bound graph, one per ReLU/LeakyReLU node k of the graph lowering (default
NaN: CROWN's adaptive choice, the piece closer to the interval), and adds outputs slope_<k> (the slopes
used) and slope_objective [batch]: the sum of the widths u - l of the pre-activation bounds of every
linear node that feeds a nonlinearity. Then, per batch of points:

1. Start from CROWN's slopes (slope_<k> of a run with the defaults: the same bounds as without inputs).
2. The gradient of slope_objective w.r.t. the alpha inputs comes from jacgraph's own VJP pass over the
   bound graph (pruned to that output), run in onnxruntime.
3. Adam steps on the slopes in numpy, projected into the valid range after each step.
4. Every iterate's bounds are sound, so the result is the elementwise best over the iterates (the max
   of the lower bounds, the min of the upper ones).

Why the pre-activation widths and not J's: in a ReLU network the Jacobian bounds depend on the slopes
only through which units the pre-activation bounds make stable (relu' in {0}, {1} or [0, 1], a step
function of l and u), so their gradient w.r.t. the slopes is zero almost everywhere; narrower l, u are
what turns units stable. The slopes are shared by every bound in the graph (one per unit and point),
not optimised per bounded neuron as alpha-CROWN proper does: cheaper, possibly less tight.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jacgraph.lowering import reads
from jacgraph.layers import lower_graph
from jacgraph.model import SourceModel
from jacgraph.passes import recurjac, vjp
from jacgraph.rules.bounds import SLOPED, slope_range
from jacgraph.runtime import session

OBJECTIVE = "slope_objective"
# The memory guard's estimate for a bound with optimised slopes, as a multiple of the plain bound's: the
# gradient graph keeps the back-substitution's values for its reverse sweep. Measured peak RSS above the
# plain bound's: 1.1x (densenet_cnn), 1.4x (inception_cnn), 1.6x (resnet_cnn), >= 1.5x (LeNet, stopped).
MEMORY_FACTOR = 3


# ---- the graph side (called by recurjac._build_graph) -------------------------------------------

def slope_spec(graph) -> dict:
    """{alpha_<k>: {"node": k, "output": "slope_<k>", "range": [s_0, s_1]}} for every ReLU/LeakyReLU node k
    of a lowered graph (jacgraph.layers.lower_graph): the slope inputs a bound graph of it has."""
    return {f"alpha_{k}": {"node": k, "output": f"slope_{k}", "range": list(slope_range(node.activation, node.act_attrs))}
            for k, node in enumerate(graph.nodes) if node.kind == "act" and node.activation in SLOPED}


def declare_slope_inputs(b, graph) -> dict:
    """An input alpha_<k> [batch, n_k] for every ReLU/LeakyReLU node k, defaulting to NaN (CROWN's choice);
    returns {k: its input}."""
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    slopes = {}
    for name, s in slope_spec(graph).items():
        n = graph.nodes[s["node"]].n
        b.add_input(name, elem, ["batch", n])
        b.initializers.append(numpy_helper.from_array(np.full((1, n), np.nan, b.dtype), name))
        slopes[s["node"]] = name
    return slopes


def emit_slope_outputs(b, dag, slopes) -> str:
    """Outputs slope_<k> [batch, n_k] (the lower slopes used) and slope_objective [batch]; returns the
    metadata that documents them (slope_spec as JSON)."""
    elem = helper.np_dtype_to_tensor_dtype(b.dtype)
    spec = slope_spec(dag.g)
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
    """The bound graph with slope inputs and its gradient graph, built once, run for any batch of points."""

    def __init__(self, model, norm="inf", method="recurjac", input_shape=None, dtype=np.float64,
                 memory_limit=recurjac.MEMORY_LIMIT, threads=None):
        src = model if isinstance(model, SourceModel) else SourceModel(model)
        self.model = recurjac.build(src, norm=norm, method=method, input_shape=input_shape, dtype=dtype,
                                    lowering="graph", slope_inputs=True, memory_limit=memory_limit,
                                    preactivation_bounds=True)  # z<k>_lower/upper: which units are unstable
        self.spec = slope_spec(lower_graph(src, input_shape))  # the graph's metadata only documents it
        assert set(self.spec) <= {i.name for i in self.model.graph.input}, "slope inputs differ from the lowering"
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

    def run(self, x0, eps, iterations=20, lr=0.1, betas=(0.9, 0.999)):
        """(J_lower, J_upper, history): the elementwise best bounds over `iterations` projected Adam steps
        from CROWN's slopes (iterations=0: CROWN's bounds); history is slope_objective [iterations + 1, batch]
        (zeros [1, batch] when the model has no ReLU/LeakyReLU to optimise)."""
        feeds = {"x0": np.asarray(x0, self.dtype), "eps": np.asarray(eps, self.dtype).reshape(-1)}
        if not self.spec:  # no ReLU/LeakyReLU: nothing to optimise (and no objective output)
            lo, hi = self.bounds.run(["J_lower", "J_upper"], feeds)
            return lo, hi, np.zeros((1, len(feeds["eps"])))
        first = self.bounds.run(["J_lower", "J_upper", OBJECTIVE] + [s["output"] for s in self.spec.values()], feeds)
        best_lo, best_hi, obj = first[:3]
        alpha = dict(zip(self.spec, first[3:]))
        history = [obj]
        m = {a: np.zeros_like(v) for a, v in alpha.items()}
        v = {a: np.zeros_like(t) for a, t in alpha.items()}
        for t in range(1, iterations + 1):
            _, grads = self.objective_and_gradient(feeds["x0"], feeds["eps"], alpha)
            for a, g in grads.items():  # Adam, then the projection onto [s_0, s_1]
                m[a] = betas[0] * m[a] + (1 - betas[0]) * g
                v[a] = betas[1] * v[a] + (1 - betas[1]) * g * g
                step = lr * (m[a] / (1 - betas[0] ** t)) / (np.sqrt(v[a] / (1 - betas[1] ** t)) + 1e-8)
                alpha[a] = np.clip(alpha[a] - step, *self.spec[a]["range"])
            lo, hi, obj = self.bounds.run(["J_lower", "J_upper", OBJECTIVE], {**feeds, **alpha})
            best_lo, best_hi = np.maximum(best_lo, lo), np.minimum(best_hi, hi)
            history.append(obj)
        return best_lo, best_hi, np.array(history)
