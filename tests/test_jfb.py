"""The JFB pass: fixed-point Loop, the JFB gradient graph against PyTorch's JFB, readout losses, CLI errors.

PyTorch's JFB gradient is the reference: z* detached, one more T step with autograd, backward(z_bar).
Tolerance 1e-5 relative: the emitted graph runs in float64 (reference evaluator) against torch in
float64, so the only differences are summation order (~1e-15); in float32 onnxruntime against the same
torch float64 gradient, round-off of a few dozen accumulated terms stays near 1e-6.
"""
from __future__ import annotations

import glob
import json
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="the JFB tests compare against PyTorch (pip install torch==2.13.0)")

from jacgraph import runtime  # noqa: E402
from jacgraph.cli import main  # noqa: E402
from jacgraph.passes import jfb, vjp  # noqa: E402
from jacgraph.testing import relative_error, run_reference, to_float64  # noqa: E402
from test_rules_transpose import reference  # noqa: E402

TOL = 1e-5


class MlpT(torch.nn.Module):
    """z_next = relu(W2 tanh(W1 z + U x + b1) + b2), ||W1||·||W2|| < 1: a contraction in z."""

    def __init__(self, n=12, d=5, h=16):
        super().__init__()
        self.W1, self.U, self.W2 = torch.nn.Linear(n, h), torch.nn.Linear(d, h, bias=False), torch.nn.Linear(h, n)
        with torch.no_grad():
            for lin in (self.W1, self.W2):
                lin.weight *= 0.8 / torch.linalg.matrix_norm(lin.weight, 2)

    def forward(self, z, x):
        return torch.relu(self.W2(torch.tanh(self.W1(z) + self.U(x))))


class ConvT(torch.nn.Module):
    """z_next = relu(Conv_W(z) + Conv_U(x) + b) with a small W."""

    def __init__(self, c=3, cx=2):
        super().__init__()
        self.W = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.U = torch.nn.Conv2d(cx, c, 3, padding=1)
        with torch.no_grad():
            self.W.weight *= 0.5 / self.W.weight.abs().sum(dim=(1, 2, 3)).max()  # row-sum (inf-norm) bound < 1

    def forward(self, z, x):
        return torch.relu(self.W(z) + self.U(x))


class ResidualT(torch.nn.Module):
    """z_next = z + 0.5 (tanh(W z + U x) - z): a damped residual step, contractive for ||W|| < 1."""

    def __init__(self, n=10, d=4):
        super().__init__()
        self.W, self.U = torch.nn.Linear(n, n, bias=False), torch.nn.Linear(d, n)
        with torch.no_grad():
            self.W.weight *= 0.9 / torch.linalg.matrix_norm(self.W.weight, 2)

    def forward(self, z, x):
        return z + 0.5 * (torch.tanh(self.W(z) + self.U(x)) - z)


CASES = {  # name -> (module class, z shape, x shape, dynamic batch)
    "mlp": (MlpT, (3, 12), (3, 5), True),
    "conv": (ConvT, (2, 3, 6, 6), (2, 2, 6, 6), False),
    "residual": (ResidualT, (4, 10), (4, 4), True),
}


