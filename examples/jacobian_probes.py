"""Whole Jacobians from few probes: colours vs input size, and the compressed graph against dense ways.

    python examples/jacobian_probes.py [--threads 1] [--runs 20] [--sizes 8,16,28,56] [--architectures]

1. Colours vs input dimension: the structural pattern and its colourings for a stack of three 3x3
   convs (1 channel) at several image sizes, and for a few other models.
2. Time, side by side in one process (interleaved runs, median, same thread count for all), on the
   three-conv stack at 28x28 and on a 784-256-256-10 MLP:
   - `--emit jacobian` (the compressed graph: one probe per colour, decompressed in-graph to the dense J
     or, with --sparse, to values + indices), with column (JVP) probes and, where fewer, row (VJP) probes,
   - the dense one-hot JVP graph (`--emit jvp --tangents n`, fed the identity),
   - torch.func.jacfwd and torch.func.jacrev (float32, CPU).
3. With --architectures: each of the 14 example architectures compiled with auto probes and checked
   against torch.func.jacrev.
All graphs run in onnxruntime on CPU (no GPU in this setup).
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
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.passes import jacobian, jvp  # noqa: E402


def conv_stack(channels=1, layers=3):
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()


def lenet_features():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.MaxPool2d(2)).eval()


def export(module, shape):
    f = io.BytesIO()
    torch.onnx.export(module, torch.randn(*shape), f, input_names=["x"], output_names=["y"], dynamo=False)
    return onnx.load_from_string(f.getvalue())


def colour_table(sizes):
    print("\n### Colours vs input dimension\n")
    print("| model | input | n (inputs) | m (outputs) | nonzeros | column colours | row colours | greedy (networkx) | "
          "pattern + colouring s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    cases = [(f"3 convs 3x3, 1 ch", conv_stack(), (1, 1, s, s)) for s in sizes]
    cases += [("3 convs 3x3, 3 ch", conv_stack(3), (1, 3, 28, 28)),
              ("LeNet features (conv5-pool-conv5-pool)", lenet_features(), (1, 1, 28, 28)),
              ("MLP 784-256-256-10", mlp(), (1, 1, 28, 28))]
    for name, module, shape in cases:
        model = export(module, shape)
        t0 = time.perf_counter()
        plan = jacobian.plan(model)
        seconds = time.perf_counter() - t0
        P = plan.pattern.matrix
        small = int((np.diff(P.indptr).astype(np.int64) ** 2).sum()) <= jacobian.GRAPH_EDGE_LIMIT
        greedy = jacobian.colouring(P, plan.pattern.x_shape, "greedy").count if small else "(too large)"
        print(f"| {name} | {'x'.join(map(str, shape[1:]))} | {P.shape[1]} | {P.shape[0]} | {P.nnz} | "
              f"{plan.columns.count} ({plan.columns.method}) | {plan.rows.count} | {greedy} | {seconds:.2f} |")


def timing(name, module, shape, threads, runs):
    torch.set_num_threads(threads)
    model = export(module, shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    n = x.size
    plan = jacobian.plan(model)
    graphs = {f"--emit jacobian, {plan.columns.count} JVP probes (columns), dense J": jacobian.build(plan, probes="columns"),
              f"--emit jacobian --sparse, {plan.columns.count} JVP probes (columns), values + indices":
              jacobian.build(plan, probes="columns", sparse=True)}
    if plan.rows.count < plan.columns.count:
        graphs[f"--emit jacobian, {plan.rows.count} VJP probes (rows, Loop), dense J"] = jacobian.build(plan, probes="rows")
    dense = jvp.build(model, tangents=n)
    eye = np.eye(n, dtype=np.float32).reshape((n,) + shape)
    calls = {}
    for label, g in graphs.items():
        sess = runtime.session(g, threads=threads)
        calls[label] = lambda s=sess: s.run(None, {"x": x})
    dsess = runtime.session(dense, threads=threads)
    dense_names = [i.name for i in dense.graph.input]
    calls[f"dense one-hot JVP graph ({n} tangents)"] = lambda: dsess.run(None, {dense_names[0]: x, dense_names[1]: eye})
    xt = torch.from_numpy(x)
    calls["torch.func.jacfwd"] = lambda: torch.func.jacfwd(module)(xt)
    calls["torch.func.jacrev"] = lambda: torch.func.jacrev(module)(xt)
    with torch.no_grad():
        med = time_calls(calls, runs)
    # the compressed graph agrees with the dense one
    J = runtime.run(next(iter(graphs.values())), {"x": x})
    Jd = dsess.run(None, {dense_names[0]: x, dense_names[1]: eye})[-1].reshape(n, -1).T
    err = np.abs(list(J.values())[-1].reshape(Jd.shape) - Jd).max() / np.abs(Jd).max()
    base = med[f"dense one-hot JVP graph ({n} tangents)"]
    print(f"\n### {name}, input {'x'.join(map(str, shape[1:]))}: J is {Jd.shape[0]} x {n} "
          f"({threads} thread(s), median of {runs} interleaved runs; max |J - J_dense| / max |J_dense| = {err:.1e})\n")
    print("| method | ms | speed-up vs dense one-hot JVP |")
    print("|---|---:|---:|")
    for label, ms in sorted(med.items(), key=lambda kv: kv[1]):
        print(f"| {label} | {ms:.2f} | {base / ms:.1f}x |")


def architectures_table():
    """Every example architecture: --emit jacobian with auto probes against torch.func.jacrev."""
    import tempfile

    from examples import architectures

    print("\n### The example architectures (auto probes)\n")
    print("| architecture | probes | build s | relative error vs torch.func.jacrev |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in architectures.ARCHITECTURES:
            path = os.path.join(folder, f"{name}.onnx")
            architectures.export(name, path)
            t0 = time.perf_counter()
            try:
                graph = jacobian.build(path)
            except Exception as e:  # a JacgraphError: say it in the table
                print(f"| {name} | error: {str(e)[:90]}... | | |")
                continue
            seconds = time.perf_counter() - t0
            props = {p.key: p.value for p in graph.metadata_props}
            x = architectures.example_input(name).numpy()
            J = runtime.run(graph, {graph.graph.input[0].name: x})[graph.graph.output[-1].name].reshape(-1, x.size)
            Jt = torch.func.jacrev(architectures.build(name))(torch.from_numpy(x)).detach().numpy().reshape(J.shape)
            err = np.linalg.norm(J - Jt) / np.linalg.norm(Jt)
            print(f"| {name} | {props['jacgraph.colours']} {props['jacgraph.probes']} | {seconds:.1f} | {err:.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sizes", default="8,16,28,56")
    ap.add_argument("--architectures", action="store_true", help="also compile the 14 example architectures")
    args = ap.parse_args()
    colour_table([int(s) for s in args.sizes.split(",")])
    timing("Three 3x3 convs (1 channel, ReLU between)", conv_stack(), (1, 1, 28, 28), args.threads, args.runs)
    timing("MLP 784-256-256-10", mlp(), (1, 1, 28, 28), args.threads, args.runs)
    if args.architectures:
        architectures_table()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
