"""Reverse mode of grouped/depthwise Conv, ConvTranspose and strided Slice, over many geometries, and on the real
models where a peer's reverse mode refuses them (onnx-ad 0.3: "a grouped Conv is not differentiated with respect to
its weight", "ConvTranspose is not differentiated with respect to its weight", "Slice with a step other than 1").

- Every geometry: the float64 dot-product test <J v, u> = <v, Jᵀu> against the JVP pass (tolerance 1e-10 relative to
  |J v|·|u|, round-off only; tests/test_rules_transpose.py), and float64 central differences of the source for x̄ and
  every parameter gradient (h = 1e-6: truncation ~1e-12, round-off ~1e-10 of the derivative's scale; tolerance 1e-6,
  as in tests/test_rules_transpose.py). Both oracles run the ops through onnx's reference evaluator.
- ConvTranspose with auto_pad or output_shape: onnx's reference evaluator cannot run output_shape without auto_pad, and
  which side takes the odd padding cell is a convention, so these are pinned against onnxruntime itself: x̄ and W̄ are
  read off onnxruntime's own float32 forward (the op is linear in each: x̄_i = <f(e_i, W), u>, W̄_j = <f(x, e_j), u>).
  Sums of at most 54 float32 products on both sides: ~1e-7 relative; tolerance 1e-5, while a pad off by one cell
  moves the result by order 1.
- Real models (examples/architectures.py, BatchNorm unfolded, batch 2): `vjp.build(wrt="params")` in float64 against
  torch.autograd of the same module in float64, with tests/test_vjp.py's tolerance 1e-5 (the exporter's float32
  weights, amplified by depth). Swin with window 7 (strided and reversed Slices): the input gradient in float32
  onnxruntime against torch.func.vjp in float64, with tests/test_transformers.py's tolerance 1e-5.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from jacgraph.passes import vjp
from jacgraph.testing import central_difference, relative_error, run_reference
from test_rules_jvp import Case, case_id, f64, i64
from test_rules_transpose import (DOT_TOL, FD_TOL, H, dot_product, props, reference,
                                  test_param_gradients_match_central_differences as param_gradients_match)

# (id, x shape, w shape, attrs): weight layouts are [M, C/G, *k] for Conv and [C, M/G, *k] for ConvTranspose
CONV_GEOMETRIES = [
    ("g1-strided-dilated", (2, 3, 9, 8), (4, 3, 3, 2), {"strides": [2, 3], "dilations": [2, 1], "pads": [1, 2, 0, 1]}),
    ("g2-dilated", (1, 4, 7, 7), (6, 2, 3, 3), {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ("depthwise-multiplier-2", (2, 3, 6, 7), (6, 1, 3, 3), {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("depthwise-same-upper", (1, 4, 7, 5), (4, 1, 3, 3), {"group": 4, "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("depthwise-same-lower-dilated", (1, 3, 8, 6), (3, 1, 3, 2),
     {"group": 3, "dilations": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("g2-valid-floor", (1, 2, 8, 9), (4, 1, 3, 2), {"group": 2, "strides": [3, 2], "auto_pad": "VALID"}),
    ("g2-1d", (2, 4, 11), (4, 2, 3), {"group": 2, "strides": [2], "dilations": [2], "pads": [1, 0]}),
]
CONV_TRANSPOSE_GEOMETRIES = [
    ("g1-output-padding", (2, 3, 4, 5), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    ("g2-strided-dilated", (1, 4, 3, 4), (4, 3, 3, 2),
     {"group": 2, "strides": [3, 2], "dilations": [1, 2], "pads": [1, 0, 0, 1], "output_padding": [2, 1]}),
    ("depthwise", (1, 4, 3, 4), (4, 1, 3, 3), {"group": 4, "strides": [2, 2]}),
    # output_padding >= stride (allowed where the dilation is larger): no window reaches the appended cells
    ("output-padding-past-stride", (1, 2, 4, 5), (2, 3, 3, 3), {"dilations": [2, 3], "output_padding": [1, 2]}),
    ("same-upper", (1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    # (onnx's reference ConvTranspose fails on groups with auto_pad: grouped SAME is pinned in PAD_CONVENTIONS below)
    ("same-lower", (1, 4, 3, 4), (4, 2, 3, 2), {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    ("output-shape-same-upper", (1, 2, 4, 5), (2, 3, 3, 3),
     {"strides": [2, 2], "output_shape": [7, 8], "auto_pad": "SAME_UPPER"}),
    ("valid-output-padding", (1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "VALID", "output_padding": [1, 0]}),
    ("1d", (2, 3, 5), (3, 2, 4), {"strides": [3], "pads": [2, 1], "output_padding": [1]}),
]
GEOMETRIES = [("Conv", *g) for g in CONV_GEOMETRIES] + [("ConvTranspose", *g) for g in CONV_TRANSPOSE_GEOMETRIES]


def out_channels(op, w_shape, attrs):
    return w_shape[0] if op == "Conv" else w_shape[1] * attrs.get("group", 1)


def weights_as_inputs(op, case_id_, xs, ws, attrs):
    bias = out_channels(op, ws, attrs)
    return Case(op, {"x": xs, "w": ws, "bias": (bias,)}, ["x", "w", "bias"], attrs=attrs, id=f"{op}-{case_id_}")


def weights_as_params(op, case_id_, xs, ws, attrs):
    bias = out_channels(op, ws, attrs)
    return Case(op, {"x": xs}, ["x", "w", "bias"], attrs=attrs, consts={"w": f64(*ws), "bias": f64(bias, seed=1)},
                id=f"{op}-{case_id_}-params")


# Slice: steps 2, -1, -2 and 3, several and negative axes, starts/ends clamped as the spec says, axes omitted
SLICE_CASES = [
    Case("Slice", {"x": (3, 7, 8)}, ["x", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(0, 1), "ends": i64(7, 8), "axes": i64(1, 2), "steps": i64(2, 3)}, id="slice-steps-2-3"),
    Case("Slice", {"x": (4, 5)}, ["x", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(100), "ends": i64(-100), "axes": i64(0), "steps": i64(-1)}, id="slice-reverse-clamped"),
    Case("Slice", {"x": (5, 3, 9)}, ["x", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(-2, 0), "ends": i64(1, 5), "axes": i64(-1, 0), "steps": i64(-2, 2)},
         id="slice-minus-2-negative-axis"),
    Case("Slice", {"x": (4, 6, 7)}, ["x", "starts", "ends", "", "steps"],
         consts={"starts": i64(0, 5, -7), "ends": i64(4, -100, 7), "steps": i64(1, -2, 3)}, id="slice-no-axes"),
    Case("Slice", {"x": (2, 6, 5)}, ["r", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(-1, 4), "ends": i64(-100, 0), "axes": i64(1, 2), "steps": i64(-3, -2)},
         extra_nodes=[helper.make_node("Relu", ["x"], ["r"])], kinks=(0,), id="slice-after-relu"),
]


@pytest.mark.parametrize("case", [weights_as_inputs(op, *g) for op, *g in GEOMETRIES] + SLICE_CASES, ids=case_id)
def test_dot_product(case):
    lhs, rhs, scale = dot_product(case)
    assert abs(lhs - rhs) <= DOT_TOL * max(scale, 1e-30), f"{case_id(case)}: <Jv,u> = {lhs!r}, <v,J^T u> = {rhs!r}"


@pytest.mark.parametrize("case", [weights_as_params(op, *g) for op, *g in GEOMETRIES], ids=case_id)
def test_x_and_weight_gradients_match_central_differences(case):
    param_gradients_match(case)


@pytest.mark.parametrize("case", SLICE_CASES, ids=case_id)
def test_slice_gradient_matches_central_differences(case):
    model = case.model()
    emitted = vjp.build(model)
    vp = props(emitted)
    rng = np.random.default_rng(3)
    feeds = {name: case.sample(rng, shape) for name, shape in case.inputs.items()}
    primal = run_reference(reference(model), feeds)
    u = {bar: rng.standard_normal(primal[y].shape) for y, bar in vp["jacgraph.cotangent_inputs"]}
    out = run_reference(reference(emitted), {**feeds, **u})
    (x, bar), = vp["jacgraph.gradient_outputs"]
    v = rng.standard_normal(feeds[x].shape)
    fd = central_difference(reference(model), feeds, {x: v}, H)
    lhs = sum(float(np.vdot(fd[y], u[b_])) for y, b_ in vp["jacgraph.cotangent_inputs"])
    rhs = float(np.vdot(v, out[bar]))
    assert abs(lhs - rhs) <= FD_TOL * max(abs(lhs), 1e-12), f"{case_id(case)}: fd {lhs!r} vs vjp {rhs!r}"


# ---- ConvTranspose padding conventions, against onnxruntime's own forward -----------------------------------------

PAD_CONVENTIONS = [
    {"strides": [2, 2], "output_shape": [8, 9]},            # no auto_pad: the odd cell at the start
    {"strides": [2, 2], "output_shape": [7, 8]},
    {"strides": [2, 2], "output_shape": [8, 9], "auto_pad": "SAME_UPPER"},   # the odd cell at the end
    {"strides": [2, 2], "output_shape": [8, 9], "auto_pad": "SAME_LOWER"},
    {"strides": [2, 2], "output_shape": [10, 12]},          # past the full size: zeros appended
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"strides": [3, 2], "dilations": [1, 2], "group": 2, "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "auto_pad": "VALID", "output_padding": [1, 0]},
]
XS, PAD_WS = (1, 2, 4, 5), {1: (2, 3, 3, 3), 2: (2, 2, 2, 3)}


def _float32_model(nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _ort(model, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # shape inference's output size for SAME + output_padding differs from the kernel's
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("attrs", PAD_CONVENTIONS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_conv_transpose_padding_conventions_match_onnxruntime(attrs):
    ws = PAD_WS[attrs.get("group", 1)]
    source = _float32_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)], [("x", ["n", *XS[1:]]), ("w", ws)],
                            ["y"])  # a free batch: the forward runs on every basis vector of x at once
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal(XS).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    y = _ort(source, {"x": x, "w": w})["y"]
    u = rng.standard_normal(y.shape).astype(np.float32)
    # onnxruntime's forward on every basis vector: x̄_i = <f(e_i, W), u>, W̄_j = <f(x, e_j), u>
    basis_x = np.eye(x.size, dtype=np.float32).reshape(x.size, *XS[1:])
    x_bar = np.einsum("nchw,chw->n", _ort(source, {"x": basis_x, "w": w})["y"].astype(np.float64), u[0]).reshape(XS)
    w_bar = np.array([np.vdot(_ort(source, {"x": x, "w": e.reshape(ws)})["y"].astype(np.float64), u)
                      for e in np.eye(w.size, dtype=np.float32)]).reshape(ws)
    emitted = vjp.build(source)  # both graph inputs are differentiated
    vp = props(emitted)
    (_, u_name), = vp["jacgraph.cotangent_inputs"]
    out = _ort(emitted, {"x": x, "w": w, u_name: u})
    grads = dict(vp["jacgraph.gradient_outputs"])
    assert out[grads["x"]].shape == XS
    assert relative_error(out[grads["x"]], x_bar) < 1e-5
    assert relative_error(out[grads["w"]], w_bar) < 1e-5


@pytest.mark.parametrize("attrs", PAD_CONVENTIONS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_conv_transpose_jacobian_matches_onnxruntime(attrs):
    """The Jacobian pass reads the same geometry (registry.resolve_window) for ConvTranspose's sparsity pattern: with
    SAME_* it used to put the odd padding cell on the other side, and its compressed probes gave O(1) errors."""
    from jacgraph.passes.jacobian import jacobian

    ws = PAD_WS[attrs.get("group", 1)]
    rng = np.random.default_rng(5)
    source = _float32_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)], [("x", ["n", *XS[1:]])],
                            ["y"])
    source.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(ws).astype(np.float32), "w"))
    basis = np.eye(int(np.prod(XS)), dtype=np.float32).reshape(-1, *XS[1:])
    columns = _ort(source, {"x": basis})["y"]  # J's columns: the forward (linear in x) of every basis vector
    expected = columns.reshape(len(basis), -1).T
    x = rng.standard_normal(XS).astype(np.float32)
    assert relative_error(jacobian(source, x, sparse=True).toarray(), expected) < 1e-6


# ---- real models ---------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch", reason="the end-to-end tests compare against PyTorch (pip install torch==2.13.0)")

from examples import architectures  # noqa: E402
from jacgraph.testing import to_float64  # noqa: E402
from test_vjp import TOL, exported, torch_grads  # noqa: E402,F401  (exported: the module-scoped export fixture)


@pytest.mark.parametrize("name", ["mobilenetv2_style", "shufflenet_style", "hardswish_se", "unet"])
def test_all_parameter_gradients_match_torch_autograd(name, exported):  # pylint: disable=redefined-outer-name
    """Grouped/depthwise Convs (mobilenetv2, shufflenet, hardswish_se) and ConvTranspose (unet), every parameter."""
    source = exported(name, batch=2, fold_batchnorm=False)
    grouped = [n for n in source.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert any(n.op_type == "ConvTranspose" for n in source.graph.node) if name == "unet" else grouped
    x = architectures.example_input(name, batch=2).numpy()
    emitted = vjp.build(source, wrt="params")
    onnx.checker.check_model(emitted, full_check=True)
    _, u, x_bar_ref, grads = torch_grads(name, x, seed=6)
    out = run_reference(reference(to_float64(emitted)), {"x": x.astype(np.float64), "y_bar": u})
    assert relative_error(out["x_bar"], x_bar_ref) < TOL
    missing = sorted(p for p in grads if f"{p}_bar" not in out)
    assert not missing, f"parameters without a gradient output: {missing}"
    for p, ref in grads.items():
        assert relative_error(out[f"{p}_bar"], ref) < TOL, f"{name}: d/d{p} differs from torch.autograd"


def test_swin_window_7_input_gradient_matches_torch():
    """Swin's patch merging reads x[:, 0::2, 1::2] (Slice step 2) and its shifted windows a reversed Slice (step -1)."""
    pytest.importorskip("transformers")
    from examples import transformer_exports

    module, x = transformer_exports.build("swin_w7")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = transformer_exports.export(module, x, "legacy")
    assert {2, -1} <= {s for steps in _slice_steps(source) for s in steps}
    emitted, meta = transformer_exports.emitted(source, "vjp")
    (u_name,) = dict(json.loads(meta["jacgraph.cotangent_inputs"])).values()
    x_name = source.graph.input[0].name
    x_bar_name = dict(json.loads(meta["jacgraph.gradient_outputs"]))[x_name]
    y = module(torch.from_numpy(x))
    u = np.random.default_rng(5).standard_normal(tuple(y.shape)).astype(np.float32)
    module = module.double()
    _, pullback = torch.func.vjp(module, torch.from_numpy(x).double())
    (x_bar_ref,) = pullback(torch.from_numpy(u).double())
    out = transformer_exports.run(emitted, {x_name: x, u_name: u})
    assert relative_error(out[x_bar_name], x_bar_ref.detach().numpy()) < 1e-5


