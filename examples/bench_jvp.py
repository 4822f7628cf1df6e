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
from jacgraph.testing import relative_error  # noqa: E402

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


def onnx_ad_forward(source, x, v):
    """onnx-ad 0.3's forward-mode graph of source's first output in its first input, and its feeds (tangent v)."""
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    ad = onnx_ad_module().forward(source, inputs=[x_name], outputs=[y_name], layout="onnx")
    return ad, {x_name: x, [i.name for i in ad.graph.input][len(source.graph.input)]: v[..., None]}


def bench_one(name, folder, threads, runs, batch, clock, with_onnx_ad):
    def run():
        path = os.path.join(folder, f"{name}.onnx")
        architectures.export(name, path, batch=batch)
        x = architectures.example_input(name, batch=batch).numpy()
        row = measure(onnx.load(path), x, architectures.build(name), threads, runs, clock, with_onnx_ad)
        return {**row, "faster_strategy": min(STRATEGIES, key=lambda s: row[f"{s}_ms"])}
    return recorded(name, run)


def recorded(name, run):
    """{"name": name, **run()}, or {"name": name, "error": why}: one model's failure is a row, not the end."""
    try:
        return {"name": name, **run()}
    except Exception as e:  # pylint: disable=broad-exception-caught  # said in the row's notes
        return {"name": name, "error": failure(e)}


