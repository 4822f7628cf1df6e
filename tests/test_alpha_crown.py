"""passes/alpha_crown.py: optimised ReLU lower-line slopes for the RecurJac bound graph. The slope inputs'
defaults reproduce CROWN's bounds, per-neuron slopes equal on every row reproduce the shared ones, optimised
bounds are never wider than CROWN's (per-neuron: never wider than the shared mode's) and stay sound against
sampled float64 torch Jacobians, and the VJP graph's gradient of the objective agrees with central differences.
"""
import json

import numpy as np
import onnx
import pytest
from test_layers import chain_model, random_mlp
from test_recurjac import N_POINTS, TOL, bounds, graph_kinks, jacobians, sample_ball, stage_function

from examples import bounds_models
from jacgraph import layers
from jacgraph.cli import main
from jacgraph.errors import JacgraphError
from jacgraph.layers import lower, lower_graph
from jacgraph.passes import alpha_crown, recurjac
from jacgraph.passes.alpha_crown import OBJECTIVE, SlopeOptimiser
from jacgraph.runtime import session


def per_neuron(opt):
    """The per-neuron slope inputs alpha_<t>_<k>_<side> of an optimiser's bound graph."""
    return [a for a, s in opt.spec.items() if "start" in s]


def finite(*arrays):
    """Assert every array is finite (an equality check alone would pass NaN == NaN), and return them."""
    for a in arrays:
        assert np.all(np.isfinite(a)), "a bound or an objective is not finite"
    return arrays


@pytest.fixture(scope="module")
def residual():
    net, shape = bounds_models.build("residual_mlp"), bounds_models.INPUT_SHAPES["residual_mlp"]
    model = bounds_models.export_bytes(net, shape)
    return net, shape, model, SlopeOptimiser(model), SlopeOptimiser(model, slopes="unit")


def test_graphs_are_valid_and_default_slopes_give_crowns_bounds(residual):
    _, shape, model, opt, unit = residual
    assert len(per_neuron(opt)) == 6 and not per_neuron(unit)  # three CROWN starts x their ReLUs below, x 2 sides
    x0, eps = np.random.default_rng(0).standard_normal((2, *shape)), np.array([0.05, 0.3])
    plain = finite(*bounds(recurjac.build(model, lowering="graph"), x0, eps))
    for o in (opt, unit):
        onnx.checker.check_model(o.model, full_check=True)
        onnx.checker.check_model(o.gradient_model, full_check=True)
        defaults = o.bounds.run(["J_lower", "J_upper"], {"x0": x0, "eps": eps})  # alpha inputs left at NaN
        started = o.run(x0, eps, iterations=0)[:2]  # CROWN's slopes fed back as numbers
        for p, d, s in zip(plain, defaults, started):
            np.testing.assert_array_equal(d, p)
            np.testing.assert_array_equal(s, p)


def test_per_neuron_slopes_equal_on_every_row_are_the_shared_slopes(residual):
    """The same slope on every row and side: the per-neuron graph gives the shared graph's bounds and objective
    bit for bit, and its gradients summed over rows and sides are the shared gradient."""
    _, shape, _, opt, unit = residual
    rng = np.random.default_rng(4)
    x0, eps = rng.standard_normal((1, *shape)), np.array([0.3])
    shared = {a: rng.uniform(0, 1, (1, *s["shape"])) for a, s in unit.spec.items()}
    params = {**shared, **{a: np.zeros((1, *opt.spec[a]["shape"])) for a in per_neuron(opt)}}
    feeds = {"x0": x0, "eps": eps}
    names = ["J_lower", "J_upper", OBJECTIVE]
    for p, n in zip(unit.bounds.run(names, {**feeds, **shared}), opt.bounds.run(names, {**feeds, **opt.slopes(params)})):
        finite(p)
        np.testing.assert_array_equal(n, p)
    _, g_unit = unit.objective_and_gradient(x0, eps, shared)
    _, g = opt.objective_and_gradient(x0, eps, opt.slopes(params))
    for a, s in unit.spec.items():
        summed = g[a] + sum(g[p].sum(axis=1) for p in per_neuron(opt) if opt.spec[p]["node"] == s["node"])
        finite(g_unit[a])
        assert np.abs(g_unit[a]).max() > 0 or a == "alpha_6"  # the last ReLU feeds only the output: no CROWN reads it
        np.testing.assert_allclose(summed, g_unit[a], rtol=1e-12, atol=1e-12 * np.abs(g_unit[a]).max())


