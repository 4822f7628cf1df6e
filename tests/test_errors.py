"""Internal failures (a rule's bug, an invalid emitted node, onnxruntime refusing a graph) reach the user as one
paragraph that names the source node, never as a library's raw multi-line report (issue 12, item 7)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.passes import jvp
from jacgraph.rules.jvp import JVP


def tanh_model():
    graph = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="the_tanh")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def one_paragraph(message):
    assert "\n" not in message and "==>" not in message and "Traceback" not in message, message


def test_an_invalid_emitted_node_names_the_source_node(monkeypatch):
    monkeypatch.setitem(JVP.rules, "Tanh", lambda b, node, t: [b.op("Relu", t, t)])  # Relu takes one input
    with pytest.raises(JacgraphError) as e:
        jvp.build(tanh_model())
    one_paragraph(str(e.value))
    assert "Tanh node 'the_tanh'" in str(e.value) and "onnx.checker" in str(e.value) and "jg_Relu" in str(e.value)


def test_a_rule_that_crashes_names_the_source_node(monkeypatch):
    monkeypatch.setitem(JVP.rules, "Tanh", lambda b, node, t: {}["missing"])
    with pytest.raises(JacgraphError) as e:
        jvp.build(tanh_model())
    one_paragraph(str(e.value))
    assert "Tanh node 'the_tanh'" in str(e.value) and "KeyError" in str(e.value)


def test_onnxruntime_refusing_a_node_is_named():
    node = helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, name="jg_DepthToSpace_3")  # no int64 kernel
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 8, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    with pytest.raises(JacgraphError) as e:
        runtime.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    one_paragraph(str(e.value))
    assert "DepthToSpace node 'jg_DepthToSpace_3'" in str(e.value) and "[ONNXRuntimeError]" not in str(e.value)


def test_onnxruntime_failing_at_run_time_is_named():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]),
                                            helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(JacgraphError) as e:
        runtime.run(model, {"x": np.ones(5, np.float32), "shape": np.array([2, 2], np.int64)})
    one_paragraph(str(e.value))
    assert "bad_reshape" in str(e.value)


def dropout_model(training_mode):
    """x -> Dropout(x, ratio 0.5, training_mode) -> y; training_mode None: omitted, else a Constant or an input."""
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    if isinstance(training_mode, bool):
        nodes.append(helper.make_node("Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.BOOL, [], [training_mode])))
    elif training_mode == "input":
        inputs.append(helper.make_tensor_value_info("t", TensorProto.BOOL, []))
    nodes.append(helper.make_node("Constant", [], ["r"], value=helper.make_tensor("r", TensorProto.FLOAT, [], [0.5])))
    nodes.append(helper.make_node("Dropout", ["x", "r"] + ([] if training_mode is None else ["t"]), ["y"], name="drop"))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("emit", ["jvp", "vjp"])
@pytest.mark.parametrize("training_mode", [True, "input"])
def test_training_mode_dropout_is_refused_with_a_reason(emit, training_mode):
    """Training-mode Dropout is random: no derivative exists, so the passes refuse it (they used to treat it as identity)."""
    import jacgraph

    with pytest.raises(JacgraphError) as e:
        jacgraph.compile(dropout_model(training_mode), emit=emit)
    one_paragraph(str(e.value))
    assert "Dropout 'drop' runs in training mode" in str(e.value) and "eval()" in str(e.value)


@pytest.mark.parametrize("emit", ["jvp", "vjp"])
@pytest.mark.parametrize("training_mode", [None, False])
def test_inference_dropout_is_the_identity(emit, training_mode):
    import jacgraph

    model = jacgraph.compile(dropout_model(training_mode), emit=emit)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    v = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    feeds = {"x": x, "x_dot": v} if emit == "jvp" else {"x": x, "y_bar": v}
    out = runtime.session(model).run(None, feeds)
    names = [o.name for o in model.graph.output]
    np.testing.assert_array_equal(out[names.index("y_dot" if emit == "jvp" else "x_bar")], v)
