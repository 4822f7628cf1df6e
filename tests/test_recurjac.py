"""passes/recurjac.py: soundness of the emitted Jacobian bounds against autodiff Jacobians sampled over
the ball (corners, interior, and points aimed at flipping unstable units), exactness at eps = 0 and on
affine networks, monotonicity in eps, RecurJac against the interval chain, and `jacgraph bound`.
"""
import copy
import functools
import io
import json
import zlib

import numpy as np
import onnx
import pytest
import torch
from test_layers import chain_model, random_cnn, random_mlp, reference_output

from jacgraph.cli import main
from jacgraph.errors import JacgraphError
from jacgraph.layers import lower
from jacgraph.passes import recurjac
from jacgraph.runtime import session

# Bounds and oracle both run in float64 through a few layers of width <= 64 with entries O(1-10):
# round-off is ~1e-14; 1e-9 leaves a wide margin and is still far below any real violation.
TOL = 1e-9
EPS = [0.0, 1e-3, 0.03, 0.2, 1.0, 5.0]
N_POINTS = 2000


# ---- oracles ----------------------------------------------------------------------------------

def stage_function(stages):
    """The lowered network as a float64 torch function of one flat input (kinks as in PyTorch)."""
    Ws = [torch.tensor(s.matrix()) for s in stages]
    bs = [torch.tensor(s.bias) for s in stages]
    acts = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, None: lambda z: z}

    def act(s, z):
        p = s.act_attrs
        if s.activation == "leaky_relu":
            return torch.nn.functional.leaky_relu(z, p["alpha"])
        if s.activation == "hardsigmoid":
            return torch.clamp(p["alpha"] * z + p["beta"], 0, 1)
        if s.activation == "clip":
            return torch.clamp(z, p["min"], p["max"])
        return acts[s.activation](z)

    def pre_activations(x):
        h, zs = x, []
        for s, W, b in zip(stages, Ws, bs):
            z = W @ h + b
            zs.append(z)
            h = act(s, z)
        return h, zs

    return (lambda x: pre_activations(x)[0]), pre_activations


def jacobians(f, X):
    return torch.func.vmap(torch.func.jacrev(f))(torch.tensor(X, dtype=torch.float64)).detach().numpy()


