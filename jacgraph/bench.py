"""`jacgraph bench`: the emitted graph against the forward model, side by side in one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

from . import compile as compile_model
from .errors import JacgraphError
from .model import SourceModel, load
from .runtime import session
from .testing import random_feeds

# Peak memory is measured in a fresh process per model: onnxruntime's arena never shrinks, so
# two sessions in one process would hide each other's peak. On Linux the probe resets its own
# high-water mark after the session is built (/proc/self/clear_refs), since building a session
# peaks higher than running it, and reads VmHWM, the peak of its own address space (ru_maxrss
# survives fork and exec, so a child reports its parent's peak); elsewhere it falls back to ru_maxrss.
_MEMORY_PROBE = r"""
import json, resource, sys, numpy as np
from jacgraph.runtime import session

def status_kb(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])

path, feeds_path, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feeds = dict(np.load(feeds_path))
sess = session(path, threads=threads or None)
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    loaded, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(runs):
    sess.run(None, feeds)
print(json.dumps({"loaded_kb": loaded, "peak_kb": peak()}))
"""


def feeds_for(model: onnx.ModelProto, seed=0) -> dict:
    src = SourceModel(model)
    rng = np.random.default_rng(seed)
    return {k: v.astype(src.np_dtype(k)) if src.is_float(k) else v for k, v in random_feeds(src, rng).items()}


def time_calls(calls: dict, runs: int, warmup: int = 3, clock=time.perf_counter, warm: bool = False) -> dict:
    """Median milliseconds of each zero-argument call, runs interleaved so machine noise hits all alike.

    clock=time.thread_time counts only this thread's CPU time: on a shared machine that leaves out the
    time other processes hold the core, valid when every call runs in the calling thread (onnxruntime
    and PyTorch with one intra-op thread).

    warm=True runs each call once more, untimed, just before its timed run, so each is timed with its own
    data in cache: interleaved, a call is otherwise timed right after its neighbour, and a neighbour that
    streams through tens of MB evicts it (an mlp forward: 0.023 ms after a no-op, 0.23 ms after 64 MB)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {k: [] for k in calls}
    for _ in range(runs):
        for k, call in calls.items():
            if warm:
                call()
            t0 = clock()
            call()
            times[k].append(clock() - t0)
    return {k: float(np.median(t)) * 1e3 for k, t in times.items()}


def time_interleaved(sessions: list, feeds: list, runs: int, warmup: int = 5, clock=time.perf_counter) -> list:
    """Median seconds per run of each session, interleaved (see time_calls)."""
    calls = {i: (lambda s=s, f=f: s.run(None, f)) for i, (s, f) in enumerate(zip(sessions, feeds))}
    ms = time_calls(calls, runs, warmup, clock)
    return [ms[i] / 1e3 for i in range(len(sessions))]


