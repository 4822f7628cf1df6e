"""The JVP pass's `auto` strategy batches exactly the weight-bound linear ops, and computes the same JVP."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jacgraph import runtime
from jacgraph.passes import jvp


def dense_then_conv():
    """Gemm 1024 -> 256 (256K weights for 256 outputs: weight-bound), then a 3x3 conv 4 -> 8 on 8x8 (288 weights)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1024, 256)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "K"),
             numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "shape")]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["img"]),
             helper.make_node("Conv", ["img", "K"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_batches_the_weight_bound_gemm_not_the_small_conv():
    model = dense_then_conv()
    emitted = jvp.build(model, strategy="auto")
    ops = [n.op_type for n in emitted.graph.node]
    assert ops.count("Gemm") == 1 and ops.count("Conv") == 2  # one Gemm over concat(x, ẋ); conv twice
    assert {n.op_type for n in emitted.graph.node if "x" in n.input} >= {"Concat"}
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 1024)).astype(np.float32),
             "x_dot": rng.standard_normal((1, 1024)).astype(np.float32)}
    auto = runtime.run(emitted, feeds)
    twopass = runtime.run(jvp.build(model, strategy="twopass"), feeds)
    for name in ("y", "y_dot"):
        # float32 with another summation order (one Gemm call over 2 rows): ~1e-7 of the largest value per sum
        np.testing.assert_allclose(auto[name], twopass[name], rtol=0, atol=1e-5 * np.abs(twopass[name]).max())


def test_auto_batches_a_weight_bound_conv_only_for_stacked_tangents():
    """A 3x3 conv 128 -> 128 on 4x4 (147K weights, 72x its 2048 outputs) is weight-bound: auto batches it only for
    K stacked tangents (one tangent: its gates stay in NCHWc); --strategy batched always does."""
    model = _one_op("Conv", [1, 128, 4, 4], [128, 128, 3, 3], [1, 128, 4, 4])
    model.graph.node[0].attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1])])
    count = lambda m: [n.op_type for n in m.graph.node].count("Conv")  # noqa: E731
    assert count(jvp.build(model, strategy="auto")) == 2 and count(jvp.build(model, strategy="batched")) == 1
    assert count(jvp.build(model, strategy="auto", tangents=4)) == 1


def test_auto_is_the_default_and_recorded():
    emitted = jvp.build(dense_then_conv())
    assert {p.key: p.value for p in emitted.metadata_props}["jacgraph.strategy"] == "auto"
    onnx.checker.check_model(emitted, full_check=True)


def _one_op(op, x_shape, w_shape, y_shape):
    weights = numpy_helper.from_array(np.zeros(w_shape, np.float32), "W")
    graph = helper.make_graph([helper.make_node(op, ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_batches_dense_layers_from_16k_weights():
    """bert_wide's 128x128 MatMul over 5 tokens (16K weights, 25x its 640 outputs) is batched (its JVP measured
    2.13 -> 1.87 x forward); gpt2's 32x128 Gemm (4K weights) is not (batching it measured slower); a conv of 64K
    weights stays two-pass even for stacked tangents (conv threshold 128K)."""
    splits = lambda m: [n.op_type for n in m.graph.node].count("Split")  # noqa: E731
    assert splits(jvp.build(_one_op("MatMul", [1, 5, 128], [128, 128], [1, 5, 128]))) == 1
    assert splits(jvp.build(_one_op("MatMul", [1, 5, 127], [127, 128], [1, 5, 128]))) == 0  # just under 16K
    assert splits(jvp.build(_one_op("Gemm", [5, 32], [32, 128], [5, 128]))) == 0
    conv = _one_op("Conv", [1, 64, 2, 2], [64, 64, 4, 4], [1, 64, 2, 2])  # 64K weights, 256x its 256 outputs
    conv.graph.node[0].attribute.extend([helper.make_attribute("pads", [1, 1, 2, 2])])
    assert splits(jvp.build(conv, tangents=4)) == 0
