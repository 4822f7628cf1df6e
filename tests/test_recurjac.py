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

def act(s, z):
    """s.activation (a stage's or a graph node's) applied in torch, kinks as in PyTorch."""
    acts = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, None: lambda z: z}
    p = s.act_attrs
    if s.activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, p["alpha"])
    if s.activation == "hardsigmoid":
        return torch.clamp(p["alpha"] * z + p["beta"], 0, 1)
    if s.activation == "clip":
        return torch.clamp(z, p["min"], p["max"])
    return acts[s.activation](z)


def stage_function(stages):
    """The lowered network as a float64 torch function of one flat input (kinks as in PyTorch)."""
    Ws = [torch.tensor(s.matrix()) for s in stages]
    bs = [torch.tensor(s.bias) for s in stages]

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
    pushed across the kink of every unit that eps can reach (the linearised distance to its kink).
    `stages`: the lowered chain, or a torch function x -> kink distances (zero at a kink)."""
    d = x0.size
    if callable(stages):
        kinks = stages
    else:
        pre = stage_function(stages)[1]
        kinks = lambda x: torch.cat(pre(x)[1])  # noqa: E731
    targeted = []
    if eps > 0:
        z = kinks(torch.tensor(x0)).detach().numpy()
        grads = torch.func.jacrev(kinks)(torch.tensor(x0)).detach().numpy()
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
    expected = {"negative_eps": "eps", "wrong_shape": "shape", "nan": "NaN", "unsupported_op": "Softmax (x1)"}[case]
    assert expected in err
    if case == "unsupported_op":  # MaxPool is lowered (a max selection); only Softmax is listed
        assert "MaxPool" not in err


def test_cli_bound_shows_its_stage_and_ctrl_c_exits_130_with_no_file(tmp_path):
    """Past 2 s `jacgraph bound` names its stage on stderr (here: point i of N); SIGINT then ends it with exit 130
    within 2 s (the main thread polls every 0.1 s), and the -o file is never written, not even in part."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, x0, out = tmp_path / "u.onnx", tmp_path / "x.npy", tmp_path / "b.npz"
    model.write_bytes(bounds_models.export_bytes(bounds_models.build("unet_cnn"), (1, 8, 8)))
    np.save(x0, np.random.default_rng(0).standard_normal((20000, 1, 8, 8)))  # ~minutes of points: never finishes
    proc = subprocess.Popen([sys.executable, "-m", "jacgraph.cli", "bound", str(model), "--x0", str(x0), "--eps", "0.1",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "jacgraph bound: running the bound graph: point " in line:
            break
    assert " of 20000 (" in lines[-1] and lines[-1].rstrip().endswith(" s)"), lines
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    waited = time.monotonic() - sent
    lines += proc.stderr.readlines()
    assert proc.returncode == 130 and waited < 2.0, (proc.returncode, waited, lines)
    assert "interrupted; nothing partial was written" in "".join(lines) and "Traceback" not in "".join(lines)
    assert sorted(os.listdir(tmp_path)) == ["u.onnx", "x.npy"]


@pytest.mark.parametrize("flags,shown", [([], True), (["quiet"], False), (["json"], False)])
def test_cli_progress_notes_follow_the_stages_unless_quiet(flags, shown, monkeypatch, capsys):
    """The watcher prints each stage the command enters (jacgraph.progress), after PROGRESS_AFTER_S; nothing with
    --quiet, nor with --json when stderr is not a terminal (pytest's captured stderr is not)."""
    import argparse
    import time

    from jacgraph import cli, progress

    monkeypatch.setattr(cli, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(cli, "STAGE_EVERY_S", 0.0)

    def work(args):
        for name in ("loading the model", "lowering the model"):
            with progress.stage(name):
                time.sleep(0.6)
        return 0

    args = argparse.Namespace(func=work, command="bound", quiet="quiet" in flags, json="json" in flags)
    assert cli.run_command(args) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("jacgraph bound: ")]
    if shown:
        assert notes[0].startswith("jacgraph bound: loading the model (") and any(
            n.startswith("jacgraph bound: lowering the model (") for n in notes), err
    else:
        assert notes == [], err


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


# ---- DAG models: residual joins, concat, pooling, max selections (lowering="graph") ---------------

from examples import bounds_models  # noqa: E402
from jacgraph.layers import lower_graph  # noqa: E402
from jacgraph.rules.bounds import _pieces  # noqa: E402


def graph_kinks(graph, x0):
    """A torch function x -> distances to every kink the lowered graph has near x0: each piecewise-linear
    unit's input minus its kinks, and each max window's top value minus its runner-up (order at x0)."""
    mats = {}

    def matmul(M, h):
        if id(M) not in mats:
            mats[id(M)] = torch.tensor(M.toarray())
        return h @ mats[id(M)].T

    def forward(x):
        return graph.forward(x[None], act, lambda node, z: z[..., torch.tensor(node.windows)].amax(-1), matmul,
                             torch.tensor)

    at_x0 = [v[0].detach().numpy() for v in forward(torch.tensor(x0))]
    pairs = {}
    for k, node in enumerate(graph.nodes):
        if node.kind == "max":
            z = at_x0[node.inputs[0]][node.windows]
            order = np.argsort(-z, axis=1, kind="stable")
            top = node.windows[np.arange(len(z)), order[:, 0]]
            runner = [next((w for w in row[o] if w != t), t) for row, o, t in zip(node.windows, order, top)]
            pairs[k] = (torch.tensor(top), torch.tensor(np.asarray(runner)))

    def kinks(x):
        vals, out = forward(x), []
        for k, node in enumerate(graph.nodes):
            z = vals[node.inputs[0]][0] if node.inputs else None
            if node.kind == "act" and node.activation not in ("tanh", "sigmoid"):
                out += [z - kink for kink in _pieces(node.activation, node.act_attrs)[0]]
            elif node.kind == "max":
                out.append(z[pairs[k][0]] - z[pairs[k][1]])
        return torch.cat(out) if out else x[:1] * 0 + 1.0

    return kinks


def assert_dag_sound(model, f, in_shape, x0, eps_list, norm="inf", n=N_POINTS, **options):
    """2000+ sampled float64 Jacobians of f (the source network in torch) inside the bounds; returns the
    mean widths and the fraction of ReLU/max units unstable (their CROWN interval straddles a kink)."""
    graph = lower_graph(model)
    sess = session(recurjac.build(model, norm=norm, lowering="graph", preactivation_bounds=True, **options),
                   provider="CPUExecutionProvider")
    kinks = graph_kinks(graph, x0.reshape(-1))
    widths, unstable = [], []
    for eps in eps_list:
        out = sess.run(None, {"x0": x0.reshape((1,) + tuple(in_shape)), "eps": np.array([eps])})
        lo, hi = out[0], out[1]
        X = sample_ball(x0.reshape(-1), eps, norm, kinks, np.random.default_rng(0), n=n)
        J = jacobians(lambda x: f(x.reshape((1,) + tuple(in_shape))).reshape(-1), X)
        below, above = (lo[0] - J).max(), (J - hi[0]).max()
        assert below <= TOL and above <= TOL, f"eps={eps}: a sampled Jacobian is outside by {max(below, above):.3g}"
        widths.append(float(np.mean(hi - lo)))
        z = np.concatenate([((zl < 0) & (zh > 0)).ravel() for zl, zh in zip(out[2::2], out[3::2])])
        unstable.append(float(z.mean()))
    return widths, unstable


# eps per model: the larger two leave >= 10% of the pre-activation units unstable (asserted below)
DAG_EPS = {"residual_mlp": [0.0, 0.05, 0.3], "resnet_cnn": [0.0, 0.1, 0.3], "densenet_cnn": [0.0, 0.1, 0.3],
           "pool_cnn": [0.0, 0.1, 0.3], "inception_cnn": [0.0, 0.1, 0.3]}
DAG_EPS["unet_cnn"] = [0.0, 0.1, 0.3]  # ConvTranspose + computed Pad skip, nearest Upsample skip: 21% and 58% unstable


@pytest.mark.parametrize("name", sorted(DAG_EPS))
def test_dag_bounds_are_sound_against_the_torch_jacobian(name):
    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(1).standard_normal(shape)
    widths, unstable = assert_dag_sound(model, net, shape, x0, DAG_EPS[name])
    assert widths[0] < 1e-12 and min(unstable[1:]) >= 0.1, (widths, unstable)


def test_dag_eps_zero_gives_the_jacobian_and_recurjac_beats_the_interval_chain():
    net, shape = bounds_models.build("residual_mlp"), bounds_models.INPUT_SHAPES["residual_mlp"]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(2).standard_normal((1, *shape))
    lo, hi = bounds(recurjac.build(model, lowering="graph"), x0, [0.0])
    J = torch.func.jacrev(net)(torch.tensor(x0)).reshape(lo.shape).detach().numpy()
    np.testing.assert_allclose(lo, J, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hi, J, rtol=1e-12, atol=1e-12)
    widths = {m: np.mean(np.subtract(*bounds(recurjac.build(model, method=m), x0, [0.05])[::-1]))
              for m in ("recurjac", "interval")}
    assert widths["recurjac"] < 0.8 * widths["interval"], widths


def test_residual_affine_network_gives_zero_width():
    """Identity residual blocks with no activation: the network is affine, its bounds are its matrix."""
    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1), \
                torch.nn.BatchNorm2d(2)
            self.head = torch.nn.Linear(2 * 2 * 4 * 4, 3)

        def forward(self, x):
            h = x + self.bn(self.c1(x))
            h = torch.cat([h, self.c2(h) - h], 1)
            return self.head(torch.flatten(torch.nn.functional.avg_pool2d(h, 2) * 0.5, 1))

    torch.manual_seed(3)
    net = Affine().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    model = bounds_models.export_bytes(net, (2, 8, 8))
    x0 = np.random.default_rng(4).standard_normal((2, 2, 8, 8))
    J = torch.func.jacrev(net.double())(torch.tensor(x0[:1])).reshape(3, -1).detach().numpy()
    for norm in ("inf", "2"):
        lo, hi = bounds(recurjac.build(model, norm=norm), x0, [0.0, 10.0])
        np.testing.assert_array_equal(lo, hi)
        for i in range(2):
            np.testing.assert_allclose(lo[i], J, rtol=1e-10, atol=1e-12)


def test_lenet_from_the_quickstart_is_bounded_soundly():
    """examples/quickstart.py's LeNet (Conv-ReLU-MaxPool x2, three Linear): 1x28x28, 10 outputs. A 32 MiB
    limit keeps the test fast: the largest back-substitutions fall back to interval bounds (still sound)."""
    from examples import architectures

    net = architectures.build("lenet").double()
    model = bounds_models.export_bytes(net, (1, 28, 28))
    x0 = architectures.example_input("lenet").double().numpy()
    widths, _ = assert_dag_sound(model, net, (1, 28, 28), x0, [0.0, 0.01], memory_limit=32 << 20)
    assert widths[0] < 1e-12 < widths[1]


def test_dag_refuses_a_model_whose_dense_weights_are_too_big(monkeypatch):
    net = bounds_models.build("pool_cnn")
    model = bounds_models.export_bytes(net, (1, 8, 8))
    monkeypatch.setattr(recurjac, "PROTO_LIMIT", 1000)
    with pytest.raises(JacgraphError, match="GiB of lowered weights"):
        recurjac.build(model)


@pytest.mark.parametrize("act,params", [("relu", ()), ("tanh", ()), ("leaky", (0.1,))])
def test_graph_lowering_of_a_chain_matches_the_chain_pass(act, params):
    """The DAG pass on a plain MLP computes the same bounds as the factored chain pass (round-off apart)."""
    rng = np.random.default_rng(21)
    model = random_mlp([5, 12, 10, 3], rng, act=act, act_params=params, scale=1.5)
    x0 = rng.standard_normal((2, 5))
    for norm in ("inf", "2"):
        chain = bounds(recurjac.build(model, norm=norm, lowering="chain"), x0, [0.1, 0.5])
        graph = bounds(recurjac.build(model, norm=norm, lowering="graph"), x0, [0.1, 0.5])
        assert np.mean(chain[1] - chain[0]) > 0.01
        for c, g in zip(chain, graph):
            np.testing.assert_allclose(g, c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["inception_cnn", "resnet_cnn"])
def test_sparse_operators_give_the_dense_bounds(name, monkeypatch):
    """Every operator in ELL form (gathered, not a dense MatMul) gives the same bounds as dense ones (with no
    memory limit: the limit counts a gathered product as K times bigger, so it may skip different steps)."""
    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(5).standard_normal((2, *shape))
    dense = bounds(recurjac.build(model, memory_limit=1 << 40), x0, [0.05, 0.2])
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    sparse = bounds(recurjac.build(model, memory_limit=1 << 40), x0, [0.05, 0.2])
    for d, s in zip(dense, sparse):
        np.testing.assert_allclose(s, d, rtol=1e-9, atol=1e-12)


# ---- convolutions applied patch-wise (jacgraph.structured), CROWN in chunks of rows ---------------

def _outputs(graph, x0, eps):
    sess = session(graph, provider="CPUExecutionProvider")
    return sess.run(None, {"x0": x0, "eps": np.asarray(eps, np.float64)})


def _strided_cnn():
    net, shape = bounds_models.build("strided_cnn"), bounds_models.INPUT_SHAPES["strided_cnn"]
    return net, shape, bounds_models.export_bytes(net, shape)


def test_patch_operators_give_the_ell_bounds(monkeypatch):
    """Every operator large (DENSE_OP_BYTES 0): the convolutions patch-wise give the bounds the same
    operators give in ELL form (find_conv off), Jacobian and pre-activation bounds alike."""
    net, shape, model = _strided_cnn()
    x0 = np.random.default_rng(2).standard_normal((2, *shape))
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    patched = recurjac.build(model, memory_limit=1 << 40, lowering="graph", preactivation_bounds=True)
    assert sum(n.op_type == "Pad" for n in patched.graph.node) >= 3 * 8  # 3 convs x 4 kinds x fwd/adj used
    monkeypatch.setattr(recurjac, "find_conv", lambda *args: None)
    ell = recurjac.build(model, memory_limit=1 << 40, lowering="graph", preactivation_bounds=True)
    assert not any(n.op_type == "Pad" for n in ell.graph.node)
    got, want = _outputs(patched, x0, [0.05, 0.2]), _outputs(ell, x0, [0.05, 0.2])
    assert np.mean(want[1] - want[0]) > 1e-3  # not a trivially tight case
    for g, w in zip(got, want):  # float64 sums in another order: round-off ~1e-15 of entries O(1)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_chunked_crown_equals_crown_at_once(norm, monkeypatch):
    """Under a small memory limit every CROWN back-substitution runs in a Loop over chunks of rows; its
    pre-activation bounds equal those of one back-substitution of all rows."""
    net, shape, model = _strided_cnn()
    x0 = np.random.default_rng(3).standard_normal((2, *shape))
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    whole = recurjac.build(model, norm=norm, memory_limit=1 << 40, lowering="graph", preactivation_bounds=True)
    chunked = recurjac.build(model, norm=norm, memory_limit=100_000, lowering="graph", preactivation_bounds=True)
    assert not any(n.op_type == "Loop" for n in whole.graph.node)
    # one per conv feeding a ReLU; under l_inf not the first (affine in the input: its interval bound is exact)
    assert sum(n.op_type == "Loop" for n in chunked.graph.node) == (2 if norm == "inf" else 3)
    got, want = _outputs(chunked, x0, [0.05, 0.2]), _outputs(whole, x0, [0.05, 0.2])
    for g, w in zip(got[2:], want[2:]):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,factored", [("strided_cnn", "never"), ("strided_cnn", "always"), ("pool_cnn", "never")])
def test_chunked_jacobian_backsubstitution_at_the_input_equals_it_at_once(name, factored, monkeypatch):
    """The input's RecurJac back-substitution (the one that gives J_lower, J_upper) in chunks of 5 rows, all
    else at once, gives the bounds of one back-substitution of all rows (dense, or factored: no run-time If;
    pool_cnn: a max node's lines inside the Loop body)."""
    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(6).standard_normal((2, *shape))
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    monkeypatch.setattr(recurjac, "FACTORED_JACOBIAN", factored)
    whole = recurjac.build(model, memory_limit=1 << 40, lowering="graph")
    rows = recurjac._DagBounds.chunk_rows
    monkeypatch.setattr(recurjac._DagBounds, "chunk_rows",  # only the range above the input: range(1, out + 1)
                        lambda self, k_range, m=1: min(rows(self, k_range, m), 5 if k_range.start == 1 else 1 << 40))
    chunked = recurjac.build(model, memory_limit=1 << 40, lowering="graph")
    assert sum(n.op_type == "Loop" for n in chunked.graph.node) == 1
    got, want = _outputs(chunked, x0, [0.05, 0.2]), _outputs(whole, x0, [0.05, 0.2])
    assert np.mean(want[1] - want[0]) > 1e-3
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("limit", [1 << 40, 300_000])
def test_strided_cnn_patch_wise_and_chunked_is_sound(limit, monkeypatch):
    """2000+ sampled Jacobians (corners, uniform, kink-aimed) inside the bounds of the strided CNN with
    patch-wise convolutions, at eps where >= 10% of the ReLUs are unstable: every back-substitution at
    once, or (300 kB) CROWN in chunks of a few rows and the input's RecurJac step one row at a time."""
    net, shape, model = _strided_cnn()
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    x0 = np.random.default_rng(4).standard_normal(shape)
    widths, unstable = assert_dag_sound(model, net, shape, x0, [0.0, 0.05, 0.2], memory_limit=limit)
    assert widths[0] < 1e-12 and min(unstable[1:]) >= 0.1, (widths, unstable)


# ---- CROWN rows only for undecided units; the factored RecurJac step ---------------------------------

# per point of a batch of two: nothing undecided (eps 0: an empty selection), some, all (eps 5: every unit unstable)
SELECTION_EPS = [[0.0, 0.0], [0.0, 0.05], [0.05, 0.2], [5.0, 5.0]]


@pytest.mark.parametrize("limit", [1 << 40, 100_000])
def test_crown_rows_for_undecided_units_give_the_bounds_of_all_rows(limit, monkeypatch):
    """CROWN rows only for the units the cheap interval step leaves undecided (NonZero at run time, then
    Scatter back), at once or in chunks, give the Jacobian bounds of CROWN over all rows, from no unit
    undecided (empty selection) to all; the units it skips keep their cheap, wider, bounds."""
    net, shape, model = _strided_cnn()
    x0 = np.random.default_rng(7).standard_normal((2, *shape))
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    graphs = {}
    for only in (False, True):
        monkeypatch.setattr(recurjac, "CROWN_UNDECIDED_ONLY", only)
        graphs[only] = recurjac.build(model, memory_limit=limit, lowering="graph", preactivation_bounds=True)
    # the two CROWN nodes (l_inf) scatter their rows into the lower and the upper cheap bounds
    assert [sum(n.op_type == "ScatterElements" for n in graphs[only].graph.node) for only in (False, True)] == [0, 4]
    onnx.checker.check_model(graphs[True], full_check=True)
    skipped = []
    for eps in SELECTION_EPS:
        want, got = _outputs(graphs[False], x0, eps), _outputs(graphs[True], x0, eps)
        for g, w in zip(got[:2], want[:2]):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
        unstable = np.concatenate([((lo < 0) & (hi > 0)).ravel() for lo, hi in zip(want[2::2], want[3::2])])
        wider = max(float((w - g).max()) for g, w in zip(got[2::2], want[2::2]))  # lower bounds: cheap <= CROWN
        skipped.append((unstable.mean(), wider))
    assert skipped[0][0] == 0.0 and skipped[0][1] < 1e-12 and skipped[-1][0] == 1.0  # none and every unit unstable
    assert 0 < skipped[2][0] < 0.5 and skipped[2][1] > 1e-3, skipped  # some: and rows were skipped


@pytest.mark.parametrize("name", ["strided_cnn", "resnet_cnn", "pool_cnn"])
def test_factored_jacobian_step_gives_the_dense_bounds(name, monkeypatch):
    """The RecurJac steps with the shared part and low-rank terms (jac_backsub_factored), and the run-time
    choice between it and the dense step, give the dense step's bounds, on a chain, on residual joins and
    with a max pool (the steps below it stay dense), from no unit undecided to all."""
    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(net, shape)
    x0 = np.random.default_rng(8).standard_normal((2, *shape))
    monkeypatch.setattr(recurjac, "DENSE_OP_BYTES", 0)
    outs = {}
    for mode in ("never", "always", "auto"):
        monkeypatch.setattr(recurjac, "FACTORED_JACOBIAN", mode)
        graph = recurjac.build(model, memory_limit=1 << 40, lowering="graph")
        assert any(n.op_type == "If" for n in graph.graph.node) == (mode == "auto")
        outs[mode] = [_outputs(graph, x0, eps) for eps in SELECTION_EPS]
    onnx.checker.check_model(graph, full_check=True)
    assert np.mean(outs["never"][2][1] - outs["never"][2][0]) > 1e-3
    for mode in ("always", "auto"):
        for got, want in zip(outs[mode], outs["never"]):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
