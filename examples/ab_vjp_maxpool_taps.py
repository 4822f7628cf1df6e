"""A/B of the input-gradient VJP with MaxPool's x̄ at the winners the JVP rule finds (new:
transpose._max_pool_by_positions) against the pool's Indices scatter (old), on light-zoo models, interleaved, with an
identical-graph control (a second session of the old graph), thread CPU time on one onnxruntime thread.

    python examples/ab_vjp_maxpool_taps.py [--only squeezenet,inception_v1] [--rounds 5] [--runs 20]

Per round the median ms of forward, old, old_control, new (interleaved in one loop); printed per model: each round's
new/old and old_control/old, their medians, and the largest |x̄_new - x̄_old| relative to max |x̄_old|.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_suite  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.rules import transpose  # noqa: E402
from jacgraph.runtime import session  # noqa: E402


def graphs(name):
    """(forward model, old VJP result, new VJP result, x)."""
    source, x = bench_suite.zoo_model(name)
    new = vjp.emit(source)
    with mock.patch.object(transpose, "_max_pool_without_indices", lambda b, node: False):
        old = vjp.emit(source)
    return source, old, new, x


def ab(name, rounds, runs):
    source, old, new, x = graphs(name)
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    forward = session(source, threads=1)
    y = forward.run(None, {x_name: x})[0]
    u = np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype)
    feeds = {x_name: x, new.cotangent_inputs[y_name]: u}
    sessions = {"forward": forward, "old": session(old.model, threads=1), "old_control": session(old.model, threads=1),
                "new": session(new.model, threads=1)}
    x_bar = {k: sessions[k].run([r.gradient_outputs[x_name]], feeds)[0] for k, r in (("old", old), ("new", new))}
    error = np.abs(x_bar["new"] - x_bar["old"]).max() / np.abs(x_bar["old"]).max()
    calls = {k: (lambda s=s, f=(feeds if k != "forward" else {x_name: x}): s.run(None, f)) for k, s in sessions.items()}
    meds = [time_calls(calls, runs, clock=time.thread_time) for _ in range(rounds)]
    pools = sum(n.op_type == "MaxPool" for n in source.graph.node)
    by_indices = sum(n.op_type == "MaxPool" and len(n.output) == 2 for n in new.model.graph.node)
    print(f"{name}: {pools} MaxPools, {pools - by_indices} without Indices in the new graph; "
          f"max |x̄_new - x̄_old| / max |x̄_old| = {error:.2e}")
    for m in meds:
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items())
              + f"  new/old {m['new'] / m['old']:.3f}  control/old {m['old_control'] / m['old']:.3f}")
    med = {k: float(np.median([m[k] for m in meds])) for k in meds[0]}
    print(f"  median of rounds: new/old {np.median([m['new'] / m['old'] for m in meds]):.3f}, control/old "
          f"{np.median([m['old_control'] / m['old'] for m in meds]):.3f}; VJP/forward old "
          f"{med['old'] / med['forward']:.2f}, new {med['new'] / med['forward']:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="squeezenet,inception_v1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    for name in args.only.split(","):
        ab(name, args.rounds, args.runs)


if __name__ == "__main__":
    main()