def _slice_steps(model):
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    return [consts[n.input[4]].tolist() for n in model.graph.node
            if n.op_type == "Slice" and len(n.input) > 4 and n.input[4] in consts]


def test_geometries_cover_groups_strides_pads_dilations():
    """The geometry table itself: every kind the rules distinguish has a case (a table that lost one would pass)."""
    convs = [a for op, _, _, _, a in GEOMETRIES if op == "Conv"]
    transposes = [(xs, a) for op, _, xs, _, a in GEOMETRIES if op == "ConvTranspose"]
    assert {a.get("group", 1) > 1 for a in convs} == {True, False}
    assert any(a.get("group", 1) == xs[1] for op, _, xs, _, a in GEOMETRIES if op == "Conv")
    assert {a.get("auto_pad", "NOTSET") for a in convs} >= {"NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"}
    assert any(max(a.get("dilations", [1])) > 1 for a in convs) and any(max(a.get("strides", [1])) > 1 for a in convs)
    assert any(a.get("group", 1) == xs[1] for xs, a in transposes)
    assert any(a.get("output_padding") for _, a in transposes) and any(a.get("output_shape") for _, a in transposes)
    assert {s for c in SLICE_CASES for s in c.consts["steps"].tolist()} >= {2, -1, -2}


def test_conv_transpose_same_with_output_padding_is_refused_not_misshaped():
    """auto_pad SAME_UPPER with output_padding: onnx's shape inference declares 9x11 where onnxruntime (and the
    spec: out = in·stride) computes 8x10; the VJP and Jacobian graphs were emitted with the declared shape and failed
    at run time or gave a wrongly shaped Jacobian (review FR-C). Now a JacgraphError naming the fix."""
    from onnx import TensorProto, helper, numpy_helper

    from jacgraph.errors import JacgraphError
    from jacgraph.passes import jacobian as jacobian_pass

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal([2, 3, 3, 3]).astype(np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], auto_pad="SAME_UPPER", kernel_shape=[3, 3],
                            strides=[2, 2], output_padding=[1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 9, 11]
    for build in (vjp.build, jacobian_pass.build):
        with pytest.raises(JacgraphError, match="output_padding"):
            build(model)
