"""jacgraph.model.SourceModel's strict shape inference: the weights go to onnx's inference as typed inputs (the
lowering's helper), with the same inferred model byte for byte and the same error for shapes that do not fit."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_lowering import conv_resize_gemm

from jacgraph import lowering
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel


def test_strict_inference_never_gets_the_weights_and_infers_the_same(monkeypatch):
    """Old: SourceModel handed every initializer's values to onnx's strict inference (2.4 s of thread CPU on the
    zoo VGG-19); the shapes decided by small initializers (Resize scales, a Reshape target) are still read."""
    model = conv_resize_gemm()
    want = onnx.shape_inference.infer_shapes(lowering.prepare(model), strict_mode=True, data_prop=True)
    handed, infer = [], onnx.shape_inference.infer_shapes

    def recording(proto, *args, **kwargs):
        handed.append(max(int(np.prod(t.dims)) for t in proto.graph.initializer))
        return infer(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", recording)
    src = SourceModel(model)
    assert handed and max(handed) <= lowering.SHAPE_DATA_LIMIT, handed
    assert src.shape("y") == (1, 4)
    assert src.proto.SerializeToString(deterministic=True) == lowering.drop_shapeless(want).SerializeToString(
        deterministic=True)


def test_shapes_that_do_not_fit_are_still_one_clear_error():
    """A Gemm whose (weight, 3 x 80 > SHAPE_DATA_LIMIT elements) does not fit its input: strict inference fails on
    the weight's declared type as it did on its value."""
    w = numpy_helper.from_array(np.ones((3, 80), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    with pytest.raises(JacgraphError, match=r"ONNX shape inference failed on the model: \(op_type:Gemm"):
        SourceModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_readers_describe_the_node_list_the_passes_walk():
    """Old: the JVP rules kept who reads each value in a cache keyed on the SourceModel alone, so a node list
    replaced after the first lookup was never seen. The map is made again when the list it was made from changes."""
    from jacgraph.rules.jvp import sole_reader

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"]),
             helper.make_node("Abs", ["r"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "z")])
    src = SourceModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in src.readers("r")] == ["Neg", "Abs"] and src.readers("y") == [None]
    assert sole_reader(src, "r") is None
    src.nodes = [n for n in src.nodes if n.op_type != "Abs"]
    assert sole_reader(src, "r").op_type == "Neg"
    src.nodes.append(nodes[2])  # the same list, grown in place
    assert sole_reader(src, "r") is None
    src.outputs = src.outputs[:1]
    assert src.readers("z") == []
