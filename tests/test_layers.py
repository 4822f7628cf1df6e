"""jacgraph.layers: lowering feed-forward ONNX models into (affine map, activation) stages.

The helpers at the top (chain_model, random_mlp, random_cnn, numpy_forward) are shared with
test_bounds.py and test_recurjac.py.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jacgraph.errors import JacgraphError
from jacgraph.layers import lower
from jacgraph.testing import reference_session, run_reference, to_float64


# ---- model builders shared by the bound tests --------------------------------------------------

def chain_model(layers, in_shape, dtype=np.float32, opset=17, batch="N"):
    """A single-chain ONNX model from a list of (kind, *params) layers, input 'x', output 'y'."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, cur = [], [], "x"
    counter = iter(range(10**6))

    def const(value):
        name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def emit(op, *inputs, **attrs):
        nonlocal cur
        out = f"v{next(counter)}"
        nodes.append(helper.make_node(op, [cur, *inputs], [out], name=f"n_{out}", **attrs))
        cur = out

    for kind, *p in layers:
        if kind == "gemm":
            emit("Gemm", const(p[0]), const(p[1]), transB=1)  # torch Linear: W [out, in]
        elif kind == "matmul":
            emit("MatMul", const(p[0].T))
        elif kind == "conv":
            emit("Conv", const(p[0]), const(p[1]), **(p[2] if len(p) > 2 else {}))
        elif kind == "bn":
            emit("BatchNormalization", *[const(v) for v in p[:4]], epsilon=1e-5)
        elif kind == "flatten":
            emit("Flatten", axis=1)
        elif kind == "reshape":
            emit("Reshape", inits.append(numpy_helper.from_array(np.asarray(p[0], np.int64), "shp")) or "shp")
        elif kind == "relu":
            emit("Relu")
        elif kind == "leaky":
            emit("LeakyRelu", alpha=p[0])
        elif kind == "tanh":
            emit("Tanh")
        elif kind == "sigmoid":
            emit("Sigmoid")
        elif kind == "hardsigmoid":
            emit("HardSigmoid", alpha=p[0], beta=p[1])
        elif kind == "clip":
            emit("Clip", const(p[0]), const(p[1]))
        elif kind in ("add", "sub", "mul", "div"):
            emit(kind.capitalize(), const(p[0]))
        elif kind in ("maxpool", "softmax", "averagepool"):
            emit({"maxpool": "MaxPool", "softmax": "Softmax", "averagepool": "AveragePool"}[kind],
                 **({"kernel_shape": [2, 2]} if kind != "softmax" else {}))
        else:
            raise ValueError(kind)
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, [batch, *in_shape])],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def random_mlp(sizes, rng, act="relu", scale=1.0, act_params=()):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(("gemm", rng.standard_normal((b, a)) * scale / np.sqrt(a), rng.standard_normal(b) * 0.3))
        if i < len(sizes) - 2:
            layers.append((act, *act_params))
    return chain_model(layers, (sizes[0],))


