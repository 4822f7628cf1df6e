"""Dynamic shapes (jacgraph.lowering): paddle2onnx-style models whose Reshape targets come from
Shape -> Slice -> Concat subgraphs and whose dims are symbolic. Ranks ONNX's inference cannot resolve go
to onnxruntime's symbolic inference, then to `input_shapes` / `--input-shape NAME=DIMS`, which fold the
shape subgraphs to constants; the refusal names the tensor, its op and the flag to pass."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jacgraph
from jacgraph import runtime
from jacgraph.cli import main
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.testing import check_jvp, to_float64

F32 = TensorProto.FLOAT
# float64 JVP vs central differences (h=1e-6: truncation ~1e-12, round-off ~1e-10): measured <= 1e-9.
FD_TOL = 1e-7


def const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def paddle_style(target="static_slice", output_shape=("N", "M", 3)):
    """x [N, 4, L] -> x^T W -> tanh -> Reshape(Concat(Slice(Shape(.), 0, END), [-1, 3])) -> Softmax.

    END is [1] ("static_slice": ONNX's data propagation resolves the rank), or min(1, dims...) computed by
    ReduceMin ("computed_end": neither ONNX nor symbolic inference resolves it; fixed shapes fold it).
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W")
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["xt", "W"], ["a"]),
             helper.make_node("Tanh", ["a"], ["b"]), helper.make_node("Shape", ["b"], ["s"]), const("zero", [0]),
             const("one", [1])]
    if target == "static_slice":
        nodes.append(helper.make_node("Slice", ["s", "zero", "one"], ["head"]))
    else:
        nodes += [helper.make_node("Concat", ["one", "s"], ["one_and_s"], axis=0),
                  helper.make_node("ReduceMin", ["one_and_s"], ["end"], keepdims=1),
                  helper.make_node("Slice", ["s", "zero", "end"], ["head"])]
    nodes += [const("tail", [-1, 3]), helper.make_node("Concat", ["head", "tail"], ["target"], axis=0),
              helper.make_node("Reshape", ["b", "target"], ["r"], name="reshape_r"),
              helper.make_node("Softmax", ["r"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "paddle_style", [helper.make_tensor_value_info("x", F32, ["N", 4, "L"])],
                              [helper.make_tensor_value_info("y", F32, list(output_shape))], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = runtime.max_ir_version()
    return model


def computed_unsqueeze():
    """Unsqueeze with axes computed from the shape (rank(x) - 1): ONNX loses the rank, symbolic inference keeps it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["n"]), const("one", np.int64(1)),
             helper.make_node("Sub", ["n", "one"], ["last"]), const("zero", [0]),
             helper.make_node("Unsqueeze", ["last", "zero"], ["axes"]),
             helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
             helper.make_node("Softmax", ["u"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "computed_unsqueeze", [helper.make_tensor_value_info("x", F32, ["N", 5, "L"])],
                              [helper.make_tensor_value_info("y", F32, ["N", 5, 1, "L"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = runtime.max_ir_version()
    return model


def check_derivatives(model, x, **options):
    """JVP vs float64 central differences of the source, VJP by the dot-product test; both emitted graphs
    run in onnxruntime at x's shape."""
    m64 = to_float64(model)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(x.shape)
    jvp64 = jacgraph.compile(m64, emit="jvp", **options)
    assert check_jvp(m64, jvp64, {"x": x}, {"x": v})["y"] < FD_TOL
    y_dot = runtime.run(runtime.session(jvp64), {"x": x, "x_dot": v})["y_dot"]
    u = rng.standard_normal(y_dot.shape)
    x_bar = runtime.run(runtime.session(jacgraph.compile(m64, emit="vjp", **options)), {"x": x, "y_bar": u})["x_bar"]
    assert abs(np.vdot(y_dot, u) - np.vdot(v, x_bar)) <= 1e-10 * max(1.0, abs(np.vdot(y_dot, u)))


def input_dims(model, name="x"):
    vi = next(i for i in model.graph.input if i.name == name)
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_shape_slice_concat_reshape_keeps_dynamic_dims():
    model = paddle_style("static_slice")
    emitted = jacgraph.compile(model, emit="jvp")
    assert input_dims(emitted) == ["N", 4, "L"]
    rng = np.random.default_rng(0)
    for shape in [(1, 4, 6), (3, 4, 9)]:  # one emitted graph, two batch sizes and lengths
        check_derivatives(model, rng.standard_normal(shape))


def test_symbolic_shape_inference_resolves_a_computed_rank():
    model = computed_unsqueeze()
    src = SourceModel(model)
    assert src.rank("u") == 4 and src.shape("u")[0] == "N"
    rng = np.random.default_rng(0)
    for shape in [(2, 5, 3), (4, 5, 7)]:
        check_derivatives(model, rng.standard_normal(shape))


def test_unresolvable_rank_is_refused_naming_tensor_op_and_flag():
    with pytest.raises(JacgraphError) as e:
        jacgraph.compile(paddle_style("computed_end"), emit="vjp")
    message = str(e.value)
    assert "'r'" in message and "Reshape node 'reshape_r'" in message and "--input-shape x=N,4,L" in message


def test_input_shapes_fold_the_shape_subgraph():
    model = paddle_style("computed_end", output_shape=(2, "M", 3))
    fixed = SourceModel(model, input_shapes={"x": [2, 4, 5]})
    assert fixed.shape("r") == (2, 10, 3)
    assert not {"Shape", "ReduceMin", "Concat"} & {n.op_type for n in fixed.nodes}, "shape arithmetic not folded"
    assert fixed.initializers["W"] is not None  # parameters are never folded away
    check_derivatives(model, np.random.default_rng(0).standard_normal((2, 4, 5)), input_shapes={"x": [2, 4, 5]})


def test_input_shapes_may_keep_the_batch_axis_symbolic():
    model = paddle_style("static_slice")
    emitted = jacgraph.compile(model, emit="vjp", input_shapes={"x": ["batch", 4, 6]})
    assert input_dims(emitted) == ["batch", 4, 6]
    for batch in (1, 3):
        runtime.run(runtime.session(emitted), {"x": np.ones((batch, 4, 6), np.float32),
                                               "y_bar": np.ones((batch, 12, 3), np.float32)})


@pytest.mark.parametrize("shapes, words", [
    ({"y": [2, 4, 5]}, "does not have as inputs"),
    ({"x": [2, 4]}, "one size per axis"),
    ({"x": [2, 3, 5]}, "change only symbolic dims"),
    ({"x": [0, 4, 5]}, "below 1"),
])
def test_bad_input_shapes_are_clear_errors(shapes, words):
    with pytest.raises(JacgraphError, match=words):
        jacgraph.compile(paddle_style(), emit="jvp", input_shapes=shapes)


def test_cli_input_shape_on_jvp_and_vjp(tmp_path, capsys):
    src = tmp_path / "paddle.onnx"
    src.write_bytes(paddle_style("computed_end").SerializeToString())
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "--emit", "vjp", "-o", str(out)]) == 2
    assert "--input-shape x=N,4,L" in capsys.readouterr().err and not out.exists()
    for emit in ("jvp", "vjp"):
        assert main(["compile", str(src), "--emit", emit, "--input-shape", "x=2,4,5", "-o", str(out)]) == 0
        assert input_dims(onnx.load(str(out))) == [2, 4, 5]
    assert main(["compile", str(src), "--emit", "jvp", "--input-shape", "x=2,4", "-o", str(tmp_path / "bad.onnx")]) == 2
    assert not (tmp_path / "bad.onnx").exists()


def test_torch_multihead_attention_export_gets_its_ranks_by_folding():
    """torch's TorchScript export of nn.TransformerEncoder computes Reshape/Unsqueeze targets from Shape ops
    that ONNX's inference loses the rank of (and symbolic inference asserts on); with static input shapes
    the folding resolves them. JVP vs float64 central differences of torch, VJP vs torch.autograd."""
    torch = pytest.importorskip("torch", reason="compares against PyTorch")
    import io

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1,
                                        enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    f = io.BytesIO()
    torch.onnx.export(layer, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(f.getvalue())
    m64, layer64, x64 = to_float64(model), layer.double(), x.double()
    v, u = torch.randn_like(x64), torch.randn_like(x64)
    with torch.no_grad():  # torch.func.jvp has no forward-mode rule for CPU flash attention: float64 differences
        y_dot = ((layer64(x64 + 1e-6 * v) - layer64(x64 - 1e-6 * v)) / 2e-6).numpy()
    out = runtime.run(runtime.session(jacgraph.compile(m64, emit="jvp")), {"x": x64.numpy(), "x_dot": v.numpy()})
    assert np.linalg.norm(out["y_dot"] - y_dot) <= FD_TOL * np.linalg.norm(y_dot)
    xg = x64.clone().requires_grad_(True)
    layer64(xg).backward(u)
    grads = runtime.run(runtime.session(jacgraph.compile(m64, emit="vjp")), {"x": x64.numpy(), "y_bar": u.numpy()})
    # the exported LayerNormalization keeps stash_type=1 (float32 statistics): even the primal differs from
    # torch's float64 by ~4e-9 (measured), so autograd is matched to 1e-6 and the JVP/VJP pair to 1e-10
    assert np.linalg.norm(grads["x_bar"] - xg.grad.numpy()) <= 1e-6 * np.linalg.norm(xg.grad.numpy())
    forward, reverse = np.vdot(out["y_dot"], u.numpy()), np.vdot(v.numpy(), grads["x_bar"])
    assert abs(forward - reverse) <= 1e-10 * max(1.0, abs(forward))
