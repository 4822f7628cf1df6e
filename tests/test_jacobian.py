"""--emit jacobian: structural pattern (symbolic), colourings, and x -> (y, J) from compressed JVP probes.

Oracles: the dense Jacobian from one-hot JVPs (the multi-tangent JVP pass with n tangents, one per input
element) for the emitted graph, and torch autograd Jacobians at 100 random points for the pattern.
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from jacgraph import runtime
from jacgraph.cli import main
from jacgraph.passes import jacobian, jvp


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.a(x) + x)


class Mixed(nn.Module):
    """Pattern rules beyond conv/pool: Slice + Max (maxout), Concat, AvgPool, channel shuffle
    (Reshape/Transpose), Pad, Tanh/Sigmoid, Softmax over the channel axis, Gemm after Flatten-free slicing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        h = torch.maximum(h[:, :2], h[:, 2:])                      # maxout over channel halves
        h = torch.cat([torch.tanh(h), torch.sigmoid(x)], dim=1)     # 4 channels
        n, c, H, W = h.shape
        h = h.reshape(n, 2, c // 2, H, W).transpose(1, 2).reshape(n, c, H, W)  # channel shuffle
        h = nn.functional.avg_pool2d(nn.functional.pad(h, (1, 0, 0, 1)), 2)
        return torch.softmax(h, dim=1)


class TinyUNet(nn.Module):
    """Down (conv, max-pool), up (bilinear and nearest Resize, ConvTranspose), skip concat."""

    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 1, 2, stride=2)
        self.out = nn.Conv2d(5, 1, 1)

    def forward(self, x):
        d = torch.relu(self.down(x))
        m = torch.relu(self.mid(nn.functional.max_pool2d(d, 2)))
        ups = [nn.functional.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False),
               nn.functional.interpolate(m, scale_factor=2, mode="nearest"), self.up(m)]
        return self.out(torch.cat([torch.cat(ups[:2], 1)[:, :2] * 0.5 + d, ups[1], ups[2]], 1))


def _models():
    torch.manual_seed(0)
    res = ResBlock(3)
    for bn in (res.a[1], res.a[4]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return {
        "mlp": (nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6)), (1, 12)),
        "conv_stack": (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1),
                                     nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)), (1, 1, 28, 28)),
        "maxpool_net": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(3, stride=1)), (1, 2, 20, 20)),
        "resnet_block": (res, (1, 3, 8, 8)),
        "mixed": (Mixed(), (1, 2, 6, 6)),
        "unet": (TinyUNet(), (1, 1, 12, 12)),
    }


MODELS = _models()


def export(module, shape, dynamic=False):
    module.eval()
    f = io.BytesIO()
    extra = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(module, torch.randn(*shape), f, input_names=["x"], output_names=["y"], dynamo=False, **extra)
    return onnx.load_from_string(f.getvalue())


@pytest.fixture(scope="module")
def exported():
    return {name: export(m, shape, dynamic=name == "mlp") for name, (m, shape) in MODELS.items()}


def one_hot_jacobian(model, x):
    """Dense J from n one-hot JVPs in one multi-tangent run: the reference the issue asks for."""
    n = x.size
    emitted = jvp.build(model, tangents=n)
    names = [i.name for i in emitted.graph.input]
    out = runtime.run(emitted, {names[0]: x, names[1]: np.eye(n, dtype=x.dtype).reshape((n,) + x.shape)})
    y_dot = out[emitted.graph.output[-1].name]
    return y_dot.reshape(n, -1).T


