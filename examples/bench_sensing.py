"""Robust Jacobian sensing at scale: a 3x16x16 CNN (768 inputs, 10 outputs), 10% of the calls corrupted.

    python examples/bench_sensing.py [--fraction 0.1] [--seed 0] [--lp-rows 1]

Every output depends on every input (dense classifier), so the structural pattern has 768 colours and
`sense --robust` makes 4 x 768 = 3072 forward calls and fits 10 rows of 769 unknowns by L1 regression.
Prints the wall time of the whole `sensing.sense` call, the relative error of J against float64
torch.func.jacrev, and (--lp-rows N) the time of the exact linear program on N of the same rows, the
solver the ADMM replaces, with the largest difference between the two fits.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import sensing  # noqa: E402

SHAPE = (1, 3, 16, 16)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.1, help="share of the calls that return garbage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lp-rows", type=int, default=0, help="also time the exact LP on this many rows")
    args = p.parse_args()
    model = cnn()
    f = io.BytesIO()
    torch.onnx.export(model, torch.randn(*SHAPE), f, input_names=["x"], output_names=["y"], dynamo=False)
    proto = onnx.load_from_string(f.getvalue())
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    J = torch.func.jacrev(model.double())(torch.from_numpy(x0).double()).detach().numpy().reshape(10, -1)
    rng = np.random.default_rng(100 + args.seed)
    budget = 4 * 768
    bad = set(rng.choice(budget, int(round(args.fraction * budget)), replace=False).tolist())
    captured = {}
    recover = sensing._recover

    def keep_design(P, colours, G, Y, *rest, **kw):  # the calls, for the --lp-rows comparison
        captured.update(P=P, colours=colours, G=G, Y=Y)
        return recover(P, colours, G, Y, *rest, **kw)

    sensing._recover = keep_design
    t0 = time.perf_counter()
    res = sensing.sense(proto, x0, robust=True, seed=args.seed, progress=False,
                        corrupt=lambda p, y: rng.uniform(-1e3, 1e3, y.shape) if p in bad else y)
    seconds = time.perf_counter() - t0
    got = res.J.toarray() if hasattr(res.J, "toarray") else res.J
    err = np.linalg.norm(got - J) / np.linalg.norm(J)
    print(f"sense --robust: {res.calls} calls ({len(bad)} corrupted), {res.colours} colours, {seconds:.1f} s, "
          f"relative error of J {err:.2e}, flagged {res.flagged_calls}, estimate {res.estimated_error:.2e}")
    if args.lp_rows:
        P, colours, G, Y = captured["P"], captured["colours"], captured["G"], captured["Y"]
        cols = colours[P.indices[P.indptr[0]:P.indptr[1]]]
        A = np.hstack([G[:, cols], np.ones((len(G), 1))])
        rows = list(range(args.lp_rows))
        t0 = time.perf_counter()
        Z_admm, _ = sensing._fit_l1_rows(A, Y[:, rows])
        t_admm = time.perf_counter() - t0
        t0 = time.perf_counter()
        Z_lp = np.stack([sensing._fit_l1(A, Y[:, i])[0] for i in rows], axis=1)
        t_lp = time.perf_counter() - t0
        print(f"{len(rows)} row(s) of {A.shape[0]} x {A.shape[1]}: ADMM {t_admm:.1f} s, exact LP (HiGHS) {t_lp:.1f} s, "
              f"largest coefficient difference {np.abs(Z_admm - Z_lp).max():.1e}")


if __name__ == "__main__":
    main()