def test_slopes_out_of_range_are_clipped_into_it(residual):
    _, shape, _, opt, _ = residual
    x0, eps = np.random.default_rng(1).standard_normal((1, *shape)), np.array([0.3])
    rng = np.random.default_rng(2)
    wild = {a: rng.uniform(-2, 3, (1, *s["shape"])) for a, s in opt.spec.items()}
    clipped = {a: np.clip(v, *opt.spec[a]["range"]) for a, v in wild.items()}
    out = [opt.bounds.run(["J_lower", "J_upper", OBJECTIVE], {"x0": x0, "eps": eps, **alpha}) for alpha in (wild, clipped)]
    for w, c in zip(*out):
        finite(c)
        np.testing.assert_array_equal(w, c)


def test_chunked_crown_keeps_shared_slopes_and_optimises_like_crown_at_once(residual, monkeypatch):
    """Old: with CROWN in chunks (an ONNX Loop, as on the CIFAR models at the default limit) the gradient graph's
    pruning dropped what the Loop body reads from outside, and the optimiser refused the model as invalid ONNX.
    A back-substitution in chunks takes the shared slopes, not per-neuron ones (per-neuron slopes made free of
    cost here, so that their budget is not what keeps them out)."""
    monkeypatch.setattr(alpha_crown, "PER_NEURON_BYTES", 0)
    _, shape, model, _, unit = residual
    chunked = SlopeOptimiser(model, memory_limit=8000)  # slopes="neuron", but every CROWN step is in chunks here
    assert any(n.op_type == "Loop" for n in chunked.model.graph.node)
    assert not per_neuron(chunked)
    x0, eps = np.random.default_rng(3).standard_normal((1, *shape)), np.array([0.3])
    once, in_chunks = unit.run(x0, eps, iterations=3), chunked.run(x0, eps, iterations=3)
    finite(*once, *in_chunks)
    np.testing.assert_allclose(in_chunks[2], once[2], rtol=1e-9)  # the objective (CROWN widths) at every step
    # J itself may be looser in chunks (RecurJac steps over the limit keep the interval step): never wider than
    # the chunked graph's own CROWN bounds
    lo0, hi0 = chunked.run(x0, eps, iterations=0)[:2]
    assert np.all(in_chunks[0] >= lo0) and np.all(in_chunks[1] <= hi0)