def peak_memory(model: onnx.ModelProto, feeds: dict, threads: int, runs: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, feeds_path = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "feeds.npz")
        onnx.save(model, path)
        np.savez(feeds_path, **feeds)
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, feeds_path, str(threads), str(runs)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def profile(model: onnx.ModelProto, feeds: dict, threads: int, runs: int = 10, warmup: int = 3) -> dict:
    """Per-op-type kernel time of one run, from onnxruntime's profiler: {op_type: {"ms", "nodes"}}.

    The trace (SessionOptions.enable_profiling) holds one event per kernel call and one `model_run`
    event per run; kernels of the warm-up runs are left out, and each kernel's median over `runs` is
    summed per op type (durations are wall-clock: the median drops runs another process preempted).
    Op types are those of the graph onnxruntime runs (fused Conv, NCHWc ReorderInput/ReorderOutput).
    """
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, threads=threads or None, profile_prefix=os.path.join(tmp, "trace"))
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted_from = run_starts[warmup] if len(run_starts) > warmup else 0
    durations, op_of = {}, {}  # kernel name -> its durations over the runs (us)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < counted_from:
            continue
        durations.setdefault(e["name"], []).append(e["dur"])
        op_of[e["name"]] = e["args"].get("op_name", "?")
    totals, nodes = {}, {}
    for name, durs in durations.items():  # the median per kernel: a run preempted by another process is left out
        totals[op_of[name]] = totals.get(op_of[name], 0.0) + float(np.median(durs)) / 1e3
        nodes[op_of[name]] = nodes.get(op_of[name], 0) + 1
    return {op: {"ms": ms, "nodes": nodes[op]} for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def format_profile(forward: dict, emitted: dict, emit: str = "jvp", others: dict | None = None) -> str:
    """Per-op profiles side by side (forward, the emitted graph, then `others`: {column name: profile}, e.g. the
    same graph before a change), the costliest op types first; the last line is each graph's kernel time beyond
    twice the forward's (the JVP's FLOP floor is about one extra forward)."""
    columns = {"forward": forward, emit: emitted, **(others or {})}
    ops = sorted(set().union(*columns.values()), key=lambda op: -max(p.get(op, {}).get("ms", 0)
                                                                     for p in columns.values()))
    cell = lambda p, op: (f"{p[op]['ms']:9.3f} ms {p[op]['nodes']:4d}" if op in p else f"{'-':>17s}")  # noqa: E731
    total = lambda p: sum(v["ms"] for v in p.values())  # noqa: E731
    lines = [f"  {'op type (as onnxruntime runs it)':34s} " + "   ".join(f"{c + ' ms, nodes':>17s}" for c in columns)]
    lines += [f"  {op:34s} " + "   ".join(cell(p, op) for p in columns.values()) for op in ops]
    lines.append(f"  {'kernel total':34s} " + "   ".join(f"{total(p):9.3f} ms {'':4s}" for p in columns.values()))
    beyond = [f"{'':17s}"] + [f"{total(p) - 2 * total(forward):9.3f} ms {'':4s}" for p in list(columns.values())[1:]]
    lines.append(f"  {'beyond 2 x forward':34s} " + "   ".join(beyond))
    return "\n".join(line.rstrip() for line in lines)


def _check_counts(**counts):
    """Each (value, least) pair an integer >= least (None allowed for tangents): `runs=0` would time nothing."""
    for name, (value, least) in counts.items():
        if value is None and name == "tangents":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise JacgraphError(f"bench: {name}={value!r} is not an integer >= {least}; give one, e.g. "
                                f"{name}={max(least, 1)}.")


def bench(model_path, emit="jvp", runs=50, threads=0, tangents=None, strategy=None, memory=True,
          profile_runs=0) -> dict:
    _check_counts(runs=(runs, 1), threads=(threads, 0), tangents=(tangents, 1), profile_runs=(profile_runs, 0))
    model = load(model_path)
    options = {"tangents": tangents}
    if strategy:
        options["strategy"] = strategy
    emitted = compile_model(model, emit=emit, **options)
    props = {p.key: p.value for p in emitted.metadata_props}
    fwd_feeds = feeds_for(model)
    rng = np.random.default_rng(1)
    jvp_feeds = dict(fwd_feeds)
    for x, x_dot in json.loads(props["jacgraph.tangent_inputs"]):
        shape = ((tangents,) if tangents else ()) + fwd_feeds[x].shape
        jvp_feeds[x_dot] = rng.standard_normal(shape).astype(fwd_feeds[x].dtype)
    fwd_sess, emitted_sess = session(model, threads=threads or None), session(emitted, threads=threads or None)
    # one thread: every kernel runs in the calling thread, so its CPU time is the run's cost without the time
    # other processes hold the core (on a shared machine the wall clock of a 2 ms run was measured at 20-37 ms)
    clock = time.thread_time if threads == 1 else time.perf_counter
    t_fwd, t_emit = time_interleaved([fwd_sess, emitted_sess], [fwd_feeds, jvp_feeds], runs, clock=clock)
    result = {"strategy": props.get("jacgraph.strategy"), "tangents": tangents or 1, "threads": threads or "default",
              "clock": "thread CPU time" if threads == 1 else "wall clock", "runs": runs,
              "forward_ms": 1e3 * t_fwd, "emitted_ms": 1e3 * t_emit, "ratio": t_emit / t_fwd}
    if memory:
        fwd_mem, emit_mem = peak_memory(model, fwd_feeds, threads), peak_memory(emitted, jvp_feeds, threads)
        result.update({
            "forward_peak_mb": fwd_mem["peak_kb"] / 1024, "emitted_peak_mb": emit_mem["peak_kb"] / 1024,
            "memory_ratio": emit_mem["peak_kb"] / fwd_mem["peak_kb"],
            "forward_growth_mb": (fwd_mem["peak_kb"] - fwd_mem["loaded_kb"]) / 1024,
            "emitted_growth_mb": (emit_mem["peak_kb"] - emit_mem["loaded_kb"]) / 1024,
        })
    if profile_runs:
        result["profile"] = {"forward": profile(model, fwd_feeds, threads, profile_runs),
                             "emitted": profile(emitted, jvp_feeds, threads, profile_runs)}
    return result
