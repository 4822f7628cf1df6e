"""Benchmark the emitted VJP graphs (input gradient, and all parameter gradients) against PyTorch's backward.

    python examples/bench_vjp.py [--threads 1] [--runs 50] [--only mlp,lenet] [--cpu-time] [--onnx-ad]
    python examples/bench_vjp.py --profile --only shufflenet [--onnx-ad]    (per-op kernel times instead)

onnxruntime forward, `--emit vjp`, `--emit vjp --wrt params` are timed interleaved in one process
(median of --runs), so machine noise hits all alike, and PyTorch forward+backward in a loop of its own.
--cpu-time: this thread's CPU time instead of the wall clock (see examples/bench_jvp.py).
--only takes the architectures of examples/architectures.py and the light-zoo models of examples/bench_suite.py
(random weights, no PyTorch module). --profile prints, per model, the per-op kernel time of each graph
(onnxruntime's profiler, jacgraph.bench.profile: medians per kernel over --runs, wall clock) side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures  # noqa: E402
from examples.bench_jvp import add_onnx_ad, add_peak_memory, failure, onnx_ad_module, recorded  # noqa: E402
from jacgraph.bench import format_profile, profile, time_calls  # noqa: E402
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.runtime import run, session  # noqa: E402
from jacgraph.testing import relative_error  # noqa: E402

DEFAULT = ["mlp", "lenet", "resnet18", "mobilenetv2_style", "densenet_style", "unet"]


def load(name, folder):
    """(model, x, module): an architecture of examples/architectures.py, exported to folder, or a light-zoo model
    of examples/bench_suite.py (module None: no PyTorch module exists for it)."""
    from examples import bench_suite  # here: bench_suite imports this module

    if name in bench_suite.ZOO:
        return (*bench_suite.zoo_model(name), None)
    path = os.path.join(folder, name + ".onnx")
    architectures.export(name, path, batch=1)
    return onnx.load(path), architectures.example_input(name, batch=1).numpy(), architectures.build(name)


def bench_one(name, folder, threads, runs, clock, with_onnx_ad=False):
    return recorded(name, lambda: measure(*load(name, folder), threads, runs, clock, with_onnx_ad, memory=False))


def with_params_as_inputs(source, params):
    """A copy of source whose initializers `params` are graph inputs instead (onnx-ad differentiates inputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    kept = [t for t in model.graph.initializer if t.name not in params]
    moved = {t.name: t for t in model.graph.initializer if t.name in params}
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(p, moved[p].data_type, list(moved[p].dims))
                             for p in params)
    return model, {p: onnx.numpy_helper.to_array(moved[p]) for p in params}


def onnx_ad_reverse(source, x, u, wrt):
    """onnx-ad 0.3's reverse-mode graph of source's first output in its first input and the initializers `wrt`
    (made inputs), and its feeds (seed cotangent u)."""
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    model, values = with_params_as_inputs(source, wrt)
    ad = onnx_ad_module().reverse(model, inputs=[x_name] + wrt, outputs=[y_name], layout="onnx")
    seed = [i.name for i in ad.graph.input][len(model.graph.input)]
    return ad, {x_name: x, **values, seed: u[..., None]}


def onnx_ad_compared(source, names):
    """names less BatchNormalization's running mean and variance (inputs 3, 4): onnx-ad 0.3's reverse mode gives them
    no gradient (exact zeros: "statistics, not differentiable operands"), jacgraph their true one (float64 central
    differences agree: docs/vjp.md), so the check against onnx-ad leaves them out; both graphs still output them."""
    statistics = {n.input[i] for n in source.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    return [n for n in names if n not in statistics]


# each peer's graph or call: the jacgraph graph computing the same gradients (PyTorch's backward gives all of them)
PEERS = {"onnx_ad_x": "vjp_x", "onnx_ad_params": "vjp_params", "torch_fwd_bwd": "vjp_params"}


def peer_ratios(row):
    """{peer + '_over_vjp': peer ms / jacgraph ms} for each of PEERS that row has both medians of."""
    return {f"{peer}_over_vjp": row[f"{peer}_ms"] / row[f"{ours}_ms"] for peer, ours in PEERS.items()
            if f"{peer}_ms" in row and f"{ours}_ms" in row}


def vjp_graphs(source, x, forward):
    """({key: (model, feeds)} of the forward and both VJP graphs, the two VJPResults, the cotangent u): u is
    standard normal (seed 0) in the shape of the first output, which the forward session computes."""
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    y = forward.run(None, {x_name: x})[0]
    u = np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype)
    emitted = {"vjp_x": vjp.emit(source), "vjp_params": vjp.emit(source, wrt="params")}
    graphs = {"forward": (source, {x_name: x})}
    graphs.update({k: (r.model, {x_name: x, r.cotangent_inputs[y_name]: u}) for k, r in emitted.items()})
    return graphs, emitted, u


def print_profiles(source, x, threads, runs, with_onnx_ad):
    """Per-op kernel time of the forward, both VJP graphs and (with_onnx_ad) onnx-ad's, side by side."""
    graphs, emitted, u = vjp_graphs(source, x, session(source, threads=threads))
    columns = {k: profile(*graphs[k], threads, runs=runs) for k in graphs}
    for key, wrt in ((("x", []), ("params", emitted["vjp_params"].params)) if with_onnx_ad else ()):
        try:
            columns[f"onnx_ad_{key}"] = profile(*onnx_ad_reverse(source, x, u, wrt), threads, runs=runs)
        except Exception as e:  # pylint: disable=broad-exception-caught  # onnx-ad refuses some models: say so
            print(f"  onnx_ad_{key}: {failure(e)}")
    print(format_profile(columns.pop("forward"), columns.pop("vjp_x"), "vjp_x", columns))


