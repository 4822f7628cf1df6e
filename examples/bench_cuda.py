"""bench_suite's JVP and VJP benchmark on onnxruntime's CUDA execution provider (issue 14).

    python examples/bench_cuda.py prepare DIR     (where PyTorch and transformers are: the exported sources)
    python examples/bench_cuda.py run DIR [--suite archs,zoo,transformers] [--mode jvp,vjp] [--runs 50]
                                          [--workers 12] [--json out.json]
    python examples/bench_cuda.py --tables out.json        (the tables of a saved run again)

`prepare` exports the archs and transformers suites' source models (ONNX and the input x, as bench_suite makes them)
into DIR, so that the GPU machine needs neither PyTorch's exporter nor transformers. The zoo sources are made where
`run` runs, from the onnx wheel's light files with bench_suite's random weights.

`run` first builds, in worker processes on the CPU, every graph bench_suite times: jacgraph's JVP (default strategy),
its input-gradient and all-parameter VJP, and onnx-ad 0.3's forward and reverse graphs for the same. Then, one model
at a time, it times them on CUDAExecutionProvider: inputs and outputs bound on the GPU (IOBinding, so no host copy is
timed), the graphs of one model called interleaved, wall clock, medians of --runs rounds after 5 warm-up rounds
(onnxruntime's Run waits for the CUDA stream before it returns). jacgraph's and onnx-ad's results are compared as on
the CPU (a relative difference above 1e-3 is a note). No PyTorch column and no memory column: this benchmark times
onnxruntime graphs only. Before each session is made, a line `@@ model graph` goes to stderr, so onnxruntime's
warnings about nodes placed on the CPU (Memcpy nodes added) can be read per graph in the log.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_jvp, bench_vjp  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.testing import relative_error  # noqa: E402

SUITES = ("archs", "zoo", "transformers")
PREPARED = ("archs", "transformers")  # exported by `prepare`; the zoo is made where `run` runs
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
TF32 = [True]  # onnxruntime's CUDA default: float32 Conv/MatMul in TF32 (10-bit mantissa) on Ampere and newer


def prepare(folder):
    """The archs and transformers sources into folder: SUITE__NAME.onnx and SUITE__NAME.npy (the input x)."""
    from examples import bench_suite

    os.makedirs(folder, exist_ok=True)
    for suite in PREPARED:
        for name in bench_suite.SUITES[suite][0]:
            with tempfile.TemporaryDirectory() as scratch:  # the arch exporter's own file
                model, x, _ = bench_suite.SUITES[suite][1](name, scratch)
            onnx.save(model, os.path.join(folder, f"{suite}__{name}.onnx"))
            np.save(os.path.join(folder, f"{suite}__{name}.npy"), x)
            print(f"prepared {suite} {name}", flush=True)


def _source(folder, suite, name):
    if suite in PREPARED:
        stem = os.path.join(folder, f"{suite}__{name}")
        return onnx.load(stem + ".onnx"), np.load(stem + ".npy")
    from examples import bench_suite

    return bench_suite.zoo_model(name)


def _peer(graphs, notes, key, build_peer):
    """Add onnx-ad's graph as graphs[key], or say why it failed as notes[key + '_error'] (onnx-ad refuses some ops:
    the peer's failure is a note, jacgraph's row stays)."""
    try:
        graphs[key] = build_peer()
    except Exception as e:  # pylint: disable=broad-exception-caught  # recorded, as bench_jvp.add_onnx_ad does
        notes[f"{key}_error"] = bench_jvp.failure(e)
    return key in graphs


def _graphs(source, x, mode):
    """{key: (model, feeds)} of one mode, the checks [(row key, ours, our outputs, theirs, their outputs)] and the
    notes {key_error: why} of peers that failed."""
    from jacgraph.passes import jvp

    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    graphs, checks, notes, n_out = {"forward": (source, {x_name: x})}, [], {}, len(source.graph.output)
    if mode == "jvp":
        v = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
        r = jvp.emit(source, strategy=bench_jvp.DEFAULT)
        graphs[bench_jvp.DEFAULT] = (r.model, {x_name: x, r.tangent_inputs[x_name]: v})
        if _peer(graphs, notes, "onnx_ad", lambda: bench_jvp.onnx_ad_forward(source, x, v)):
            checks.append(("onnx_ad_difference", bench_jvp.DEFAULT, [r.tangent_outputs[y_name]], "onnx_ad",
                           [graphs["onnx_ad"][0].graph.output[n_out].name]))
        return graphs, checks, notes
    from jacgraph.runtime import session

    ours, emitted, u = bench_vjp.vjp_graphs(source, x, session(source, threads=1))  # the CPU benchmark's graphs
    for key in ("x", "params"):
        r = emitted[f"vjp_{key}"]
        wrt = r.params if key == "params" else []
        graphs[f"vjp_{key}"] = ours[f"vjp_{key}"]
        if not _peer(graphs, notes, f"onnx_ad_{key}", lambda wrt=wrt: bench_vjp.onnx_ad_reverse(source, x, u, wrt)):
            continue
        theirs = dict(zip([x_name] + wrt, [o.name for o in graphs[f"onnx_ad_{key}"][0].graph.output][n_out:]))
        compared = bench_vjp.onnx_ad_compared(source, [x_name] + wrt)  # no BatchNorm running statistics
        checks.append((f"onnx_ad_{key}_difference", f"vjp_{key}", [r.gradient_outputs[n] for n in compared],
                       f"onnx_ad_{key}", [theirs[n] for n in compared]))
    return graphs, checks, notes


def build(job):
    """Worker: one model's graphs of each mode saved under folder/graphs/SUITE__NAME/; (suite, name, {mode: plan})
    where a plan is {"graphs": {key: [model file, feeds file]}, "checks": [...], "notes": {...}} or {"error": why}."""
    folder, suite, name, modes = job
    os.environ["JACGRAPH_PROVIDER"] = "cpu"  # the workers build on the CPU; the GPU is for the timing alone
    out = os.path.join(folder, "graphs", f"{suite}__{name}")
    os.makedirs(out, exist_ok=True)
    plans = {}
    try:
        source, x = _source(folder, suite, name)
    except Exception as e:  # pylint: disable=broad-exception-caught  # one model's failure is a row
        return suite, name, {m: {"error": bench_jvp.failure(e)} for m in modes}
    for mode in modes:
        try:
            graphs, checks, notes = _graphs(source, x, mode)
            files = {}
            for key, (model, feeds) in graphs.items():
                files[key] = [os.path.join(out, f"{mode}_{key}.onnx"), os.path.join(out, f"{mode}_{key}.npz")]
                big = model.ByteSize() > 1_800_000_000  # one protobuf message holds at most 2 GB
                onnx.save(model, files[key][0], save_as_external_data=big)
                np.savez(files[key][1], **feeds)
            plans[mode] = {"graphs": files, "checks": checks, "notes": notes}
        except Exception as e:  # pylint: disable=broad-exception-caught  # the model's row says why
            plans[mode] = {"error": bench_jvp.failure(e)}
    return suite, name, plans


def bound_call(ort, model_file, feeds_file, device):
    """(call, {output name: numpy}) of one graph on device's provider ("cuda" or "cpu"), inputs and outputs bound
    on the device."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 2  # warnings: onnxruntime says when it places nodes on the CPU (Memcpy nodes)
    provider = PROVIDERS[device]
    options = {"use_tf32": "0"} if device == "cuda" and not TF32[0] else {}
    sess = ort.InferenceSession(model_file, opts, providers=[(provider, options), "CPUExecutionProvider"])
    if sess.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not load: {sess.get_providers()}")
    binding = sess.io_binding()
    with np.load(feeds_file) as feeds:
        for k in feeds.files:
            binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(feeds[k], device, 0))
    names = [o.name for o in sess.get_outputs()]
    for name in names:
        binding.bind_output(name, device)
    sess.run_with_iobinding(binding)
    outputs = dict(zip(names, binding.copy_outputs_to_cpu()))
    return (lambda: sess.run_with_iobinding(binding)), outputs