def random_cnn(rng, act="relu"):
    """Conv(stride 2, pad 1) + BN + act [4,3,3], Conv(groups 2) + act [4,1,1], Flatten, Gemm + act, Gemm."""
    w1 = rng.standard_normal((4, 2, 3, 3)) / 4
    w2 = rng.standard_normal((4, 2, 3, 3)) / 4
    layers = [("conv", w1, rng.standard_normal(4) * 0.1, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
              ("bn", rng.uniform(0.5, 1.5, 4), rng.standard_normal(4) * 0.1, rng.standard_normal(4) * 0.1,
               rng.uniform(0.5, 2, 4)),
              (act,),
              ("conv", w2, rng.standard_normal(4) * 0.1, {"group": 2}),
              (act,),
              ("flatten",),
              ("gemm", rng.standard_normal((12, 4 * 1 * 1)) / 2, rng.standard_normal(12) * 0.1),
              (act,),
              ("gemm", rng.standard_normal((3, 12)) / 3, rng.standard_normal(3) * 0.1)]
    return chain_model(layers, (2, 6, 6))


def act_numpy(name, attrs, z):
    if name is None:
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":
        return np.where(z > 0, z, attrs["alpha"] * z)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if name == "hardsigmoid":
        return np.clip(attrs["alpha"] * z + attrs["beta"], 0, 1)
    if name == "clip":
        return np.clip(z, attrs["min"], attrs["max"])
    raise ValueError(name)


def numpy_forward(stages, x):
    """Forward pass of the lowered stages on flat inputs [N, n0]."""
    h = x
    for s in stages:
        h = act_numpy(s.activation, s.act_attrs, s.affine(h))
    return h


def reference_output(model, x):
    m64 = to_float64(model)
    return run_reference(reference_session(m64), {"x": x})["y"]


# ---- tests -------------------------------------------------------------------------------------

# Both sides run in float64 on float32-valued weights; 1e-10 leaves room for summation order only.
TOL = 1e-10


@pytest.mark.parametrize("act,params", [("relu", ()), ("leaky", (0.1,)), ("tanh", ()), ("sigmoid", ()),
                                        ("hardsigmoid", (0.2, 0.5)), ("clip", (-0.5, 0.7))])
def test_mlp_lowering_matches_model(act, params):
    rng = np.random.default_rng(0)
    model = random_mlp([5, 7, 6, 3], rng, act=act, act_params=params)
    stages = lower(model)
    assert [s.activation is not None for s in stages] == [True, True, False]
    assert [s.matrix().shape for s in stages] == [(7, 5), (6, 7), (3, 6)]
    x = rng.standard_normal((4, 5))
    np.testing.assert_allclose(numpy_forward(stages, x), reference_output(model, x), rtol=TOL, atol=TOL)


def test_cnn_lowering_conv_bn_flatten():
    rng = np.random.default_rng(1)
    model = random_cnn(rng)
    stages = lower(model)
    assert [s.out_shape for s in stages] == [(4, 3, 3), (4, 1, 1), (12,), (3,)]
    assert stages[0].conv is not None and stages[0].conv["W"].shape == (4, 2, 3, 3)  # BN folded into the kernel
    assert stages[1].conv["attrs"]["group"] == 2
    x = rng.standard_normal((3, 2, 6, 6))
    np.testing.assert_allclose(numpy_forward(stages, x.reshape(3, -1)), reference_output(model, x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("attrs", [{"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
                                   {"dilations": [2, 1], "pads": [2, 0, 1, 1]}, {"auto_pad": "VALID"}])
def test_conv_variants_match_model(attrs):
    rng = np.random.default_rng(2)
    model = chain_model([("conv", rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3), attrs), ("relu",),
                         ("flatten",)], (2, 5, 7))
    stages = lower(model)
    x = rng.standard_normal((2, 2, 5, 7))
    np.testing.assert_allclose(numpy_forward(stages, x.reshape(2, -1)), reference_output(model, x).reshape(2, -1),
                               rtol=TOL, atol=TOL)


def test_constant_affine_ops_fold_and_matmul():
    rng = np.random.default_rng(3)
    layers = [("sub", rng.standard_normal(4)), ("div", rng.uniform(1, 2, 4)), ("matmul", rng.standard_normal((6, 4))),
              ("add", rng.standard_normal(6)), ("mul", rng.uniform(-1, 1, 6)), ("tanh",),
              ("gemm", rng.standard_normal((2, 6)), rng.standard_normal(2)), ("gemm", rng.standard_normal((3, 2)),
                                                                              rng.standard_normal(3))]
    model = chain_model(layers, (4,))
    stages = lower(model)
    assert len(stages) == 2 and stages[1].matrix().shape == (3, 6)  # two Gemms with no activation compose
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(numpy_forward(stages, x), reference_output(model, x), rtol=TOL, atol=TOL)


def test_model_ending_in_activation_and_consecutive_activations():
    rng = np.random.default_rng(4)
    model = chain_model([("gemm", rng.standard_normal((4, 3)), rng.standard_normal(4)), ("relu",), ("tanh",)], (3,))
    stages = lower(model)
    assert [s.activation for s in stages] == ["relu", "tanh"]
    np.testing.assert_array_equal(stages[1].matrix(), np.eye(4))
    x = rng.standard_normal((3, 3))
    np.testing.assert_allclose(numpy_forward(stages, x), reference_output(model, x), rtol=TOL, atol=TOL)


def test_unsupported_ops_listed_in_one_error():
    rng = np.random.default_rng(5)
    # 1x6x6 -> Conv 3x3 -> 2x4x4 -> MaxPool 2x2 (stride 1) -> 2x3x3 -> Flatten 18
    model = chain_model([("conv", rng.standard_normal((2, 1, 3, 3)), np.zeros(2)), ("relu",), ("maxpool",),
                         ("flatten",), ("gemm", rng.standard_normal((3, 2 * 3 * 3)), np.zeros(3)), ("softmax",)], (1, 6, 6))
    with pytest.raises(JacgraphError) as e:
        lower(model)
    assert "MaxPool (x1)" in str(e.value) and "Softmax (x1)" in str(e.value)


def test_residual_connection_is_an_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "res", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(JacgraphError, match="two computed tensors"):
        lower(model)


def test_conv_without_fixed_shape_needs_input_shape():
    rng = np.random.default_rng(6)
    model = chain_model([("conv", rng.standard_normal((2, 1, 3, 3)), np.zeros(2)), ("relu",), ("flatten",)],
                        (1, "H", "W"))
    with pytest.raises(JacgraphError, match="--input-shape"):
        lower(model)
    stages = lower(model, input_shape=(1, 1, 5, 5))
    assert stages[0].in_shape == (1, 5, 5) and stages[0].out_shape == (2, 3, 3)
    x = rng.standard_normal((1, 1, 5, 5))
    np.testing.assert_allclose(numpy_forward(stages, x.reshape(1, -1)), reference_output(model, x).reshape(1, -1),
                               rtol=TOL, atol=TOL)


def test_torch_exported_cnn_lowers():
    torch = pytest.importorskip("torch")
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.LeakyReLU(0.2),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4), torch.nn.Sigmoid(),
                              torch.nn.Linear(4, 2)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    f = io.BytesIO()
    x = torch.randn(2, 1, 5, 5)
    torch.onnx.export(net, (x,), f, dynamo=False, opset_version=17, training=torch.onnx.TrainingMode.PRESERVE,
                      input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(f.getvalue())
    stages = lower(model)
    assert [s.activation for s in stages] == ["leaky_relu", "sigmoid", None]
    with torch.no_grad():
        expected = net(x.double()).numpy() if False else net.double()(x.double()).numpy()
    np.testing.assert_allclose(numpy_forward(stages, x.double().numpy().reshape(2, -1)), expected, rtol=1e-9, atol=1e-9)


# ---- lower_graph: DAGs ------------------------------------------------------------------------

import torch  # noqa: E402

from examples import bounds_models  # noqa: E402
from jacgraph.layers import lower_graph  # noqa: E402


def graph_numpy(graph, x):
    """The lowered graph evaluated in numpy on flat inputs [N, n0]."""
    acts = lambda node, z: act_numpy(node.activation, node.act_attrs, z)  # noqa: E731
    return graph.forward(x, acts, lambda node, z: z[..., node.windows].max(-1))[-1]


def assert_lowering_matches_torch(net, shape, onnx_bytes):
    """lower_graph of net's export, evaluated in numpy at 4 normal points, against net itself; returns the Graph."""
    graph = lower_graph(onnx_bytes)
    x = np.random.default_rng(0).standard_normal((4, *shape))
    expected = net(torch.tensor(x)).detach().numpy().reshape(4, -1)
    np.testing.assert_allclose(graph_numpy(graph, x.reshape(4, -1)), expected, rtol=1e-10, atol=1e-12)
    return graph


class _Shapes(torch.nn.Module):
    """Slice, Split, Transpose, Sub of two branches, ReduceMax, ReduceMean, Concat along two axes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)

    def forward(self, x):
        h = torch.cat([x, x[:, :, :1] * 0.5], 2)                          # 2x7x6
        a, b = torch.split(h[:, :, 1:, ::2], [1, 1], dim=1)              # 1x6x5 each
        h = torch.relu(self.conv(torch.cat([a - b, b, a.permute(0, 1, 3, 2)[:, :, :, :5][:, :, :5]], 2)[:, :, :6]))
        m = torch.amax(h, dim=(2,), keepdim=True)
        return torch.cat([m.flatten(1), h.mean(dim=(2, 3)), h.flatten(1)], 1)


@pytest.mark.parametrize("name", ["residual_mlp", "resnet_cnn", "densenet_cnn", "pool_cnn", "inception_cnn", "shapes"])
def test_graph_lowering_matches_the_torch_model(name):
    if name == "shapes":
        torch.manual_seed(0)
        net, shape = _Shapes().double().eval(), (2, 6, 10)
    else:
        net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    graph = assert_lowering_matches_torch(net, shape, bounds_models.export_bytes(net, shape))
    kinds = [n.kind for n in graph.nodes]
    assert kinds[0] == "input" and kinds[-1] == "linear"


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_graph_lowering_of_pad_matches_the_reference(mode):
    """Pad with constant pads (constant value 0.5 / reflect / edge) before a Conv and a residual Sub."""
    rng = np.random.default_rng(7)
    W = numpy_helper.from_array(rng.standard_normal((1, 1, 3, 3)).astype(np.float32), "W")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads")
    value = numpy_helper.from_array(np.array(0.5, np.float32), "value")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [helper.make_node("Pad", ["x", "pads"] + (["value"] if mode == "constant" else []), ["p"], mode=mode),
             helper.make_node("Conv", ["p", "W"], ["c"]),  # 7x7 -> 5x5
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["s"]),
             helper.make_node("Sub", ["r", "s"], ["d"]),
             helper.make_node("Reshape", ["d", "shape"], ["y"])]
    starts = numpy_helper.from_array(np.array([1, 1], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([6, 6], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 25])],
                              [W, pads, value, shape, starts, ends, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 1, 4, 4))
    lowered = lower_graph(model)
    np.testing.assert_allclose(graph_numpy(lowered, x.reshape(3, -1)), reference_output(model, x), rtol=TOL, atol=TOL)


class _Upsampling(torch.nn.Module):
    """ConvTranspose (stride, pads, output_padding, dilation, groups), Resize (nearest / bilinear, align_corners,
    a non-integer scale, a target size), Squeeze/Unsqueeze, and a Pad whose pads are computed from shapes."""

    def __init__(self):
        super().__init__()
        self.t1 = torch.nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1)  # 5x5 -> 10x10
        self.t2 = torch.nn.ConvTranspose2d(4, 2, 2, stride=1, dilation=2, groups=2)       # 10x10 -> 12x12
        self.t3 = torch.nn.ConvTranspose1d(2, 1, 3, stride=3)                              # 5 -> 15

    def forward(self, x):
        up = torch.nn.functional.interpolate
        h = torch.relu(self.t2(self.t1(x)))
        small = up(h, scale_factor=0.5, mode="nearest")                                 # 12 -> 6
        a = up(x, size=(7, 6), mode="bilinear", align_corners=True)                     # 5x5 -> 7x6
        b = up(x, scale_factor=1.5, mode="bilinear")                                    # 5x5 -> 7x7
        dy, dx = b.size(2) - a.size(2), b.size(3) - a.size(3)
        a = torch.nn.functional.pad(a, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])  # pads from shapes
        row = self.t3(x[:, :, 0]).unsqueeze(1).squeeze(2)                               # [N, 1, 15]
        return torch.cat([small.flatten(1), (a - b).flatten(1), row.flatten(1)], 1)


@pytest.mark.parametrize("name", ["upsampling", "unet_cnn"])
def test_graph_lowering_of_upsampling_matches_the_torch_model(name):
    """ConvTranspose as the transpose of its Conv, Resize as its interpolation matrices, computed pads folded."""
    if name == "upsampling":
        torch.manual_seed(1)
        net, shape = _Upsampling().double().eval(), (2, 5, 5)
    else:
        net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    onnx_bytes = bounds_models.export_bytes(net, shape)
    ops = {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node}
    assert {"ConvTranspose", "Resize", "Pad", "Shape"} <= ops, ops  # the pads are computed in the export
    assert_lowering_matches_torch(net, shape, onnx_bytes)


def test_graph_lowering_of_a_fixed_batch_unet_folds_its_constant_pad_chain():
    """Exported at a fixed batch of 1, torch writes U-Net's pads as a chain of Constant/Concat/Slice/Cast nodes
    that does not depend on x: it is folded too (it was refused as 'computed pads')."""
    net, shape = bounds_models.build("unet_cnn"), bounds_models.INPUT_SHAPES["unet_cnn"]
    onnx_bytes = bounds_models.export_bytes(net, shape, dynamic_batch=False)
    model = onnx.load_from_string(onnx_bytes)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, *shape]
    assert {"Pad", "Concat", "Cast"} <= {n.op_type for n in model.graph.node}
    assert_lowering_matches_torch(net, shape, onnx_bytes)


@pytest.mark.parametrize("declared", [[1, 1, 4, 4], ["N", 1, "H", "W"]])
@pytest.mark.parametrize("mode,transform", [("cubic", "half_pixel"), ("linear", "tf_crop_and_resize")])
def test_graph_lowering_refuses_other_resize_modes_and_lists_every_unsupported_node(mode, transform, declared):
    """A Resize it does not take, a Loop, an LSTM (lowered to products of computed tensors) and a Mul of two
    computed tensors: one error that names each with its count, not the first one met (also before asking
    for an --input-shape when the input's is symbolic)."""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array
    inits = [c(np.array([1, 1, 2, 2], np.float32), "scales"), c(np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32), "roi"),
             c(np.array([8, 1, 8], np.int64), "seq_shape"), c(rng.standard_normal((1, 16, 8)).astype(np.float32), "W"),
             c(rng.standard_normal((1, 16, 4)).astype(np.float32), "R"), c(np.array(2, np.int64), "trip"),
             c(np.array(True), "cond"), c(np.array([1, -1], np.int64), "flat")]
    body = helper.make_graph(
        [helper.make_node("Tanh", ["s_in"], ["s_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["r"], mode=mode, coordinate_transformation_mode=transform),
             helper.make_node("Mul", ["r", "r"], ["r2"]),
             helper.make_node("Reshape", ["r2", "seq_shape"], ["seq"]),
             helper.make_node("LSTM", ["seq", "W", "R"], ["Y", "Yh"], hidden_size=4),
             helper.make_node("Reshape", ["Yh", "flat"], ["h"]),
             helper.make_node("Loop", ["trip", "cond", "h"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, declared)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(JacgraphError) as refused:
        lower_graph(model)
    message = str(refused.value)
    assert f"Resize with mode '{mode}'/'{transform}'" in message and "(x1)" in message
    assert "Loop (x1)" in message
    # the LSTM's products i*g, f*c, o*tanh(c) over 8 steps (f*c of step 0 multiplies the constant initial
    # state), and the Mul above: 3*8 - 1 + 1
    assert "Mul of two computed tensors (not affine) (x24)" in message, message


@pytest.mark.parametrize("indices, ok", [([0, 5, -6], True), ([0, 6], False), ([-7], False)])
def test_graph_lowering_gather_checks_its_indices(indices, ok):
    """Old: an index outside the axis reached np.take and raised IndexError (an internal error, exit 3)."""
    w = numpy_helper.from_array(np.arange(len(indices) * 2, dtype=np.float32).reshape(len(indices), 2), "w")
    idx = numpy_helper.from_array(np.asarray(indices, np.int64), "idx")
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], axis=1), helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if ok:  # the lowered selection equals numpy's take on the features
        g = lower_graph(model)
        x = np.random.default_rng(0).standard_normal(6)
        np.testing.assert_allclose(g.nodes[1].mats[0] @ x, np.take(x, indices))
    else:
        with pytest.raises(JacgraphError, match="fix its indices"):
            lower_graph(model)
