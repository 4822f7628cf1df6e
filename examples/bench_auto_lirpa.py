"""auto_LiRPA's Jacobian bounds (Shi et al., NeurIPS 2022) beside jacgraph's, on the DAG models of
examples/bounds_models.py. A benchmark only: auto_LiRPA is never a dependency of jacgraph.

    # its source, e.g. from a clone of github.com/Verified-Intelligence/auto_LiRPA (no pip install:
    # its setup.py pins torch < 2.9)
    pip install --target /tmp/alirpa_deps appdirs graphviz
    python examples/bench_auto_lirpa.py --source /path/to/auto_LiRPA_checkout --deps /tmp/alirpa_deps [--eps 0.02]
        [--alirpa-optimize off] [--optimize-slopes 0,20] [--slopes neuron,unit] [--cpu-time]

Same point x0 (standard normal, seed 0) and l_inf eps as examples/bench_bounds.py. auto_LiRPA runs in
float32 (its default); jacgraph in float64. Prints, per model, auto_LiRPA's time and mean width (or its
error) and one row per jacgraph configuration: its time (graph building included) and mean width.
auto_LiRPA's compute_jacobian_bounds optimises its intermediate bounds (alpha-CROWN, method
'CROWN-Optimized' on the network output, 20 iterations) by default (--alirpa-optimize on); off gives its
plain CROWN. --optimize-slopes: a comma list of N, jacgraph with N slope steps (passes/alpha_crown.py; 0:
CROWN's slopes, RecurJac as `jacgraph bound` runs it), each with every --slopes mode: "neuron" (per
bounded neuron and side where a back-substitution runs at once, the default of --optimize-slopes) or
"unit" (one slope per ReLU unit, shared). --cpu-time: one thread for torch and onnxruntime and the calling
thread's CPU time (time.thread_time) instead of wall seconds, for a loaded machine.

--models recurjac_mlp: the RecurJac benchmark's 784-256-256-10 ReLU MLP, trained on upsampled digits
(bounds_models.RecurJacMLP), bounded at its first test image instead of a normal point. --check adds the
interval chain (recurjac.bound method="interval": time, mean width) and the sampled Jacobians' range
(examples/bench_bounds.py sampled_range, --samples points, corners + uniform, float64 torch: a lower bound)
with how far the furthest sampled entry lies outside each configuration's bounds intersected with the
interval chain's (<= 0: inside).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_bounds, bounds_models  # noqa: E402
from jacgraph.passes import alpha_crown, recurjac  # noqa: E402


def jacobian_module(net) -> torch.nn.Module:
    """net (float32) wrapped so that its output is auto_LiRPA's JacobianOP of net at the input: what auto_LiRPA
    bounds to bound net's Jacobian (auto_LiRPA must be importable)."""
    from auto_LiRPA.jacobian import JacobianOP

    class JacobianWrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return JacobianOP.apply(self.model(x), x)

    return JacobianWrapper(net.float())


def auto_lirpa_width(net, x0, eps, optimize=True, clock=time.perf_counter):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    x = torch.tensor(x0, dtype=torch.float32)
    t0 = clock()
    model = BoundedModule(jacobian_module(net), x, device="cpu")
    lower, upper = model.compute_jacobian_bounds(BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=eps)),
                                                 optimize=optimize)
    t = clock() - t0
    return float((upper - lower).mean()), t


