"""The JVP pass: (x, x_dot) -> (y, y_dot) with y_dot = J(x) x_dot, by the rules in jacgraph.rules.jvp."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import onnx

from jacgraph.builder import Builder
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel, node_inputs
from jacgraph.rules import control_flow  # noqa: F401  (registers If/Loop/Scan into the JVP and VJP tables)
from jacgraph.rules.jvp import BATCHED, JVP, zeros_like

STRATEGIES = ("twopass", "batched", "auto")
DEFAULT_STRATEGY = "auto"


def weight_bound(src: SourceModel, node, stacked: bool = False) -> bool:
    """The `auto` strategy's choice: batch a linear op's tangent with its primal (one call over concat(x, ẋ))
    when its weights are at least 16x its outputs per sample, so that reading the weights once for both pays for
    the Concat, Split and bias Add, and large: >= 16K for Gemm/MatMul, >= 128K for Conv. Measured in
    docs/benchmarks/speed.md: dense layers from 16K weights gain (bert_wide's 128x128 and 128x512 MatMuls over
    5 tokens: JVP 2.13 -> 1.87 x forward, maxout_mlp 1.59 -> 1.50), from 4K they lose (gpt2's 32x128 Gemms:
    2.27 -> 2.46); smaller conv thresholds batched mobilenetv2's 4x4 1x1 convs and lost. With one tangent (not
    `stacked`) convolutions stay two-pass: the ReLU/Clip gates then run in onnxruntime's NCHWc layout, which a
    batched Conv's batch-axis Concat and Split leave, and it measured 1-4% slower on resnet18 and vgg_style; with K
    stacked tangents (Where gates) batching still pays (resnet18 K=4: docs/benchmarks/jvp-profile.md)."""
    dense = node.op_type in ("Gemm", "MatMul")
    if not stacked and not dense:
        return False
    w, y = src.shape(node.input[1]), src.shape(node.output[0])
    if not (w and y and all(isinstance(d, int) for d in list(w) + list(y[1:]))):
        return False
    weights = math.prod(w)
    return weights >= (2**14 if dense else 2**17) and weights >= 16 * math.prod(y[1:])


def missing_rules(src: SourceModel, wrt, table) -> Counter:
    """Ops on the differentiated path that have no rule in `table`, with counts (RuleTable.missing)."""
    return table.missing(src, wrt)


def tangent_name(b, name):
    return b.fresh(f"{name}_dot")


def differentiate(b, env):
    """Copy b.src's nodes into `b`, each followed by its tangent rule; `env` (source value name -> tangent
    name, absent: zero) is updated. Control-flow rules call this on a child Builder for each body."""
    strategy = getattr(b, "strategy", DEFAULT_STRATEGY)
    for node in b.src.nodes:
        tangents_in = [env.get(name) if name else None for name in node_inputs(node)]
        if all(t is None for t in tangents_in):
            b.copy(node)
            continue
        outs = NotImplemented
        if node.op_type in BATCHED and (strategy == "batched" or strategy == "auto" and weight_bound(b.src, node, b.K is not None)):
            outs = b.apply(BATCHED[node.op_type], node, *tangents_in)
        if outs is NotImplemented:
            b.copy(node)
            outs = b.apply(JVP[node.op_type], node, *tangents_in)
        env.update((name, t) for name, t in zip(node.output, outs) if name)


@dataclass
class JVPResult:
    """The emitted model and the names a caller building on it needs (its metadata only documents them)."""
    model: onnx.ModelProto
    tangent_inputs: dict  # differentiated input x -> its tangent input x_dot
    tangent_outputs: dict  # output y -> its tangent output y_dot


def build(model, inputs=None, tangents=None, strategy=DEFAULT_STRATEGY) -> onnx.ModelProto:
    """The JVP model (what `jacgraph compile --emit jvp` writes); see `emit`."""
    return emit(model, inputs, tangents, strategy).model


def emit(model, inputs=None, tangents=None, strategy=DEFAULT_STRATEGY) -> JVPResult:
    """Emit the JVP model: source inputs, then one `<x>_dot` per differentiated input; outputs y then `<y>_dot`."""
    src = model if isinstance(model, SourceModel) else SourceModel(model)
    wrt = src.check_inputs(inputs if inputs else src.float_inputs())
    if strategy not in STRATEGIES:
        raise JacgraphError(f"--strategy {strategy!r} is not known; use one of {', '.join(STRATEGIES)}.")
    if tangents is not None and (not isinstance(tangents, int) or tangents < 1):
        raise JacgraphError(f"--tangents must be a positive integer, got {tangents!r}.")
    JVP.check(src, wrt)

    b = Builder(src, K=tangents)
    lead = [] if tangents is None else [tangents]
    for inp in src.graph.input:
        if inp.name not in src.initializers:
            b.inputs.append(inp)
    env = {}  # source value name -> tangent name in the new graph (absent/None: symbolic zero)
    for x in wrt:
        env[x] = tangent_name(b, x)
        b.add_input(env[x], src.dtype(x), lead + list(src.shape(x) or []))

    b.strategy = strategy
    differentiate(b, env)

    b.outputs.extend(src.outputs)
    out_pairs = []
    for y in src.outputs:
        t = env.get(y.name)
        if t is None:
            t = zeros_like(b, y.name)
        name = b.fresh(f"{y.name}_dot")
        b.nodes.append(onnx.helper.make_node("Identity", [t], [name], name=b.fresh("jg_output")))
        b.add_output(name, src.dtype(y.name), lead + list(src.shape(y.name) or []))
        out_pairs.append([y.name, name])
    metadata = {"jacgraph.emit": "jvp", "jacgraph.strategy": strategy, "jacgraph.tangents": tangents or 0,
                "jacgraph.tangent_inputs": json.dumps([[x, env[x]] for x in wrt]),
                "jacgraph.tangent_outputs": json.dumps(out_pairs)}
    model = b.build(f"{src.graph.name}_jvp", doc=f"JVP of {src.graph.name} (jacgraph)", metadata=metadata)
    return JVPResult(model, {x: env[x] for x in wrt}, dict(out_pairs))
