"""jacgraph.lowering: ops without a native rule expanded into their ONNX function bodies, model-local
functions inlined; forward against onnxruntime's kernels, derivatives against float64 central differences."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jacgraph
from jacgraph import lowering, runtime
from jacgraph.model import SourceModel
from jacgraph.testing import check_jvp, relative_error, to_float64

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
# float32 forward, expanded body vs onnxruntime's fused kernel: different op order, each op rounds
# (~1e-7 relative); measured worst 3e-7, and a wrong body (missing scale, wrong axis) is off by >1e-2.
FORWARD_TOL = 1e-5
# float64 JVP vs central differences (h=1e-6: truncation ~1e-12, round-off ~1e-10): measured <= 1e-9.
FD_TOL = 1e-7


def one_node(op, inputs, opset, **attrs):
    """A model of one `op` node; inputs are (name, shape[, elem_type])."""
    node = helper.make_node(op, [i[0] for i in inputs], ["y"], **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(i[0], i[2] if len(i) > 2 else F32, i[1])
                                           for i in inputs], [helper.make_tensor_value_info("y", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = runtime.max_ir_version()
    return model


FUNCTION_OPS = {
    "Attention": one_node("Attention", [("q", [2, 3, 4, 8]), ("k", [2, 3, 5, 8]), ("v", [2, 3, 5, 8])], 23),
    "Attention-causal": one_node("Attention", [("q", [2, 3, 4, 8]), ("k", [2, 3, 4, 8]), ("v", [2, 3, 4, 8])], 23,
                                 is_causal=1),
    "RMSNormalization": one_node("RMSNormalization", [("x", [2, 3, 4]), ("scale", [4])], 23),
    "GroupNormalization": one_node("GroupNormalization", [("x", [2, 4, 3, 3]), ("scale", [4]), ("bias", [4])], 21,
                                   num_groups=2),
    "RotaryEmbedding": one_node("RotaryEmbedding", [("x", [2, 3, 4, 8]), ("cos", [10, 4]), ("sin", [10, 4]),
                                                    ("positions", [2, 4], I64)], 23),
    "MeanVarianceNormalization": one_node("MeanVarianceNormalization", [("x", [2, 4, 3, 3])], 13),
    "SoftmaxCrossEntropyLoss": one_node("SoftmaxCrossEntropyLoss", [("x", [3, 5]), ("target", [3], I64)], 13,
                                        reduction="mean"),
    "NegativeLogLikelihoodLoss": one_node("NegativeLogLikelihoodLoss", [("x", [3, 5]), ("target", [3], I64)], 13,
                                          reduction="sum"),
    "ReduceL2": one_node("ReduceL2", [("x", [3, 5])], 18, keepdims=0),
    "ReduceLogSumExp": one_node("ReduceLogSumExp", [("x", [3, 5])], 18),
}


def feeds_for(model, rng, dtype=np.float32):
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == I64:  # class targets / rotary positions: valid indices
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


@pytest.mark.parametrize("name", list(FUNCTION_OPS))
def test_function_op_expands_and_differentiates(name):
    model = FUNCTION_OPS[name]
    op = model.graph.node[0].op_type
    src = SourceModel(model, native=lowering.native_ops() - {op})  # expanded even once the op gets a native rule
    ops = {n.op_type for n in src.nodes}
    assert op not in ops and "NegativeLogLikelihoodLoss" not in ops, f"{op} was not expanded (nested bodies too)"
    rng = np.random.default_rng(0)
    feeds = feeds_for(model, rng)
    expected = runtime.run(runtime.session(model), feeds)["y"]
    assert relative_error(runtime.run(runtime.session(src.proto), feeds)["y"], expected) < FORWARD_TOL
    # the emitted graphs of the float32 source load in onnxruntime (Builder.build ran the full checker)
    for emit in ("jvp", "vjp"):
        runtime.session(jacgraph.compile(model, emit=emit))
    # derivatives in float64: bodies cast to float32 internally (stash_type, softmax_precision), so the
    # float64 copy is made after expansion, where those casts become float64 too
    m64 = to_float64(src.proto)
    feeds64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    directions = {k: rng.standard_normal(v.shape) for k, v in feeds64.items() if v.dtype == np.float64}
    errors = check_jvp(m64, jacgraph.compile(m64, emit="jvp"), feeds64, directions)
    assert max(errors.values()) < FD_TOL, errors
    jvp_out = runtime.run(runtime.session(jacgraph.compile(m64, emit="jvp")),
                          {**feeds64, **{f"{k}_dot": v for k, v in directions.items()}})
    u = rng.standard_normal(np.shape(jvp_out["y"]))
    grads = runtime.run(runtime.session(jacgraph.compile(m64, emit="vjp")), {**feeds64, "y_bar": u})
    forward, reverse = np.vdot(jvp_out["y_dot"], u), sum(np.vdot(directions[k], grads[f"{k}_bar"]) for k in directions)
    assert abs(forward - reverse) <= 1e-10 * max(1.0, abs(forward)), "VJP fails the dot-product test"


def mlp_with(*activations, opset=18):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    nodes, x = [helper.make_node("MatMul", ["x", "W"], ["a0"])], "a0"
    for i, act in enumerate(activations):
        out = "y" if i == len(activations) - 1 else f"a{i + 1}"
        nodes.append(helper.make_node(act, [x], [out]))
        x = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F32, ["N", 4])],
                              [helper.make_tensor_value_info("y", F32, ["N", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_native_rules_win_and_cpa_survives_expansion():
    model = mlp_with("Relu", "HardSigmoid")
    assert [n.op_type for n in SourceModel(model).nodes] == ["MatMul", "Relu", "HardSigmoid"]
    # without native rules for them, both expand into Max/Mul/Add/Min (their CastLike constants folded):
    # still continuous piecewise-affine, and the dynamic batch axis stays dynamic
    expanded = SourceModel(model, native=lowering.native_ops() - {"Relu", "HardSigmoid"})
    assert {n.op_type for n in expanded.nodes} <= {"MatMul", "Max", "Min", "Mul", "Add", "Constant"}
    assert expanded.is_cpa and expanded.shape("y") == ("N", 3)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    assert np.array_equal(runtime.run(runtime.session(expanded.proto), {"x": x})["y"],
                          runtime.run(runtime.session(model), {"x": x})["y"])


def test_model_local_functions_are_inlined():
    # a local function calling another one, with an attribute reference, as torch's dynamo exporter writes
    inner = helper.make_function("local", "scaled_tanh", ["t"], ["u"], [
        helper.make_node("Constant", [], ["s"], value_float=0.0, name="c"),
        helper.make_node("Tanh", ["t"], ["th"]),
        helper.make_node("Mul", ["th", "s"], ["u"])],
        opset_imports=[helper.make_opsetid("", 18)])
    inner.node[0].ClearField("attribute")
    inner.node[0].attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    inner.attribute_proto.append(helper.make_attribute("value_float", 0.5))
    outer = helper.make_function("local", "block", ["a"], ["b"], [
        helper.make_node("scaled_tanh", ["a"], ["h"], domain="local"),
        helper.make_node("Sigmoid", ["h"], ["b"])],
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    graph = helper.make_graph([helper.make_node("block", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", F32, [2, 3])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])])
    model = helper.make_model(graph, functions=[inner, outer],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    model.ir_version = runtime.max_ir_version()
    src = SourceModel(model)
    assert all(n.domain in ("", "ai.onnx") for n in src.nodes) and not src.proto.functions
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3))
    expected = runtime.run(runtime.session(model), {"x": x.astype(np.float32)})["y"]  # onnxruntime runs the calls
    got = runtime.run(runtime.session(src.proto), {"x": x.astype(np.float32)})["y"]
    assert relative_error(got, expected) < FORWARD_TOL
    m64 = to_float64(src.proto)  # onnx's reference evaluator cannot run attribute references with defaults
    errors = check_jvp(m64, jacgraph.compile(m64, emit="jvp"), {"x": x}, {"x": rng.standard_normal((2, 3))})
    assert errors["y"] < FD_TOL


def test_plain_model_is_left_alone():
    model = mlp_with("Relu")
    assert lowering.prepare(model) is model


def test_attention_with_a_skipped_optional_input_and_a_kv_cache():
    """Inputs Q, K, V, '' (no mask), past_key, past_value; outputs Y, present_key, present_value: the body is
    built for this node's inputs (onnx's schema inliner cannot type the skipped one)."""
    shapes = {"q": [2, 3, 4, 8], "k": [2, 3, 2, 8], "v": [2, 3, 2, 8],
              "past_key": [2, 3, 5, 8], "past_value": [2, 3, 5, 8]}
    node = helper.make_node("Attention", ["q", "k", "v", "", "past_key", "past_value"],
                            ["y", "present_key", "present_value"], is_causal=1)
    graph = helper.make_graph([node], "attention_cache",
                              [helper.make_tensor_value_info(n, F32, s) for n, s in shapes.items()],
                              [helper.make_tensor_value_info(n, F32, None) for n in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = runtime.max_ir_version()
    src = SourceModel(model, native=lowering.native_ops() - {"Attention"})
    assert "Attention" not in {n.op_type for n in src.nodes}
    rng = np.random.default_rng(0)
    feeds = feeds_for(model, rng)
    expected, got = runtime.run(runtime.session(model), feeds), runtime.run(runtime.session(src.proto), feeds)
    assert all(relative_error(got[k], v) < FORWARD_TOL for k, v in expected.items())
    m64 = to_float64(src.proto)
    feeds64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    directions = {k: rng.standard_normal(v.shape) for k, v in feeds64.items()}
    errors = check_jvp(m64, jacgraph.compile(m64, emit="jvp"), feeds64, directions)
    assert max(errors.values()) < FD_TOL, errors


def test_layer_norm_with_mean_and_inv_std_outputs_expands():
    """LayerNormalization keeps its native rule for Y alone; with Mean/InvStdDev used (NATIVE_GAPS) it is expanded,
    and all three outputs get checked derivatives."""
    rng = np.random.default_rng(0)
    bias = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "bias")

    def model(outputs):
        node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], outputs, axis=1)
        graph = helper.make_graph([node], "ln", [helper.make_tensor_value_info("x", F32, [2, 3, 4]),
                                                 helper.make_tensor_value_info("scale", F32, [3, 4])],
                                  [helper.make_tensor_value_info(o, F32, None) for o in outputs], [bias])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = runtime.max_ir_version()
        return m

    assert [n.op_type for n in SourceModel(model(["y"])).nodes] == ["LayerNormalization"]
    full = model(["y", "mean", "inv_std"])
    src = SourceModel(full)
    assert "LayerNormalization" not in {n.op_type for n in src.nodes}
    feeds = feeds_for(full, rng)
    expected, got = runtime.run(runtime.session(full), feeds), runtime.run(runtime.session(src.proto), feeds)
    assert all(relative_error(got[k], v) < FORWARD_TOL for k, v in expected.items())
    m64 = to_float64(src.proto)
    feeds64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    directions = {k: rng.standard_normal(v.shape) for k, v in feeds64.items()}
    errors = check_jvp(m64, jacgraph.compile(m64, emit="jvp"), feeds64, directions)
    assert set(errors) == {"y", "mean", "inv_std"} and max(errors.values()) < FD_TOL, errors


def conv_resize_gemm():
    """Conv (216 weights) -> Resize by float scales -> Reshape to [1, -1] -> Gemm (2048 weights): weights above
    SHAPE_DATA_LIMIT elements, and the small initializers whose values decide shapes (scales, the Reshape target)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
             numpy_helper.from_array(rng.standard_normal((8 * 12 * 12, 4)).astype(np.float32) / 30, "B")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[0, 0, 0, 0]),
             helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Reshape", ["r", "flat"], ["f"]), helper.make_node("Gemm", ["f", "B"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_inference_never_gets_the_weights_and_is_skipped_when_every_value_is_typed(monkeypatch):
    """lowering's shape inference sees the weights (initializers over SHAPE_DATA_LIMIT elements) as typed inputs,
    not their values, with the same result byte for byte; prepare runs no inference on a model whose values are all
    typed already (it hands the model back)."""
    model = conv_resize_gemm()
    full = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert [d.dim_value for d in full.graph.output[0].type.tensor_type.shape.dim] == [1, 4]  # scales, flat read
    handed = []
    infer = onnx.shape_inference.infer_shapes

    def recording(proto, *args, **kwargs):
        handed.append(max(int(np.prod(t.dims)) for t in proto.graph.initializer))
        return infer(proto, *args, **kwargs)

    monkeypatch.setattr(lowering.shape_inference, "infer_shapes", recording)
    ours = lowering.with_inferred_types(model)
    assert handed == [4] and ours.SerializeToString(deterministic=True) == full.SerializeToString(deterministic=True)
    assert lowering.prepare(full) is full and handed == [4]  # no second inference
    assert lowering.unknown_rank_values(model) and lowering.prepare(model) is model and handed == [4, 4]