def time_model(ort, suite, name, mode, plan, runs, device):
    row = {"suite": suite, "name": name, "runs": runs, "default_strategy": bench_jvp.DEFAULT}
    if "error" in plan:
        return {**row, "error": plan["error"]}
    row.update(plan.get("notes", {}))
    calls, outputs = {}, {}
    for key, (model_file, feeds_file) in plan["graphs"].items():
        print(f"@@ {name} {mode} {key}", file=sys.stderr, flush=True)
        try:
            calls[key], outputs[key] = bound_call(ort, model_file, feeds_file, device)
        except Exception as e:  # pylint: disable=broad-exception-caught  # a graph that fails is a note
            if key == "forward" or not key.startswith("onnx_ad"):
                return {**row, "error": bench_jvp.failure(e)}
            row[f"{key}_error"] = bench_jvp.failure(e)
    for row_key, ours, our_names, theirs, their_names in plan["checks"]:
        if ours in outputs and theirs in outputs:
            a = np.concatenate([outputs[theirs][n][..., 0].ravel() for n in their_names])
            b = np.concatenate([outputs[ours][n].ravel() for n in our_names])
            row[row_key] = relative_error(a, b)
    med = time_calls(calls, runs, warmup=5)
    row.update({f"{k}_ms": v for k, v in med.items()})
    row.update({f"{k}_ratio": v / med["forward"] for k, v in med.items() if k != "forward"})
    if mode == "jvp" and "onnx_ad" in med:
        row["onnx_ad_over_jvp"] = med["onnx_ad"] / med[bench_jvp.DEFAULT]
    return row


