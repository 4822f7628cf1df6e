"""Where auto_LiRPA's optimised Jacobian bounds beat jacgraph's RecurJac on the RecurJac benchmark's MLP, measured.

    python examples/alpha_crown_gap.py --source <auto_LiRPA checkout> --deps /tmp/alirpa_deps [--eps 0.05]

On bounds_models' trained 784-256-256-10 ReLU MLP at its first test image (l_inf ball), prints for layer 2's
pre-activation bounds (layer 1's are exact over an l_inf ball): the number of unstable units and the sum of
widths of (a) jacgraph's CROWN bounds, (b) the per-neuron optimum (every bound minimised over the lower-line
slopes of layer 1's unstable ReLUs by one LP each, scipy HiGHS: for one relaxed layer the CROWN bound is
convex, piecewise linear in the slopes), (c) auto_LiRPA's intermediate bounds after its alpha-CROWN, (d)
jacgraph's per-neuron slopes after 20 steps; then the mean Jacobian width auto_LiRPA's plain CROWN on the
Jacobian graph gives with each set plugged in as its intermediate bounds (what compute_jacobian_bounds does
with (c)). A benchmark only: auto_LiRPA and scipy's LP are never dependencies of jacgraph.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_auto_lirpa, bounds_models  # noqa: E402
from jacgraph.passes.alpha_crown import SlopeOptimiser  # noqa: E402
from jacgraph.runtime import session  # noqa: E402
from jacgraph.passes import recurjac  # noqa: E402


def lp_upper(lam, W1, b1, l1, u1, x, eps):
    """min over slopes a in [0, 1] (unstable units where lam < 0) of the CROWN upper bound of lam . relu(W1 x + b1)
    over ||x' - x||_inf <= eps (chord above where lam >= 0): an LP in (a, |coefficient on x|)."""
    unstable = (l1 < 0) & (u1 > 0)
    a_up = np.where(unstable, u1 / np.where(unstable, u1 - l1, 1), (l1 >= 0).astype(float))
    fixed = np.where(unstable, np.where(lam >= 0, a_up, 0.0), a_up)
    const = (lam * fixed) @ b1 + lam @ np.where(unstable & (lam >= 0), -a_up * l1, 0.0)
    v0 = (lam * fixed) @ W1
    free = np.flatnonzero(unstable & (lam < 0))
    G, n = lam[free, None] * W1[free], W1.shape[1]
    cost = np.concatenate([lam[free] * b1[free] + G @ x, eps * np.ones(n)])
    A = sp.vstack([sp.hstack([sp.csr_matrix(G.T), -sp.eye(n)]), sp.hstack([sp.csr_matrix(-G.T), -sp.eye(n)])])
    r = linprog(cost, A_ub=A, b_ub=np.concatenate([-v0, v0]), bounds=[(0, 1)] * len(free) + [(0, None)] * n,
                method="highs")
    assert r.status == 0, r.message
    return r.fun + const + v0 @ x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True, help="a checkout of auto_LiRPA (the folder holding auto_LiRPA/)")
    p.add_argument("--deps", help="a folder with auto_LiRPA's pure-Python requirements")
    p.add_argument("--eps", type=float, default=0.05)
    args = p.parse_args()
    sys.path[:0] = [args.source] + ([args.deps] if args.deps else [])
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    net = bounds_models.build("recurjac_mlp")
    x0, eps = net.example_input, args.eps
    model = bounds_models.export_bytes(net, (784,))
    (W1, b1), (W2, b2) = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in net.f[0:3:2]]
    x = x0[0]
    l1, u1 = W1 @ x + b1 - eps * np.abs(W1).sum(1), W1 @ x + b1 + eps * np.abs(W1).sum(1)
    feeds = {"x0": x0, "eps": np.array([eps])}
    sets = {"jacgraph CROWN": session(recurjac.build(model, lowering="graph", preactivation_bounds=True)).run(
        ["z3_lower", "z3_upper"], feeds)}
    sets["per-neuron LP optimum"] = (np.array([-lp_upper(-W2[i], W1, b1, l1, u1, x, eps) + b2[i] for i in range(256)])[None],
                                     np.array([lp_upper(W2[i], W1, b1, l1, u1, x, eps) + b2[i] for i in range(256)])[None])
    opt = SlopeOptimiser(model)
    best = [np.inf, np.inf]  # min of -lower and of upper
    run = opt.bounds.run

    def recording(names, f):  # the elementwise best layer-2 bounds over the optimiser's iterates
        out = run(names + ["z3_lower", "z3_upper"], f)
        best[0], best[1] = np.minimum(best[0], -out[-2]), np.minimum(best[1], out[-1])
        return out[:-2]

    opt.bounds.run = recording
    opt.run(x0, [eps], iterations=20)
    jacgraph_neuron = (-best[0], best[1])

    xt = torch.tensor(x0, dtype=torch.float32)
    bm = BoundedModule(bench_auto_lirpa.jacobian_module(net), xt, device="cpu")
    X = BoundedTensor(xt, PerturbationLpNorm(norm=np.inf, eps=eps))
    bm.compute_bounds(method="CROWN-Optimized", C=None, x=(X,), bound_upper=False,
                      final_node_name=bm.jacobian_start_nodes[0].name)  # what compute_jacobian_bounds(optimize=True) runs
    interm = {n.name: (n.lower, n.upper) for n in bm._modules.values() if n.is_lower_bound_current()}
    layer2 = next(k for k, (lo, hi) in interm.items() if hi is not None and tuple(lo.shape) == (1, 256)
                  and not np.allclose(lo.detach().numpy()[0], l1, atol=1e-3))
    sets["auto_LiRPA alpha-CROWN"] = tuple(t.detach().double().numpy() for t in interm[layer2])
    sets["jacgraph per-neuron, 20 steps (best over steps)"] = jacgraph_neuron
    print(f"eps {eps}; layer 2: 256 units")
    print("| layer-2 bounds | unstable units | sum of widths | auto_LiRPA Jacobian CROWN with them: mean width |")
    print("|---|---|---|---|")
    for name, (lo, hi) in sets.items():
        plugged = dict(interm)
        plugged[layer2] = (torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32))
        jl, ju = bm.compute_bounds(method="CROWN", x=(X,), interm_bounds=plugged)
        print(f"| {name} | {int(np.sum((lo < 0) & (hi > 0)))} | {np.sum(hi - lo):.1f} | {float((ju - jl).mean()):.6f} |",
              flush=True)


if __name__ == "__main__":
    main()
