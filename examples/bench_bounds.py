"""Jacobian bounds on DAG architectures: jacgraph RecurJac vs the interval chain vs sampled Jacobians.

    python examples/bench_bounds.py [--eps 0.02] [--samples 2000] [--models residual_mlp,...] [--lipschitz]
                                    [--threads N] [--crown-rows all --jacobian-step never: as before both speed-ups]

Per model (examples/bounds_models.py, random weights; "lenet" is examples/architectures.py's quickstart
LeNet): the time to build the bound graph and its onnxruntime session and to run it for one point
(wall, and CPU seconds of the whole process, which a loaded machine does not inflate as much),
peak RSS, the mean width of [J_lower, J_upper] for RecurJac and for the interval chain, and the mean
width of the sampled Jacobians' range (max - min over 2000 points of the l_inf ball: corners and
uniform), a lower bound on the true range that any sound bound must contain.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures, bounds_models  # noqa: E402
from jacgraph.errors import JacgraphError  # noqa: E402
from jacgraph.passes import recurjac  # noqa: E402
from jacgraph.runtime import session  # noqa: E402


def model_and_net(name):
    if name == "lenet":
        net, shape = architectures.build("lenet").double(), (1, 28, 28)
    else:
        net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    return bounds_models.export_bytes(net, shape), net, shape


def run(model, x0, eps, method, memory_limit=recurjac.MEMORY_LIMIT, threads=None):
    """Bounds (lo, hi), build+session (wall, process CPU) s, run (wall, process CPU, this thread's CPU) s and the
    interval-only nodes. Process CPU counts every thread (onnxruntime's intra-op pool too); with threads=1 all
    of the run is on this thread, so its thread CPU is the run's work whatever the load."""
    t0, c0 = time.perf_counter(), time.process_time()
    graph = recurjac.build(model, method=method, memory_limit=memory_limit)
    sess = session(graph, threads=threads, provider="CPUExecutionProvider")
    t1, c1, th1 = time.perf_counter(), time.process_time(), time.thread_time()
    lo, hi = sess.run(None, {"x0": x0, "eps": np.array([eps])})
    t2, c2, th2 = time.perf_counter(), time.process_time(), time.thread_time()
    meta = {p.key: p.value for p in graph.metadata_props}
    return lo, hi, (t1 - t0, c1 - c0), (t2 - t1, c2 - c1, th2 - th1), meta.get("jacgraph.interval_only_nodes", "[]")


def sampled_range(net, x0, eps, n, rng, bounds=None):
    """Mean width of the sampled Jacobians' range; with bounds=(lo, hi) also how far the furthest sampled
    Jacobian entry lies outside them (<= 0: all inside; the soundness check at a scale too big for a test)."""
    d = x0.size
    P = np.concatenate([np.sign(rng.standard_normal((n // 2, d))), rng.uniform(-1, 1, (n - n // 2, d))])
    X = torch.tensor(x0.reshape(1, -1) + eps * P)
    f = lambda x: net(x.reshape(1, *x0.shape[1:])).reshape(-1)  # noqa: E731
    lo = hi = None
    for chunk in torch.split(X, 100):  # 100 Jacobians at a time keeps the CIFAR model's samples small
        J = torch.func.vmap(torch.func.jacrev(f))(chunk).detach().numpy()
        lo = J.min(0) if lo is None else np.minimum(lo, J.min(0))
        hi = J.max(0) if hi is None else np.maximum(hi, J.max(0))
    if bounds is None:
        return float(np.mean(hi - lo))
    return float(np.mean(hi - lo)), float(np.max([(bounds[0][0] - lo).max(), (hi - bounds[1][0]).max()]))  # NaN stays NaN


def lipschitz_table(names, samples):
    """AutoLip over the DAG (jacgraph lipschitz --method autolip) vs the largest sampled ||J(x)||_2."""
    from jacgraph.passes import lipschitz as L

    print("\n| model | AutoLip bound (guaranteed) | s | sampled max ||J(x)||_2 (lower bound) |\n|---|---|---|---|")
    for name in names:
        model, net, shape = model_and_net(name)
        t0 = time.perf_counter()
        bound = L.analyze(model, method="autolip").autolip["bound"]
        t = time.perf_counter() - t0
        X = torch.tensor(np.random.default_rng(0).standard_normal((samples, *shape)))
        f = lambda x: net(x[None]).reshape(-1)  # noqa: E731
        worst = max(float(torch.linalg.matrix_norm(torch.func.vmap(torch.func.jacrev(f))(c).flatten(2), ord=2).max())
                    for c in torch.split(X, 100))
        print(f"| {name} | {bound:.4g} | {t:.1f} | {worst:.4g} |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--interval-too", action=argparse.BooleanOptionalAction, default=True,
                   help="also build the interval chain (--no-interval-too: RecurJac only)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own choice)")
    p.add_argument("--crown-rows", choices=["undecided", "all"], default="undecided",
                   help="CROWN rows only for units the interval step leaves undecided (default), or all (as before)")
    p.add_argument("--jacobian-step", choices=["auto", "always", "never"], default=recurjac.FACTORED_JACOBIAN,
                   help="the factored RecurJac step: chosen at run time (auto), always, or never (the dense step, as before)")
    p.add_argument("--memory-limit", type=float, default=recurjac.MEMORY_LIMIT / 2**30,
                   help="GiB one back-substitution step may hold (recurjac.build memory_limit; larger ones run in chunks)")
    p.add_argument("--models", default="residual_mlp,resnet_cnn,densenet_cnn,pool_cnn,inception_cnn,unet_cnn,lenet,cifar_cnn,"
                                         "resnet_cifar")
    p.add_argument("--lipschitz", action="store_true", help="the AutoLip table instead of the Jacobian-bound table")
    args = p.parse_args()
    recurjac.CROWN_UNDECIDED_ONLY, recurjac.FACTORED_JACOBIAN = args.crown_rows == "undecided", args.jacobian_step
    if args.lipschitz:
        return lipschitz_table(args.models.split(","), args.samples)
    print("| model | input | RecurJac: build+session s: wall / CPU | run s: wall / CPU / thread CPU | mean width | interval-only nodes | "
          "interval chain: mean width | sampled range (lower bound) | sampled outside by (<= 0: inside) | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, net, shape = model_and_net(name)
        x0 = np.random.default_rng(0).standard_normal((1, *shape))
        try:
            limit = int(args.memory_limit * 2**30)
            lo, hi, t_build, t_run, skipped = run(model, x0, args.eps, "recurjac", limit, args.threads)
            li, hi_i, _, _, _ = run(model, x0, args.eps, "interval", limit, args.threads) if args.interval_too else \
                (lo * np.nan,) * 2 + (0,) * 3
        except JacgraphError as e:
            print(f"| {name} | {'x'.join(map(str, shape))} | refused: {e} | | | | | | | "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} |")
            continue
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before torch samples Jacobians
        sampled, outside = sampled_range(net, x0, args.eps, args.samples, np.random.default_rng(1), (lo, hi))
        print(f"| {name} | {'x'.join(map(str, shape))} | {t_build[0]:.1f} / {t_build[1]:.1f} | "
              f"{t_run[0]:.1f} / {t_run[1]:.1f} / {t_run[2]:.1f} | {np.mean(hi - lo):.4g} | "
              f"{skipped} | {np.mean(hi_i - li):.4g} | {sampled:.4g} | {outside:.2g} | {rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
