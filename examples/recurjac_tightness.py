"""How tight are RecurJac's local Lipschitz bounds? A trained MLP on scikit-learn digits, l_inf balls.

    python examples/recurjac_tightness.py [--points 5] [--samples 4000] [--json out.json]

For each eps and each output y_i of a 64-100-100-10 ReLU MLP (inputs scaled to [0, 1]), four numbers
for L_i = max over the ball of ||grad y_i||_1 (the local Lipschitz constant w.r.t. l_inf):
  recurjac   the bound from `--emit recurjac` (sound)
  interval   the plain interval chain (Fast-Lip-like; sound, same pre-activation bounds)
  opnorm     the product of operator norms ||W_3[i]||_1 ||W_2||_inf ||W_1||_inf (sound, global)
  sampled    max of ||grad y_i(x)||_1 over sampled x in the ball (corners, interior, points pushed
             across each reachable kink): a LOWER bound on L_i
Reported: medians over test points and outputs of each bound divided by the sampled lower bound, and the
fraction of hidden units whose pre-activation interval contains 0 (unstable).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import recurjac  # noqa: E402
from jacgraph.runtime import session  # noqa: E402

EPS = [0.001, 0.003, 0.01, 0.03, 0.1]


def trained_mlp(seed=0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[:1500]), y[:1500]).backward()
        opt.step()
    acc = (net(X[1500:]).argmax(1) == y[1500:]).float().mean().item()
    return net.eval(), X[1500:].numpy().astype(np.float64), acc


def export(net):
    f = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 64),), f, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def sampled_lower_bound(net64, x0, eps, n, rng):
    """max ||grad y_i||_1 over corners, interior points and kink-crossing points of the l_inf ball."""
    layers = [m for m in net64 if isinstance(m, torch.nn.Linear)]

    def hidden(x):
        zs, h = [], x
        for lin in layers[:-1]:
            z = lin(h)
            zs.append(z)
            h = torch.relu(z)
        return torch.cat(zs)

    x0t = torch.tensor(x0)
    z = hidden(x0t).detach().numpy()
    G = torch.func.jacrev(hidden)(x0t).detach().numpy()
    reach = np.abs(z) / np.maximum(eps * np.abs(G).sum(1), 1e-300)
    targeted = [x0 - np.sign(z[j]) * np.sign(G[j]) * eps * t for j in np.argsort(reach)[:100]
                for t in (min(reach[j] * (1 + 1e-6), 1.0), 1.0)]
    corners = x0 + eps * np.sign(rng.standard_normal((n // 2, x0.size)))
    inner = x0 + rng.uniform(-eps, eps, (n // 2, x0.size))
    X = torch.tensor(np.concatenate([corners, inner, np.array(targeted)]))
    J = torch.func.vmap(torch.func.jacrev(lambda x: net64(x[None])[0]))(X).detach().numpy()
    return np.abs(J).sum(axis=2).max(axis=0)  # [outputs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    net, Xtest, acc = trained_mlp()
    model = export(net)
    net64 = net.double()
    Ws = [m.weight.detach().numpy().astype(np.float64) for m in net64 if isinstance(m, torch.nn.Linear)]
    opnorm = np.abs(Ws[-1]).sum(1) * np.prod([np.abs(W).sum(1).max() for W in Ws[:-1]])
    sessions = {m: session(recurjac.build(model, norm="inf", method=m, preactivation_bounds=True), threads=2,
                           provider="CPUExecutionProvider") for m in ("recurjac", "interval")}
    rng = np.random.default_rng(0)
    rows = []
    print(f"64-100-100-10 ReLU MLP on digits, held-out accuracy {acc:.3f}; l_inf balls; "
          f"{args.points} test points x 10 outputs")
    print("| eps | unstable units | recurjac / sampled | interval / sampled | opnorm / sampled | "
          "recurjac within 10% |")
    print("|---|---|---|---|---|---|")
    for eps in EPS:
        ratios = {"recurjac": [], "interval": [], "opnorm": []}
        unstable, within = [], []
        for x0 in Xtest[:args.points]:
            feeds = {"x0": x0[None], "eps": np.array([eps])}
            lower = sampled_lower_bound(net64, x0, eps, args.samples, rng)
            for m, sess in sessions.items():
                out = sess.run(None, feeds)
                L = recurjac.lipschitz(out[0], out[1], "inf")[0][0]
                assert np.all(L >= lower - 1e-9), "a sampled gradient norm exceeds the bound"
                ratios[m].extend(L / lower)
                if m == "recurjac":
                    lo, hi = np.concatenate(out[2::2], axis=1), np.concatenate(out[3::2], axis=1)
                    unstable.append(np.mean((lo <= 0) & (hi >= 0)))
                    within.extend(L <= 1.1 * lower)
            ratios["opnorm"].extend(opnorm / lower)
        row = {"eps": eps, "unstable_fraction": float(np.mean(unstable)),
               **{f"{k}_over_sampled": float(np.median(v)) for k, v in ratios.items()},
               "recurjac_within_10pct": float(np.mean(within))}
        rows.append(row)
        print(f"| {eps:g} | {row['unstable_fraction']:.1%} | {row['recurjac_over_sampled']:.3f} | "
              f"{row['interval_over_sampled']:.3f} | {row['opnorm_over_sampled']:.1f} | "
              f"{row['recurjac_within_10pct']:.0%} of outputs |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": acc, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