def export(module, zshape, xshape, path, dynamic=True):
    axes = {"z": {0: "batch"}, "x": {0: "batch"}, "z_next": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation
        # no constant folding: initializers keep PyTorch's parameter names (no pre-transposed copies)
        torch.onnx.export(module, (torch.zeros(zshape), torch.zeros(xshape)), str(path), dynamo=False, opset_version=17,
                          input_names=["z", "x"], output_names=["z_next"], dynamic_axes=axes, do_constant_folding=False)
    return str(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("jfb"), {}

    def get(name):
        if name not in made:
            cls, zshape, xshape, dynamic = CASES[name]
            torch.manual_seed(0)
            module = cls().eval()
            path = export(module, zshape, xshape, folder / f"{name}.onnx", dynamic)
            made[name] = (module, path, jfb.build(path, state="z"), zshape, xshape)
        return made[name]
    return get


def torch_jfb(module, z_star, x, z_bar):
    """PyTorch's JFB gradient in float64: one T step at a detached z*, backward(z_bar)."""
    m = module.double()
    for p in m.parameters():
        p.grad = None
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    m(torch.tensor(z_star, dtype=torch.float64), xt).backward(torch.tensor(z_bar, dtype=torch.float64))
    grads = {"x": xt.grad.numpy()} | {n: p.grad.numpy() for n, p in m.named_parameters()}
    module.float()
    return grads


def params_of(module):
    return {n: p.detach().numpy().astype(np.float32) for n, p in module.named_parameters()}


def emitted_grads(model, feeds):
    props = {p.key: p.value for p in model.metadata_props}
    pairs = json.loads(props["jacgraph.gradient_outputs"])
    return {name: feeds[bar] for name, bar in pairs}


@pytest.mark.parametrize("name", list(CASES))
def test_jfb_gradient_matches_pytorch_jfb(name, cases):
    module, path, models, zshape, xshape = cases(name)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(xshape).astype(np.float32)
    weights = params_of(module)
    fp = runtime.run(models["fixed_point"], {"x": x} | weights)
    z_star = fp["z_star"]
    z_bar = rng.standard_normal(zshape).astype(np.float32)
    expected = torch_jfb(module, z_star, x, z_bar)

    grad = models["jfb_grad"]
    assert [i.name for i in grad.graph.input] == ["z_star", "x"] + list(weights) + ["z_bar"]
    feeds = {"z_star": z_star, "x": x, "z_bar": z_bar} | weights
    out64 = run_reference(reference(to_float64(grad)), {k: v.astype(np.float64) for k, v in feeds.items()})
    got64 = emitted_grads(grad, out64)
    assert set(got64) == set(expected)
    for key in expected:
        assert relative_error(got64[key], expected[key]) < TOL, (name, key)
    got32 = emitted_grads(grad, runtime.run(grad, feeds))
    for key in expected:
        assert relative_error(got32[key], expected[key]) < TOL, (name, key, "float32 onnxruntime")


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_point_meets_tolerance(name, cases):
    module, path, _, zshape, xshape = cases(name)
    tol = 1e-5
    fp = jfb.build(path, state="z", tol=tol, max_iter=200)["fixed_point"]
    x = np.random.default_rng(2).standard_normal(xshape).astype(np.float32)
    out = jfb.solve(runtime.session(fp), {"x": x})
    iterations, residual, z = int(out["iterations"]), float(out["residual"]), out["z_star"]
    assert 1 < iterations < 200 and residual <= tol
    # T is a contraction (L < 1): ||T(z*) - z*|| <= L ||z* - z_prev|| <= tol ||z_prev||, and ||z_prev|| is ||z*|| to
    # within tol; the factor 2 absorbs float32 round-off in T itself (~1e-7 of ||z||, near tol = 1e-5)
    with torch.no_grad():
        step = module(torch.tensor(z), torch.tensor(x)).numpy()
    axes = tuple(range(1, len(zshape)))
    per_sample = np.sqrt(((step - z) ** 2).sum(axes)) / np.sqrt((z ** 2).sum(axes))
    assert per_sample.max() <= 2 * tol
    assert np.linalg.norm(z) > 0


def test_non_convergence_is_reported(cases):
    _, path, _, _, xshape = cases("residual")
    fp = jfb.build(path, state="z", tol=1e-7, max_iter=3)["fixed_point"]
    x = np.random.default_rng(3).standard_normal(xshape).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="did not converge: 3 iterations"):
        out = jfb.solve(runtime.session(fp), {"x": x})
    assert int(out["iterations"]) == 3 and float(out["residual"]) > 1e-7


def test_fixed_iterations_equals_numpy_iteration(cases):
    module, path, _, zshape, xshape = cases("residual")
    n = 25
    models = jfb.build(path, state="z", fixed_iterations=n)
    fp = models["fixed_point"]
    assert "Loop" not in {node.op_type for node in fp.graph.node}
    x = np.random.default_rng(4).standard_normal(xshape)
    out = runtime.run(fp, {"x": x.astype(np.float32)})
    W = module.W.weight.detach().numpy().astype(np.float64)
    U, c = module.U.weight.detach().numpy().astype(np.float64), module.U.bias.detach().numpy().astype(np.float64)
    z = np.zeros(zshape)
    for _ in range(n):
        prev, z = z, z + 0.5 * (np.tanh(z @ W.T + x @ U.T + c) - z)
    # float32 graph against float64 numpy: the contraction damps round-off, so it stays at float32 level (~1e-7)
    assert relative_error(out["z_star"], z) < TOL
    assert int(out["iterations"]) == n
    res = (np.linalg.norm(z - prev, axis=1) / (np.linalg.norm(prev, axis=1) + 1e-12)).max()
    assert abs(float(out["residual"]) - res) <= 1e-3 * res + 1e-6  # a difference of nearby float32 iterates
    # the Loop form with tol 0 runs the same n steps
    loop = jfb.build(path, state="z", tol=0.0, max_iter=n)["fixed_point"]
    out_loop = runtime.run(loop, {"x": x.astype(np.float32)})
    assert int(out_loop["iterations"]) == n and relative_error(out_loop["z_star"], out["z_star"]) < 1e-6


def test_z0_input_warm_start(cases):
    _, path, models, _, xshape = cases("mlp")
    x = np.random.default_rng(5).standard_normal(xshape).astype(np.float32)
    cold = runtime.run(models["fixed_point"], {"x": x})
    warm_model = jfb.build(path, state="z", z0=True)["fixed_point"]
    assert [i.name for i in warm_model.graph.input][-1] == "z0"
    warm = runtime.run(warm_model, {"x": x, "z0": cold["z_star"]})
    assert int(warm["iterations"]) < int(cold["iterations"]) and relative_error(warm["z_star"], cold["z_star"]) < 1e-4


def test_jfb_versus_exact_implicit_gradient(cases, record_property):
    """Cosine between the JFB gradient and the implicit-function-theorem gradient, reported.

    Exact: w solves (I - dT/dz)^T w = z_bar (numpy, dT/dz from one-hot VJPs), gradient = (dT/dθ)^T w,
    i.e. the jfb_grad graph fed w. Cross-checked against PyTorch backprop through 300 unrolled float64
    iterations, which converges to the implicit gradient at the rate of the contraction.
    """
    module, path, models, zshape, xshape = cases("mlp")
    rng = np.random.default_rng(6)
    x = rng.standard_normal(xshape).astype(np.float32)
    weights = params_of(module)
    z_star = runtime.run(jfb.build(path, state="z", tol=1e-7, max_iter=500)["fixed_point"], {"x": x})["z_star"]
    z_bar = rng.standard_normal(zshape)

    dz = vjp.build(path, inputs=["z"])
    sess = runtime.session(to_float64(dz), provider="CPUExecutionProvider")
    n = z_star.size
    J = np.empty((n, n))  # J[i, j] = d T(z)_i / d z_j over the whole batch (block diagonal)
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1
        J[i] = sess.run(["z_bar"], {"z": z_star.astype(np.float64), "x": x.astype(np.float64),
                                    "z_next_bar": e.reshape(zshape)})[0].ravel()
    w = np.linalg.solve((np.eye(n) - J).T, z_bar.ravel()).reshape(zshape)

    g64 = reference(to_float64(models["jfb_grad"]))
    feeds = {k: v.astype(np.float64) for k, v in ({"z_star": z_star, "x": x} | weights).items()}
    jfb_g = emitted_grads(models["jfb_grad"], run_reference(g64, feeds | {"z_bar": z_bar}))
    exact = emitted_grads(models["jfb_grad"], run_reference(g64, feeds | {"z_bar": w}))

    m = module.double()
    for p in m.parameters():
        p.grad = None
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(zshape, dtype=torch.float64)
    for _ in range(300):
        z = m(z, xt)
    z.backward(torch.tensor(z_bar))
    unrolled = {"x": xt.grad.numpy()} | {k: p.grad.numpy() for k, p in m.named_parameters()}
    module.float()
    for key in exact:  # 0.8^300 truncation; float32 z* (tol 1e-7) limits agreement to ~1e-6
        assert relative_error(exact[key], unrolled[key]) < 1e-4, key

    keys = sorted(exact)
    a = np.concatenate([jfb_g[k].ravel() for k in keys])
    b = np.concatenate([exact[k].ravel() for k in keys])
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"\ncosine(JFB gradient, exact implicit gradient) on the MLP T: {cosine:.4f}")
    record_property("jfb_implicit_cosine", cosine)
    assert cosine > 0  # Fung et al.: for a contractive T the JFB gradient is a descent direction


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_readout_graph_matches_pytorch(loss, tmp_path, cases):
    _, path, _, _, _ = cases("mlp")
    torch.manual_seed(0)
    readout = torch.nn.Linear(12, 4)
    r_path = tmp_path / "R.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(readout, (torch.zeros(3, 12),), str(r_path), dynamo=False, opset_version=17,
                          input_names=["h"], output_names=["logits"], dynamic_axes={"h": {0: "n"}, "logits": {0: "n"}})
    model = jfb.build(path, state="z", readout=str(r_path), loss=loss)["readout"]
    assert [i.name for i in model.graph.input][:2] == ["z_star", "labels"]
    assert [o.name for o in model.graph.output][:2] == ["loss", "z_bar"]
    rng = np.random.default_rng(7)
    z = rng.standard_normal((5, 12)).astype(np.float32)
    labels = rng.integers(0, 4, 5) if loss == "cross_entropy" else rng.standard_normal((5, 4)).astype(np.float32)
    out = runtime.run(model, {"z_star": z, "labels": labels})

    zt = torch.tensor(z, requires_grad=True)
    logits = readout(zt)
    fn = torch.nn.functional.cross_entropy if loss == "cross_entropy" else torch.nn.functional.mse_loss
    value = fn(logits, torch.tensor(labels))
    value.backward()
    assert relative_error(out["loss"], value.item()) < TOL
    assert relative_error(out["logits"], logits.detach().numpy()) < TOL
    assert relative_error(out["z_bar"], zt.grad.numpy()) < TOL
    for name, p in readout.named_parameters():
        assert relative_error(out[f"{name}_bar"], p.grad.numpy()) < TOL, name


