"""Where a JVP graph's kernel time goes, by the source op whose rule emitted each kernel.

    python examples/jvp_time_by_rule.py MODEL [--runs 30] [--top 20]

MODEL: an architecture of examples/architectures.py or a light zoo model of examples/bench_suite.py (random weights,
seed 0, as bench_suite loads them). The default JVP graph (`jvp.build`) and the forward run with one onnxruntime
thread under its profiler; each kernel's median wall time over --runs is credited to the source node whose copy
precedes it in the emitted graph (jvp.differentiate emits each node's copy, then the nodes of its rule), so
"rule MaxPool: Where" is the Where kernels of the max-pool rules and "primal Relu: Conv" the forward's own
Conv+ReLU. onnxruntime's NCHWc nodes are named after their output; the nodes onnxruntime makes itself (NCHWc
reorders, the bodies of ops it runs as functions, e.g. HardSwish as HardSigmoid and Mul) are "onnxruntime".
Profiler times are wall-clock and inflate under load; the forward and the JVP graph run interleaved, so a load
change hits both alike: read a run as a whole.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples import architectures, bench_suite  # noqa: E402
from jacgraph.passes import jvp  # noqa: E402
from jacgraph.runtime import session  # noqa: E402


def kernel_times(models, feeds, runs, warmup=5):
    """For each model (run interleaved, so load hits them alike): {kernel node name: (median µs over the runs, op
    type as onnxruntime runs it)}."""
    with tempfile.TemporaryDirectory() as folder:
        sessions = [session(m, threads=1, profile_prefix=os.path.join(folder, f"trace{i}"))
                    for i, m in enumerate(models)]
        for _ in range(warmup + runs):
            for sess, feed in zip(sessions, feeds):
                sess.run(None, feed)
        traces = []
        for sess in sessions:
            with open(sess.end_profiling()) as f:
                traces.append(json.load(f))
    return [_medians(events, warmup) for events in traces]


def _medians(events, warmup):
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    durations, op_of = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[warmup]:
            name = e["name"][:-len("_kernel_time")]
            durations[name].append(e["dur"])
            op_of[name] = e["args"].get("op_name", "?")
    return {name: (float(np.median(d)), op_of[name]) for name, d in durations.items()}


def credit(source, emitted):
    """{emitted node name or output name: "primal OP" / "rule OP"} from the order of the emitted graph."""
    copies = {n.name: n.op_type for n in source.graph.node}
    owner, current = {}, None
    for node in emitted.graph.node:
        if node.name in copies:
            current = copies[node.name]
            label = f"primal {current}"
        else:
            label = f"rule {current}" if current else "outputs"
        owner[node.name] = label
        owner.update((out, label) for out in node.output)
    return owner


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--top", type=int, default=20, help="rows printed")
    args = p.parse_args()
    if args.model in bench_suite.ZOO:
        source, x = bench_suite.zoo_model(args.model)
    else:
        with tempfile.TemporaryDirectory() as folder:
            source = onnx.load(architectures.export(args.model, os.path.join(folder, "model.onnx")))
        x = architectures.example_input(args.model).numpy()
    emitted = jvp.build(source)
    name = source.graph.input[0].name
    feeds = {name: x, f"{name}_dot": np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)}
    forward_times, jvp_times = kernel_times([source, emitted], [{name: x}, feeds], args.runs)
    forward = sum(us for us, _ in forward_times.values()) / 1e3
    owner = credit(source, emitted)
    totals, counts = defaultdict(float), defaultdict(int)
    for kernel, (us, op) in jvp_times.items():
        key = f"{owner.get(kernel, owner.get(kernel.removesuffix('_nchwc'), 'onnxruntime'))}: {op}"
        totals[key] += us / 1e3
        counts[key] += 1
    total = sum(totals.values())
    print(f"{args.model}: forward kernels {forward:.3f} ms, JVP kernels {total:.3f} ms ({total / forward:.2f}x), "
          f"beyond 2x forward {total - 2 * forward:.3f} ms")
    for key, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:8.3f} ms {counts[key]:4d}  {key}")


if __name__ == "__main__":
    main()
