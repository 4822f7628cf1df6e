"""Print the control-flow check table of docs/control-flow.md: for each If/Loop/Scan model of
tests/test_control_flow.py, the JVP's relative error against float64 central differences and the VJP's
dot-product mismatch, both in onnxruntime (float64 CPU kernels).

    python examples/control_flow_checks.py
"""
import os
import sys

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


if __name__ == "__main__":
    print("| model | JVP vs central differences | VJP dot product | control flow in the VJP graph |")
    print("|---|---|---|---|")
    for name in NAMES:
        print(row(name))