def test_per_neuron_slopes_keep_to_their_budget(residual, monkeypatch):
    """A budget that one (start node, ReLU) pair fills: that pair gets per-neuron slopes, the other two pairs
    keep the shared ones in the same graph; the bounds are never wider than the shared mode's and stay sound."""
    net, shape, model, _, unit = residual
    pair = 2 * 24 * 24  # both sides of a 24-unit start node over a 24-unit ReLU
    monkeypatch.setattr(alpha_crown, "PER_NEURON_BYTES", recurjac.MEMORY_LIMIT // alpha_crown.PER_NEURON_SHARE // pair)
    mixed = SlopeOptimiser(model)
    assert per_neuron(mixed) == ["alpha_3_2_upper", "alpha_3_2_lower"], per_neuron(mixed)
    x0, eps = np.random.default_rng(5).standard_normal((1, *shape)), np.array([0.3])
    lo, hi, _ = finite(*mixed.run(x0, eps, iterations=10))
    lo_u, hi_u, _ = finite(*unit.run(x0, eps, iterations=10))
    assert np.all(lo >= lo_u) and np.all(hi <= hi_u)
    J = jacobians(lambda x: net(x[None])[0], sample_ball(x0[0], 0.3, "inf", graph_kinks(lower_graph(model), x0[0]),
                                                         np.random.default_rng(0)))
    assert (lo[0] - J).max() <= TOL and (J - hi[0]).max() <= TOL


def test_vjp_gradient_agrees_with_central_differences(residual):
    """At slopes inside (0, 1) the objective is smooth in them (away from units turning stable): float64 central
    differences with h = 1e-6 have error ~h^2 f''' + 1e-16 |f| / h ~ 1e-8 relative, far below 1e-5. Per-neuron
    inputs moved one at a time and every input at once (the shared ones are unused here: no CROWN runs in chunks)."""
    _, shape, _, opt, _ = residual
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal((1, *shape)), np.array([0.3])
    alpha = {a: rng.uniform(0.2, 0.8, (1, *s["shape"])) for a, s in opt.spec.items()}
    obj, grads = opt.objective_and_gradient(x0, eps, alpha)
    finite(obj, *grads.values())

    def objective(direction, t):
        feeds = {"x0": x0, "eps": eps, **{a: alpha[a] + t * direction.get(a, 0.0) for a in alpha}}
        return float(opt.bounds.run([OBJECTIVE], feeds)[0][0])

    h = 1e-6
    moved = ["alpha_3_2_upper", "alpha_5_4_upper", "alpha_5_2_lower", None]  # None: every input at once
    for name in moved:
        direction = {a: rng.standard_normal(v.shape) for a, v in alpha.items() if name in (None, a)}
        along = sum(float(np.sum(grads[a] * d)) for a, d in direction.items())
        central = (objective(direction, h) - objective(direction, -h)) / (2 * h)
        assert abs(along) > 1e-3, (name, along)  # the slopes do move the objective here
        assert abs(along - central) <= 1e-5 * abs(central), (name, along, central)


def mlp_case():
    """A random 32-96-96-5 ReLU MLP (seed 1) where per-neuron slopes beat shared ones beat CROWN's (measured
    2026-11-30, 20 steps: eps 0.1 mean widths 4.112 / 4.0045 / 3.9608)."""
    rng = np.random.default_rng(1)
    model = random_mlp([32, 96, 96, 5], rng, scale=1.5)
    f = stage_function(lower(model))[0]
    return model, f, (32,), rng.standard_normal((1, 32)), lower(model)


def densenet_case():
    net, shape = bounds_models.build("densenet_cnn"), bounds_models.INPUT_SHAPES["densenet_cnn"]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(0).standard_normal((1, *shape))
    return model, lambda x: net(x.reshape((1,) + tuple(shape))).reshape(-1), shape, x0, graph_kinks(lower_graph(model), x0.reshape(-1))


# eps per model where >= 10% of the ReLU inputs are unstable (asserted below)
CASES = {"mlp": (mlp_case, [0.1, 0.2]), "densenet_cnn": (densenet_case, [0.1, 0.3])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimised_bounds_are_never_wider_and_sound(name):
    """CROWN's slopes, shared optimised slopes and per-neuron ones (20 steps each), on the same points: each
    never wider than the one before, entry by entry; the objective falls; per-neuron strictly narrower in sum;
    2000+ sampled float64 Jacobians (corners, uniform, kink-aimed) inside both optimised bounds."""
    make, eps_list = CASES[name]
    model, f, shape, x0, kinks = make()
    neuron, unit = SlopeOptimiser(model), SlopeOptimiser(model, slopes="unit")
    assert per_neuron(neuron)
    plain = session(recurjac.build(model, lowering="graph", preactivation_bounds=True), provider="CPUExecutionProvider")
    gained = 0.0
    for eps in eps_list:
        base = finite(*plain.run(None, {"x0": x0, "eps": np.array([eps])}))
        unstable = np.concatenate([((zl < 0) & (zh > 0)).ravel() for zl, zh in zip(base[2::2], base[3::2])])
        assert unstable.mean() >= 0.1, unstable.mean()
        lo_u, hi_u, hist_u = finite(*unit.run(x0, np.array([eps]), iterations=20))
        lo, hi, hist = finite(*neuron.run(x0, np.array([eps]), iterations=20))
        assert np.all(lo_u >= base[0]) and np.all(hi_u <= base[1])
        assert np.all(lo >= lo_u) and np.all(hi <= hi_u), f"eps={eps}: per-neuron wider than shared somewhere"
        for h in (hist_u, hist):  # the objective at the start is CROWN's; some step beats it
            assert h[1:].min() < h[0].min(), h[:, 0]
        gained += float(np.sum(hi_u - lo_u) - np.sum(hi - lo))
        X = sample_ball(x0.reshape(-1), eps, "inf", kinks, np.random.default_rng(0), n=N_POINTS)
        J = jacobians(f, X)
        for low, high in ((lo, hi), (lo_u, hi_u)):
            below, above = (low[0] - J).max(), (J - high[0]).max()
            assert below <= TOL and above <= TOL, f"eps={eps}: a sampled Jacobian is outside by {max(below, above):.3g}"
    assert gained > 0, "per-neuron slopes tightened no entry beyond the shared ones at either eps"


def test_cli_optimize_slopes(tmp_path, capsys):
    net = bounds_models.build("residual_mlp")
    (tmp_path / "m.onnx").write_bytes(bounds_models.export_bytes(net, (16,)))
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).standard_normal((1, 16)))
    args = ["bound", str(tmp_path / "m.onnx"), "--x0", str(tmp_path / "x0.npy"), "--eps", "0.3"]
    assert main(args + ["-o", str(tmp_path / "plain.npz")]) == 0
    assert main(args + ["--optimize-slopes", "40", "-o", str(tmp_path / "opt.npz")]) == 0
    assert "slopes optimised by 40 steps" in capsys.readouterr().out
    plain, opt = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "opt.npz")
    finite(plain["J_lower"], plain["J_upper"], opt["J_lower"], opt["J_upper"])
    assert np.all(opt["J_lower"] >= plain["J_lower"]) and np.all(opt["J_upper"] <= plain["J_upper"])
    assert np.sum(opt["J_upper"] - opt["J_lower"]) < np.sum(plain["J_upper"] - plain["J_lower"])
    assert main(args + ["--optimize-slopes", "-1", "-o", str(tmp_path / "bad.npz")]) == 2
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("act,params,norm", [("leaky", (0.1,), "2"), ("leaky", (1.5,), "inf"), ("tanh", (), "inf")])
def test_a_chain_through_the_graph_lowering(act, params, norm):
    """A plain MLP (the chain pass's kind of model) goes through the graph lowering: LeakyReLU's slope range
    [min(s, 1), max(s, 1)] (s = 1.5 included), an l_2 ball, and a model with nothing to optimise (tanh:
    CROWN's bounds back). Sound against 2000+ sampled Jacobians, never wider than without."""
    rng = np.random.default_rng(7)
    model = random_mlp([6, 16, 12, 3], rng, act=act, act_params=params, scale=1.5)
    x0, eps = rng.standard_normal(6), 0.4
    plain = finite(*bounds(recurjac.build(model, norm=norm, lowering="graph"), x0[None], [eps]))
    r = recurjac.bound(model, x0, eps, norm=norm, optimize_slopes=20, progress=False)
    lo, hi = finite(r["J_lower"], r["J_upper"])
    assert np.all(lo >= plain[0]) and np.all(hi <= plain[1])
    if act == "tanh":
        np.testing.assert_array_equal(lo, plain[0])
        np.testing.assert_array_equal(hi, plain[1])
    stages = lower(model)
    J = jacobians(stage_function(stages)[0], sample_ball(x0, eps, norm, stages, np.random.default_rng(0)))
    below, above = (lo[0] - J).max(), (J - hi[0]).max()
    assert below <= TOL and above <= TOL, f"a sampled Jacobian is outside by {max(below, above):.3g}"


