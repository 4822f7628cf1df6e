"""An implicit network trained on scikit-learn's digits with onnxruntime alone (JFB), beside PyTorch.

    z* = relu(z* W + x U + b),  logits = z* V + c,  ||W||_2 <= 0.9 (rescaled after every step)

Three pipelines, same initial weights, same batches in the same order, same Adam:
  ort        jacgraph's fixed_point / readout / jfb_grad graphs in onnxruntime sessions, numpy Adam;
             weights are fed to the sessions as inputs every step (no re-export)
  torch_jfb  PyTorch JFB: fixed-point iteration under no_grad, one more T step with grad, backward
  torch_bp   PyTorch backprop through every fixed-point iteration

    python examples/jfb_digits.py            # 40 epochs, timings, peak memory at 10 vs 100 iterations
    python examples/jfb_digits.py --quick    # 5 epochs (same memory probes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

NORM_CAP = 0.9  # ||W||_2 cap: T is then a 0.9-contraction in z (relu is 1-Lipschitz)


# ---- data and the network ----------------------------------------------------------------------
def digits(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y)


def init_weights(hidden, d=64, classes=10, seed=0):
    """PyTorch-Linear-style uniform init; W starts at ||W||_2 = 0.5."""
    rng = np.random.default_rng(seed)
    u = lambda fan_in, *shape: (rng.uniform(-1, 1, shape) / np.sqrt(fan_in)).astype(np.float32)  # noqa: E731
    W = u(hidden, hidden, hidden)
    W *= np.float32(0.5 / np.linalg.norm(W, 2))
    return {"W": W, "U": u(d, d, hidden), "b": u(d, hidden), "V": u(hidden, hidden, classes), "c": u(hidden, classes)}


def torch_modules(weights):
    import torch

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k in "WUb":
                setattr(self, k, torch.nn.Parameter(torch.tensor(weights[k])))

        def forward(self, z, x):
            return torch.relu(z @ self.W + x @ self.U + self.b)

    class R(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.V, self.c = torch.nn.Parameter(torch.tensor(weights["V"])), torch.nn.Parameter(torch.tensor(weights["c"]))

        def forward(self, z):
            return z @ self.V + self.c

    return T(), R()


def compile_graphs(weights, folder, tol, max_iter, fixed_iterations=None):
    """Export T and R from PyTorch, compile them with jacgraph; returns {suffix: path}."""
    import torch

    import jacgraph
    from jacgraph.cli import write_atomic

    T, R = torch_modules(weights)
    hidden = weights["W"].shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(T, (torch.zeros(2, hidden), torch.zeros(2, 64)), f"{folder}/T.onnx", dynamo=False,
                          opset_version=17, input_names=["z", "x"], output_names=["z_next"],
                          dynamic_axes={"z": {0: "batch"}, "x": {0: "batch"}, "z_next": {0: "batch"}})
        torch.onnx.export(R, (torch.zeros(2, hidden),), f"{folder}/R.onnx", dynamo=False, opset_version=17,
                          input_names=["h"], output_names=["logits"],
                          dynamic_axes={"h": {0: "batch"}, "logits": {0: "batch"}})
    models = jacgraph.compile(f"{folder}/T.onnx", emit="jfb", state="z", inputs=[], tol=tol, max_iter=max_iter,
                              fixed_iterations=fixed_iterations, readout=f"{folder}/R.onnx", loss="cross_entropy")
    paths = {k: f"{folder}/jfb.{k}.onnx" for k in models}
    write_atomic({paths[k]: models[k] for k in models})
    return paths


# ---- numpy Adam (PyTorch's update, bias-corrected) ---------------------------------------------
class Adam:
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, *betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            params[k] -= (self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)).astype(np.float32)


def cap_norm_np(W):
    s = np.linalg.norm(W, 2)
    if s > NORM_CAP:
        W *= np.float32(NORM_CAP / s)


# ---- the three pipelines ------------------------------------------------------------------------
class OrtPipeline:
    """A training step is three onnxruntime calls: fixed point, readout (loss, z_bar), JFB gradient."""

    def __init__(self, paths, weights, lr, threads):
        import onnxruntime

        from jacgraph import runtime

        onnxruntime.set_default_logger_severity(3)  # parameters as inputs with defaults is the point, not a mistake
        self.fp, self.ro, self.gr = (runtime.session(paths[k], threads=threads)
                                     for k in ("fixed_point", "readout", "jfb_grad"))
        self.w = {k: v.copy() for k, v in weights.items()}
        self.opt = Adam(self.w, lr)
        self.grad_names = [o.name for o in self.gr.get_outputs()]
        self.ro_names = [o.name for o in self.ro.get_outputs()]
        self.iterations = []

    def set_lr(self, lr):
        self.opt.lr = lr

    def fixed_point(self, x):
        from jacgraph.passes import jfb

        out = jfb.solve(self.fp, {"x": x, "W": self.w["W"], "U": self.w["U"], "b": self.w["b"]})
        self.iterations.append(int(out["iterations"]))
        return out["z_star"]

    def step(self, x, labels):
        z = self.fixed_point(x)
        w = self.w
        loss, z_bar, V_bar, c_bar, _ = self.ro.run(self.ro_names, {"z_star": z, "labels": labels, "V": w["V"], "c": w["c"]})
        feeds = {"z_star": z, "x": x, "z_bar": z_bar, "W": w["W"], "U": w["U"], "b": w["b"]}
        grads = dict(zip(self.grad_names, self.gr.run(self.grad_names, feeds)))
        self.opt.step(self.w, {"W": grads["W_bar"], "U": grads["U_bar"], "b": grads["b_bar"], "V": V_bar, "c": c_bar})
        cap_norm_np(self.w["W"])
        return float(loss)

    def implicit_cosine(self, x, labels):
        """Cosine between the JFB gradient of (W, U, b) and the exact implicit one, on one batch.

        Exact: per sample, w solves (I - dT/dz)^T w = z_bar with dT/dz = diag(relu'(pre)) W^T, and the
        gradient is the jfb_grad graph fed w instead of z_bar (it computes (dT/dθ)^T of whatever it is fed).
        """
        z = self.fixed_point(x)
        _, z_bar, _, _, _ = self.ro.run(self.ro_names, {"z_star": z, "labels": labels, "V": self.w["V"], "c": self.w["c"]})
        mask = (z @ self.w["W"] + x @ self.w["U"] + self.w["b"] > 0).astype(np.float64)
        J = mask[:, :, None] * self.w["W"].T[None].astype(np.float64)  # J[s, i, j] = d z_next_i / d z_j
        eye = np.eye(J.shape[1])[None]
        w = np.linalg.solve(np.transpose(eye - J, (0, 2, 1)), z_bar[:, :, None].astype(np.float64))[:, :, 0]
        feeds = {"z_star": z, "x": x, "W": self.w["W"], "U": self.w["U"], "b": self.w["b"]}
        jfb_g = np.concatenate([g.ravel() for g in self.gr.run(self.grad_names, feeds | {"z_bar": z_bar})])
        exact = np.concatenate([g.ravel() for g in self.gr.run(self.grad_names, feeds | {"z_bar": w.astype(np.float32)})])
        return float(jfb_g @ exact / (np.linalg.norm(jfb_g) * np.linalg.norm(exact)))

    def predict(self, x, labels):
        z = self.fixed_point(x)
        return self.ro.run(["logits"], {"z_star": z, "labels": labels, "V": self.w["V"], "c": self.w["c"]})[0].argmax(1)


class TorchPipeline:
    """mode 'jfb': iterate without grad, one T step with grad; mode 'bp': grad through every iteration."""

    def __init__(self, weights, lr, mode, tol, max_iter, fixed_iterations=None):
        import torch

        self.torch, self.mode, self.tol, self.max_iter, self.fixed = torch, mode, tol, max_iter, fixed_iterations
        self.T, self.R = torch_modules(weights)
        self.opt = torch.optim.Adam(list(self.T.parameters()) + list(self.R.parameters()), lr=lr)
        self.iterations = []

    def set_lr(self, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr

    def solve(self, x):
        """The fixed_point graph's rule: stop when max per-sample ||z_{k+1} - z_k|| / (||z_k|| + 1e-12) <= tol."""
        z = self.torch.zeros(x.shape[0], self.T.W.shape[0])
        n = self.fixed or self.max_iter
        for k in range(1, n + 1):
            z_next = self.T(z, x)
            if not self.fixed:
                with self.torch.no_grad():
                    res = ((z_next - z).norm(dim=1) / (z.norm(dim=1) + 1e-12)).max().item()
            z = z_next
            if not self.fixed and res <= self.tol:
                break
        self.iterations.append(k)
        return z

    def step(self, x, labels):
        torch = self.torch
        x, labels = torch.from_numpy(x), torch.from_numpy(labels)
        if self.mode == "jfb":
            with torch.no_grad():
                z = self.solve(x)
            z = self.T(z, x)  # JFB: one differentiable step at the detached fixed point
        else:
            z = self.solve(x)
        loss = torch.nn.functional.cross_entropy(self.R(z), labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            s = torch.linalg.matrix_norm(self.T.W, 2)
            if s > NORM_CAP:
                self.T.W *= NORM_CAP / s
        return loss.item()

    def predict(self, x, labels=None):
        with self.torch.no_grad():
            return self.R(self.solve(self.torch.from_numpy(x))).argmax(1).numpy()


# ---- peak memory of one gradient step, in a fresh process ----------------------------------------
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def memory_probe(pipeline, iters, hidden, batch):
    """Peak RSS growth (MB) of one gradient step at exactly `iters` fixed-point iterations."""
    import torch

    torch.set_num_threads(1)
    Xtr, _, ytr, _ = digits()
    idx = np.arange(batch) % len(Xtr)
    x, labels = Xtr[idx], ytr[idx]
    weights = init_weights(hidden)
    if pipeline == "ort":
        folder = tempfile.mkdtemp()
        # tol 0: the Loop runs exactly `iters` iterations (the dynamic form, as trained)
        p = OrtPipeline(compile_graphs(weights, folder, tol=0.0, max_iter=iters), weights, 1e-3, threads=1)
        warnings.simplefilter("ignore", RuntimeWarning)  # tol 0 never converges: that is the point here
    else:
        p = TorchPipeline(weights, 1e-3, pipeline.split("_")[1], tol=0.0, max_iter=iters, fixed_iterations=iters)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter: count the step only, not imports and session setup
    base = _rss_kb("VmRSS")
    p.step(x, labels)
    assert p.iterations[-1] == iters
    return (_rss_kb("VmHWM") - base) / 1024


def measure_memory(pipelines, iter_counts, hidden, batch):
    out = {}
    for name in pipelines:
        for n in iter_counts:
            cmd = [sys.executable, __file__, "--memory-probe", name, "--iters", str(n), "--hidden", str(hidden),
                   "--batch", str(batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[(name, n)] = float(res.stdout.strip().splitlines()[-1])
    return out


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 epochs (a fast check)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="threads for onnxruntime and PyTorch alike")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # numpy's OpenBLAS defaults to every core; on a shared machine its idle-spinning threads make a 128x128
    # SVD 10x slower, so numpy, onnxruntime and PyTorch all get the same thread count
    threadpool_limits(args.threads)
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args.iters, args.hidden, args.batch))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    epochs = 5 if args.quick and args.epochs == 40 else args.epochs
    Xtr, Xte, ytr, yte = digits()
    weights = init_weights(args.hidden)
    folder = tempfile.mkdtemp()
    paths = compile_graphs(weights, folder, args.tol, args.max_iter)
    pipes = {"ort": OrtPipeline(paths, weights, args.lr, args.threads),
             "torch_jfb": TorchPipeline(weights, args.lr, "jfb", args.tol, args.max_iter),
             "torch_bp": TorchPipeline(weights, args.lr, "bp", args.tol, args.max_iter)}
    times = {k: [] for k in pipes}
    rng = np.random.default_rng(0)
    print(f"digits: {len(Xtr)} train / {len(Xte)} test, hidden {args.hidden}, batch {args.batch}, {epochs} epochs, "
          f"tol {args.tol:g}, max_iter {args.max_iter}, {args.threads} thread(s), CPU")
    for epoch in range(epochs):
        order = rng.permutation(len(Xtr))
        batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
        for name, p in pipes.items():  # epochs interleaved, so machine load hits all three alike
            p.set_lr(args.lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs)))  # cosine decay, the same for all
            t0 = time.perf_counter()
            losses = [p.step(Xtr[i], ytr[i]) for i in batches]
            times[name].append(time.perf_counter() - t0)
            if epoch in (0, epochs - 1) or (epoch + 1) % 10 == 0:
                print(f"  epoch {epoch + 1:3d} {name:9s} loss {np.mean(losses):.4f}  {times[name][-1]:.3f} s  "
                      f"mean iterations {np.mean(p.iterations[-len(batches):]):.1f}")
    results = {"epochs": epochs, "hidden": args.hidden, "batch": args.batch, "threads": args.threads}
    print("\npipeline   test acc   s/epoch (median)   max iterations seen")
    for name, p in pipes.items():
        acc = float((p.predict(Xte, yte) == yte).mean())
        sec = float(np.median(times[name]))
        results[name] = {"test_accuracy": acc, "s_per_epoch": sec, "max_iterations": int(max(p.iterations))}
        print(f"{name:10s} {100 * acc:7.2f}%   {sec:10.3f}          {max(p.iterations)}")
    r = results["torch_jfb"]["s_per_epoch"] / results["ort"]["s_per_epoch"]
    print(f"onnxruntime JFB is {r:.2f}x the speed of PyTorch JFB per epoch "
          f"({results['torch_bp']['s_per_epoch'] / results['ort']['s_per_epoch']:.2f}x PyTorch backprop-through-iterations)")
    cos_train = pipes["ort"].implicit_cosine(Xtr, ytr)
    print(f"cosine(JFB gradient, exact implicit gradient) of (W, U, b) at the trained ort weights, whole training set: "
          f"{cos_train:.4f}")
    results["jfb_implicit_cosine"] = cos_train
    if any(max(p.iterations) >= args.max_iter for p in pipes.values()):
        print(f"warning: some fixed-point solves stopped at max_iter={args.max_iter} before reaching tol {args.tol:g}")

    if not args.no_memory:
        batch = len(Xtr)  # the whole training set in one step, so activations dominate the footprint
        mem = measure_memory(["ort", "torch_jfb", "torch_bp"], (10, 100), args.hidden, batch)
        print(f"\npeak RSS growth of one gradient step (batch {batch}, fresh process each, MB):")
        print("pipeline    10 iterations   100 iterations")
        for name in ("ort", "torch_jfb", "torch_bp"):
            print(f"{name:10s}  {mem[(name, 10)]:12.1f}   {mem[(name, 100)]:12.1f}")
        results["memory_mb"] = {f"{k}@{n}": v for (k, n), v in mem.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