def test_cli_writes_three_graphs(tmp_path, cases, capsys):
    _, path, _, _, _ = cases("mlp")
    r = tmp_path / "R.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(12, 3), (torch.zeros(3, 12),), str(r), dynamo=False, opset_version=17,
                          input_names=["h"], output_names=["y"], dynamic_axes={"h": {0: "n"}, "y": {0: "n"}})
    out = tmp_path / "T"
    assert main(["compile", path, "--emit", "jfb", "--state", "z", "--readout", str(r), "--loss", "cross_entropy",
                 "--tol", "1e-5", "--max-iter", "50", "-o", str(out)]) == 0
    written = sorted(p.split("/")[-1] for p in glob.glob(str(tmp_path / "T.*")))
    assert written == ["T.fixed_point.onnx", "T.jfb_grad.onnx", "T.readout.onnx"]
    fp = onnx.load(str(tmp_path / "T.fixed_point.onnx"))
    assert {p.key: p.value for p in fp.metadata_props}["jacgraph.max_iter"] == "50"
    assert "jfb fixed_point" in capsys.readouterr().out


def _two_output_T(path):
    class Two(torch.nn.Module):
        def forward(self, z, x):
            return torch.relu(z + x), z * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Two(), (torch.zeros(2, 3), torch.zeros(2, 3)), str(path), dynamo=False, opset_version=17,
                          input_names=["z", "x"], output_names=["a", "b"])