def test_a_relu_on_the_input_has_nothing_to_optimise():
    """ReLU(x) then a linear layer: no linear node feeds the ReLU, so the objective is zero and the bounds are CROWN's."""
    rng = np.random.default_rng(8)
    model = chain_model([("relu",), ("gemm", rng.standard_normal((3, 4)), rng.standard_normal(3))], (4,))
    x0 = rng.standard_normal(4)
    plain = finite(*bounds(recurjac.build(model, lowering="graph"), x0[None], [0.5]))
    r = recurjac.bound(model, x0, 0.5, optimize_slopes=3, progress=False)
    np.testing.assert_array_equal(r["J_lower"], plain[0])
    np.testing.assert_array_equal(r["J_upper"], plain[1])


def test_cli_memory_guard_counts_the_gradient_graph(tmp_path, capsys):
    """--max-memory between the plain bound's estimate and MEMORY_FACTOR times it: the plain bound runs, the
    optimised one is refused (exit 2, nothing written) with a message naming --optimize-slopes."""
    from jacgraph.cli import memory
    from jacgraph.model import SourceModel
    from jacgraph.passes.alpha_crown import MEMORY_FACTOR

    net = bounds_models.build("residual_mlp")
    (tmp_path / "m.onnx").write_bytes(bounds_models.export_bytes(net, (16,)))
    np.save(tmp_path / "x0.npy", np.zeros(16))
    need = memory.bound_working_set(SourceModel(str(tmp_path / "m.onnx")), None, 1)
    args = ["bound", str(tmp_path / "m.onnx"), "--x0", str(tmp_path / "x0.npy"), "--eps", "0.1",
            "--max-memory", str(int(need * (1 + MEMORY_FACTOR) / 2))]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--optimize-slopes", "5", "-o", str(tmp_path / "r.npz")]) == 2
    assert "--optimize-slopes" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()


