"""The emitted HVP graphs (`--emit hvp`, forward-over-reverse) on the example architectures, against PyTorch.

    python examples/bench_hvp.py [--threads 1] [--runs 20] [--only mlp,lenet]
    python examples/bench_hvp.py --default-exporter   # torch.onnx.export(dynamo=True), dynamic batch: H v vs torch.func

For three smooth models (a GELU MLP, a SiLU/tanh CNN, an attention block) and each example architecture
(batch 1, f = <y, y_bar> with a fixed random y_bar): compile time, the relative
difference of H v from onnxruntime float32 and from torch.func.jvp(torch.func.grad(f)) in float32
(||a - b|| / ||b||; "0 = 0" where both are exactly zero, as for networks whose gradient is piecewise
constant: ReLU and max-pool only), and the median times of the onnxruntime forward, the HVP graph and
torch.func's forward-over-reverse, run interleaved in one process. Where PyTorch has no forward-mode rule
for an op's backward (hardsigmoid_backward: neither forward nor double backward), the reference is float64
central differences of torch.func.grad (h = 1e-6) and the PyTorch time is theirs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.passes import hvp  # noqa: E402
from jacgraph.runtime import session  # noqa: E402
from jacgraph.testing import relative_error  # noqa: E402


class MLP(torch.nn.Module):
    """Linear/tanh/Linear/GELU/Linear/softplus; scalar=True returns the sum of squares (a loss)."""

    def __init__(self, d_in=6, width=8, d_out=3, scalar=False):
        super().__init__()
        self.scalar = scalar
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                       torch.nn.GELU(), torch.nn.Linear(width, d_out), torch.nn.Softplus())

    def forward(self, x):
        y = self.net(x)
        return (y * y).sum() if self.scalar else y


class CNN(torch.nn.Module):
    """Conv/SiLU/max-pool, strided Conv/tanh, Linear, log-softmax on size x size images."""

    def __init__(self, size=8, classes=5):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(6 * (size // 4) ** 2, classes)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.nn.functional.silu(self.c1(x)), 2)
        h = torch.tanh(self.c2(h))
        return torch.nn.functional.log_softmax(self.head(h.flatten(1)), dim=-1)


class Block(torch.nn.Module):
    """Pre-norm attention + GELU MLP, with residuals (a transformer layer, one head); scalar=True: mean of squares."""

    def __init__(self, d=8, scalar=False):
        super().__init__()
        self.scalar = scalar
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.n1(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / h.shape[-1] ** 0.5
        x = x + self.o(torch.softmax(scores, dim=-1) @ self.v(h))
        y = x + self.mlp(self.n2(x))
        return (y * y).mean() if self.scalar else y


# smooth models (the architectures' ReLU/max-pool gradients are piecewise constant: their H v is 0)
SMOOTH = {"gelu_mlp": (lambda: MLP(784, 256, 10), (1, 784)), "smooth_cnn": (lambda: CNN(32, 10), (1, 3, 32, 32)),
          "attention_block": (lambda: Block(64), (1, 32, 64))}


def export_model(name, path):
    """(the model in eval mode, an example input) for an architecture or a SMOOTH model, exported to `path`."""
    if name in SMOOTH:
        make, shape = SMOOTH[name]
        torch.manual_seed(0)
        model, x = make().eval(), torch.randn(*shape)
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False)
        return model, x.numpy()
    architectures.export(name, path, batch=1)
    return architectures.build(name), architectures.example_input(name, batch=1).numpy()


def bench_one(name, folder, threads, runs):
    path = os.path.join(folder, name + ".onnx")
    model, x = export_model(name, path)
    src = onnx.load(path)
    forward = session(src, threads=threads)
    y = forward.run(None, {"x": x})[0]
    rng = np.random.default_rng(0)
    y_bar = rng.standard_normal(y.shape).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    t0 = time.perf_counter()
    result = hvp.emit(src, y_bar=True)
    compile_s = time.perf_counter() - t0
    sess = session(result.model, threads=threads)
    feeds = {"x": x, "y_bar": y_bar, "x_dot": v}
    got = sess.run(["x_hvp"], feeds)[0]

    xt, vt, ut = torch.from_numpy(x), torch.from_numpy(v), torch.from_numpy(y_bar)

    def f(z):
        return (model(z) * ut).sum()

    def torch_hvp():
        return torch.func.jvp(torch.func.grad(f), (xt,), (vt,))[1]

    try:
        expected = torch_hvp().detach().numpy()
        how = "torch.func"
    except NotImplementedError:  # PyTorch has no second derivative of some ops (hardsigmoid_backward)
        model64, x64, v64, u64 = model.double(), xt.double(), vt.double(), ut.double()
        grad64 = torch.func.grad(lambda z: (model64(z) * u64).sum())
        h = 1e-6

        def torch_hvp():  # central differences of PyTorch's gradient in float64
            return (grad64(x64 + h * v64) - grad64(x64 - h * v64)) / (2 * h)
        expected = torch_hvp().detach().numpy()
        how = "central differences of torch.func.grad, float64"
    norm = np.linalg.norm(expected)
    error = "0 = 0" if norm == 0 and not np.any(got) else f"{relative_error(got, expected):.1e}"
    ms = time_calls({"forward": lambda: forward.run(None, {"x": x}), "hvp": lambda: sess.run(None, feeds),
                     "torch": torch_hvp}, runs)
    return {"name": name, "compile_s": compile_s, "error": error, "hv_norm": float(norm), "how": how, **ms}


class CausalBlock(torch.nn.Module):
    """A GPT-style causal-mask attention (masked_fill -> Where) in front of a Block."""

    def __init__(self, d=16, tokens=6):
        super().__init__()
        self.block, self.embed = Block(d), torch.nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(tokens, tokens)).bool())

    def forward(self, x):
        h = self.embed(x)
        attention = (h @ h.transpose(-1, -2)).masked_fill(~self.mask, float("-inf")).softmax(-1)
        return self.block(attention @ h)


def default_exporter_check():
    """HVP of models from PyTorch's default (torch.export-based) exporter with a dynamic batch axis, run at batch 3
    (exported at 2), against torch.func in float64 (the emitted graph's float64 copy, onnx's reference evaluator)."""
    from jacgraph.testing import reference_session, run_reference, to_float64

    models = {"attention block": (Block(16), (6, 16)), "causal attention": (CausalBlock(), (6, 16)),
              "smooth cnn": (CNN(8), (3, 8, 8))}
    for name, (module, shape) in models.items():
        torch.manual_seed(0)
        module = module.eval()
        program = torch.onnx.export(module, (torch.randn(2, *shape),), dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        result = hvp.emit(program.model_proto)
        x_name = program.model_proto.graph.input[0].name
        (bar,) = result.cotangent_inputs.values()
        rng = np.random.default_rng(0)
        x, v = rng.standard_normal((3, *shape)), rng.standard_normal((3, *shape))
        y_bar = rng.standard_normal(tuple(module(torch.tensor(x, dtype=torch.float32)).shape))
        out = run_reference(reference_session(to_float64(result.model)), {x_name: x, bar: y_bar,
                                                                           result.tangent_inputs[x_name]: v})
        module = module.double()
        _, hv = torch.func.jvp(torch.func.grad(lambda z: (module(z) * torch.tensor(y_bar)).sum()),
                               (torch.tensor(x),), (torch.tensor(v),))
        error = relative_error(out[result.hvp_outputs[x_name]], hv.detach().numpy())
        print(f"| {name} | {', '.join(sorted({n.op_type for n in program.model_proto.graph.node}))} | {error:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", help="comma-separated model names (default: the smooth models, then every architecture)")
    parser.add_argument("--default-exporter", action="store_true",
                        help="instead: the HVP of models from torch.onnx.export(dynamo=True), dynamic batch, vs torch.func")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.default_exporter:
        print("| model | ops | H v vs torch.func (rel., float64) |")
        print("|---|---|---|")
        return default_exporter_check()
    names = args.only.split(",") if args.only else list(SMOOTH) + list(architectures.ARCHITECTURES)
    print("| model | compile s | ‖Hv‖ | H v vs PyTorch (rel.) | forward ms | HVP ms | PyTorch ms | HVP/forward | PyTorch by |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            r = bench_one(name, folder, args.threads, args.runs)
            print(f"| {name} | {r['compile_s']:.1f} | {r['hv_norm']:.3g} | {r['error']} | {r['forward']:.2f} | "
                  f"{r['hvp']:.2f} | {r['torch']:.2f} | {r['hvp'] / r['forward']:.1f} | {r['how']} |", flush=True)


if __name__ == "__main__":
    main()
