"""Benchmark the emitted JVP graphs on the 14 architectures (CPU, one thread count for everything).

    python examples/bench_jvp.py [--threads 2] [--runs 30] [--batch 1] [--only resnet18,lenet] [--json out.json]

For each architecture: onnxruntime forward, the emitted JVP (twopass and batched strategies) and
torch.func.jvp are timed interleaved in one process (median of --runs), so machine noise hits all
alike; peak RSS of the forward and JVP runs is measured in a fresh process each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import peak_memory, time_calls  # noqa: E402
from jacgraph.passes import jvp  # noqa: E402


def bench_one(name, folder, threads, runs, batch):
    path = os.path.join(folder, f"{name}.onnx")
    architectures.export(name, path, batch=batch)
    source = onnx.load(path)
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    x = architectures.example_input(name, batch=batch).numpy()
    v = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    emitted = {s: jvp.build(source, strategy=s) for s in ("twopass", "batched")}
    sessions = {"forward": runtime.session(source, threads=threads)}
    sessions.update({s: runtime.session(m, threads=threads) for s, m in emitted.items()})
    feeds = {"forward": {x_name: x}, "twopass": {x_name: x, f"{x_name}_dot": v}}
    feeds["batched"] = feeds["twopass"]
    model = architectures.build(name)
    xt, vt = torch.from_numpy(x), torch.from_numpy(v)
    calls = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    calls["torch_jvp"] = lambda: torch.func.jvp(model, (xt,), (vt,))
    calls["torch_forward"] = lambda: model(xt)
    with torch.no_grad():
        med = time_calls(calls, runs)
    best = min(("twopass", "batched"), key=lambda s: med[s])
    mem_fwd = peak_memory(source, feeds["forward"], threads)
    mem_jvp = peak_memory(emitted["twopass"], feeds["twopass"], threads)
    row = {"name": name, **{f"{k}_ms": val for k, val in med.items()},
           "twopass_ratio": med["twopass"] / med["forward"], "batched_ratio": med["batched"] / med["forward"],
           "torch_over_twopass": med["torch_jvp"] / med["twopass"], "faster_strategy": best,
           "forward_peak_mb": mem_fwd["peak_kb"] / 1024, "jvp_peak_mb": mem_jvp["peak_kb"] / 1024,
           "memory_ratio": mem_jvp["peak_kb"] / mem_fwd["peak_kb"],
           "forward_growth_mb": (mem_fwd["peak_kb"] - mem_fwd["loaded_kb"]) / 1024,
           "jvp_growth_mb": (mem_jvp["peak_kb"] - mem_jvp["loaded_kb"]) / 1024}
    return row


def table(rows):
    lines = ["| architecture | ORT forward ms | JVP twopass ms | JVP batched ms | twopass / forward | batched / forward "
             "| torch.func.jvp ms | torch.func.jvp / JVP | peak RSS MB forward, JVP | peak RSS JVP / forward "
             "| run growth MB forward, JVP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['forward_ms']:.3f} | {r['twopass_ms']:.3f} | {r['batched_ms']:.3f} | "
                     f"{r['twopass_ratio']:.2f} | {r['batched_ratio']:.2f} | {r['torch_jvp_ms']:.3f} | "
                     f"{r['torch_over_twopass']:.2f} | {r['forward_peak_mb']:.0f}, {r['jvp_peak_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f} | {r['forward_growth_mb']:.1f}, {r['jvp_growth_mb']:.1f} |")
    med = lambda k: float(np.median([r[k] for r in rows]))  # noqa: E731
    lines.append(f"| **median** | | | | {med('twopass_ratio'):.2f} | {med('batched_ratio'):.2f} | | "
                 f"{med('torch_over_twopass'):.2f} | | {med('memory_ratio'):.2f} | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--only", help="comma-separated architecture names")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(architectures.ARCHITECTURES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            rows.append(bench_one(name, folder, args.threads, args.runs, args.batch))
            r = rows[-1]
            print(f"{name:20s} fwd {r['forward_ms']:8.3f} ms  twopass x{r['twopass_ratio']:.2f}  "
                  f"batched x{r['batched_ratio']:.2f}  torch.func.jvp/JVP {r['torch_over_twopass']:.2f}  "
                  f"mem x{r['memory_ratio']:.2f}", flush=True)
    print()
    print(f"threads={args.threads}, batch={args.batch}, median of {args.runs} interleaved runs")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
