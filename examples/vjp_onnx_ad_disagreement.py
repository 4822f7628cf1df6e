"""Where and why jacgraph's VJP and onnx-ad 0.3's reverse mode part on a zoo model (docs/vjp.md, last section).

    python examples/vjp_onnx_ad_disagreement.py statistics resnet50 --bn 30     (BatchNorm running mean/var)
    python examples/vjp_onnx_ad_disagreement.py cuts inception_v1 38 52 58 66   (input gradient per cut)
    python examples/vjp_onnx_ad_disagreement.py kink inception_v1 58 --pre 57   (the Relu unit that flips)

statistics: for BatchNormalization number --bn (in node order), the two largest entries of jacgraph's gradient of
its running mean and variance, onnx-ad's (exact zeros), and float64 central differences of <u, y> (reference
evaluator on a float64 copy) at steps 1e-3..1e-6: agreement across steps says no kink was crossed.
cuts: the source cut after node k (its output the model's output, u standard normal, seed 0); the relative
difference of the two input gradients, float32 onnxruntime CPU. The first cut that parts names the node.
kink: at cut k, both float32 input gradients against jacgraph's VJP graph run in float64, and for the Relu input
`--pre` (a node index) the unit nearest the kink in float64 with its value in each tool's own float32 graph.
Same zoo weights (seed 0) and x as examples/bench_suite.py, one thread.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import shape_inference

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_suite, bench_vjp  # noqa: E402
from jacgraph.passes import vjp  # noqa: E402
from jacgraph.runtime import run, session  # noqa: E402
from jacgraph.testing import reference_session, relative_error, run_reference, to_float64  # noqa: E402


def cut(source, k):
    """source up to node k, whose first output becomes the only output."""
    nodes, out = list(source.graph.node), source.graph.node[k].output[0]
    inferred = shape_inference.infer_shapes(source).graph
    typed = {v.name: v for v in [*inferred.value_info, *inferred.output]}  # a cut at the last node: the output
    needed, kept = {out}, []
    for node in reversed(nodes[:k + 1]):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    inits = [t for t in source.graph.initializer if t.name in needed]
    del model.graph.node[:], model.graph.output[:], model.graph.initializer[:]
    model.graph.node.extend(reversed(kept))
    model.graph.output.append(typed[out])
    model.graph.initializer.extend(inits)
    return model


def input_gradients(model, x):
    """(jacgraph's VJPResult, its feeds, jacgraph's x_bar, onnx-ad's graph, its feeds, onnx-ad's x_bar), float32."""
    x_name, y_name = model.graph.input[0].name, model.graph.output[0].name
    y = run(session(model, threads=1), {x_name: x})[y_name]
    u = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    r = vjp.emit(model)
    feeds = {x_name: x, r.cotangent_inputs[y_name]: u}
    ours = run(session(r.model, threads=1), feeds, [r.gradient_outputs[x_name]])[r.gradient_outputs[x_name]]
    ad, ad_feeds = bench_vjp.onnx_ad_reverse(model, x, u, [])
    return r, feeds, ours, ad, ad_feeds, session(ad, threads=1).run(None, ad_feeds)[1][..., 0]


def with_output(model, name):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def statistics(source, x, bn):
    graphs, emitted, u = bench_vjp.vjp_graphs(source, x, session(source, threads=1))
    r, x_name, y_name = emitted["vjp_params"], source.graph.input[0].name, source.graph.output[0].name
    node = [n for n in source.graph.node if n.op_type == "BatchNormalization"][bn]
    stats = list(node.input[3:5])
    ours = run(session(r.model, threads=1), graphs["vjp_params"][1], [r.gradient_outputs[p] for p in stats])
    ad, feeds = bench_vjp.onnx_ad_reverse(source, x, u, stats)
    theirs = session(ad, threads=1).run(None, feeds)[len(source.graph.output) + 1:]
    source64, values = bench_vjp.with_params_as_inputs(to_float64(source), stats)
    sess, base = reference_session(source64), {x_name: x.astype(np.float64), **values}

    def loss(p, c, h):
        shifted = values[p].copy()
        shifted.ravel()[c] += h
        return float(np.sum(u.astype(np.float64) * run_reference(sess, {**base, p: shifted})[y_name]))

    print(f"BatchNormalization #{bn} ({node.name or node.output[0]})")
    for p, theirs_p in zip(stats, theirs):
        g = ours[r.gradient_outputs[p]].ravel()
        for c in np.argsort(-np.abs(g))[:2]:
            cds = ", ".join(f"h={h:g}: {(loss(p, c, h) - loss(p, c, -h)) / (2 * h):.6g}"
                            for h in (1e-3, 1e-4, 1e-5, 1e-6))
            print(f"  {p}[{c}]: jacgraph {g[c]:.6g}, onnx-ad {theirs_p.ravel()[c]:.6g}, float64 CD {cds}", flush=True)


def kink(source, x, k, pre):
    model = cut(source, k)
    r, feeds, ours, ad, ad_feeds, theirs = input_gradients(model, x)
    x_name, g = model.graph.input[0].name, r.gradient_outputs[model.graph.input[0].name]
    exact = run_reference(reference_session(to_float64(r.model)), {n: v.astype(np.float64) for n, v in feeds.items()})[g]
    print(f"cut {k}: jacgraph float32 vs jacgraph float64 {relative_error(ours, exact):.3g}, onnx-ad float32 vs "
          f"jacgraph float64 {relative_error(theirs, exact):.3g}")
    z = source.graph.node[pre].output[0]
    z64 = run_reference(reference_session(to_float64(cut(source, pre))), {x_name: x.astype(np.float64)})[z]
    ours_z = session(with_output(r.model, z), threads=1).run([z], feeds)[0]
    theirs_z = session(with_output(ad, z), threads=1).run([z], ad_feeds)[0]
    unit = int(np.argmin(np.abs(z64)))
    print(f"{z}: {z64.size} units; nearest the kink {tuple(int(i) for i in np.unravel_index(unit, z64.shape))}: float64 {z64.ravel()[unit]:.4g}, "
          f"jacgraph's graph {ours_z.ravel()[unit]:.4g}, onnx-ad's graph {theirs_z.ravel()[unit]:.4g}; sign flips "
          f"against float64: jacgraph {int(np.sum((ours_z > 0) != (z64 > 0)))}, "
          f"onnx-ad {int(np.sum((theirs_z > 0) != (z64 > 0)))}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["statistics", "cuts", "kink"])
    p.add_argument("model", choices=list(bench_suite.ZOO))
    p.add_argument("nodes", nargs="*", type=int, help="cuts: node indices; kink: the one cut")
    p.add_argument("--bn", type=int, default=0, help="statistics: which BatchNormalization (node order)")
    p.add_argument("--pre", type=int, help="kink: the node whose output is the Relu input to examine")
    args = p.parse_args(argv)
    source, x = bench_suite.zoo_model(args.model)
    if args.what == "statistics":
        statistics(source, x, args.bn)
    elif args.what == "cuts":
        for k in args.nodes:
            node = source.graph.node[k]
            _, _, ours, _, _, theirs = input_gradients(cut(source, k), x)
            print(f"{k} {node.op_type} {node.output[0]}: {relative_error(theirs, ours):.3g}", flush=True)
    else:
        kink(source, x, args.nodes[0], args.pre)


if __name__ == "__main__":
    main()