def measure(source, x, module, threads, runs, clock, with_onnx_ad, memory=True, warm=False):
    """Median ms of the forward, the input-gradient VJP and the all-parameter VJP (and with_onnx_ad onnx-ad 0.3's
    reverse-mode graphs for the same two), timed interleaved, and PyTorch's backward for both when a `module` is
    given; peak RSS. A failing comparison is recorded as `*_error`, never raised (see bench_jvp.measure)."""
    x_name = source.graph.input[0].name
    forward = session(source, threads=threads)
    graphs, emitted, u = vjp_graphs(source, x, forward)
    sessions = {"forward": forward, **{k: session(r.model, threads=threads) for k, r in emitted.items()}}
    row = {}
    if with_onnx_ad:
        params = emitted["vjp_params"].params
        for key, wrt in (("x", []), ("params", params)):
            add_onnx_ad(row, graphs, sessions, lambda wrt=wrt: onnx_ad_reverse(source, x, u, wrt), threads,
                        key=f"onnx_ad_{key}")
            if f"onnx_ad_{key}" in sessions:  # onnx-ad's gradients, in its inputs' order, against jacgraph's
                theirs = dict(zip([x_name] + wrt, sessions[f"onnx_ad_{key}"].run(
                    None, graphs[f"onnx_ad_{key}"][1])[len(source.graph.output):]))
                compared = onnx_ad_compared(source, [x_name] + wrt)
                names = [emitted[f"vjp_{key}"].gradient_outputs[n] for n in compared]
                ours = list(run(sessions[f"vjp_{key}"], graphs[f"vjp_{key}"][1], names).values())
                row[f"onnx_ad_{key}_difference"] = relative_error(
                    np.concatenate([theirs[n][..., 0].ravel() for n in compared]),
                    np.concatenate([g.ravel() for g in ours]))
    med = time_calls({k: (lambda s=sessions[k], f=f: s.run(None, f)) for k, (_, f) in graphs.items()},
                     runs, clock=clock, warm=warm)
    sessions.clear()  # their memory (VGG-19: GBs) is not needed for what follows, the memory probes included
    if module is not None:
        xt, ut = torch.from_numpy(x), torch.from_numpy(u)

        def torch_x():  # the input gradient only
            _, pullback = torch.func.vjp(module, xt)
            pullback(ut)

        def torch_params():  # input and every parameter gradient
            xx = xt.clone().requires_grad_(True)
            module.zero_grad()
            module(xx).backward(ut)

        try:
            # PyTorch in its own loop: an onnxruntime call right after a PyTorch call runs measurably slower
            med.update(time_calls({"torch_x": torch_x, "torch_fwd_bwd": torch_params}, runs, clock=clock,
                                   warm=warm))
        except Exception as e:  # pylint: disable=broad-exception-caught  # recorded, as in bench_jvp
            row["torch_error"] = failure(e)
    row.update({f"{k}_ms": val for k, val in med.items()})
    row.update({f"{k}_ratio": val / med["forward"] for k, val in med.items() if k != "forward"})
    row.update(peer_ratios(row))
    if memory:
        add_peak_memory(row, graphs, {k: k for k in graphs}, threads)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--only", help="comma-separated architecture or light-zoo model names")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (use with --threads 1)")
    p.add_argument("--onnx-ad", action="store_true", help="also time onnx-ad 0.3's reverse-mode graphs")
    p.add_argument("--profile", action="store_true", help="per-op kernel times of each graph instead of timings")
    args = p.parse_args(argv)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else DEFAULT
    if args.profile:
        with tempfile.TemporaryDirectory() as folder:
            for name in names:
                print(f"\n{name}: per-op kernel time, median of {args.runs} runs, threads={args.threads}")
                print_profiles(*load(name, folder)[:2], args.threads, args.runs, args.onnx_ad)
        return
    from examples.bench_suite import ms_cell, notes_cell, ratio_cell  # '—' where a number is missing, and why

    ad = " onnx-ad x ms | onnx-ad params ms |" if args.onnx_ad else ""
    print("| model | forward ms | vjp (x_bar) ms | ratio | vjp --wrt params ms | ratio |" + ad
          + " PyTorch fwd+bwd ms | notes |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * (1 + 2 * args.onnx_ad) + "---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            t = bench_one(name, folder, args.threads, args.runs, clock, args.onnx_ad)
            ad_cells = [ms_cell(t, "onnx_ad_x_ms"), ms_cell(t, "onnx_ad_params_ms")] if args.onnx_ad else []
            cells = [name, ms_cell(t, "forward_ms"), ms_cell(t, "vjp_x_ms"), ratio_cell(t, "vjp_x_ratio"),
                     ms_cell(t, "vjp_params_ms"), ratio_cell(t, "vjp_params_ratio"), *ad_cells,
                     ms_cell(t, "torch_fwd_bwd_ms"), notes_cell(t)]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"threads={args.threads}, batch 1, median of {args.runs} interleaved runs, "
          f"{'thread CPU time' if args.cpu_time else 'wall clock'}")


if __name__ == "__main__":
    main()
