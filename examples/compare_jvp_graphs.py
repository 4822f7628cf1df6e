"""The JVP graphs two jacgraph checkouts emit for the 14 architectures, timed side by side (before/after a change).

    python examples/compare_jvp_graphs.py --before /path/to/old/checkout [--runs 30] [--only squeezenet_style]
                                          [--profile] [--json out.json]

--only also takes the light zoo models of examples/bench_suite.py (squeezenet, shufflenet, ...: random weights,
seed 0, as bench_suite loads them) and the Hugging Face exports of examples/transformer_exports.py (bert, llama, ...,
and the larger bert_large, ...: legacy exporter, opset 17, as bench_suite's transformers suites load them).

Each checkout emits its graph in its own process (default strategy, `jvp.build`), from the same exported model;
then the forward model and both JVP graphs run interleaved in this process with one onnxruntime thread, timed
with this thread's CPU time (median of --runs). Printed: JVP / forward before and after, after / before, and
the largest relative difference between the two graphs' tangents (the same derivative, so float32 round-off
only), and the node counts of the forward and both JVP graphs after onnxruntime's graph optimizations (the kernels
a run launches: on sub-millisecond forwards their per-node overhead sets the time). --profile adds onnxruntime's per-op kernel times of the forward and both graphs (jacgraph.bench.profile).
An old checkout is made with e.g. `git archive <commit> | tar -x -C /tmp/old`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples import architectures, bench_suite, transformer_exports  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import format_profile, profile, time_calls  # noqa: E402

_EMIT = "import sys, onnx; from jacgraph.passes import jvp; onnx.save(jvp.build(onnx.load(sys.argv[1])), sys.argv[2])"


def emit(checkout, source_path, out_path):
    """The JVP graph checkout `checkout` emits (its own process: two jacgraph versions cannot share one)."""
    env = {**os.environ, "PYTHONPATH": checkout}
    subprocess.run([sys.executable, "-c", _EMIT, source_path, out_path], env=env, cwd=checkout, check=True,
                   capture_output=True)
    return onnx.load(out_path)


def optimized_nodes(model):
    """How many nodes onnxruntime runs for `model` after its graph optimizations (Constants not counted)."""
    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3  # (its warning that an NCHWc-optimized file is hardware-specific)
        onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return sum(node.op_type != "Constant" for node in onnx.load(options.optimized_model_filepath).graph.node)


def compare(name, folder, before, runs, with_profile):
    path = os.path.join(folder, f"{name}.onnx")
    if name in bench_suite.ZOO:
        model, x = bench_suite.zoo_model(name)
        onnx.save(model, path)
    elif name in transformer_exports.MODELS or name in transformer_exports.LARGE:
        model, x, _ = bench_suite.SUITES["transformers"][1](name, folder)
        onnx.save(model, path)
    else:
        architectures.export(name, path)
        x = architectures.example_input(name).numpy()
    source = onnx.load(path)
    graphs = {"before": emit(before, path, os.path.join(folder, f"{name}.before.onnx")),
              "after": emit(ROOT, path, os.path.join(folder, f"{name}.after.onnx"))}
    x_name = source.graph.input[0].name
    feeds = {x_name: x, f"{x_name}_dot": np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)}
    sessions = {"forward": (runtime.session(source, threads=1), {x_name: x})}
    sessions.update({k: (runtime.session(m, threads=1), feeds) for k, m in graphs.items()})
    tangents = {k: sessions[k][0].run(None, feeds)[1] for k in graphs}
    med = time_calls({k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in sessions.items()}, runs,
                     clock=time.thread_time)
    scale = max(float(np.abs(tangents["before"]).max()), 1e-30)
    row = {"name": name, "forward_ms": med["forward"], "before_ratio": med["before"] / med["forward"],
           "after_ratio": med["after"] / med["forward"], "after_over_before": med["after"] / med["before"],
           "max_tangent_difference": float(np.abs(tangents["after"] - tangents["before"]).max()) / scale,
           "optimized_nodes": [optimized_nodes(m) for m in (source, graphs["before"], graphs["after"])]}
    if with_profile:
        fwd = profile(source, {x_name: x}, 1, runs)
        row["profile"] = format_profile(fwd, profile(graphs["after"], feeds, 1, runs), "after",
                                        {"before": profile(graphs["before"], feeds, 1, runs)})
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="path of the older jacgraph checkout")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--only", help="comma-separated architecture (or light zoo model, or transformer export) names")
    p.add_argument("--profile", action="store_true", help="per-op kernel times of the forward and both graphs")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(architectures.ARCHITECTURES)
    rows = []
    print("| model | forward ms | before: JVP / forward | after: JVP / forward | after / before | "
          "max tangent difference | nodes: forward, before, after |\n|---|---:|---:|---:|---:|---:|---|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            r = compare(name, folder, os.path.abspath(args.before), args.runs, args.profile)
            rows.append(r)
            print(f"| {name} | {r['forward_ms']:.3f} | {r['before_ratio']:.2f} | {r['after_ratio']:.2f} | "
                  f"{r['after_over_before']:.3f} | {r['max_tangent_difference']:.1e} | "
                  f"{', '.join(map(str, r['optimized_nodes']))} |", flush=True)
    if rows:
        before, after = (np.median([r[k] for r in rows]) for k in ("before_ratio", "after_ratio"))
        print(f"median: before {before:.2f}, after {after:.2f}")
    for r in rows:
        if "profile" in r:
            print(f"\n{r['name']} (kernel ms, median per kernel over the runs, summed per op type):\n{r['profile']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
