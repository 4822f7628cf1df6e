"""Print the control-flow check table of docs/control-flow.md: for each If/Loop/Scan model of
tests/test_control_flow.py, the JVP's relative error against float64 central differences and the VJP's
dot-product mismatch, both in onnxruntime (float64 CPU kernels).

    python examples/control_flow_checks.py            # the check table
    python examples/control_flow_checks.py --bench    # timings of a recurrent Loop, its JVP and VJP
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_control_flow import (H, NAMES, Float64Session, central_difference, feeds_for, float_inputs,  # noqa: E402
                               props, relative_error, run_jvp, vjp)


def row(name):
    rng = np.random.default_rng(0)
    make, feeds = feeds_for(name, rng)
    m = make()
    xs = float_inputs(feeds)
    v = {x: rng.standard_normal(np.shape(feeds[x])) for x in xs}
    _, out, dot_out = run_jvp(m, feeds, v)
    fd = central_difference(Float64Session(m), feeds, v, H)
    jvp_error = max(relative_error(out[dot_out[y]], fd[y]) for y in fd)
    emitted = vjp.build(m, inputs=xs)
    p = props(emitted)
    bars, grads = dict(p["jacgraph.cotangent_inputs"]), dict(p["jacgraph.gradient_outputs"])
    u = {y: rng.standard_normal(np.shape(out[y])) for y in bars}
    got = Float64Session(emitted)({**feeds, **{bars[y]: u[y] for y in bars}})
    forward = sum(np.sum(out[dot_out[y]] * u[y]) for y in bars)
    reverse = sum(np.sum(v[x] * got[grads[x]]) for x in xs)
    ops = sorted({n.op_type for n in emitted.graph.node if n.op_type in ("If", "Loop", "Scan")})
    return f"| {name} | {jvp_error:.1e} | {abs(forward - reverse) / max(abs(forward), 1):.1e} | {', '.join(ops)} |"




def bench(steps=100, hidden=64, batch=16, runs=50):
    """Time a TorchScript-exported recurrent Loop (s <- tanh(s W + x), `steps` iterations) and its JVP and VJP
    graphs in onnxruntime (one thread, CPU time), beside PyTorch's eager forward, torch.func.jvp and
    forward + backward (one thread)."""
    import tempfile
    import warnings

    import onnx
    import torch

    from jacgraph import runtime
    from jacgraph.bench import time_calls
    from jacgraph.passes import jvp

    class Recurrence(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(hidden, hidden) / hidden ** 0.5)

        def forward(self, x, n: int):
            s = x
            for _ in range(n):
                s = torch.tanh(s @ self.w + x)
            return s

    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = Recurrence()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "loop.onnx")
        torch.onnx.export(torch.jit.script(module), (torch.randn(batch, hidden), steps), path, dynamo=False,
                          input_names=["x", "n"], output_names=["y"])
        model = onnx.load(path)
    forward, tangent, reverse = model, jvp.build(model, inputs=["x"]), vjp.build(model, inputs=["x"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    n = np.array(steps, np.int64)
    feeds = {"x": x, "n": n}
    sessions = {name: runtime.session(m, threads=1) for name, m in
                (("forward", forward), ("jvp", tangent), ("vjp", reverse))}
    extra = {"forward": {}, "jvp": {added_input(tangent): x}, "vjp": {added_input(reverse): x}}
    xt, v = torch.tensor(x, requires_grad=True), torch.tensor(x)
    calls = {name: (lambda s=s, name=name: s.run(None, {**feeds, **extra[name]})) for name, s in sessions.items()}
    calls["torch forward"] = lambda: module(xt, steps)
    calls["torch.func.jvp"] = lambda: torch.func.jvp(lambda t: module(t, steps), (xt,), (v,))
    calls["torch forward+backward"] = lambda: torch.autograd.grad(module(xt, steps), xt, v)
    ms = time_calls(calls, runs, clock=time.thread_time)
    print(f"recurrent Loop: {steps} steps, hidden {hidden}, batch {batch}; median ms of {runs} runs (CPU time, 1 thread)")
    print("| graph | jacgraph (onnxruntime) | ratio to forward | PyTorch eager | ratio to forward |")
    print("|---|---|---|---|---|")
    for ours, theirs in (("forward", "torch forward"), ("jvp", "torch.func.jvp"), ("vjp", "torch forward+backward")):
        print(f"| {ours} | {ms[ours]:.2f} | {ms[ours] / ms['forward']:.2f} | {ms[theirs]:.2f} | "
              f"{ms[theirs] / ms['torch forward']:.2f} |")


def added_input(model):
    """The name of the emitted graph's (first) tangent or cotangent input."""
    pairs = props(model).get("jacgraph.tangent_inputs") or props(model)["jacgraph.cotangent_inputs"]
    return pairs[0][1]


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench()
    else:
        print("| model | JVP vs central differences | VJP dot product | control flow in the VJP graph |")
        print("|---|---|---|---|")
        for case in NAMES:
            print(row(case))