def failure(error: Exception) -> str:
    """One line naming an error, for a table cell (a comparison that fails is recorded, not raised)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def add_onnx_ad(row, graphs, sessions, build, threads, key="onnx_ad"):
    """Add onnx-ad's graph to the timed ones as `key`: build() -> (model, feeds), or record why it failed as
    row[key + '_error'] (onnx-ad refuses some models; the table says so and the run goes on)."""
    try:
        model, feeds = build()
        sess = runtime.session(model, threads=threads)
        sess.run(None, feeds)
    except Exception as e:  # pylint: disable=broad-exception-caught  # any failure of the comparison is recorded
        row[f"{key}_error"] = failure(e)
        return
    graphs[key], sessions[key] = (model, feeds), sess


def add_peak_memory(row, graphs, probes, threads):
    """Peak RSS (MB) of each graph named in probes ({graph key: row prefix}), each in a fresh process."""
    for key, prefix in probes.items():
        if key not in graphs:
            continue
        try:
            row[f"{prefix}_peak_mb"] = peak_memory(graphs[key][0], graphs[key][1], threads)["peak_kb"] / 1024
        except Exception as e:  # pylint: disable=broad-exception-caught  # the probe process died (memory): say so
            row[f"{prefix}_peak_error"] = failure(e)


def measure(source, x, module, threads, runs, clock, with_onnx_ad, strategies=None, memory=True, warm=False):
    """Median ms of the forward, each strategy's JVP and (with_onnx_ad) onnx-ad 0.3's forward-mode graph,
    timed interleaved, and of torch.func.jvp when a PyTorch `module` is given; ratios to the forward, peak
    RSS. A failing comparison (onnx-ad, torch, a memory probe) is recorded as `*_error`, never raised.
    warm: each call timed with its own data in cache (see jacgraph.bench.time_calls)."""
    strategies = strategies or STRATEGIES
    default = DEFAULT if DEFAULT in strategies else strategies[0]
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    v = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
    emitted = {s: jvp.emit(source, strategy=s) for s in strategies}
    graphs = {"forward": (source, {x_name: x})}
    graphs.update({s: (r.model, {x_name: x, r.tangent_inputs[x_name]: v}) for s, r in emitted.items()})
    sessions = {k: runtime.session(m, threads=threads) for k, (m, _) in graphs.items()}
    row = {"default_strategy": default}
    if with_onnx_ad:
        add_onnx_ad(row, graphs, sessions, lambda: onnx_ad_forward(source, x, v), threads)
    if "onnx_ad" in sessions:  # both graphs must compute the same J v, or the timing compares different things
        ad = graphs["onnx_ad"][0]
        theirs_name, ours_name = ad.graph.output[len(source.graph.output)].name, emitted[default].tangent_outputs[y_name]
        theirs = runtime.run(sessions["onnx_ad"], graphs["onnx_ad"][1], [theirs_name])[theirs_name]
        ours = runtime.run(sessions[default], graphs[default][1], [ours_name])[ours_name]
        row["onnx_ad_difference"] = relative_error(theirs[..., 0], ours)
    med = time_calls({k: (lambda s=sessions[k], f=f: s.run(None, f)) for k, (_, f) in graphs.items()},
                     runs, clock=clock, warm=warm)
    sessions.clear()  # their memory (VGG-19: GBs) is not needed for what follows, the memory probes included
    if module is not None:
        # PyTorch in its own loop: an onnxruntime call right after a PyTorch call was measured up to 4x slower
        # (0.025 -> 0.10 ms on the mlp forward), which would distort the onnxruntime ratios
        xt, vt = torch.from_numpy(x), torch.from_numpy(v)
        try:
            with torch.no_grad():
                med.update(time_calls({"torch_jvp": lambda: torch.func.jvp(module, (xt,), (vt,)),
                                       "torch_forward": lambda: module(xt)}, runs, clock=clock, warm=warm))
            row["torch_over_jvp"] = med["torch_jvp"] / med[default]
        except Exception as e:  # pylint: disable=broad-exception-caught  # torch.func cannot trace some modules
            row["torch_error"] = failure(e)
    row.update({f"{k}_ms": val for k, val in med.items()})
    row.update({f"{s}_ratio": med[s] / med["forward"] for s in strategies})
    if "onnx_ad" in med:
        row["onnx_ad_ratio"] = med["onnx_ad"] / med["forward"]
        row["onnx_ad_over_jvp"] = med["onnx_ad"] / med[default]
    if memory:
        add_peak_memory(row, graphs, {"forward": "forward", default: "jvp", "onnx_ad": "onnx_ad"}, threads)
        if "forward_peak_mb" in row and "jvp_peak_mb" in row:
            row["memory_ratio"] = row["jvp_peak_mb"] / row["forward_peak_mb"]
    return row


def table(rows):
    """The markdown table: '—' where a number is missing and a notes cell saying why (bench_suite's cells)."""
    from examples.bench_suite import memory_cell, ms_cell, notes_cell, ratio_cell

    ad = any(key.startswith("onnx_ad") for r in rows for key in r)
    head = (["architecture", "ORT forward ms"] + [f"{s} / forward" for s in STRATEGIES]
            + (["onnx-ad / forward", f"onnx-ad / {DEFAULT}"] if ad else [])
            + ["torch.func.jvp ms", f"torch.func.jvp / {DEFAULT}", "peak RSS MB forward, JVP",
               "peak RSS JVP / forward", "notes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["name"], ms_cell(r, "forward_ms")] + [ratio_cell(r, s + "_ratio") for s in STRATEGIES]
                 + ([ratio_cell(r, "onnx_ad_ratio"), ratio_cell(r, "onnx_ad_over_jvp")] if ad else [])
                 + [ms_cell(r, "torch_jvp_ms"), ratio_cell(r, "torch_over_jvp"), memory_cell(r, ["forward", "jvp"]),
                    ratio_cell(r, "memory_ratio"), notes_cell(r)])
        lines.append("| " + " | ".join(cells) + " |")

    def med(key):  # over the rows that have the number
        values = [r[key] for r in rows if key in r]
        return f"{float(np.median(values)):.2f}" if values else "—"
    cells = (["**median**", ""] + [med(s + "_ratio") for s in STRATEGIES]
             + ([med("onnx_ad_ratio"), med("onnx_ad_over_jvp")] if ad else [])
             + ["", med("torch_over_jvp"), "", med("memory_ratio"), ""])
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", help="comma-separated architecture names")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (use with --threads 1)")
    p.add_argument("--onnx-ad", action="store_true", help="also time onnx-ad 0.3's forward-mode graph")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    names = args.only.split(",") if args.only else list(architectures.ARCHITECTURES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            rows.append(bench_one(name, folder, args.threads, args.runs, args.batch, clock, args.onnx_ad))
            print(table(rows[-1:]).splitlines()[2], flush=True)
    print()
    print(f"threads={args.threads}, batch={args.batch}, median of {args.runs} interleaved runs, "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}; default strategy {DEFAULT}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
