"""Time full Jacobian bounds of a 784-1024-1024-1024-10 ReLU MLP with onnxruntime on the CPU.

    python examples/bench_recurjac.py [--threads 2] [--runs 3] [--eps 0.0005,0.001,0.002,0.005,0.01,0.02]

The MLP has He-scaled random weights (std sqrt(2 / fan_in)), small random biases, and x0 uniform in
[0, 1]^784 (MNIST-like). For each eps (l_inf ball) the RecurJac graph and the interval-chain graph
(same pre-activation bounds) run interleaved, `--runs` times each; the median wall time of one
session.run is reported, with the fraction of unstable hidden units (pre-activation interval
containing 0) and the mean width of the [10 x 784] Jacobian bounds. Graph construction and session
creation (which includes onnxruntime's constant folding) are timed once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jacgraph.passes import recurjac  # noqa: E402
from jacgraph.runtime import session  # noqa: E402

SIZES = [784, 1024, 1024, 1024, 10]


def mlp(sizes, rng):
    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((b, a)) * np.sqrt(2 / a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"b{i}"], [f"z{i}"], transB=1))
        cur = f"z{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"h{i}"]))
            cur = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--eps", default="0.0005,0.001,0.002,0.005,0.01,0.02")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    model = mlp(SIZES, rng)
    x0 = rng.uniform(0, 1, (1, SIZES[0]))
    sessions, setup = {}, {}
    for method in ("recurjac", "interval"):
        t = time.perf_counter()
        graph = recurjac.build(model, norm="inf", method=method, preactivation_bounds=True)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        sessions[method] = session(graph, threads=args.threads, provider="CPUExecutionProvider")
        setup[method] = {"build_s": t_build, "session_s": time.perf_counter() - t,
                         "graph_mb": graph.ByteSize() / 1e6, "nodes": len(graph.graph.node)}
    print(f"{'-'.join(map(str, SIZES))} ReLU MLP, float64, onnxruntime CPU, {args.threads} intra-op threads, "
          f"median of {args.runs} runs")
    for m, s in setup.items():
        print(f"  {m}: graph {s['nodes']} nodes, {s['graph_mb']:.1f} MB; build {s['build_s']:.2f} s, "
              f"session {s['session_s']:.2f} s")
    print("| eps | unstable units | recurjac s | interval s | recurjac mean width | interval mean width |")
    print("|---|---|---|---|---|---|")
    rows = []
    for eps in [float(e) for e in args.eps.split(",")]:
        feeds = {"x0": x0, "eps": np.array([eps])}
        times = {m: [] for m in sessions}
        outs = {}
        for _ in range(args.runs):
            for m, sess in sessions.items():  # interleaved: machine noise hits both alike
                t = time.perf_counter()
                outs[m] = sess.run(None, feeds)
                times[m].append(time.perf_counter() - t)
        out = outs["recurjac"]
        lo, hi = np.concatenate(out[2::2], axis=1), np.concatenate(out[3::2], axis=1)
        row = {"eps": eps, "unstable_fraction": float(np.mean((lo <= 0) & (hi >= 0))),
               **{f"{m}_s": float(np.median(t)) for m, t in times.items()},
               **{f"{m}_width": float(np.mean(o[1] - o[0])) for m, o in outs.items()}}
        rows.append(row)
        print(f"| {eps:g} | {row['unstable_fraction']:.1%} | {row['recurjac_s']:.2f} | {row['interval_s']:.2f} | "
              f"{row['recurjac_width']:.4g} | {row['interval_width']:.4g} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows, "threads": args.threads}, f, indent=2)


if __name__ == "__main__":
    main()
