"""LipSDP on LipSDP's own MNIST shape, 784-50-10 (Fazlyab et al. 2019 report 24.366 for their weights).

    python examples/lipsdp_digits784.py                                   # a net trained here
    python examples/lipsdp_digits784.py --weights PATH/mnist_weights.mat  # LipSDP's published net
    python examples/lipsdp_digits784.py --weights PATH/LipSDP             # the same, from a LipSDP checkout

--weights: a .mat file whose 'weights' cell holds W0 [50, 784] and W1 [10, 50] (the layout of
github.com/arobey1/LipSDP, examples/saved_weights/mnist_weights.mat, MIT license; not part of jacgraph), or a
checkout of that repository. Biases do not change the constant: they are set to zero in the ONNX model.
Without --weights the net is trained locally (60 epochs of Adam, seed 0) on sklearn's 8x8 digits upsampled
to 28x28 (1797 images).

The ONNX model is written to a temporary file and analysed through `jacgraph lipschitz`'s API, as a user
would: LipSDP-Neuron's verified bound (the 784-wide input block reduced to W0's 50-dim row space,
passes/lipsdp.py reduce_input, then the barrier method), SeqLip's and AutoLip's guaranteed bounds, and the
largest ||J(x)||_2 over sampled points (images when trained here, else Gaussian points) and noisy copies (a
lower bound on the true constant), and SeqLip's greedy vertex (a Jacobian norm at an activation pattern that
occurs: also a lower bound). Times are wall clock and thread CPU time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import lipschitz as L  # noqa: E402

MAT = os.path.join("examples", "saved_weights", "mnist_weights.mat")  # inside a LipSDP checkout


def digits784():
    """sklearn's 1797 8x8 digits in [0, 1], bilinearly upsampled to 28x28 and flattened: X [1797, 784] float32, y."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    X = torch.nn.functional.interpolate(X, size=(28, 28), mode="bilinear").reshape(-1, 784)
    return X, torch.tensor(d.target)


def train():
    X, y = digits784()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(60):
        for i in range(0, len(X), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    print(f"trained here: train accuracy {(net(X).argmax(1) == y).float().mean().item():.4f}")
    return net.double(), X.double()


def published(path):
    """The 784-50-10 net from LipSDP's .mat file (or a checkout holding it), biases zero."""
    from scipy.io import loadmat

    if os.path.isdir(path):
        path = os.path.join(path, MAT)
    weights = [np.asarray(w, np.float64) for w in loadmat(path)["weights"].ravel()]
    if [w.shape for w in weights] != [(50, 784), (10, 50)]:
        sys.exit(f"{path}: expected W0 [50, 784] and W1 [10, 50] in 'weights', got {[w.shape for w in weights]}")
    net = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10)).double()
    with torch.no_grad():
        for layer, w in zip((net[0], net[2]), weights):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.zero_()
    print(f"published weights: {path}")
    return net, torch.rand(2000, 784, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def onnx_file(net, folder):
    path = os.path.join(folder, "digits784.onnx")
    torch.onnx.export(net, torch.zeros(1, 784, dtype=torch.float64), path, input_names=["x"], output_names=["y"],
                      dynamo=False)
    return path


def timed(f):
    w0, c0 = time.perf_counter(), time.thread_time()
    out = f()
    return out, time.perf_counter() - w0, time.thread_time() - c0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="LipSDP's mnist_weights.mat, or a LipSDP checkout (default: train a net here)")
    args = p.parse_args()
    net, X = published(args.weights) if args.weights else train()
    with tempfile.TemporaryDirectory() as folder:
        path = onnx_file(net, folder)
        sdp, sdp_wall, sdp_cpu = timed(lambda: L.analyze(path, method="lipsdp").lipsdp)
        seq, seq_wall, _ = timed(lambda: L.analyze(path, method="seqlip").seqlip)
        auto, auto_wall, _ = timed(lambda: L.analyze(path, method="autolip").autolip)
    Xs = torch.cat([X, X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1), dtype=X.dtype)])
    J = torch.func.vmap(torch.func.jacrev(net))(Xs)
    lower = torch.linalg.matrix_norm(J, ord=2).max().item()
    bound = "none (not verified)" if sdp["bound"] is None else f"{sdp['bound']:.8g}"
    print(f"LipSDP bound {bound} (verified: {sdp['guaranteed']}; solver {sdp['solver']}, {sdp['status']}; "
          f"{sdp['rows']} rows, input reduced from {sdp.get('input_reduced_from')}; {sdp_wall:.2f} s wall, "
          f"{sdp_cpu:.2f} s thread CPU)")
    print(f"SeqLip bound {seq['bound']:.6g} ({seq_wall:.1f} s)   AutoLip bound {auto['bound']:.6g} ({auto_wall:.1f} s)")
    # the greedy vertex s gives ||W1 diag(s) W0|| for one ReLU pattern; W0 [50, 784] has rank 50, so W0 x + b takes
    # every value in R^50 and every pattern occurs at some x: the value is a Jacobian norm, a lower bound
    print(f"SeqLip greedy vertex ||W1 diag(s) W0||_2 {seq['value']:.6g} (a pattern that occurs: a lower bound on the "
          "constant when W0 has full row rank)")
    print(f"sampled max ||J(x)||_2 {lower:.6g} over {len(Xs)} points (a lower bound on the constant)")


if __name__ == "__main__":
    main()
