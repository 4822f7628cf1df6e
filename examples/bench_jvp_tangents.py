"""Cost of K stacked tangents (`--tangents K`) on the 14 architectures, relative to one tangent.

    python examples/bench_jvp_tangents.py [--ks 1,4,16] [--runs 20] [--only resnet18,lenet] [--json out.json]

For each architecture the forward model and the JVP graphs for each K (default strategy, x_dot with a
leading axis of K) run interleaved in one process, one onnxruntime thread, timed with this thread's CPU
time (median of --runs; on a shared machine that leaves out the time other processes hold the core).
Printed per K: JVP / forward, the cost relative to K = 1, and the extra forwards each direction costs
((JVP - forward) / (K * forward)); sublinear growth means cost(K) / cost(1) < K.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.passes import jvp  # noqa: E402


def bench_one(name, folder, ks, runs):
    path = os.path.join(folder, f"{name}.onnx")
    architectures.export(name, path)
    source = onnx.load(path)
    x_name = source.graph.input[0].name
    x = architectures.example_input(name).numpy()
    rng = np.random.default_rng(0)
    calls = {"forward": (runtime.session(source, threads=1), {x_name: x})}
    for k in ks:
        v = rng.standard_normal((k,) + x.shape).astype(np.float32)
        calls[k] = (runtime.session(jvp.build(source, tangents=k), threads=1), {x_name: x, f"{x_name}_dot": v})
    med = time_calls({key: (lambda s=s, f=f: s.run(None, f)) for key, (s, f) in calls.items()}, runs,
                     clock=time.thread_time)
    fwd = med["forward"]
    return {"name": name, "forward_ms": fwd,
            **{f"K{k}_over_forward": med[k] / fwd for k in ks},
            **{f"K{k}_over_K{ks[0]}": med[k] / med[ks[0]] for k in ks},
            **{f"K{k}_extra_forwards_per_tangent": (med[k] - fwd) / (k * fwd) for k in ks}}


def table(rows, ks):
    head = (["architecture", "forward ms"] + [f"K={k} / forward" for k in ks] + [f"K={k} / K={ks[0]}" for k in ks[1:]]
            + ["extra forwards per tangent at K=" + ", ".join(map(str, ks))])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["name"], f"{r['forward_ms']:.3f}"] + [f"{r[f'K{k}_over_forward']:.2f}" for k in ks]
                 + [f"{r[f'K{k}_over_K{ks[0]}']:.2f}" for k in ks[1:]]
                 + [", ".join(f"{r[f'K{k}_extra_forwards_per_tangent']:.2f}" for k in ks)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,4,16", help="comma-separated tangent counts (the first is the reference)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--only", help="comma-separated architecture names")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    names = args.only.split(",") if args.only else list(architectures.ARCHITECTURES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            rows.append(bench_one(name, folder, ks, args.runs))
            print(f"{name}: " + "  ".join(f"K={k} {rows[-1][f'K{k}_over_forward']:.2f}x fwd" for k in ks), flush=True)
    print(table(rows, ks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