def settings(ort, mode, load_before, device):
    return {"mode": mode, "threads": "default", "provider": device.upper(), "clock": "wall clock",
            "load_average": [load_before, os.getloadavg()[0]],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "onnxruntime": ort.__version__,
            "device": f"{_device_name()}, TF32 {'on' if TF32[0] else 'off'}" if device == "cuda" else "this CPU"}


def _device_name():
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except Exception:  # pylint: disable=broad-exception-caught  # the name is a label only
        return "unknown GPU"


def run_all(args):
    from examples import bench_suite

    modes = args.mode.split(",")
    pairs = [(s, n) for s in args.suite.split(",") for n in bench_suite.SUITES[s][0]
             if not args.models or n in args.models.split(",")]
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        built = pool.map(build, [(args.folder, s, n, modes) for s, n in pairs], chunksize=1)
    print(f"built {len(built)} models' graphs in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        import torch  # noqa: F401  # loads PyTorch's CUDA 13 and cuDNN libraries, which onnxruntime-gpu then uses
    except ImportError:
        pass
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    load_before = os.getloadavg()[0]
    results = {}
    for mode in modes:
        rows = []
        for suite, name, plans in built:
            rows.append(time_model(ort, suite, name, mode, plans[mode], args.runs, args.provider))
            r = rows[-1]
            status = r.get("error") or ", ".join(f"{label} {r[key]:.2f}" for key, label in bench_suite.MEDIANS[mode]
                                                 if key in r)
            print(f"[{mode} {suite}] {name}: {status}", flush=True)
        results[mode] = {"settings": settings(ort, mode, load_before, args.provider), "rows": rows}
        if args.json:
            bench_suite.save_json(args.json, results)
    return results


def tables(results):
    from examples import bench_suite

    for saved in results.values():
        bench_suite.report(saved["rows"], saved["settings"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", choices=["prepare", "run"])
    p.add_argument("folder", nargs="?", help="where the sources are (prepare writes them, run reads them)")
    p.add_argument("--suite", default=",".join(SUITES))
    p.add_argument("--models", help="comma-separated model names (default: every model of the suites)")
    p.add_argument("--mode", default="jvp,vjp", help="jvp, vjp or both")
    p.add_argument("--runs", type=int, default=50, help="timed rounds per model (median)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cuda",
                   help="cpu: the same protocol on the CPU provider (onnxruntime's default threads), to check a setup")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--no-tf32", action="store_true", help="CUDA: full float32 Conv/MatMul (use_tf32=0)")
    p.add_argument("--json", help="write the rows and settings of each mode to this JSON file")
    p.add_argument("--tables", metavar="JSON", help="print the tables of a run saved with --json; run nothing")
    args = p.parse_args(argv)
    TF32[0] = not args.no_tf32
    if args.tables:
        with open(args.tables) as f:
            tables(json.load(f))
    elif args.command == "prepare" and args.folder:
        prepare(args.folder)
    elif args.command == "run" and args.folder:
        tables(run_all(args))
    else:
        p.error("give `prepare DIR`, `run DIR` or --tables JSON")


if __name__ == "__main__":
    main()
