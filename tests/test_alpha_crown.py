"""passes/alpha_crown.py: optimised ReLU lower-line slopes for the RecurJac bound graph. The slope inputs'
defaults reproduce CROWN's bounds, optimised bounds are never wider and stay sound against sampled float64
torch Jacobians, and the VJP graph's gradient of the objective agrees with central differences.
"""
import numpy as np
import onnx
import pytest
from test_layers import chain_model, random_mlp
from test_recurjac import N_POINTS, TOL, bounds, graph_kinks, jacobians, sample_ball, stage_function

from examples import bounds_models
from jacgraph.cli import main
from jacgraph.layers import lower, lower_graph
from jacgraph.passes import recurjac
from jacgraph.passes.alpha_crown import OBJECTIVE, SlopeOptimiser
from jacgraph.runtime import session


def units(opt, alpha):
    """The number of units of an alpha input [batch, units]."""
    return next(i for i in opt.model.graph.input if i.name == alpha).type.tensor_type.shape.dim[1].dim_value


@pytest.fixture(scope="module")
def residual():
    net, shape = bounds_models.build("residual_mlp"), bounds_models.INPUT_SHAPES["residual_mlp"]
    model = bounds_models.export_bytes(net, shape)
    return net, shape, model, SlopeOptimiser(model)


def test_graphs_are_valid_and_default_slopes_give_crowns_bounds(residual):
    _, shape, model, opt = residual
    onnx.checker.check_model(opt.model, full_check=True)
    onnx.checker.check_model(opt.gradient_model, full_check=True)
    x0, eps = np.random.default_rng(0).standard_normal((2, *shape)), np.array([0.05, 0.3])
    plain = bounds(recurjac.build(model, lowering="graph"), x0, eps)
    defaults = opt.bounds.run(["J_lower", "J_upper"], {"x0": x0, "eps": eps})  # alpha inputs left at NaN
    started = opt.run(x0, eps, iterations=0)[:2]  # CROWN's slopes fed back as numbers
    for p, d, s in zip(plain, defaults, started):
        np.testing.assert_array_equal(d, p)
        np.testing.assert_array_equal(s, p)


def test_slopes_out_of_range_are_clipped_into_it(residual):
    _, shape, _, opt = residual
    x0, eps = np.random.default_rng(1).standard_normal((1, *shape)), np.array([0.3])
    rng = np.random.default_rng(2)
    wild = {a: rng.uniform(-2, 3, (1, units(opt, a))) for a in opt.spec}
    clipped = {a: np.clip(v, *opt.spec[a]["range"]) for a, v in wild.items()}
    out = [opt.bounds.run(["J_lower", "J_upper", OBJECTIVE], {"x0": x0, "eps": eps, **alpha}) for alpha in (wild, clipped)]
    for w, c in zip(*out):
        np.testing.assert_array_equal(w, c)


def test_chunked_crown_optimises_like_crown_at_once(residual):
    """Old: with CROWN in chunks (an ONNX Loop, as on the CIFAR models at the default limit) the gradient graph's
    pruning dropped what the Loop body reads from outside, and the optimiser refused the model as invalid ONNX."""
    _, shape, model, opt = residual
    chunked = SlopeOptimiser(model, memory_limit=8000)
    assert any(n.op_type == "Loop" for n in chunked.model.graph.node)
    x0, eps = np.random.default_rng(3).standard_normal((1, *shape)), np.array([0.3])
    once, in_chunks = opt.run(x0, eps, iterations=3), chunked.run(x0, eps, iterations=3)
    assert np.all(np.isfinite(in_chunks[2])) and np.all(np.isfinite(in_chunks[0]))
    np.testing.assert_allclose(in_chunks[2], once[2], rtol=1e-9)  # the objective (CROWN widths) at every step
    # J itself may be looser in chunks (RecurJac steps over the limit keep the interval step): never wider than
    # the chunked graph's own CROWN bounds
    lo0, hi0 = chunked.run(x0, eps, iterations=0)[:2]
    assert np.all(in_chunks[0] >= lo0) and np.all(in_chunks[1] <= hi0)