def point(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("probes", ["columns", "rows"])
@pytest.mark.parametrize("name", list(MODELS))
def test_emitted_jacobian_equals_one_hot_jvps(name, probes, exported, tmp_path):
    """Dense and --sparse outputs of `jacgraph compile --emit jacobian` equal the one-hot-JVP Jacobian, with
    JVP probes per column colour and with VJP probes (an ONNX Loop) per row colour."""
    model = exported[name]
    shape = MODELS[name][1]
    src_path, dense_path, sparse_path = tmp_path / "m.onnx", tmp_path / "j.onnx", tmp_path / "js.onnx"
    onnx.save(model, src_path)
    common = ["compile", str(src_path), "--emit", "jacobian", "--probes", probes]
    assert main(common + ["-o", str(dense_path)]) == 0
    assert main(common + ["--sparse", "-o", str(sparse_path)]) == 0
    dense_model, sparse_model = onnx.load(dense_path), onnx.load(sparse_path)
    onnx.checker.check_model(dense_model, full_check=True)
    props = {p.key: p.value for p in dense_model.metadata_props}
    K = int(props["jacgraph.colours"])
    assert props["jacgraph.probes"] == probes
    for seed in range(2):
        x = point(shape, seed)
        expected = one_hot_jacobian(model, x)
        out = runtime.run(dense_model, {"x": x})
        np.testing.assert_allclose(out["y"], runtime.run(model, {"x": x})["y"], rtol=1e-6, atol=1e-6)
        J = out[[o.name for o in dense_model.graph.output][1]]
        assert J.shape == tuple(dense_model.graph.output[0].type.tensor_type.shape.dim[i].dim_value
                                for i in range(len(out["y"].shape))) + shape
        J = J.reshape(expected.shape)
        # float32 on both sides; a compressed probe adds at most one structural nonzero per (row, colour), so
        # the only difference is summation order (kernel choice, forward vs reverse): float32 rounding
        # (6e-8) over at most a few hundred terms per entry, well under 1e-5 of the largest entry.
        scale = np.abs(expected).max()
        np.testing.assert_allclose(J, expected, rtol=0, atol=1e-5 * scale)
        vals = runtime.run(sparse_model, {"x": x})
        values, indices = (vals[o.name] for o in sparse_model.graph.output[1:])
        Js = sp.csr_matrix((values, (indices[:, 0], indices[:, 1])), shape=expected.shape).toarray()
        np.testing.assert_array_equal(Js, J)
        assert np.abs(expected).sum() > 0
    dense_probes = expected.shape[1] if probes == "columns" else expected.shape[0]
    assert K < dense_probes or name == "mlp"  # the point: fewer probes than one-hot ones where J is sparse


def test_python_api_dense_and_sparse(exported):
    x = point(MODELS["maxpool_net"][1], 3)
    J = jacobian.jacobian(exported["maxpool_net"], x)
    Js = jacobian.jacobian(exported["maxpool_net"], x, sparse=True)
    assert isinstance(J, np.ndarray) and sp.issparse(Js)
    np.testing.assert_array_equal(Js.toarray(), J)
    np.testing.assert_allclose(J, one_hot_jacobian(exported["maxpool_net"], x), rtol=0, atol=1e-5 * np.abs(J).max())


@pytest.mark.parametrize("name", list(MODELS))
def test_pattern_contains_every_numerical_nonzero(name, exported):
    """At 100 random points the autograd Jacobian is zero off the structural pattern, and the pattern is the
    same whichever direction it was propagated in. Float32: the question is which entries are exactly zero
    (relu' = 0, outside a window), the same in float32, and torch's float64 conv backward is a slow path."""
    module, shape = MODELS[name]
    pat = jacobian.sparsity(exported[name], input_shape=shape)
    other = jacobian.sparsity(exported[name], input_shape=shape,
                              direction="forward" if pat.matrix.shape[0] < pat.matrix.shape[1] else "reverse")
    assert (pat.matrix != other.matrix).nnz == 0
    m, n = pat.matrix.shape
    xs = torch.from_numpy(np.random.default_rng(7).standard_normal((100,) + shape[1:]).astype(np.float32))
    # Samples do not interact (eval mode), so d(Σ_b y_b)/dx_b = J(x_b): m reverse passes give 20 Jacobians.
    seen = np.zeros((m, n), bool)
    for chunk in xs.split(20):
        Js = torch.func.jacrev(lambda z: module.eval()(z).sum(0))(chunk).reshape(m, len(chunk), n)
        seen |= (Js != 0).any(dim=1).numpy()
    outside = seen & ~pat.matrix.toarray()
    assert not outside.any(), f"{outside.sum()} numerical nonzeros outside the structural pattern"
    assert seen.sum() > 0
    if name != "mlp":  # convolutional models: the pattern must actually be sparse for the check to mean much
        assert pat.matrix.nnz < m * n


def brute_force_valid(P, colours):
    P = sp.csr_matrix(P)
    for i in range(P.shape[0]):
        cols = P.indices[P.indptr[i]:P.indptr[i + 1]]
        if len(set(colours[cols].tolist())) != len(cols):
            return False
    return True


@pytest.mark.parametrize("method", ["structured", "greedy", "distance2", "auto"])
def test_colourings_are_valid(method, exported):
    for name, (_, shape) in MODELS.items():
        pat = jacobian.sparsity(exported[name], input_shape=shape)
        col = jacobian.colouring(pat.matrix, pat.x_shape, method)
        assert brute_force_valid(pat.matrix, col.colours) and jacobian.is_valid(pat.matrix, col.colours)
        assert col.count >= col.lower_bound == np.diff(pat.matrix.indptr).max()
    rng = np.random.default_rng(0)
    for _ in range(5):  # random patterns: no structure to lean on
        P = sp.random(40, 60, density=0.08, random_state=rng, format="csr") != 0
        col = jacobian.colouring(P, (60,), method)
        assert brute_force_valid(P, col.colours) and col.count >= col.lower_bound


def test_validity_check_can_fail():
    P = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1]], bool))
    assert not jacobian.is_valid(P, np.array([0, 0, 1])) and not brute_force_valid(P, np.array([0, 0, 1]))
    assert jacobian.is_valid(P, np.array([0, 1, 0]))


