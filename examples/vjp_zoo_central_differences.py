"""The all-parameter VJP of onnx light-zoo models (random weights, examples/bench_suite.zoo_model) against float64
central differences, for the weights of their grouped Convs (the gradients onnx-ad 0.3 refuses).

For each chosen weight W and a random direction v: <(f(W + hv) - f(W - hv)) / 2h, u> against <v, W̄>, both in float64
(onnx's reference evaluator on float64 copies), at h = 1e-5, 1e-7 and 1e-9. Random-weight CNNs have many units near a
ReLU kink or a max-pool tie, so a large h crosses kinks (errors of 1e-2) and a tiny one meets round-off: the
agreement at the best h is what to read.

    python examples/vjp_zoo_central_differences.py --models alexnet,shufflenet --weights 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_suite, bench_vjp  # noqa: E402
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.testing import central_difference, reference_session, run_reference, to_float64  # noqa: E402


def grouped_conv_weights(model):
    return sorted({n.input[1] for n in model.graph.node
                   if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)})


def check(name, n_weights, steps=(1e-5, 1e-7, 1e-9)):
    source, x = bench_suite.zoo_model(name)
    chosen = grouped_conv_weights(source)[:n_weights]
    result = vjp.emit(source, wrt="params")
    x_name, y_name = source.graph.input[0].name, source.graph.output[0].name
    (u_name,) = dict(result.cotangent_inputs).values()
    grads = dict(result.gradient_outputs)
    source64 = to_float64(source)
    feeds = {x_name: x.astype(np.float64)}
    rng = np.random.default_rng(0)
    u = rng.standard_normal(run_reference(reference_session(source64), feeds)[y_name].shape)
    out = run_reference(reference_session(to_float64(result.model)), {**feeds, u_name: u})
    opened_model, values = bench_vjp.with_params_as_inputs(source64, chosen)  # central differences move them
    opened = reference_session(opened_model)
    rows = []
    for w in chosen:
        v = rng.standard_normal(values[w].shape)
        ours = float(np.vdot(v, out[grads[w]]))
        errors = [abs(float(np.vdot(central_difference(opened, {**feeds, **values}, {w: v}, h)[y_name], u)) - ours)
                  / abs(ours) for h in steps]
        rows.append((name, w, values[w].shape, ours, errors))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="alexnet,shufflenet")
    p.add_argument("--weights", type=int, default=3, help="grouped Conv weights checked per model")
    args = p.parse_args(argv)
    print("| model | weight | shape | <v, W̄> | relative error at h = 1e-5, 1e-7, 1e-9 |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        t0 = time.thread_time()
        for model, w, shape, ours, errors in check(name, args.weights):
            print(f"| {model} | {w} | {list(shape)} | {ours:.6g} | {', '.join(f'{e:.1e}' for e in errors)} |")
        print(f"({name}: {time.thread_time() - t0:.1f} CPU-s)", file=sys.stderr)


if __name__ == "__main__":
    main()
