"""LipSDP on LipSDP's own MNIST shape, 784-50-10 (Fazlyab et al. 2019 report 24.366 for their weights).

    python examples/lipsdp_digits784.py

Their weights cannot be downloaded here, so the net is trained locally (60 epochs of Adam, seed 0) on
sklearn's 8x8 digits upsampled to 28x28 (1797 images). Printed: LipSDP-Neuron's verified bound (the
784-wide input block reduced to W0's 50-dim row space, passes/lipsdp.py reduce_input), SeqLip's and
AutoLip's guaranteed bounds, and the largest ||J(x)||_2 over the training images and noisy copies (a
lower bound on the true constant).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import lipschitz as L  # noqa: E402
from jacgraph.passes import lipsdp  # noqa: E402


def train():
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    X = torch.nn.functional.interpolate(X, size=(28, 28), mode="bilinear").reshape(-1, 784)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(60):
        for i in range(0, len(X), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    print(f"train accuracy {(net(X).argmax(1) == y).float().mean().item():.4f}")
    return net.double(), X.double()


def main():
    net, X = train()
    W = [net[0].weight.detach().numpy(), net[2].weight.detach().numpy()]
    boxes = [(0.0, 1.0), (1.0, 1.0)]
    t0 = time.perf_counter()
    r = lipsdp.lipsdp(W, boxes)
    t1 = time.perf_counter()
    s = L.seqlip(W, boxes)
    t2 = time.perf_counter()
    auto = spectral.gram_bound(W[0]) * spectral.gram_bound(W[1])
    Xs = torch.cat([X, X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1), dtype=X.dtype)])
    J = torch.func.vmap(torch.func.jacrev(net))(Xs)
    lower = torch.linalg.matrix_norm(J, ord=2).max().item()
    print(f"LipSDP bound {r['bound']:.6g} (verified: {r['guaranteed']}; {r['rows']} rows, input reduced from "
          f"{r.get('input_reduced_from')}; {t1 - t0:.1f} s)")
    print(f"SeqLip bound {s['bound']:.6g} ({t2 - t1:.1f} s)   AutoLip bound {auto:.6g}")
    print(f"sampled max ||J(x)||_2 {lower:.6g} over {len(Xs)} points (a lower bound on the constant)")


if __name__ == "__main__":
    main()