def test_three_3x3_convs_need_49_colours(exported):
    """A stack of three 3x3 convs sees a 7x7 window: 49 colours (the clique bound) instead of 784 probes."""
    pat = jacobian.sparsity(exported["conv_stack"])
    col = jacobian.colouring(pat.matrix, pat.x_shape)
    window = 3 * (3 - 1) + 1
    assert col.count == col.lower_bound == window ** 2 and pat.matrix.shape[1] == 28 * 28
    greedy = jacobian.colouring(pat.matrix, pat.x_shape, "greedy")
    assert greedy.count >= col.count


def model_with(nodes, inputs, inits=(), outputs=("y",), shape=None):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape)
                                                   for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_ops_are_listed_together(tmp_path, capsys):
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    model = model_with([helper.make_node("TopK", ["x", "k"], ["y", "i"]),
                        helper.make_node("Relu", ["y"], ["z"]),
                        helper.make_node("Foo", ["z"], ["w"], domain="custom")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])], [k], outputs=("w",), shape=[1, 2])
    model.opset_import.append(helper.make_opsetid("custom", 1))
    path, out = tmp_path / "m.onnx", tmp_path / "j.onnx"
    onnx.save(model, path)
    assert main(["compile", str(path), "--emit", "jacobian", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TopK" in err and "custom.Foo" in err and not out.exists()


def test_two_float_inputs_need_inputs_option(tmp_path, capsys):
    model = model_with([helper.make_node("Mul", ["a", "b"], ["y"])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in "ab"])
    path, out = tmp_path / "m.onnx", tmp_path / "j.onnx"
    onnx.save(model, path)
    assert main(["compile", str(path), "--emit", "jacobian", "-o", str(out)]) == 2
    assert "--inputs" in capsys.readouterr().err and not out.exists()
    assert main(["compile", str(path), "--emit", "jacobian", "--inputs", "a", "-o", str(out)]) == 0
    jac_model = onnx.load(out)
    a, b = np.array([1, 2, 3], np.float32), np.array([4, 5, 6], np.float32)
    J = runtime.run(jac_model, {"a": a, "b": b})[jac_model.graph.output[1].name]
    np.testing.assert_array_equal(J, np.diag(b))  # d(a*b)/da = diag(b), exactly (one product per entry)


@pytest.mark.parametrize("kernel, strides", [([3, 3], [1, 1]), ([3, 2], [2, 1])])
def test_maxpool_with_column_major_indices(kernel, strides):
    """MaxPool storage_order=1 only numbers the Indices output column-major (ONNX spec: "used only to convert an
    n-tuple index value into a single integer value for producing the second output"): the Jacobian of its values
    is the same as with row-major Indices. Oracle: onnxruntime's own argmax (the row-major copy's Indices), J[o,
    idx[o]] = tanh'(Y[o]); the emitted graph's Indices output equals onnxruntime's column-major one."""
    def pool_then_tanh(order):
        nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=kernel, strides=strides,
                                  storage_order=order), helper.make_node("Tanh", ["p"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 5])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("idx", TensorProto.INT64, None)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(3).permutation(60).reshape(1, 2, 6, 5).astype(np.float32) / 60  # no ties
    column_major = pool_then_tanh(1)
    J = jacobian.jacobian(column_major, x)
    y, idx_rows = runtime.run(pool_then_tanh(0), {"x": x}).values()
    expected = np.zeros((y.size, x.size))
    expected[np.arange(y.size), idx_rows.ravel()] = 1 - y.ravel() ** 2
    np.testing.assert_allclose(J, expected, rtol=1e-6, atol=0)
    emitted = jacobian.emit(column_major, input_shape=x.shape).model
    ours, theirs = runtime.run(emitted, {"x": x})["idx"], runtime.run(column_major, {"x": x})["idx"]
    assert not np.array_equal(theirs, idx_rows) and np.array_equal(ours, theirs)