def _wrong_shape_T(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(4, 3), (torch.zeros(2, 4),), str(path), dynamo=False, opset_version=17,
                          input_names=["z"], output_names=["z_next"])


@pytest.mark.parametrize("case, expect", [
    ("no_such_state", "T's inputs are: z, x"),
    ("wrong_shape", "has shape [2, 3]"),
    ("two_outputs", "has 2 outputs"),
    ("readout_without_loss", "--readout needs --loss"),
])
def test_cli_errors_exit_2_and_write_nothing(case, expect, tmp_path, cases, capsys):
    _, path, _, _, _ = cases("mlp")
    args = ["--state", "z"]
    if case == "no_such_state":
        args = ["--state", "h"]
    elif case == "wrong_shape":
        path = str(tmp_path / "bad.onnx")
        _wrong_shape_T(path)
    elif case == "two_outputs":
        path = str(tmp_path / "bad.onnx")
        _two_output_T(path)
    elif case == "readout_without_loss":
        args += ["--readout", path]
    out = tmp_path / "OUT"
    assert main(["compile", path, "--emit", "jfb", *args, "-o", str(out)]) == 2
    assert expect in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "OUT*")) and not glob.glob(str(tmp_path / ".jacgraph-*"))


def test_digits_example_ort_pipeline_tracks_pytorch_jfb(tmp_path):
    """examples/jfb_digits.py: three onnxruntime calls + numpy Adam per step follow PyTorch JFB + torch Adam.

    Both start from the same weights and see the same batches. They differ only in where the readout
    sees z (z* here, T(z*) in PyTorch), which tol = 1e-6 bounds by ~1e-6 relative, and float32 round-off
    (observed: 2e-8 relative in the weights after 5 steps); 1e-5 leaves room for a solve that stops one
    iteration apart near tol (z* then moves by <= 1e-6 relative).
    """
    from examples import jfb_digits as ex

    Xtr, _, ytr, _ = ex.digits()
    weights = ex.init_weights(32)
    paths = ex.compile_graphs(weights, str(tmp_path), tol=1e-6, max_iter=300)
    ort_p = ex.OrtPipeline(paths, weights, lr=1e-3, threads=1)
    torch_p = ex.TorchPipeline(weights, lr=1e-3, mode="jfb", tol=1e-6, max_iter=300)
    for i in range(5):
        batch = slice(16 * i, 16 * (i + 1))
        loss_ort, loss_torch = ort_p.step(Xtr[batch], ytr[batch]), torch_p.step(Xtr[batch], ytr[batch])
        assert abs(loss_ort - loss_torch) <= 1e-5 * abs(loss_torch)
    assert max(abs(a - b) for a, b in zip(ort_p.iterations, torch_p.iterations)) <= 1
    for name, p in list(torch_p.T.named_parameters()) + list(torch_p.R.named_parameters()):
        assert relative_error(ort_p.w[name], p.detach().numpy()) < 1e-5, name
        assert relative_error(ort_p.w[name], weights[name]) > 1e-3, name  # the weights did move


