"""Robust Jacobian sensing at scale: a 3x16x16 CNN (768 inputs, 10 outputs), 10% of the calls corrupted.

    python examples/bench_sensing.py [--fraction 0.1] [--seeds 0] [--lp-rows 1] [--before COMMIT]

Every output depends on every input (dense classifier), so the structural pattern has 768 colours and
`sense --robust` makes 4 x 768 = 3072 forward calls and fits 10 rows of 769 unknowns robustly.
For each seed it prints the wall time and the process CPU time (every thread: onnxruntime's and the
BLAS threads too) of the whole `sensing.sense` call, the relative error of J against float64
torch.func.jacrev, and whether the calls it judged corrupted are exactly the corrupted ones.
--before COMMIT runs passes/sensing.py as it was at that commit (git show) on the same calls, first.
--lp-rows N also times the exact linear program (HiGHS) on N of the same rows, the solver the fast
path replaces, with the largest difference between the two fits and their flags.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from jacgraph.passes import sensing  # noqa: E402

SHAPE = (1, 3, 16, 16)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def sensing_at(commit):
    """passes/sensing.py as it was at `commit`, imported as a module of its own (the 'before' of the docs)."""
    text = subprocess.run(["git", "show", f"{commit}:passes/sensing.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"sensing_{commit}", loader=None))
    sys.modules[module.__name__] = module  # its dataclass looks itself up there
    exec(compile(text, f"{commit}:passes/sensing.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
    return module


def run(module, proto, x0, J, seed, fraction, captured):
    """One `sense --robust` with `fraction` of the calls returning uniform(-1000, 1000): a printed row."""
    rng = np.random.default_rng(100 + seed)
    budget = 4 * 768
    bad = set(rng.choice(budget, int(round(fraction * budget)), replace=False).tolist())
    recover = module._recover

    def keep_design(P, colours, G, Y, *rest, **kw):  # the calls, for the --lp-rows comparison
        captured.update(P=P, colours=colours, G=G, Y=Y)
        return recover(P, colours, G, Y, *rest, **kw)

    module._recover = keep_design
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        res = module.sense(proto, x0, robust=True, seed=seed, progress=False,
                           corrupt=lambda p, y: rng.uniform(-1e3, 1e3, y.shape) if p in bad else y)
    finally:
        module._recover = recover
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    got = res.J.toarray() if hasattr(res.J, "toarray") else res.J
    err = np.linalg.norm(got - J) / np.linalg.norm(J)
    judged = getattr(res, "corrupted_calls", None)
    exact = "n/a" if judged is None else ("yes" if set(judged.tolist()) == bad else
                                          f"no (missed {len(bad - set(judged.tolist()))}, "
                                          f"extra {len(set(judged.tolist()) - bad)})")
    print(f"{module.__name__}, seed {seed}: {res.calls} calls ({len(bad)} corrupted), {res.colours} colours, "
          f"wall {wall:.1f} s, CPU {cpu:.1f} s, relative error of J {err:.3e}, flagged {res.flagged_calls} "
          f"(exactly the corrupted calls: {exact}), fallback rows {getattr(res, 'fallback_rows', 'n/a')}, "
          f"estimate {res.estimated_error:.3e}", flush=True)
    return got


def compare_lp(captured, rows):
    """The fast path against the exact linear program (HiGHS) on `rows` rows of the captured calls."""
    P, colours, G, Y = captured["P"], captured["colours"], captured["G"], captured["Y"]
    cols = colours[P.indices[P.indptr[0]:P.indptr[1]]]
    A = np.hstack([G[:, cols], np.ones((len(G), 1))])
    rows = list(range(rows))
    t0 = time.perf_counter()
    Z_fast, keep_fast, _ = sensing._fit_robust(sensing._Design(A), Y[:, rows])
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    fits = [sensing._fit_l1(A, Y[:, i]) for i in rows]
    t_lp = time.perf_counter() - t0
    Z_lp, keep_lp = np.stack([z for z, _ in fits], axis=1), np.stack([k for _, k in fits], axis=1)
    print(f"{len(rows)} row(s) of {A.shape[0]} x {A.shape[1]}: fast path {t_fast:.1f} s, exact LP (HiGHS) {t_lp:.1f} s, "
          f"largest coefficient difference {np.abs(Z_fast - Z_lp).max():.1e}, same flags: "
          f"{np.array_equal(keep_fast, keep_lp)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.1, help="share of the calls that return garbage")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the probes and the corruption")
    p.add_argument("--lp-rows", type=int, default=0, help="also time the exact LP on this many rows")
    p.add_argument("--before", metavar="COMMIT", help="also run passes/sensing.py as it was at this commit")
    args = p.parse_args()
    model = cnn()
    f = io.BytesIO()
    torch.onnx.export(model, torch.randn(*SHAPE), f, input_names=["x"], output_names=["y"], dynamo=False)
    proto = onnx.load_from_string(f.getvalue())
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    J = torch.func.jacrev(model.double())(torch.from_numpy(x0).double()).detach().numpy().reshape(10, -1)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    captured = {}
    for seed in args.seeds:
        before = run(sensing_at(args.before), proto, x0, J, seed, args.fraction, captured) if args.before else None
        after = run(sensing, proto, x0, J, seed, args.fraction, captured)
        if before is not None:
            print(f"seed {seed}: largest difference between the two J: {np.abs(after - before).max():.1e} "
                  f"(largest |J| {np.abs(J).max():.2f})", flush=True)
    if args.lp_rows:
        compare_lp(captured, args.lp_rows)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
