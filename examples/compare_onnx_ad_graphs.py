"""jacgraph's JVP graph beside onnx-ad 0.3's forward-mode graph, op by op as onnxruntime runs them (issue 14).

    python examples/compare_onnx_ad_graphs.py --only lenet,alexnet_style,t5_encoder [--runs 40] [--profile]
                                              [--save FOLDER] [--json out.json]

--only takes the 14 architectures of examples/architectures.py, the light zoo models and the Hugging Face exports,
loaded as examples/bench_suite.py loads them (batch 1; zoo: random weights, seed 0). Per model, four graphs run
interleaved in this process with one onnxruntime thread, timed with this thread's CPU time (median of --runs):
the forward, jacgraph's JVP (`jvp.emit`, default strategy), onnx-ad's `forward(..., layout="onnx")` and `two
forwards`, the source run on x and on x_dot in one graph. No exact forward-mode graph needs much less than the
forward plus one tangent pass of the linear ops, which cost about what the forward's do, so `onnx-ad / two forwards`
is about the most any JVP graph could be faster than onnx-ad's (a reference, not a proof: a tangent pass can cost less
than the forward, whose biases and fused activations it drops). Printed: the times over the forward, onnx-ad /
jacgraph, onnx-ad / two forwards, and each graph's op counts after onnxruntime's optimizations (its
`optimized_model_filepath`: fused Conv, NCHWc ReorderInput/ReorderOutput as it runs them); --profile adds
onnxruntime's per-op kernel times of the three (jacgraph.bench.profile; wall-clock, inflated under load: read them
within one table). --save keeps the graphs and their optimized forms. onnx-ad is pip-installed when missing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime
from onnx import compose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples import bench_jvp, bench_suite  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import format_profile, profile, time_calls  # noqa: E402
from jacgraph.passes import jvp  # noqa: E402


def load(name, folder):
    """(model, x) of a bench_suite model by name, from whichever suite has it."""
    for suite in ("archs", "zoo", "transformers", "transformers_large"):
        names, make = bench_suite.SUITES[suite]
        if name in names:
            model, x, _ = make(name, folder)
            return model, x
    raise SystemExit(f"unknown model {name!r}; use a name of examples/bench_suite.py's suites")


def two_forwards(model):
    """The source run on x and on x_dot in one graph (inputs p_<x>, t_<x>)."""
    a, b = compose.add_prefix(model, "p_"), compose.add_prefix(model, "t_")
    graph = onnx.helper.make_graph(list(a.graph.node) + list(b.graph.node), "two_forwards",
                                   list(a.graph.input) + list(b.graph.input), list(a.graph.output) + list(b.graph.output),
                                   list(a.graph.initializer) + list(b.graph.initializer))
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    out.ir_version = model.ir_version
    return out


def optimized_ops(model, path):
    """Op type -> count of the graph onnxruntime runs for `model` (Constants not counted); written to `path`."""
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = path
    options.log_severity_level = 3  # (its warning that an NCHWc-optimized file is hardware-specific)
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant")


def compare(name, runs, with_profile, folder):
    with tempfile.TemporaryDirectory() as scratch:
        source, x = load(name, scratch)
    x_name = source.graph.input[0].name
    v = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
    ours = jvp.emit(source)
    graphs = {"forward": (source, {x_name: x}), "jacgraph": (ours.model, {x_name: x, ours.tangent_inputs[x_name]: v}),
              "onnx_ad": bench_jvp.onnx_ad_forward(source, x, v),
              "two_forwards": (two_forwards(source), {"p_" + x_name: x, "t_" + x_name: v})}
    ops = {k: optimized_ops(m, os.path.join(folder, f"{name}.{k}.optimized.onnx")) for k, (m, _) in graphs.items()}
    for k, (m, _) in graphs.items():
        onnx.save(m, os.path.join(folder, f"{name}.{k}.onnx"))
    sessions = {k: runtime.session(m, threads=1) for k, (m, _) in graphs.items()}
    tangents = [sessions[k].run(None, graphs[k][1])[1] for k in ("jacgraph", "onnx_ad")]
    med = time_calls({k: (lambda s=sessions[k], f=f: s.run(None, f)) for k, (_, f) in graphs.items()}, runs,
                     clock=time.thread_time)
    row = {"name": name, "forward_ms": med["forward"], "load": os.getloadavg()[0],
           **{f"{k}_ratio": med[k] / med["forward"] for k in ("jacgraph", "onnx_ad", "two_forwards")},
           "onnx_ad_over_jacgraph": med["onnx_ad"] / med["jacgraph"],
           "onnx_ad_over_two_forwards": med["onnx_ad"] / med["two_forwards"],
           "tangent_difference": float(np.abs(tangents[1][..., 0] - tangents[0]).max() / max(np.abs(tangents[0]).max(), 1e-30)),
           "ops": {k: dict(c) for k, c in ops.items() if k != "two_forwards"}}
    if with_profile:
        prof = {k: profile(m, f, 1, runs) for k, (m, f) in graphs.items() if k != "two_forwards"}
        row["profile"] = format_profile(prof["forward"], prof["jacgraph"], "jacgraph", {"onnx_ad": prof["onnx_ad"]})
    return row


def op_table(ops):
    names = sorted(set().union(*ops.values()), key=lambda op: (-max(c.get(op, 0) for c in ops.values()), op))
    lines = [f"  {'op type':30s} " + " ".join(f"{k:>9s}" for k in ops)]
    lines += [f"  {op:30s} " + " ".join(f"{ops[k].get(op, 0):9d}" for k in ops) for op in names]
    lines.append(f"  {'nodes':30s} " + " ".join(f"{sum(c.values()):9d}" for c in ops.values()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", required=True, help="comma-separated model names (bench_suite's suites)")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--profile", action="store_true", help="per-op kernel times of the forward and both JVP graphs")
    p.add_argument("--save", help="folder to keep the graphs and their onnxruntime-optimized forms in")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    print("| model | forward ms | jacgraph / forward | onnx-ad / forward | two forwards / forward | onnx-ad / jacgraph "
          "| onnx-ad / two forwards | load |\n|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.save or scratch
        os.makedirs(folder, exist_ok=True)
        for name in args.only.split(","):
            r = compare(name, args.runs, args.profile, folder)
            rows.append(r)
            print(f"| {name} | {r['forward_ms']:.3f} | {r['jacgraph_ratio']:.2f} | {r['onnx_ad_ratio']:.2f} | "
                  f"{r['two_forwards_ratio']:.2f} | {r['onnx_ad_over_jacgraph']:.3f} | {r['onnx_ad_over_two_forwards']:.3f} "
                  f"| {r['load']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        print(f"\n{r['name']}: ops after onnxruntime's optimizations (J v of the two graphs differ by "
              f"{r['tangent_difference']:.1e} of the largest)\n{op_table(r['ops'])}")
        if "profile" in r:
            print(f"{r['name']} (kernel ms, median per kernel over the runs, summed per op type):\n{r['profile']}")


if __name__ == "__main__":
    main()
