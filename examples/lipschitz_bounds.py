"""AutoLip, SeqLip and LipSDP (jacgraph lipschitz) against exact constants and sampled lower bounds.

    python examples/lipschitz_bounds.py            # everything (a few minutes on 2 CPU cores)
    python examples/lipschitz_bounds.py --tiny 8   # fewer tiny nets

1. 32 tiny random ReLU MLPs (input 2-3, 1-3 hidden layers of 3-6 units): the exact l2 Lipschitz
   constant by region enumeration (examples/lipschitz_exact.py) against the AutoLip bound, the
   exact-search SeqLip bound and the verified LipSDP-Neuron bound; geometric-mean ratios bound / exact.
2. Models trained briefly on scikit-learn's digits (8x8, upsampled to 16x16 for the CNN): a 10-layer
   MLP of width 16 (SeqLip's exact search covers every pair: a guaranteed bound), the same of width
   64 (greedy SeqLip: an estimate, printed with the guaranteed midpoint bound), and a 4-conv CNN.
   Each against a sampled lower bound: the largest ||J(x)||_2 of the ReLU network over the data,
   noisy data, and points found by gradient ascent of ||J|| on a softplus surrogate (a true
   Jacobian norm at a point is a lower bound on the Lipschitz constant). LipSDP where the model fits
   its size limit (passes/lipsdp.py: the width-16 MLP; the width-64 MLP and the CNN are too large).
3. `--dag`: the DAG models of examples/bounds_models.py (residual, ResNet-style, DenseNet-style concat,
   conv-maxpool-conv, Inception-style, U-Net-style): AutoLip and SeqLip over the DAG (SeqLip on the chains
   inside it) against the largest ||J(x)||_2 over 2000 Gaussian points and 20 steps of gradient ascent on
   ||J(x)||_2 from the 8 best (torch float64 Jacobians; a lower bound on the constant).

    python examples/lipschitz_bounds.py --dag residual_mlp,resnet_cnn,densenet_cnn,pool_cnn,inception_cnn,unet_cnn

Timings are wall-clock seconds of one run (the machine is shared; take them as rough); the DAG table also
gives the analysis's thread CPU time.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.lipschitz_exact import exact_lipschitz, mlp_onnx, random_mlp  # noqa: E402
from jacgraph.model import SourceModel  # noqa: E402
from jacgraph.passes import lipschitz as L  # noqa: E402


def geomean(values):
    return float(np.exp(np.mean(np.log(values))))


def tiny_nets(count):
    rows = []
    for seed in range(count):
        ws, bs = random_mlp(seed)
        t0 = time.perf_counter()
        exact, regions = exact_lipschitz(ws, bs)
        t1 = time.perf_counter()
        report = L.analyze(mlp_onnx(ws, bs), method="all")
        assert report.seqlip["exact"] and report.lipsdp["guaranteed"]
        rows.append({"dims": [ws[0].shape[1]] + [w.shape[0] for w in ws], "regions": len(regions), "exact": exact,
                     "autolip": report.autolip["bound"], "seqlip": report.seqlip["bound"],
                     "lipsdp": report.lipsdp["bound"], "lipsdp_seconds": report.lipsdp["seconds"],
                     "exact_seconds": t1 - t0})
    auto = [r["autolip"] / r["exact"] for r in rows]
    seq = [r["seqlip"] / r["exact"] for r in rows]
    sdp = [r["lipsdp"] / r["exact"] for r in rows]
    assert min(auto) >= 1 and min(seq) >= 1 and min(sdp) >= 1, "a guaranteed bound fell below the exact constant"
    print(f"\n## {count} tiny ReLU MLPs: bound / exact Lipschitz constant")
    print("| method | geometric mean | min | max |")
    print("|---|---|---|---|")
    print(f"| AutoLip | {geomean(auto):.2f} | {min(auto):.2f} | {max(auto):.2f} |")
    print(f"| SeqLip (exact search) | {geomean(seq):.2f} | {min(seq):.2f} | {max(seq):.2f} |")
    print(f"| LipSDP-Neuron (verified) | {geomean(sdp):.2f} | {min(sdp):.2f} | {max(sdp):.2f} |")
    print(f"(LipSDP: {sum(r['lipsdp_seconds'] for r in rows):.1f} s for {count} SDPs; "
          f"below SeqLip on {sum(a < b for a, b in zip(sdp, seq))} of {count} nets)")
    print(f"(exact constants: {sum(r['regions'] for r in rows)} regions in all, "
          f"{sum(r['exact_seconds'] for r in rows):.1f} s of LPs)")
    return {"autolip_geomean": geomean(auto), "seqlip_geomean": geomean(seq), "lipsdp_geomean": geomean(sdp), "nets": rows}


# ---- trained models ----------------------------------------------------------------------------

def digits(torch, size):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        X = torch.nn.functional.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)
    return X, torch.tensor(y)


def train(torch, model, X, y, epochs, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def export(torch, model, shape):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return buf.getvalue()


def lower_bound(torch, model, X, steps=30, starts=16, seed=0):
    """max ||J(x)||_2 over data, noisy data and softplus-surrogate ascent points (each a true Jacobian norm)."""
    import copy

    from torch.func import grad, jacrev, vmap

    relu = copy.deepcopy(model).double().eval().requires_grad_(False)
    smooth = copy.deepcopy(relu)
    for name, mod in list(smooth.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(mod, child_name, torch.nn.Softplus(beta=20.0))

    def jac_norm(net):
        return lambda x: torch.linalg.matrix_norm(jacrev(lambda z: net(z[None])[0])(x).reshape(10, -1), ord=2)

    g = torch.Generator().manual_seed(seed)
    X = X.double()
    points = torch.cat([X, X + 0.1 * torch.randn(X.shape, generator=g, dtype=torch.float64),
                        torch.randn((500, *X.shape[1:]), generator=g, dtype=torch.float64)])
    norms = vmap(jac_norm(relu))(points)
    best = float(norms.max())
    x = points[torch.argsort(norms, descending=True)[:starts]].clone()
    ascend = vmap(grad(jac_norm(smooth)))
    for _ in range(steps):
        step = ascend(x)
        x = x + 0.05 * step / (step.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1)) + 1e-12)
        best = max(best, float(vmap(jac_norm(relu))(x).max()))
    return best


def mlp(torch, width, depth=10):
    nn = torch.nn
    dims = [64] + [width] * (depth - 1) + [10]
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(torch):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def trained_models(epochs):
    import torch

    torch.set_num_threads(2)
    rows = []
    for name, build, size in [("10-layer MLP, width 16", lambda: mlp(torch, 16), 8),
                              ("10-layer MLP, width 64", lambda: mlp(torch, 64), 8),
                              ("4-conv CNN, 16x16 input", lambda: cnn(torch), 16)]:
        torch.manual_seed(0)
        X, y = digits(torch, size)
        model = build()
        accuracy = train(torch, model, X, y, epochs)
        model.eval()
        onnx_bytes = export(torch, model, X.shape[1:])
        t0 = time.perf_counter()
        auto = L.analyze(onnx_bytes, method="autolip")
        t1 = time.perf_counter()
        seq = L.analyze(onnx_bytes, method="seqlip")
        t2 = time.perf_counter()
        stages = L.lower(SourceModel(onnx_bytes))  # explicit=False: a model over the size limit is skipped, not an error
        sdp = L.run_lipsdp(stages, L.max_slope(stages[-1].activation, stages[-1].act_attrs), explicit=False)
        t2b = time.perf_counter()
        low = lower_bound(torch, model, X)
        t3 = time.perf_counter()
        s = seq.seqlip
        rows.append({"model": name, "train_accuracy": accuracy, "autolip": auto.autolip["bound"],
                     "seqlip_value": s["value"], "seqlip_exact": s["exact"], "seqlip_bound": s["bound"],
                     "lipsdp": sdp, "lower": low, "autolip_s": t1 - t0, "seqlip_s": t2 - t1, "lower_s": t3 - t2b,
                     "widest_pair": max(p["units"] for p in s["pairs"])})
    print("\n## trained on scikit-learn digits: Lipschitz bounds and a sampled lower bound")
    print("| model | train acc | AutoLip bound | SeqLip | SeqLip guaranteed bound | LipSDP bound | sampled lower bound | "
          "AutoLip s | SeqLip s | LipSDP s | lower bound s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        seq = f"{r['seqlip_value']:.4g} ({'exact search: bound' if r['seqlip_exact'] else 'greedy: estimate'})"
        d = r["lipsdp"]
        if "skipped" in d:
            sdp, sdp_s = "too large (skipped)", "-"
        else:
            sdp = f"{d['bound']:.4g} ({d['rows']} rows)" if d["guaranteed"] else f"{d['value']:.4g} (estimate: check failed)"
            sdp_s = f"{d['seconds']:.2f}"
        print(f"| {r['model']} | {r['train_accuracy']:.3f} | {r['autolip']:.4g} | {seq} | {r['seqlip_bound']:.4g} | {sdp} | "
              f"{r['lower']:.4g} | {r['autolip_s']:.2f} | {r['seqlip_s']:.2f} | {sdp_s} | {r['lower_s']:.2f} |")
    return rows


def sampled_lower_bound(net, shape, samples=2000, best=8, steps=20, seed=0):
    """max ||J(x)||_2 over Gaussian points (two scales) and `steps` of Adam ascent on it from the `best` ones."""
    import torch

    rng = np.random.default_rng(seed)
    half = samples // 2
    X = torch.tensor(np.concatenate([rng.standard_normal((half, *shape)), 3 * rng.standard_normal((half, *shape))]))
    n = int(np.prod(shape))
    jac = lambda x: torch.func.jacrev(lambda v: net(v[None])[0])(x).reshape(-1, n)  # noqa: E731
    norms = torch.cat([torch.linalg.matrix_norm(torch.func.vmap(jac)(c), ord=2) for c in torch.split(X, 250)]).detach()
    worst = float(norms.max())
    x = X[torch.argsort(norms, descending=True)[:best]].clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        value = torch.linalg.matrix_norm(torch.func.vmap(jac)(x), ord=2)
        (-value.sum()).backward()
        opt.step()
        worst = max(worst, float(value.detach().max()))
    return worst


def dag_models(names, samples):
    """AutoLip and SeqLip over each DAG model against sampled ||J(x)||_2 (+ gradient ascent)."""
    from examples import bounds_models

    print("\n| model | AutoLip bound | SeqLip bound (chains in the DAG) | SeqLip chains | analysis s: wall / thread CPU | "
          "sampled max ||J(x)||_2 + ascent (lower bound) | AutoLip / sampled | SeqLip / sampled |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
        model = bounds_models.export_bytes(net, shape)
        w0, c0 = time.perf_counter(), time.thread_time()
        report = L.analyze(model, method="all")
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        auto, seq = report.autolip["bound"], report.seqlip["bound"]
        lower = sampled_lower_bound(net, shape, samples)
        print(f"| {name} | {auto:.4g} | {seq:.4g} | {len(report.seqlip['pairs'])} | {wall:.2f} / {cpu:.2f} | {lower:.4g} | "
              f"{auto / lower:.3g} | {seq / lower:.3g} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", type=int, default=32, help="number of tiny random nets with exact constants")
    p.add_argument("--epochs", type=int, default=60, help="training epochs on digits")
    p.add_argument("--skip-trained", action="store_true")
    p.add_argument("--dag", help="comma-separated models of examples/bounds_models.py: only the DAG table")
    p.add_argument("--samples", type=int, default=2000, help="--dag: sampled points per model")
    args = p.parse_args(argv)
    if args.dag:
        return dag_models(args.dag.split(","), args.samples)
    tiny_nets(args.tiny)
    if not args.skip_trained:
        trained_models(args.epochs)


if __name__ == "__main__":
    main()
