"""Benchmark the emitted JVP graphs on the 14 architectures (CPU, one thread count for everything).

    python examples/bench_jvp.py [--threads 1] [--runs 30] [--batch 1] [--only resnet18,lenet]
                                 [--cpu-time] [--onnx-ad] [--json out.json]

For each architecture: onnxruntime forward, the emitted JVP with each strategy of the JVP pass
(twopass, batched, auto: the default), torch.func.jvp and, with --onnx-ad, onnx-ad 0.3's forward-mode
graph (pip-installed by this script when missing; never a jacgraph dependency) are timed interleaved
in one process (median of --runs), so machine noise hits all alike. --cpu-time times with this
thread's CPU time instead of the wall clock: on a shared machine it leaves out the time other
processes hold the core (valid with --threads 1, where every call runs in this thread). Peak RSS of
the forward and default-strategy JVP runs is measured in a fresh process each.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import peak_memory, time_calls  # noqa: E402
from jacgraph.passes import jvp  # noqa: E402

STRATEGIES = list(jvp.STRATEGIES)  # (an older checkout has fewer; the table follows)
DEFAULT = jvp.DEFAULT_STRATEGY


def onnx_ad_module():
    """onnx_ad, pip-installing onnx-ad 0.3.0 first when it is missing (a comparison, not a dependency)."""
    try:
        return importlib.import_module("onnx_ad")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "onnx-ad==0.3.0"], check=True)
        importlib.invalidate_caches()
        return importlib.import_module("onnx_ad")


def bench_one(name, folder, threads, runs, batch, clock, with_onnx_ad):
    path = os.path.join(folder, f"{name}.onnx")
    architectures.export(name, path, batch=batch)
    source = onnx.load(path)
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    x = architectures.example_input(name, batch=batch).numpy()
    v = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    emitted = {s: jvp.build(source, strategy=s) for s in STRATEGIES}
    sessions = {"forward": (runtime.session(source, threads=threads), {x_name: x})}
    sessions.update({s: (runtime.session(m, threads=threads), {x_name: x, f"{x_name}_dot": v})
                     for s, m in emitted.items()})
    if with_onnx_ad:
        ad = onnx_ad_module().forward(source, inputs=[x_name], outputs=[y_name], layout="onnx")
        seed = [i.name for i in ad.graph.input][len(source.graph.input)]
        sessions["onnx_ad"] = (runtime.session(ad, threads=threads), {x_name: x, seed: v[..., None]})
    model = architectures.build(name)
    xt, vt = torch.from_numpy(x), torch.from_numpy(v)
    calls = {k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in sessions.items()}
    med = time_calls(calls, runs, clock=clock)
    # PyTorch in its own loop: an onnxruntime call right after a PyTorch call was measured up to 4x slower
    # (0.025 -> 0.10 ms on the mlp forward), which would distort the onnxruntime ratios
    with torch.no_grad():
        med.update(time_calls({"torch_jvp": lambda: torch.func.jvp(model, (xt,), (vt,)),
                               "torch_forward": lambda: model(xt)}, runs, clock=clock))
    mem_fwd = peak_memory(source, sessions["forward"][1], threads)
    mem_jvp = peak_memory(emitted[DEFAULT], sessions[DEFAULT][1], threads)
    row = {"name": name, **{f"{k}_ms": val for k, val in med.items()},
           **{f"{s}_ratio": med[s] / med["forward"] for s in STRATEGIES},
           "torch_over_jvp": med["torch_jvp"] / med[DEFAULT],
           "faster_strategy": min(STRATEGIES, key=lambda s: med[s]),
           "forward_peak_mb": mem_fwd["peak_kb"] / 1024, "jvp_peak_mb": mem_jvp["peak_kb"] / 1024,
           "memory_ratio": mem_jvp["peak_kb"] / mem_fwd["peak_kb"]}
    if with_onnx_ad:
        row["onnx_ad_ratio"] = med["onnx_ad"] / med["forward"]
        row["onnx_ad_over_jvp"] = med["onnx_ad"] / med[DEFAULT]
    return row


def table(rows):
    ad = "onnx_ad_ratio" in rows[0]
    head = (["architecture", "ORT forward ms"] + [f"{s} / forward" for s in STRATEGIES]
            + (["onnx-ad / forward", f"onnx-ad / {DEFAULT}"] if ad else [])
            + ["torch.func.jvp ms", f"torch.func.jvp / {DEFAULT}", "peak RSS MB forward, JVP",
               "peak RSS JVP / forward"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["name"], f"{r['forward_ms']:.3f}"] + [f"{r[s + '_ratio']:.2f}" for s in STRATEGIES]
                 + ([f"{r['onnx_ad_ratio']:.2f}", f"{r['onnx_ad_over_jvp']:.2f}"] if ad else [])
                 + [f"{r['torch_jvp_ms']:.3f}", f"{r['torch_over_jvp']:.2f}",
                    f"{r['forward_peak_mb']:.0f}, {r['jvp_peak_mb']:.0f}", f"{r['memory_ratio']:.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    med = lambda k: f"{float(np.median([r[k] for r in rows])):.2f}"  # noqa: E731
    cells = (["**median**", ""] + [med(s + "_ratio") for s in STRATEGIES]
             + ([med("onnx_ad_ratio"), med("onnx_ad_over_jvp")] if ad else [])
             + ["", med("torch_over_jvp"), "", med("memory_ratio")])
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", help="comma-separated architecture names")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (use with --threads 1)")
    p.add_argument("--onnx-ad", action="store_true", help="also time onnx-ad 0.3's forward-mode graph")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    names = args.only.split(",") if args.only else list(architectures.ARCHITECTURES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            rows.append(bench_one(name, folder, args.threads, args.runs, args.batch, clock, args.onnx_ad))
            r = rows[-1]
            print(f"{name:20s} fwd {r['forward_ms']:8.3f} ms  "
                  + "  ".join(f"{s} x{r[s + '_ratio']:.2f}" for s in STRATEGIES)
                  + (f"  onnx-ad x{r['onnx_ad_ratio']:.2f}" if args.onnx_ad else "")
                  + f"  torch.func.jvp/JVP {r['torch_over_jvp']:.2f}  mem x{r['memory_ratio']:.2f}", flush=True)
    print()
    print(f"threads={args.threads}, batch={args.batch}, median of {args.runs} interleaved runs, "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}; default strategy {DEFAULT}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
