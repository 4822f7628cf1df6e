"""What optimised ReLU slopes (alpha-CROWN idea, passes/alpha_crown.py) gain on the RecurJac bounds.

    python examples/bench_alpha_crown.py [--eps 0.02] [--iterations 20] [--models residual_mlp,...] [--slopes neuron,unit]

Per model (examples/bounds_models.py, random weights, seed 0; "lenet" is the quickstart LeNet of
examples/architectures.py), x0 standard normal (seed 0), one point, l_inf ball, graph lowering, float64:
the mean width of [J_lower, J_upper] with CROWN's slopes and after N projected Adam steps on them
(elementwise best over the iterates), one row per slope mode (--slopes: "neuron", per bounded neuron and
side where a back-substitution runs at once, or "unit", one shared slope per ReLU unit; the slope inputs
column counts the numbers fed per point, shared inputs that no back-substitution reads included), the share of entries made tighter, the objective (sum of the
pre-activation widths) before and after, the fraction of pre-activation units whose CROWN interval
straddles 0 (l < 0 < u; the same count as tests/test_recurjac.py), and the thread CPU time
of building the graphs and sessions and of the N steps (thread CPU time: the shared machine's wall
clock is noisy; onnxruntime's own threads are not counted, so --threads 1 is the default here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.bench_bounds import model_and_net  # noqa: E402
from jacgraph.passes.alpha_crown import SlopeOptimiser  # noqa: E402


def measure(name, eps, iterations, threads, slopes):
    model, _, shape = model_and_net(name)
    x0 = np.random.default_rng(0).standard_normal((1, *shape))
    t0 = time.thread_time()
    opt = SlopeOptimiser(model, threads=threads, slopes=slopes)
    t_build = time.thread_time() - t0
    feeds = {"x0": x0, "eps": np.array([eps])}
    t0 = time.thread_time()
    lo0, hi0, hist0 = opt.run(x0, feeds["eps"], iterations=0)
    t_once = time.thread_time() - t0
    z = opt.bounds.run([o.name for o in opt.model.graph.output if o.name.startswith("z")], feeds)
    unstable = np.concatenate([((zl < 0) & (zh > 0)).ravel() for zl, zh in zip(z[0::2], z[1::2])]).mean()
    t0 = time.thread_time()
    lo, hi, hist = opt.run(x0, feeds["eps"], iterations=iterations)
    t_opt = time.thread_time() - t0
    return {"name": name, "alphas": int(sum(np.prod(s["shape"]) for s in opt.spec.values())), "unstable": float(unstable), "before": float(np.mean(hi0 - lo0)),
            "after": float(np.mean(hi - lo)), "tighter": float(np.mean((lo > lo0) | (hi < hi0))),
            "objective": (float(hist0[0][0]), float(hist.min())), "build": t_build, "once": t_once, "opt": t_opt}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="residual_mlp,resnet_cnn,densenet_cnn,pool_cnn,inception_cnn,lenet")
    p.add_argument("--slopes", default="unit,neuron", help="comma list of slope modes (see above)")
    args = p.parse_args()
    print(f"eps {args.eps}, {args.iterations} steps, onnxruntime threads {args.threads}")
    print("| model | slopes | slope inputs | unstable | mean width (CROWN slopes) | mean width (optimised) | entries tighter | "
          "objective before -> after | build s | one bound s | N steps s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for slopes in args.slopes.split(","):
            r = measure(name, args.eps, args.iterations, args.threads, slopes)
            print(f"| {name} | {slopes} | {r['alphas']} | {100 * r['unstable']:.0f}% | {r['before']:.6g} | {r['after']:.6g} | {100 * r['tighter']:.1f}% | "
                  f"{r['objective'][0]:.5g} -> {r['objective'][1]:.5g} | {r['build']:.1f} | {r['once']:.2f} | "
                  f"{r['opt']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