def sample_ball(x0, eps, norm, stages, rng, n=N_POINTS):
    """Points of the ball: corners (l_inf) or sphere points (l_2), uniform interior points, and points
    pushed across the kink of every unit that eps can reach (the linearised distance to its kink)."""
    d = x0.size
    _, pre = stage_function(stages)
    targeted = []
    if eps > 0:
        zs = [z.detach().numpy() for z in pre(torch.tensor(x0))[1]]
        grads = torch.func.jacrev(lambda x: torch.cat(pre(x)[1]))(torch.tensor(x0)).detach().numpy()
        z = np.concatenate(zs)
        gnorm = np.abs(grads).sum(1) if norm == "inf" else np.linalg.norm(grads, axis=1)
        reach = np.abs(z) / np.maximum(eps * gnorm, 1e-300)
        for j in np.argsort(reach)[:60]:
            g = grads[j] if norm == "2" else np.sign(grads[j])
            g = g / max(np.linalg.norm(g, ord=np.inf if norm == "inf" else 2), 1e-300)
            direction = -np.sign(z[j]) * g
            for t in (min(reach[j], 1.0) * (1 - 1e-6), min(reach[j] * (1 + 1e-6), 1.0), 1.0):
                targeted.append(x0 + t * eps * direction)
    m = max(n - len(targeted), 2 * d)
    if norm == "inf":
        corners = np.sign(rng.standard_normal((m // 2, d)))
        inner = rng.uniform(-1, 1, (m - m // 2, d))
        P = np.concatenate([corners, inner])
    else:
        v = rng.standard_normal((m, d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        P = v * np.concatenate([np.ones(m // 2), rng.uniform(0, 1, m - m // 2) ** (1 / d)])[:, None]
    X = np.concatenate([x0 + eps * P] + ([np.array(targeted)] if targeted else []))
    assert len(X) >= n
    return X


def bounds(graph_or_sess, x0, eps):
    sess = graph_or_sess if hasattr(graph_or_sess, "run") else session(graph_or_sess, provider="CPUExecutionProvider")
    lo, hi = sess.run(None, {"x0": np.asarray(x0, np.float64), "eps": np.asarray(eps, np.float64).reshape(-1)})
    return lo, hi


def assert_sound(model, norm, rng, eps_list=EPS, f=None, x0=None, method="recurjac"):
    stages = lower(model)
    in_shape = stages[0].in_shape
    sess = session(recurjac.build(model, norm=norm, method=method), provider="CPUExecutionProvider")
    x0 = rng.standard_normal(stages[0].in_features) if x0 is None else x0.reshape(-1)
    f = f or stage_function(stages)[0]
    widths = []
    for eps in eps_list:
        lo, hi = bounds(sess, x0.reshape((1,) + tuple(in_shape)), [eps])
        J = jacobians(f, sample_ball(x0, eps, norm, stages, rng))
        below, above = (lo[0] - J).max(), (J - hi[0]).max()
        assert below <= TOL and above <= TOL, f"eps={eps}: a sampled Jacobian is outside by {max(below, above):.3g}"
        widths.append(float(np.mean(hi - lo)))
    return widths


# ---- soundness ---------------------------------------------------------------------------------

ACTS = [("relu", ()), ("leaky", (0.1,)), ("tanh", ()), ("sigmoid", ()), ("hardsigmoid", (0.3, 0.5)),
        ("clip", (-0.5, 0.7))]


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("act,params", ACTS)
def test_random_mlp_bounds_are_sound(act, params, norm):
    rng = np.random.default_rng(zlib.crc32(f"{act}{norm}".encode()))  # a fixed seed per case
    model = random_mlp([5, 12, 10, 8, 3], rng, act=act, act_params=params, scale=1.5)
    widths = assert_sound(model, norm, rng)
    assert widths[-1] > 0  # the test covers regions where units change state


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_consecutive_activations_and_an_activation_at_the_output(norm):
    rng = np.random.default_rng(18)
    model = chain_model([("gemm", rng.standard_normal((6, 4)), rng.standard_normal(6)), ("relu",), ("tanh",),
                         ("gemm", rng.standard_normal((3, 6)), rng.standard_normal(3)), ("sigmoid",)], (4,))
    assert [s.activation for s in lower(model)] == ["relu", "tanh", "sigmoid"]
    assert_sound(model, norm, rng)


@functools.lru_cache(maxsize=1)
def _trained_digits_mlp():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    accuracy = (net(X).argmax(1) == y).float().mean().item()
    return net.eval(), X.numpy().astype(np.float64), accuracy


def export(net, example):
    """ONNX export that keeps BatchNormalization a node: the exporter's Conv+BN folding runs in float32,
    which would make the model differ from the float64 torch oracle by ~1e-8."""
    f = io.BytesIO()
    torch.onnx.export(net, (example,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(f.getvalue())


def torch_function(net):
    net64 = copy.deepcopy(net).double()
    return lambda x: net64(x[None])[0]


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_trained_mlp_bounds_are_sound(norm):
    net, X, accuracy = _trained_digits_mlp()
    assert accuracy > 0.9  # it did learn: units are not all in one state
    model = export(net, torch.tensor(X[:2], dtype=torch.float32))
    rng = np.random.default_rng(7)
    assert_sound(model, norm, rng, eps_list=[0.0, 0.01, 0.1, 0.5], f=torch_function(net), x0=X[3])


def test_cnn_bounds_are_sound():
    rng = np.random.default_rng(8)
    assert_sound(random_cnn(rng), "inf", rng, eps_list=[0.0, 0.01, 0.1, 1.0])


def test_torch_cnn_bounds_are_sound_against_the_torch_jacobian():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 2 * 2, 5)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    model = export(net, torch.randn(2, 1, 8, 8))
    net64 = net.double()
    f = lambda x: net64(x.reshape(1, 1, 8, 8))[0]  # noqa: E731
    rng = np.random.default_rng(9)
    assert_sound(model, "2", rng, eps_list=[0.0, 0.05, 0.5, 3.0], f=f)


# ---- exactness, monotonicity, tightness ---------------------------------------------------------

@pytest.mark.parametrize("act,params", ACTS)
def test_eps_zero_gives_the_jacobian(act, params):
    rng = np.random.default_rng(10)
    model = random_mlp([4, 9, 7, 3], rng, act=act, act_params=params)
    stages = lower(model)
    x0 = rng.standard_normal(4)  # generic: no unit sits exactly on a kink
    lo, hi = bounds(recurjac.build(model), x0[None], [0.0])
    J = jacobians(stage_function(stages)[0], x0[None])
    np.testing.assert_allclose(lo, J, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hi, J, rtol=1e-12, atol=1e-12)


def test_affine_network_gives_its_matrix_with_zero_width():
    rng = np.random.default_rng(11)
    W1, W2, scale = rng.standard_normal((6, 4)), rng.standard_normal((3, 6)), rng.uniform(0.5, 2, 6)
    mlp = chain_model([("gemm", W1, rng.standard_normal(6)), ("mul", scale), ("gemm", W2, rng.standard_normal(3))],
                      (4,), dtype=np.float64)
    conv = chain_model([("conv", rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2), {"pads": [1, 1, 1, 1]}),
                        ("bn", rng.uniform(0.5, 1.5, 2), rng.standard_normal(2), rng.standard_normal(2),
                         rng.uniform(0.5, 2, 2)),
                        ("flatten",), ("gemm", rng.standard_normal((3, 2 * 4 * 4)), rng.standard_normal(3))],
                       (1, 4, 4), dtype=np.float64)
    # the conv model's matrix from the ONNX reference evaluator: f(e_k) - f(0) is exact for an affine map
    basis = np.concatenate([np.zeros((1, 16)), np.eye(16)]).reshape(17, 1, 4, 4)
    out = reference_output(conv, basis)
    for model, matrix in ((mlp, W2 @ (scale[:, None] * W1)), (conv, (out[1:] - out[0]).T)):
        x0 = rng.standard_normal((2,) + tuple(lower(model)[0].in_shape))
        for norm in ("inf", "2"):
            lo, hi = bounds(recurjac.build(model, norm=norm), x0, [0.0, 10.0])
            np.testing.assert_array_equal(lo, hi)
            for i in range(2):  # summation order differs from the reference: round-off only
                np.testing.assert_allclose(lo[i], matrix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["recurjac", "interval"])
def test_bounds_grow_with_eps(method):
    rng = np.random.default_rng(12)
    model = random_mlp([5, 16, 16, 16, 4], rng, scale=1.5)
    x0 = rng.standard_normal((1, 5))
    sess = session(recurjac.build(model, method=method), provider="CPUExecutionProvider")
    prev = None
    for eps in np.geomspace(1e-4, 10, 25):
        lo, hi = bounds(sess, x0, [eps])
        if prev is not None:  # nested balls, nested bounds (up to round-off)
            assert np.all(lo <= prev[0] + 1e-12) and np.all(hi >= prev[1] - 1e-12)
        prev = (lo, hi)


def test_recurjac_is_tighter_than_the_interval_chain_where_units_are_stable():
    rng = np.random.default_rng(13)
    model = random_mlp([6, 20, 20, 20, 4], rng)
    x0 = rng.standard_normal((1, 6))
    rj = session(recurjac.build(model), provider="CPUExecutionProvider")
    iv = session(recurjac.build(model, method="interval"), provider="CPUExecutionProvider")
    stages = lower(model)
    _, pre = stage_function(stages)
    checked = 0
    for eps in (0.03, 0.1, 0.3):
        (lo, hi), (ilo, ihi) = bounds(rj, x0, [eps]), bounds(iv, x0, [eps])
        assert np.all(lo >= ilo - 1e-12) and np.all(hi <= ihi + 1e-12)  # never looser
        # some units stable, some not (judged from sampled pre-activations: a necessary condition)
        X = torch.tensor(sample_ball(x0[0], eps, "inf", stages, rng, n=500))
        Z = torch.func.vmap(lambda x: torch.cat(pre(x)[1][:3]))(X).detach().numpy()  # the 60 hidden units
        flips = np.any(Z > 0, axis=0) & np.any(Z < 0, axis=0)
        if 0 < flips.sum() < 60:
            assert np.mean(hi - lo) < np.mean(ihi - ilo)
            checked += 1
    assert checked >= 2


def test_a_batch_equals_its_points_one_by_one():
    rng = np.random.default_rng(14)
    model = random_mlp([5, 10, 10, 3], rng, act="tanh")
    sess = session(recurjac.build(model, norm="2"), provider="CPUExecutionProvider")
    x0, eps = rng.standard_normal((3, 5)), np.array([0.0, 0.1, 1.0])
    lo, hi = bounds(sess, x0, eps)
    for i in range(3):
        one = bounds(sess, x0[i:i + 1], eps[i:i + 1])
        np.testing.assert_allclose(lo[i], one[0][0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(hi[i], one[1][0], rtol=1e-12, atol=1e-13)


def test_lipschitz_from_bounds():
    lo = np.array([[[-1.0, 2.0], [0.5, -3.0]]])
    hi = np.array([[[0.5, 2.5], [1.0, 1.0]]])
    per, induced = recurjac.lipschitz(lo, hi, "inf")
    np.testing.assert_allclose(per, [[3.5, 4.0]])
    np.testing.assert_allclose(induced, [4.0])
    per, induced = recurjac.lipschitz(lo, hi, "2")
    np.testing.assert_allclose(per, [[np.hypot(1, 2.5), np.hypot(1, 3)]])
    np.testing.assert_allclose(induced, [np.linalg.norm([[1, 2.5], [1, 3]], 2)])


# ---- command line --------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(15)
    model = tmp_path / "m.onnx"
    onnx.save(random_mlp([5, 8, 8, 3], rng), model)
    x = tmp_path / "x.npy"
    np.save(x, rng.standard_normal(5))
    return tmp_path, model, x


def test_cli_bound_prints_writes_and_matches_the_api(files, capsys):
    tmp, model, x = files
    out = tmp / "b.npz"
    assert main(["bound", str(model), "--x0", str(x), "--eps", "0.2", "--norm", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "output 2: local Lipschitz bound" in text and "||J||_2->2 <=" in text
    saved = np.load(out)
    lo, hi = bounds(recurjac.build(str(model), norm="2"), np.load(x)[None], [0.2])
    np.testing.assert_array_equal(saved["J_lower"], lo)
    np.testing.assert_array_equal(saved["J_upper"], hi)
    np.save(tmp / "xb.npy", np.random.default_rng(0).standard_normal((4, 5)))
    assert main(["bound", str(model), "--x0", str(tmp / "xb.npy"), "--eps", "0.1", "--method", "interval",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert np.array(info["lipschitz"]).shape == (4, 3) and len(info["induced"]) == 4


def test_cli_compile_emit_recurjac(files):
    tmp, model, x = files
    out = tmp / "rj.onnx"
    assert main(["compile", str(model), "--emit", "recurjac", "--norm", "2", "-o", str(out)]) == 0
    lo, hi = bounds(onnx.load(out), np.load(x)[None], [0.1])
    assert lo.shape == (1, 3, 5) and np.all(lo <= hi)


@pytest.mark.parametrize("case", ["negative_eps", "wrong_shape", "nan", "unsupported_op"])
def test_cli_bad_input_exits_2_and_writes_nothing(files, case, capsys):
    tmp, model, x = files
    eps = "0.1"
    if case == "negative_eps":
        eps = "-0.5"
    elif case == "wrong_shape":
        np.save(x, np.zeros((2, 4)))
    elif case == "nan":
        np.save(x, np.array([0.0, np.nan, 1.0, 2.0, 3.0]))
    else:
        rng = np.random.default_rng(0)
        onnx.save(chain_model([("conv", rng.standard_normal((2, 1, 3, 3)), np.zeros(2)), ("relu",), ("maxpool",),
                               ("flatten",), ("gemm", rng.standard_normal((3, 18)), np.zeros(3)), ("softmax",)],
                              (1, 6, 6)), model)
    out = tmp / "b.npz"
    assert main(["bound", str(model), "--x0", str(x), "--eps", eps, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    expected = {"negative_eps": "eps", "wrong_shape": "shape", "nan": "NaN", "unsupported_op": "MaxPool (x1)"}[case]
    assert expected in err
    if case == "unsupported_op":
        assert "Softmax (x1)" in err


def test_api_rejects_bad_points():
    model = random_mlp([3, 4, 2], np.random.default_rng(16))
    with pytest.raises(JacgraphError, match="eps"):
        recurjac.bound(model, np.zeros(3), -1.0)
    with pytest.raises(JacgraphError, match="per sample"):
        recurjac.bound(model, np.zeros((2, 2)), 0.1)
    with pytest.raises(JacgraphError, match="--norm"):
        recurjac.build(model, norm="1")


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_preactivation_bounds_hold(norm):
    rng = np.random.default_rng(17)
    model = random_mlp([5, 16, 16, 16, 3], rng, scale=1.5)
    stages = lower(model)
    sess = session(recurjac.build(model, norm=norm, preactivation_bounds=True), provider="CPUExecutionProvider")
    _, pre = stage_function(stages)
    x0 = rng.standard_normal(5)
    for eps in (0.0, 0.1, 1.0):
        out = sess.run(None, {"x0": x0[None], "eps": np.array([eps])})
        Z = torch.func.vmap(lambda x: torch.cat(pre(x)[1][:3]))(
            torch.tensor(sample_ball(x0, eps, norm, stages, rng, n=1000))).detach().numpy()
        lo, hi = np.concatenate(out[2::2], axis=1), np.concatenate(out[3::2], axis=1)
        assert np.all(Z >= lo - TOL) and np.all(Z <= hi + TOL)
