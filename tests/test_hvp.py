"""--emit hvp and the closure of the rule set under its own output (issue 12, item 6).

1. HVP (x, v) -> (y, ∇f, H v) on exported PyTorch models (an MLP with smooth activations, a small CNN with
   max-pooling, a transformer-like block), in float64 through onnx's reference evaluator:
   - against central differences of the VJP graph's gradient in direction v: h = 1e-6 in float64 gives
     truncation O(h²·f'''') ~ 1e-12 and round-off ~ 1e-16/h ~ 1e-10 relative, so 1e-6 leaves margin (the
     tolerance of the JVP rule tests); random inputs keep every max-pool window free of ties;
   - against torch.func forward-over-reverse, jvp(grad(f)), in float64 with the same weights: the graphs are
     emitted from the float32 export, so their constants (GELU's 1/√2 and 1/√(2π) in its slope, LayerNorm's
     ε, attention's 1/√d) are rounded to float32 (6e-8 relative) before the float64 copy is made; measured
     2e-8 relative with GELU/LayerNorm, 4e-16 for the CNN which has none; 1e-6 leaves margin while a wrong
     rule is off by O(1);
   - in float32 onnxruntime with full optimizations, against the float64 result: float32 round-off ~1e-7 per
     op accumulates over the forward, reverse and tangent sweeps; 1e-3 relative.
2. Closure: for every case of the rule tests, the JVP and VJP graphs use only ops that have both JVP and
   VJP rules, and jvp(vjp), vjp(vjp), jvp(jvp) compile; for one case per op they are checked numerically
   (jvp(vjp) and jvp(jvp) against central differences of the graph they differentiate, vjp(vjp) by the
   dot product with jvp(vjp)).
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from jacgraph import compile as jg_compile
from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.passes import hvp, jvp, vjp
from jacgraph.rules.jvp import JVP
from jacgraph.rules.transpose import VJP
from jacgraph.testing import central_difference, relative_error, run_reference, to_float64
from test_rules_jvp import CASES, case_id
from test_rules_transpose import EXTRA, reference

torch = pytest.importorskip("torch")
from examples.bench_hvp import CNN, MLP, Block  # noqa: E402  (the models the benchmark times)

TOL = 1e-6      # against central differences (see the module docstring)
H = 1e-6
TORCH_TOL = 1e-6
ORT_TOL = 1e-3


# ---- exported models ----------------------------------------------------------------------------

MODELS = {  # name -> (module, input shape)
    "mlp": (lambda: MLP(), (2, 6)),
    "mlp-scalar": (lambda: MLP(scalar=True), (2, 6)),
    "cnn": (lambda: CNN(), (2, 3, 8, 8)),
    "block": (lambda: Block(), (2, 5, 8)),
    "block-scalar": (lambda: Block(scalar=True), (2, 5, 8)),
}


@pytest.fixture(scope="module")
def exported():
    """name -> (float32 ONNX model, the float64 torch module with the same weights)."""
    out = {}
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        module = make().eval()
        f = io.BytesIO()
        torch.onnx.export(module, (torch.randn(*shape),), f, input_names=["x"], output_names=["y"], dynamo=False)
        out[name] = (onnx.load_from_string(f.getvalue()), module.double())
    return out


def hvp_case(exported, name):
    model, module = exported[name]
    result = hvp.emit(model)
    shape = MODELS[name][1]
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal(shape), "x_dot": rng.standard_normal(shape)}
    for y, bar in result.cotangent_inputs.items():
        feeds[bar] = rng.standard_normal(tuple(d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim))
    return model, module, result, feeds


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_matches_central_differences_of_the_vjp(exported, name):
    model, _, result, feeds = hvp_case(exported, name)
    assert bool(result.cotangent_inputs) == (not name.endswith("scalar"))
    out = run_reference(reference(to_float64(result.model)), feeds)
    reverse = vjp.emit(model)
    grad_feeds = {k: v for k, v in feeds.items() if k != "x_dot"}
    if not result.cotangent_inputs:  # the scalar's cotangent is the constant 1
        grad_feeds.update({bar: np.ones(()) for bar in reverse.cotangent_inputs.values()})
    fd = central_difference(reference(to_float64(reverse.model)), grad_feeds, {"x": feeds["x_dot"]}, H)
    grad = run_reference(reference(to_float64(reverse.model)), grad_feeds)
    assert relative_error(out["x_bar"], grad["x_bar"]) < 1e-12, "the gradient output is the VJP's"
    assert relative_error(out["x_hvp"], fd["x_bar"]) < TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_matches_torch_forward_over_reverse(exported, name):
    _, module, result, feeds = hvp_case(exported, name)
    out = run_reference(reference(to_float64(result.model)), feeds)
    y_bar = torch.tensor(feeds["y_bar"]) if result.cotangent_inputs else None

    def f(x):
        y = module(x)
        return y if y_bar is None else (y * y_bar).sum()

    x, v = torch.tensor(feeds["x"]), torch.tensor(feeds["x_dot"])
    grad, hv = torch.func.jvp(torch.func.grad(f), (x,), (v,))
    assert relative_error(out["x_bar"], grad.detach().numpy()) < TORCH_TOL
    assert relative_error(out["x_hvp"], hv.detach().numpy()) < TORCH_TOL


@pytest.mark.parametrize("name", ["mlp", "cnn", "block-scalar"])
def test_hvp_runs_in_onnxruntime_float32(exported, name):
    _, _, result, feeds = hvp_case(exported, name)
    expected = run_reference(reference(to_float64(result.model)), feeds)
    got = runtime.run(runtime.session(result.model), {k: v.astype(np.float32) for k, v in feeds.items()})
    assert relative_error(got["x_hvp"], expected["x_hvp"]) < ORT_TOL


def test_hvp_several_directions_and_options(exported):
    model, _, result, feeds = hvp_case(exported, "mlp")
    stacked = hvp.emit(model, tangents=2)
    v2 = np.stack([feeds["x_dot"], -2.0 * feeds["x_dot"][::-1]])
    out = run_reference(reference(to_float64(stacked.model)), {**feeds, "x_dot": v2})
    for k in range(2):
        one = run_reference(reference(to_float64(result.model)), {**feeds, "x_dot": v2[k]})
        assert relative_error(out["x_hvp"][k], one["x_hvp"]) < 1e-12
    forced = hvp.emit(exported["mlp-scalar"][0], y_bar=True)
    assert [i.name for i in forced.model.graph.input] == ["x", "y_bar", "x_dot"]
    with pytest.raises(JacgraphError, match="not one scalar"):
        hvp.emit(model, y_bar=False)
    assert [o.name for o in jg_compile(model, emit="hvp").graph.output] == ["y", "x_bar", "x_hvp"]


# ---- closure: every op an emitted graph uses has rules in both tables -------------------------------

CLOSURE_CASES = CASES + EXTRA
ONE_PER_OP = list({c.op: c for c in reversed(CLOSURE_CASES)}.values())


def first_order(case):
    model = case.model()
    return model, jvp.emit(model), vjp.emit(model)


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=case_id)
def test_emitted_ops_have_rules_in_both_tables(case):
    _, forward, reverse = first_order(case)
    for graph in (forward.model, reverse.model):
        ops = {n.op_type for n in graph.graph.node}
        assert not ops - set(JVP) and not ops - set(VJP), f"{case_id(case)}: no JVP/VJP rule for {ops - set(JVP) - set(VJP)}"
    for build, graph in ((jvp.build, reverse.model), (vjp.build, reverse.model), (jvp.build, forward.model)):
        try:
            onnx.checker.check_model(build(graph), full_check=True)
        except JacgraphError as e:
            if "needs opset" not in str(e):  # jacgraph.compile converts the model up for these
                raise


def _random_feeds(model, rng, case, reverse):
    """Feeds for every float input of an emitted graph: the case's inputs from its sampler, the cotangents (shaped
    like the primal outputs, which may be dynamic) and tangents standard normal."""
    sampled = {x: case.sample(rng, shape) for x, shape in case.inputs.items()}
    primal = run_reference(reference(case.model()), sampled)
    shapes = {**{x: np.shape(v) for x, v in sampled.items()},
              **{bar: np.shape(primal[y]) for y, bar in reverse.cotangent_inputs.items()}}
    feeds = {}
    for i in model.graph.input:
        if i.type.tensor_type.elem_type != onnx.TensorProto.DOUBLE:
            continue
        dims = shapes.get(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim))
        feeds[i.name] = sampled[i.name] if i.name in sampled else rng.standard_normal(dims)
    return feeds


@pytest.mark.parametrize("case", ONE_PER_OP, ids=case_id)
def test_second_order_graphs_are_right(case):
    _, forward, reverse = first_order(case)
    rng = np.random.default_rng(11)
    for graph in (reverse.model, forward.model):  # jvp(vjp) = HVP, jvp(jvp): against central differences
        second = jvp.emit(graph)
        feeds = _random_feeds(graph, rng, case, reverse)
        directions = {x: rng.standard_normal(np.shape(feeds[x])) for x in second.tangent_inputs}
        out = run_reference(reference(second.model), {**feeds, **{second.tangent_inputs[x]: d for x, d in directions.items()}})
        fd = central_difference(reference(graph), feeds, directions, H)
        for y, y_dot in second.tangent_outputs.items():
            if y in fd:
                assert relative_error(out[y_dot], fd[y]) < TOL, f"{case_id(case)}: d/dε of {y}"
    try:  # vjp(vjp): <J w, u> = <w, Jᵀ u> with J w from jvp(vjp)
        twice = vjp.emit(reverse.model)
    except JacgraphError as e:
        assert "needs opset" in str(e)
        return
    second = jvp.emit(reverse.model)
    feeds = _random_feeds(reverse.model, rng, case, reverse)
    w = {x: rng.standard_normal(np.shape(feeds[x])) for x in second.tangent_inputs}
    jw = run_reference(reference(second.model), {**feeds, **{second.tangent_inputs[x]: d for x, d in w.items()}})
    u = {bar: rng.standard_normal(np.shape(jw[second.tangent_outputs[y]])) for y, bar in twice.cotangent_inputs.items()}
    back = run_reference(reference(twice.model), {**feeds, **u})
    lhs = sum(float(np.vdot(jw[second.tangent_outputs[y]], u[bar])) for y, bar in twice.cotangent_inputs.items())
    rhs = sum(float(np.vdot(w[x], back[bar])) for x, bar in twice.gradient_outputs.items() if x in w)
    scale = sum(np.linalg.norm(jw[second.tangent_outputs[y]]) * np.linalg.norm(u[bar])
                for y, bar in twice.cotangent_inputs.items())
    assert abs(lhs - rhs) <= 1e-10 * max(scale, 1e-30), f"{case_id(case)}: <Jw,u> = {lhs!r}, <w,J^T u> = {rhs!r}"