def test_slope_inputs_metadata_describes_every_alpha_input(residual):
    """Old: the jacgraph.slope_inputs metadata listed only the shared inputs (nothing read it) and SlopeOptimiser
    lowered the model a second time to size the per-neuron ones. Now the metadata lists every alpha input with
    its range and shape, and it is what the optimiser reads."""
    _, _, model, opt, unit = residual
    graph = lower_graph(model)
    for o in (opt, unit):
        meta = {p.key: p.value for p in o.model.metadata_props}
        spec = json.loads(meta["jacgraph.slope_inputs"])
        assert spec == o.spec
        assert list(spec) == [i.name for i in o.model.graph.input if i.name.startswith("alpha_")]
        for a, s in spec.items():
            n_k = graph.nodes[s["node"]].n
            assert s["shape"] == ([graph.nodes[s["start"]].n, n_k] if "start" in s else [n_k]), a
            assert s["range"] == [0.0, 1.0] and s["output"] == f"slope_{s['node']}"
    assert sum("start" in s for s in opt.spec.values()) == 6


def test_the_model_is_lowered_once_to_build_and_once_to_check_memory(residual, tmp_path, monkeypatch):
    """Old: SlopeOptimiser lowered the model twice (the build, then again to size its per-neuron inputs), and
    `jacgraph bound --optimize-slopes` twice more for its memory estimate."""
    calls = []

    def counted(model, input_shape=None):
        calls.append(1)
        return lower_graph(model, input_shape)

    monkeypatch.setattr(layers, "lower_graph", counted)
    monkeypatch.setattr(alpha_crown, "lower_graph", counted)
    _, shape, model, _, _ = residual
    SlopeOptimiser(model)
    assert len(calls) == 1
    (tmp_path / "m.onnx").write_bytes(model)
    np.save(tmp_path / "x0.npy", np.zeros(shape))
    calls.clear()
    assert main(["bound", str(tmp_path / "m.onnx"), "--x0", str(tmp_path / "x0.npy"), "--eps", "0.1",
                 "--optimize-slopes", "1", "--quiet"]) == 0
    assert len(calls) == 2


def test_cli_memory_guard_sizes_the_graph_lowering_on_a_chain(tmp_path, capsys):
    """Old: on a plain MLP the guard sized the chain lowering (what the plain bound runs), but optimised slopes
    always run the graph lowering, which holds several times more (784-256-256-10: estimate 79 MiB against a
    measured 407 MiB peak RSS). A limit twice the old estimate now refuses, before allocating anything."""
    from jacgraph.cli import memory
    from jacgraph.model import SourceModel

    rng = np.random.default_rng(9)
    (tmp_path / "m.onnx").write_bytes(random_mlp([64, 64, 64, 10], rng).SerializeToString())
    np.save(tmp_path / "x0.npy", rng.standard_normal(64))
    src = SourceModel(str(tmp_path / "m.onnx"))
    old = memory.bound_working_set(src, None, 1) * alpha_crown.MEMORY_FACTOR + alpha_crown.per_neuron_bytes(lower_graph(src))
    assert alpha_crown.working_set(src) > 2 * old
    args = ["bound", str(tmp_path / "m.onnx"), "--x0", str(tmp_path / "x0.npy"), "--eps", "0.1", "--quiet",
            "--max-memory", str(int(2 * old)), "--optimize-slopes", "2", "-o", str(tmp_path / "r.npz")]
    assert main(args) == 2
    assert "--optimize-slopes" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("slopes", ["neurons", None, 1])
def test_an_unknown_slope_mode_is_a_jacgraph_error(slopes):
    """Old: a ValueError. Now the one error type for bad input, naming both modes, before anything is built."""
    with pytest.raises(JacgraphError, match="no such slope mode. Choose 'neuron'.*or 'unit'"):
        SlopeOptimiser(b"not even a model", slopes=slopes)