def test_wrt_subset_keeps_other_parameters_constant(cases):
    module, path, _, zshape, xshape = cases("residual")
    models = jfb.build(path, state="z", wrt="U.bias")  # the CLI's --wrt string form
    assert [i.name for i in models["fixed_point"].graph.input] == ["x", "U.bias"]
    assert [o.name for o in models["jfb_grad"].graph.output] == ["x_bar", "U.bias_bar"]
    rng = np.random.default_rng(8)
    x, z_bar = rng.standard_normal(xshape).astype(np.float32), rng.standard_normal(zshape).astype(np.float32)
    shifted = module.U.bias.detach().numpy() + 0.5  # a fed parameter value must replace the default
    z_star = runtime.run(models["fixed_point"], {"x": x, "U.bias": shifted})["z_star"]
    with torch.no_grad():
        module.U.bias += 0.5
        step = module(torch.tensor(z_star), torch.tensor(x)).numpy()
    assert relative_error(step, z_star) < 1e-3  # z* is the fixed point for the fed bias (tol 1e-4 per sample)
    expected = torch_jfb(module, z_star, x, z_bar)
    with torch.no_grad():
        module.U.bias -= 0.5
    out = runtime.run(models["jfb_grad"], {"z_star": z_star, "x": x, "U.bias": shifted, "z_bar": z_bar})
    assert relative_error(out["U.bias_bar"], expected["U.bias"]) < TOL
    assert relative_error(out["x_bar"], expected["x"]) < TOL
