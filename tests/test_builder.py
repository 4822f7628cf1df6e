"""jacgraph/builder.py: the one object that emits nodes. Here: taking back a source node's copy (a rule that
computes the node's outputs itself, as the LRN JVP rule does) leaves no trace of the copy."""
import pytest
from onnx import TensorProto, helper

from jacgraph.builder import Builder
from jacgraph.model import SourceModel


def test_remove_copy_takes_back_the_copy_and_only_it():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    src = SourceModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    b = Builder(src)
    before = b.Neg("x")
    source_node = src.graph.node[0]
    copy = b.copy(source_node)
    after = b.Abs(before)
    assert copy in b.nodes
    b.remove_copy(source_node)
    assert [n.op_type for n in b.nodes] == ["Neg", "Abs"] and after == b.nodes[-1].output[0]
    with pytest.raises(KeyError):  # the copy is gone: extra outputs cannot be added to it any more
        b.extra_output(source_node, 1, "mask")
