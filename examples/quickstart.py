"""Quickstart: export a CNN from PyTorch, compile its JVP graph, run it in onnxruntime, check it.

    python examples/quickstart.py [--out out/]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "lenet.onnx")
    jvp_path = os.path.join(args.out, "lenet.jvp.onnx")

    # 1. a model from PyTorch, exported to ONNX (input "x", output "y")
    architectures.export("lenet", model_path, batch=4)
    print(f"exported {model_path}")

    # 2. compile: (x, x_dot) -> (y, y_dot) with y_dot = J(x) x_dot
    subprocess.run(["jacgraph", "inspect", model_path], check=True)
    subprocess.run(["jacgraph", "compile", model_path, "--emit", "jvp", "-o", jvp_path], check=True)

    # 3. run the emitted graph in plain onnxruntime
    x = architectures.example_input("lenet", batch=4).numpy()
    x_dot = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    session = ort.InferenceSession(jvp_path, providers=["CPUExecutionProvider"])
    y, y_dot = session.run(["y", "y_dot"], {"x": x, "x_dot": x_dot})

    # 4. compare with PyTorch's forward-mode autodiff (float64)
    model = architectures.build("lenet").double()
    _, y_dot_torch = torch.func.jvp(model, (torch.from_numpy(x).double(),), (torch.from_numpy(x_dot).double(),))
    err = np.linalg.norm(y_dot - y_dot_torch.detach().numpy()) / np.linalg.norm(y_dot_torch.detach().numpy())
    print(f"y_dot from onnxruntime vs torch.func.jvp (float64): relative error {err:.1e}")

    # 5. jacgraph's own check against float64 central differences
    subprocess.run(["jacgraph", "verify", jvp_path], check=True)
    if err > 1e-4:
        sys.exit("quickstart: the emitted JVP disagrees with PyTorch")


if __name__ == "__main__":
    main()
