"""Jacobian sensing of a black box: error vs forward calls, and robustness to corrupted calls.

    python examples/sensing_curve.py [--seeds 3] [--png examples/sensing_error.png]

The black box is a conv layer (2 -> 3 channels, 3x3, padding 1) on a 2x10x10 input: J is 300 x 200
with 18 column colours. Every call goes through onnxruntime (float32); the exact J comes from float64
torch.func.jacfwd on the same weights.

1. Gaussian noise (sigma = 1e-3 on every output of every call): relative error of J vs calls for least
   squares and robust L1 on the structural pattern, and least squares on the dense pattern (which needs
   n + 1 = 201 calls before it can start). Saved as a PNG.
2. Corrupted calls (a fraction of the calls return arbitrary values in +-1000): robust vs least squares at
   4 x colours = 72 calls, for several fractions.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import sensing  # noqa: E402

SHAPE = (1, 2, 10, 10)
SIGMA = 1e-3
STEP = 0.1


def conv_layer():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1).eval()
    f = io.BytesIO()
    torch.onnx.export(layer, torch.randn(*SHAPE), f, input_names=["x"], output_names=["y"], dynamo=False)
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    J = torch.func.jacfwd(layer.double())(torch.from_numpy(x0).double()).detach().numpy().reshape(300, 200)
    return onnx.load_from_string(f.getvalue()), x0, J


def rel(a, b):
    a = a.toarray() if hasattr(a, "toarray") else a
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def noisy(seed):
    rng = np.random.default_rng(1000 + seed)
    return lambda p, y: y + SIGMA * rng.standard_normal(y.shape)


def corrupted(budget, fraction, seed):
    rng = np.random.default_rng(2000 + seed)
    bad = set(rng.choice(budget, int(round(fraction * budget)), replace=False).tolist())
    return lambda p, y: rng.uniform(-1e3, 1e3, y.shape) if p in bad else y


def curve(model, x0, J, seeds):
    budgets = [19, 24, 36, 54, 72, 108, 144, 216, 288, 432]
    runs = {"least squares, structural (18 colours)": ("structural", False, budgets),
            "robust L1, structural": ("structural", True, [b for b in budgets if b >= 36]),
            "least squares, dense (200 colours)": ("dense", False, [b for b in budgets if b > 200])}
    results = {}
    print(f"\n### Error vs calls, Gaussian noise sigma = {SIGMA:g} per output, step {STEP:g}, "
          f"mean of {seeds} seeds\n")
    print("| method | calls | relative error of J | estimated (from residuals) |")
    print("|---|---:|---:|---:|")
    for label, (pattern, robust, bs) in runs.items():
        errs, ests = [], []
        for b in bs:
            e, est = [], []
            for seed in range(seeds):
                r = sensing.sense(model, x0, budget=b, robust=robust, pattern=pattern, step=STEP, seed=seed,
                                  corrupt=noisy(seed), progress=False)
                e.append(rel(r.J, J))
                est.append(r.estimated_error if r.estimated_error is not None else np.nan)
            errs.append(float(np.mean(e)))
            ests.append(float(np.nanmean(est)) if not np.all(np.isnan(est)) else np.nan)
            print(f"| {label} | {b} | {errs[-1]:.2e} | {ests[-1]:.2e} |")
        results[label] = (bs, errs, ests)
    return results


def plot(results, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=90)
    styles = [("C0", "o-", 5), ("C1", "s--", 3), ("C2", "^-", 4)]  # robust sits on least squares: dashed, smaller
    for (label, (bs, errs, ests)), (colour, style, size) in zip(results.items(), styles):
        ax.loglog(bs, errs, style, color=colour, label=label, markersize=size)
        ax.loglog(bs, ests, ":", color=colour, linewidth=1)
    ax.axvline(19, color="grey", linewidth=0.8, linestyle="--")
    ax.text(20, 0.3, "minimum: 18 colours + 1", fontsize=7, color="grey")
    ticks = [19, 36, 72, 144, 288]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("forward calls")
    ax.set_ylabel("relative error of J")
    ax.set_title(f"Jacobian sensing, conv layer 2->3ch 10x10, noise {SIGMA:g}\n(dotted: residual estimate)",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"\nwrote {path} ({os.path.getsize(path) // 1024} KB)")


def corruption_table(model, x0, J, seeds):
    budget = 72
    print(f"\n### Corrupted calls (arbitrary values in +-1000), {budget} calls = 4 x 18 colours, step 1, "
          f"worst of {seeds} seeds\n")
    print("| corrupted calls | robust L1: relative error | flagged | least squares: relative error |")
    print("|---:|---:|---:|---:|")
    for fraction in (0.0, 0.05, 0.10, 0.20, 0.30, 0.40):
        rob, ls, flagged = [], [], []
        for seed in range(seeds):
            r = sensing.sense(model, x0, budget=budget, robust=True, step=1.0, seed=seed,
                              corrupt=corrupted(budget, fraction, seed), progress=False)
            rob.append(rel(r.J, J))
            flagged.append(r.flagged_calls)
            q = sensing.sense(model, x0, budget=budget, robust=False, step=1.0, seed=seed,
                              corrupt=corrupted(budget, fraction, seed), progress=False)
            ls.append(rel(q.J, J))
        n_bad = int(round(fraction * budget))
        print(f"| {n_bad} ({fraction:.0%}) | {max(rob):.1e} | {min(flagged)}-{max(flagged)} | {max(ls):.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sensing_error.png"))
    args = ap.parse_args()
    model, x0, J = conv_layer()
    corruption_table(model, x0, J, args.seeds)
    plot(curve(model, x0, J, args.seeds), args.png)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