def jacgraph_bounds(model, x0, eps, steps, slopes, threads, clock):
    """(J_lower, J_upper, seconds): RecurJac with CROWN's slopes (steps 0, as `jacgraph bound` runs it) or with
    `steps` optimised slope steps in mode `slopes`; the time includes building the graphs and sessions."""
    t0 = clock()
    if steps:
        opt = alpha_crown.SlopeOptimiser(model, slopes=slopes, threads=threads)
        lo, hi, _ = opt.run(x0, np.array([eps]), iterations=steps)
    else:
        r = recurjac.bound(model, x0, eps, threads=threads, progress=False)
        lo, hi = r["J_lower"], r["J_upper"]
    return lo, hi, clock() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True, help="a checkout of auto_LiRPA (the folder holding auto_LiRPA/)")
    p.add_argument("--deps", help="a folder with auto_LiRPA's pure-Python requirements (pip install --target DIR appdirs graphviz)")
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--models", default="residual_mlp,resnet_cnn,densenet_cnn,pool_cnn,inception_cnn")
    p.add_argument("--alirpa-optimize", choices=("on", "off"), default="on",
                   help="auto_LiRPA's optimised intermediate bounds (its default) or its plain CROWN")
    p.add_argument("--optimize-slopes", default="0", help="jacgraph: comma list of optimised-slope step counts (default 0)")
    p.add_argument("--slopes", default="neuron", help="comma list of slope modes for N > 0: neuron, unit (default neuron)")
    p.add_argument("--cpu-time", action="store_true", help="one thread each, thread CPU time (see above)")
    p.add_argument("--check", action="store_true", help="also the interval chain and the sampled range (see above)")
    p.add_argument("--samples", type=int, default=2000, help="--check: sampled points (default 2000)")
    args = p.parse_args()
    sys.path[:0] = [args.source] + ([args.deps] if args.deps else [])
    clock, threads = (time.thread_time, 1) if args.cpu_time else (time.perf_counter, None)
    if args.cpu_time:
        torch.set_num_threads(1)
    configs = [(n, mode) for n in map(int, args.optimize_slopes.split(",")) for mode in (args.slopes.split(",") if n else ["-"])]
    unit = "CPU s" if args.cpu_time else "s"
    extra = " interval s | interval mean width | sampled range (lower bound) | sampled outside by (<= 0: inside) |"
    print(f"eps {args.eps}; times in {'thread CPU seconds, 1 thread' if args.cpu_time else 'wall seconds'}")
    print(f"| model | auto_LiRPA {unit} | auto_LiRPA mean width | jacgraph slope steps | slopes | jacgraph {unit} (build+run) | "
          "jacgraph mean width |" + (extra if args.check else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" * 4 if args.check else ""))
    for name in args.models.split(","):
        net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
        x0 = getattr(net, "example_input", None)
        if x0 is None:
            x0 = np.random.default_rng(0).standard_normal((1, *shape))
        else:
            print(f"{name}: train / test accuracy {net.accuracy[0]:.4f} / {net.accuracy[1]:.4f}", flush=True)
        model = bounds_models.export_bytes(net, shape)
        rows = []
        if args.check:
            t0 = clock()
            ri = recurjac.bound(model, x0, args.eps, method="interval", threads=threads, progress=False)
            t_iv = clock() - t0
        for steps, mode in configs:
            lo, hi, t_jg = jacgraph_bounds(model, x0, args.eps, steps, mode, threads, clock)
            checked = ""
            if args.check:  # before auto_LiRPA, which turns net to float32
                both = (np.maximum(lo, ri["J_lower"]), np.minimum(hi, ri["J_upper"]))
                sampled, outside = bench_bounds.sampled_range(net, x0, args.eps, args.samples, np.random.default_rng(1), both)
                checked = f" {t_iv:.1f} | {np.mean(ri['J_upper'] - ri['J_lower']):.6g} | {sampled:.6g} | {outside:.2g} |"
            rows.append(f"| {steps} | {mode} | {t_jg:.1f} | {np.mean(hi - lo):.6g} |{checked}")
        try:
            width, t = auto_lirpa_width(net, x0, args.eps, optimize=args.alirpa_optimize == "on", clock=clock)
            theirs = f"{t:.1f} | {width:.6g}"
        except Exception as e:  # noqa: BLE001  a peer's failure is a result to report
            last = traceback.extract_tb(e.__traceback__)[-1]
            theirs = f"- | fails: {type(e).__name__}: {str(e).splitlines()[0][:120]} ({os.path.basename(last.filename)}:{last.lineno})"
        for row in rows:
            print(f"| {name} | {theirs} {row}", flush=True)


if __name__ == "__main__":
    main()
