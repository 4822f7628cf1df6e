"""Benchmark the emitted VJP graphs (input gradient, and all parameter gradients) against PyTorch's backward.

    python examples/bench_vjp.py [--threads 1] [--runs 50] [--only mlp,lenet] [--cpu-time]

onnxruntime forward, `--emit vjp`, `--emit vjp --wrt params` are timed interleaved in one process
(median of --runs), so machine noise hits all alike, and PyTorch forward+backward in a loop of its own.
--cpu-time: this thread's CPU time instead of the wall clock (see examples/bench_jvp.py).
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
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.runtime import session  # noqa: E402

DEFAULT = ["mlp", "lenet", "resnet18", "mobilenetv2_style", "densenet_style", "unet"]


def bench_one(name, folder, threads, runs, clock):
    path = os.path.join(folder, name + ".onnx")
    architectures.export(name, path, batch=1)
    src, x = onnx.load(path), architectures.example_input(name, batch=1).numpy()
    forward = session(src, threads=threads)
    y = forward.run(None, {"x": x})[0]
    u = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    grad_x = session(vjp.build(src), threads=threads)
    grad_all = session(vjp.build(src, wrt="params"), threads=threads)
    model, xt, ut = architectures.build(name), torch.from_numpy(x), torch.from_numpy(u)

    def torch_step():
        xx = xt.clone().requires_grad_(True)
        model.zero_grad()
        model(xx).backward(ut)

    calls = {"forward": lambda: forward.run(None, {"x": x}),
             "vjp_x": lambda: grad_x.run(None, {"x": x, "y_bar": u}),
             "vjp_params": lambda: grad_all.run(None, {"x": x, "y_bar": u})}
    times = time_calls(calls, runs, clock=clock)
    # PyTorch in its own loop: an onnxruntime call right after a PyTorch call runs measurably slower
    times.update(time_calls({"torch_fwd_bwd": torch_step}, runs, clock=clock))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--only", help="comma-separated architecture names")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (use with --threads 1)")
    args = p.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else DEFAULT
    print("| model | forward ms | vjp (x_bar) ms | ratio | vjp --wrt params ms | ratio | PyTorch fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            t = bench_one(name, folder, args.threads, args.runs, clock)
            print(f"| {name} | {t['forward']:.3f} | {t['vjp_x']:.3f} | {t['vjp_x'] / t['forward']:.2f} | "
                  f"{t['vjp_params']:.3f} | {t['vjp_params'] / t['forward']:.2f} | {t['torch_fwd_bwd']:.3f} |",
                  flush=True)
    print(f"threads={args.threads}, batch 1, median of {args.runs} interleaved runs, "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}")


if __name__ == "__main__":
    main()