def test_vjp_gradient_agrees_with_central_differences(residual):
    """At slopes inside (0, 1) the objective is smooth in them (away from units turning stable): float64 central
    differences with h = 1e-6 have error ~h^2 f''' + 1e-16 |f| / h ~ 1e-8 relative, far below 1e-5."""
    _, shape, _, opt = residual
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal((1, *shape)), np.array([0.3])
    alpha = {a: rng.uniform(0.2, 0.8, (1, units(opt, a))) for a in opt.spec}
    direction = {a: rng.standard_normal(v.shape) for a, v in alpha.items()}
    _, grads = opt.objective_and_gradient(x0, eps, alpha)
    along = sum(float(np.sum(grads[a] * direction[a])) for a in alpha)

    def objective(t):
        feeds = {"x0": x0, "eps": eps, **{a: alpha[a] + t * direction[a] for a in alpha}}
        return float(opt.bounds.run([OBJECTIVE], feeds)[0][0])

    h = 1e-6
    central = (objective(h) - objective(-h)) / (2 * h)
    assert abs(along) > 1e-2, along  # the slopes do move the objective here
    assert abs(along - central) <= 1e-5 * abs(central), (along, central)


# eps per model where >= 10% of the ReLU/max inputs are unstable (asserted below)
CASES = {"residual_mlp": [0.05, 0.3], "densenet_cnn": [0.1, 0.3]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimised_bounds_are_never_wider_and_sound(name):
    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(net, shape)
    opt = SlopeOptimiser(model)
    plain = session(recurjac.build(model, lowering="graph", preactivation_bounds=True), provider="CPUExecutionProvider")
    x0 = np.random.default_rng(0).standard_normal((1, *shape))
    kinks = graph_kinks(lower_graph(model), x0.reshape(-1))
    gained = 0.0
    for eps in CASES[name]:
        base = plain.run(None, {"x0": x0, "eps": np.array([eps])})
        unstable = np.concatenate([((zl < 0) & (zh > 0)).ravel() for zl, zh in zip(base[2::2], base[3::2])])
        assert unstable.mean() >= 0.1, unstable.mean()
        lo, hi, history = opt.run(x0, np.array([eps]), iterations=40)
        assert np.all(lo >= base[0]) and np.all(hi <= base[1])
        assert history.min() <= history[0].min()  # the objective went down (or stayed) somewhere
        gained += float(np.sum(base[1] - base[0]) - np.sum(hi - lo))
        X = sample_ball(x0.reshape(-1), eps, "inf", kinks, np.random.default_rng(0), n=N_POINTS)
        J = jacobians(lambda x: net(x.reshape((1,) + tuple(shape))).reshape(-1), X)
        below, above = (lo[0] - J).max(), (J - hi[0]).max()
        assert below <= TOL and above <= TOL, f"eps={eps}: a sampled Jacobian is outside by {max(below, above):.3g}"
    assert gained > 0, "40 steps tightened no entry at either eps"


def test_cli_optimize_slopes(tmp_path, capsys):
    net = bounds_models.build("residual_mlp")
    (tmp_path / "m.onnx").write_bytes(bounds_models.export_bytes(net, (16,)))
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).standard_normal((1, 16)))
    args = ["bound", str(tmp_path / "m.onnx"), "--x0", str(tmp_path / "x0.npy"), "--eps", "0.3"]
    assert main(args + ["-o", str(tmp_path / "plain.npz")]) == 0
    assert main(args + ["--optimize-slopes", "40", "-o", str(tmp_path / "opt.npz")]) == 0
    assert "slopes optimised by 40 steps" in capsys.readouterr().out
    plain, opt = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "opt.npz")
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
    plain = bounds(recurjac.build(model, norm=norm, lowering="graph"), x0[None], [eps])
    r = recurjac.bound(model, x0, eps, norm=norm, optimize_slopes=20, progress=False)
    lo, hi = r["J_lower"], r["J_upper"]
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
    plain = bounds(recurjac.build(model, lowering="graph"), x0[None], [0.5])
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
