"""Where jacgraph's and onnx-ad's zoo gradients differ (bench_suite --mode vjp notes), which one is right.

    python examples/vjp_zoo_checks.py inception_v1 shufflenet            (input gradient)
    python examples/vjp_zoo_checks.py --params resnet50                  (all-parameter gradient)
    python examples/vjp_zoo_checks.py --pools squeezenet                 (its MaxPools, with and without Indices)

Input gradient: d = g_jacgraph - g_onnx_ad (both float32, onnxruntime CPU), normalised. The true <J^T u, d> is
<u, J d>, here float64 central differences of the source (reference evaluator on a float64 copy) at two steps;
printed beside <g, d> of each float32 gradient, of jacgraph's VJP graph run in float64, and of jacgraph's graph
run in float32 with onnxruntime's graph optimizations off and with only ConvBNFusion off.
--params: the relative difference of the two all-parameter gradients grouped by how the parameter is used
(op type and input index), with the number of tensors onnx-ad returns as exactly zero.
--pools: thread CPU time of each MaxPool of the model alone, fed its activations at x, with and without the
Indices output (the VJP graph reads Indices), 30 interleaved runs, one thread.
Same models, weights (seed 0) and cotangent u (seed 0) as examples/bench_suite.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import time

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import bench_suite, bench_vjp  # noqa: E402
from jacgraph import runtime  # noqa: E402
from jacgraph.bench import time_calls  # noqa: E402
from jacgraph.reference import reference_session, run_reference  # noqa: E402
from jacgraph.testing import central_difference, to_float64  # noqa: E402


def gradients(name, params):
    """(model, feeds, VJPResult, {input or param: jacgraph's gradient}, {same: onnx-ad's}) in float32."""
    model, x = bench_suite.zoo_model(name)
    graphs, emitted, u = bench_vjp.vjp_graphs(model, x, runtime.session(model))
    key = "vjp_params" if params else "vjp_x"
    result, feeds = emitted[key], graphs[key][1]
    wrt = list(result.params) if params else []
    names = [model.graph.input[0].name] + wrt
    ours = runtime.run(result.model, feeds, [result.gradient_outputs[n] for n in names])
    ad, ad_feeds = bench_vjp.onnx_ad_reverse(model, x, u, wrt)
    theirs = runtime.session(ad).run(None, ad_feeds)[len(model.graph.output):]
    return (model, feeds, result, {n: ours[result.gradient_outputs[n]] for n in names},
            {n: g[..., 0] for n, g in zip(names, theirs)})


def ort_float32(model, feeds, output, disabled=None, level=onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level, options.intra_op_num_threads = level, 1
    sess = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=disabled or [])
    return sess.run([output], feeds)[0]


def check_input_gradient(name):
    model, feeds, result, ours, theirs = gradients(name, params=False)
    x_name, y_name = model.graph.input[0].name, model.graph.output[0].name
    g_j, g_o = ours[x_name], theirs[x_name]
    d = (g_j - g_o).astype(np.float64)
    print(f"{name}: input gradients differ by {np.linalg.norm(d) / np.linalg.norm(g_j):.2e} (relative)")
    d /= np.linalg.norm(d)
    source64 = reference_session(to_float64(model))
    u = feeds[result.cotangent_inputs[y_name]].astype(np.float64)
    for h in (1e-6, 1e-7):
        cd = central_difference(source64, {x_name: feeds[x_name].astype(np.float64)}, {x_name: d}, h)[y_name]
        print(f"  true <u, J d>, float64 central difference h={h:g}: {np.sum(u * cd):.6e}")
    dot = lambda g: f"{float(np.sum(g * d)):.6e}"  # noqa: E731
    graph64 = run_reference(reference_session(to_float64(result.model)),
                            {k: v.astype(np.float64) for k, v in feeds.items()})[result.gradient_outputs[x_name]]
    print(f"  <g, d>: jacgraph float32 {dot(g_j)}, onnx-ad float32 {dot(g_o)}, jacgraph's graph in float64 "
          f"{dot(graph64)}")
    off = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    for label, run_kw in (("optimizations off", {"level": off}), ("ConvBNFusion off", {"disabled": ["ConvBNFusion"]})):
        g = ort_float32(result.model, feeds, result.gradient_outputs[x_name], **run_kw)
        print(f"  jacgraph float32, {label}: <g, d> {dot(g)}, differs from its float64 run by "
              f"{np.linalg.norm(g - graph64) / np.linalg.norm(graph64):.2e}")


def check_parameter_gradient(name):
    model, _, _, ours, theirs = gradients(name, params=True)
    use = {}
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            use.setdefault(inp, f"{node.op_type} input {i}")
    groups = {}  # use -> [squared difference, squared norm, tensors, all-zero in onnx-ad]
    for param, g_j in ours.items():
        g = groups.setdefault(use.get(param, "?"), [0.0, 0.0, 0, 0])
        g[0] += float(np.sum((g_j - theirs[param]) ** 2.0))
        g[1] += float(np.sum(g_j.astype(np.float64) ** 2))
        g[2] += 1
        g[3] += int(not np.any(theirs[param]))
    print(f"{name}: all-parameter gradients, relative difference by use of the parameter")
    for key, (diff, norm, count, zeros) in sorted(groups.items()):
        print(f"  {key:32s} {np.sqrt(diff / max(norm, 1e-60)):.2e}  ({count} tensors, {zeros} all zero in onnx-ad)")


def time_pools(name):
    model, x = bench_suite.zoo_model(name)
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None) for n in pools)
    inputs = runtime.run(probe, {model.graph.input[0].name: x}, [n.input[0] for n in pools])
    calls = {}
    for i, pool in enumerate(pools):
        a = inputs[pool.input[0]]
        for outputs in (["y"], ["y", "indices"]):
            node = helper.make_node("MaxPool", ["x"], outputs, **{at.name: helper.get_attribute_value(at)
                                                                   for at in pool.attribute})
            graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, a.shape)],
                                      [helper.make_tensor_value_info(o, t, None) for o, t in
                                       zip(outputs, (TensorProto.FLOAT, TensorProto.INT64))])
            sess = runtime.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads=1)
            label = f"pool {i} {'x'.join(map(str, a.shape[1:]))} {'with Indices' if len(outputs) == 2 else 'plain'}"
            calls[label] = lambda sess=sess, a=a: sess.run(None, {"x": a})
    for label, ms in time_calls(calls, 30, clock=time.thread_time).items():
        print(f"{name} {label}: {ms:.3f} ms thread CPU time")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", choices=list(bench_suite.ZOO))
    p.add_argument("--params", action="store_true", help="the all-parameter gradient instead of the input's")
    p.add_argument("--pools", action="store_true", help="time the model's MaxPools with and without Indices")
    args = p.parse_args(argv)
    check = time_pools if args.pools else check_parameter_gradient if args.params else check_input_gradient
    for name in args.models:
        check(name)


if __name__ == "__main__":
    main()
