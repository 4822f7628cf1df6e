"""End to end: `--emit vjp` on the 14 architectures of examples/architectures.py against torch.autograd.

Both sides run in float64 (the emitted graph through the reference evaluator, the PyTorch model after
.double()), for the reason tests/test_architectures.py gives: float32 is no oracle for deep ReLU nets.
Tolerance 1e-5, as there: the exporter folds BatchNorm into Conv weights in float32 (~1e-7 relative
differences, amplified by depth); a wrong rule gives errors of order 1. Every emitted graph also runs
in float32 onnxruntime, whose primal output must match PyTorch's.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="the end-to-end tests compare against PyTorch (pip install torch==2.13.0)")

from examples import architectures  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.cli import main  # noqa: E402
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.testing import relative_error, run_reference, to_float64  # noqa: E402
from test_rules_transpose import reference  # noqa: E402

TOL = 1e-5
TOL32_PRIMAL = 1e-4  # float32 forward, onnxruntime vs PyTorch kernels: continuous, no kink sensitivity


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("architectures")
    cache = {}

    def get(name, batch=1, fold_batchnorm=True):
        key = (name, batch, fold_batchnorm)
        if key not in cache:
            path = folder / f"{name}_{batch}_{fold_batchnorm}.onnx"
            architectures.export(name, str(path), batch=batch, fold_batchnorm=fold_batchnorm)
            cache[key] = onnx.load(str(path))
        return cache[key]
    return get


def torch_grads(name, x, seed):
    """float64 autograd for a standard-normal cotangent u: (y, u, x_bar, {parameter name: grad})."""
    model = architectures.build(name).double()
    xt = torch.from_numpy(x).double().requires_grad_(True)
    y = model(xt)
    u = np.random.default_rng(seed).standard_normal(tuple(y.shape))
    y.backward(torch.from_numpy(u))
    return y.detach().numpy(), u, xt.grad.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_input_gradient_matches_torch_autograd(name, exported):
    source = exported(name)
    x = architectures.example_input(name, batch=1).numpy()
    emitted = vjp.build(source)
    y_ref, u, x_bar_ref, _ = torch_grads(name, x, seed=5)
    out = run_reference(reference(to_float64(emitted)), {"x": x.astype(np.float64), "y_bar": u})
    assert relative_error(out["y"], y_ref) < TOL
    assert relative_error(out["x_bar"], x_bar_ref) < TOL, f"{name}: x_bar differs from torch.autograd"
    out32 = runtime.run(runtime.session(emitted), {"x": x, "y_bar": u.astype(np.float32)})
    assert relative_error(out32["y"], y_ref) < TOL32_PRIMAL
    assert out32["x_bar"].shape == x.shape and np.all(np.isfinite(out32["x_bar"]))


@pytest.mark.parametrize("name", ["mlp", "maxout_mlp", "lenet", "densenet_style"])
def test_parameter_gradients_match_torch_autograd(name, exported):
    # batch 2: weight gradients sum over the batch; BatchNorm unfolded: every parameter keeps its name
    source = exported(name, batch=2, fold_batchnorm=False)
    x = architectures.example_input(name, batch=2).numpy()
    emitted = vjp.build(source, wrt="params")
    _, u, x_bar_ref, grads = torch_grads(name, x, seed=6)
    out = run_reference(reference(to_float64(emitted)), {"x": x.astype(np.float64), "y_bar": u})
    assert relative_error(out["x_bar"], x_bar_ref) < TOL
    compared = [p for p in grads if f"{p}_bar" in out]
    assert len(compared) == len(grads), f"parameters without a gradient output: {sorted(set(grads) - set(compared))}"
    for p in compared:
        assert relative_error(out[f"{p}_bar"], grads[p]) < TOL, f"{name}: d/d{p} differs from torch.autograd"


def test_cli_compile_vjp_wrt_params(tmp_path, exported):
    src = tmp_path / "m.onnx"
    onnx.save(exported("lenet"), str(src))
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "--emit", "vjp", "--wrt", "params", "-o", str(out)]) == 0
    sess = runtime.session(str(out))
    names = [i.name for i in sess.get_inputs()]
    assert names[0] == "x" and names[-1] == "y_bar"
    x = architectures.example_input("lenet", batch=1).numpy()
    result = runtime.run(sess, {"x": x, "y_bar": np.ones((1, 10), np.float32)})
    assert {"y", "x_bar", "0.weight_bar", "0.bias_bar"} <= set(result)


def test_cli_bad_wrt_exits_2_and_writes_nothing(tmp_path, exported, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(exported("mlp"), str(src))
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "--emit", "vjp", "--wrt", "0.weight,bogus", "-o", str(out)]) == 2
    assert "'bogus'" in capsys.readouterr().err
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["m.onnx"]
