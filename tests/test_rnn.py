"""RNN, GRU and LSTM lowered to primitive ops (jacgraph.lowering): forward against onnxruntime's native
kernels, derivatives against float64 central differences, torch.func.jvp and torch.autograd."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jacgraph
from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.lowering import UNROLL_MAX, all_nodes
from jacgraph.model import SourceModel
from jacgraph.testing import central_difference, check_jvp, relative_error, to_float64

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
T, BATCH, INPUT, HIDDEN = 4, 3, 5, 6
SEQ_LENS = np.array([4, 2, 1], np.int32)  # full, half, one step: the masks cut at three different places
# float32 forward, lowering vs onnxruntime's fused kernel: both round each of T steps (gate GEMMs,
# MLAS's sigmoid/tanh approximations ~1e-7 relative); measured worst relative error 9.6e-7 over the
# cases below, so 1e-5 leaves room for other BLAS orders while a wrong gate or mask gives >1e-2.
FORWARD_TOL = 1e-5
# float64 against float64: lowering JVP vs central differences with h=1e-6 (O(h²) truncation ~1e-12,
# round-off ~1e-10/|J|): 1e-6 is far below any rule error.
FD_TOL = 1e-6


def recurrent_model(op, direction="forward", layout=0, seq_lens=False, initial=True, peepholes=False, bias=True,
                    steps=T, **attrs):
    """One RNN/GRU/LSTM node with random weights; X, sequence_lens, initial_h/c are graph inputs.
    `steps`: the sequence length X declares (an int, or a name for a dynamic length)."""
    rng = np.random.default_rng(0)
    G, D = GATES[op], 2 if direction == "bidirectional" else 1

    def weight(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, (0.5 * rng.standard_normal(shape)).ravel())

    inits = [weight("W", D, G * HIDDEN, INPUT), weight("R", D, G * HIDDEN, HIDDEN)]
    if bias:
        inits.append(weight("B", D, 2 * G * HIDDEN))
    state_shape = [BATCH, D, HIDDEN] if layout else [D, BATCH, HIDDEN]
    x_shape = [BATCH, steps, INPUT] if layout else [steps, BATCH, INPUT]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if seq_lens:
        inputs.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, [BATCH]))
    names = ["X", "W", "R", "B" if bias else "", "seq_lens" if seq_lens else "", "initial_h" if initial else ""]
    outputs = ["Y", "Y_h"]
    states = ["initial_h"]
    if op == "LSTM":
        names += ["initial_c" if initial else "", "P" if peepholes else ""]
        outputs.append("Y_c")
        states.append("initial_c")
        if peepholes:
            inits.append(weight("P", D, 3 * HIDDEN))
    if initial:
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, state_shape) for s in states]
    node = helper.make_node(op, names, outputs, hidden_size=HIDDEN, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], op.lower(), inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = runtime.max_ir_version()
    return model


def feeds_for(model, seed=1, dtype=np.float32, steps=T):
    """Random inputs; a dynamic sequence length gets `steps`; sequence_lens cut at three places (capped at steps)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else steps for d in inp.type.tensor_type.shape.dim]
        lens = np.minimum(SEQ_LENS, steps)
        feeds[inp.name] = lens if inp.name == "seq_lens" else rng.standard_normal(shape).astype(dtype)
    return feeds


def native_reference(model, feeds):
    """onnxruntime's own kernel; it refuses layout=1, so that case runs as layout 0 on transposed tensors."""
    layout = helper.get_node_attr_value(model.graph.node[0], "layout")
    if not layout:
        return runtime.run(runtime.session(model), feeds)
    time_major = onnx.ModelProto()
    time_major.CopyFrom(model)
    for attr in time_major.graph.node[0].attribute:
        if attr.name == "layout":
            attr.i = 0
    for inp in time_major.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 3:
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    swapped = {k: v.transpose(1, 0, 2) if v.ndim == 3 else v for k, v in feeds.items()}
    out = runtime.run(runtime.session(time_major), swapped)
    return {k: v.transpose(2, 0, 1, 3) if v.ndim == 4 else v.transpose(1, 0, 2) for k, v in out.items()}


def lowered(model):
    proto = SourceModel(model).proto
    assert not {n.op_type for n in proto.graph.node} & set(GATES), "the recurrence was not lowered"
    return proto


CASES = [dict(op=op, direction=d, layout=layout, seq_lens=s, peepholes=op == "LSTM")
         for op in GATES for d in ("forward", "reverse", "bidirectional") for layout in (0, 1) for s in (False, True)]
CASES += [
    dict(op="GRU", direction="bidirectional", linear_before_reset=1, seq_lens=True),
    dict(op="GRU", linear_before_reset=1, bias=False),
    dict(op="LSTM", direction="bidirectional", initial=False, bias=False),
    dict(op="LSTM", direction="bidirectional", clip=0.3, peepholes=True),
    dict(op="GRU", clip=0.3, linear_before_reset=1),
    dict(op="RNN", clip=0.3, direction="reverse"),
    dict(op="LSTM", activations=["HardSigmoid", "LeakyRelu", "ScaledTanh"], activation_alpha=[0.3, 0.2, 1.5],
         activation_beta=[0.4, 0.7]),
    dict(op="GRU", direction="bidirectional", activations=["Sigmoid", "Tanh", "Affine", "Elu"],
         activation_alpha=[0.5, 0.9], activation_beta=[0.1]),
    dict(op="GRU", activations=["Softsign", "Softplus"]),
    dict(op="RNN", activations=["ThresholdedRelu"], activation_alpha=[0.1]),
    dict(op="RNN", direction="bidirectional", activations=["Relu", "Tanh"]),
]


def case_id(case):
    return "-".join(f"{k}={v}" if k != "op" else v for k, v in case.items() if v not in (False, "forward", 0))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_lowering_matches_onnxruntime_kernel(case):
    model = recurrent_model(**case)
    feeds = feeds_for(model)
    expected = native_reference(model, feeds)
    got = runtime.run(runtime.session(lowered(model)), feeds)
    for name, value in expected.items():
        assert got[name].shape == value.shape
        assert relative_error(got[name], value) < FORWARD_TOL, f"{name} differs from onnxruntime's {case['op']}"


@pytest.mark.parametrize("case", [
    dict(op="LSTM", direction="bidirectional", seq_lens=True, peepholes=True, layout=1),
    dict(op="GRU", direction="reverse", linear_before_reset=1),
    dict(op="RNN", direction="bidirectional", seq_lens=True),
], ids=["lstm", "gru", "rnn"])
def test_jvp_and_vjp_match_central_differences(case):
    model = to_float64(recurrent_model(**case))
    feeds = feeds_for(model, dtype=np.float64)
    rng = np.random.default_rng(2)
    directions = {k: rng.standard_normal(v.shape) for k, v in feeds.items() if v.dtype == np.float64}
    # the oracle differentiates the lowered forward (checked against onnxruntime's kernel above): onnx's
    # reference evaluator has no layout=1 or sequence_lens support, and onnxruntime's kernels are float32-only
    errors = check_jvp(lowered(model), jacgraph.compile(model, emit="jvp"), feeds, directions)
    assert max(errors.values()) < FD_TOL, errors
    # reverse mode: <J v, u> = <v, J^T u> with J v from the checked JVP graph
    jvp_out = runtime.run(runtime.session(jacgraph.compile(model, emit="jvp")),
                          {**feeds, **{f"{k}_dot": v for k, v in directions.items()}})
    vjp_model = jacgraph.compile(model, emit="vjp")
    outputs = [o.name for o in model.graph.output]
    cotangents = {f"{y}_bar": rng.standard_normal(jvp_out[y].shape) for y in outputs}
    vjp_out = runtime.run(runtime.session(vjp_model), {**feeds, **cotangents})
    forward = sum(np.vdot(jvp_out[f"{y}_dot"], cotangents[f"{y}_bar"]) for y in outputs)
    reverse = sum(np.vdot(directions[x], vjp_out[f"{x}_bar"]) for x in directions)
    assert abs(forward - reverse) <= 1e-10 * max(1.0, abs(forward))


class OnnxruntimeOracle:
    """onnxruntime in float64 as the central-difference oracle: onnx's reference evaluator has no reverse Scan."""

    def __init__(self, model):
        self.session = runtime.session(model)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, _, feeds):
        return self.session.run(None, feeds)


SCAN_CASES = [dict(op="LSTM", direction="bidirectional", seq_lens=True, peepholes=True, layout=1),
              dict(op="GRU", direction="reverse", linear_before_reset=1, seq_lens=True),
              dict(op="GRU", direction="bidirectional", clip=0.5),
              dict(op="RNN", direction="bidirectional", seq_lens=True)]


@pytest.mark.parametrize("case", SCAN_CASES, ids=[case_id(c) for c in SCAN_CASES])
def test_dynamic_sequence_length_becomes_a_scan(case):
    """A dynamic length (or one above UNROLL_MAX) is a Scan over time; one emitted graph serves every length."""
    model = recurrent_model(**case, steps="T")
    proto = lowered(model)
    assert "Scan" in {n.op_type for n in proto.graph.node}
    jvp_model = jacgraph.compile(to_float64(model), emit="jvp")
    vjp_model = jacgraph.compile(to_float64(model), emit="vjp")
    rng = np.random.default_rng(4)
    for steps in (3, 7):
        feeds = feeds_for(model, steps=steps)
        expected = native_reference(recurrent_model(**case, steps=steps), feeds)
        got = runtime.run(runtime.session(proto), feeds)
        assert all(relative_error(got[k], v) < FORWARD_TOL for k, v in expected.items())
        feeds64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
        directions = {k: rng.standard_normal(v.shape) for k, v in feeds64.items() if v.dtype == np.float64}
        jvp_out = runtime.run(runtime.session(jvp_model), {**feeds64, **{f"{k}_dot": v for k, v in directions.items()}})
        fd = central_difference(OnnxruntimeOracle(to_float64(proto)), feeds64, directions)
        assert max(relative_error(jvp_out[f"{y}_dot"], fd[y]) for y in fd) < FD_TOL
        outputs = [o.name for o in model.graph.output]
        cotangents = {f"{y}_bar": rng.standard_normal(jvp_out[y].shape) for y in outputs}
        vjp_out = runtime.run(runtime.session(vjp_model), {**feeds64, **cotangents})
        forward = sum(np.vdot(jvp_out[f"{y}_dot"], cotangents[f"{y}_bar"]) for y in outputs)
        reverse = sum(np.vdot(directions[x], vjp_out[f"{x}_bar"]) for x in directions)
        assert abs(forward - reverse) <= 1e-10 * max(1.0, abs(forward))


def test_long_sequence_is_a_scan_not_unrolled():
    model = recurrent_model("LSTM", direction="bidirectional", steps=UNROLL_MAX + 8)
    proto = lowered(model)
    assert sum(n.op_type == "Scan" for n in proto.graph.node) == 2 and len(proto.graph.node) < 100
    feeds = feeds_for(model)
    expected = native_reference(model, feeds)
    got = runtime.run(runtime.session(proto), feeds)
    assert all(relative_error(got[k], v) < FORWARD_TOL for k, v in expected.items())


def test_input_forget_is_refused():
    with pytest.raises(JacgraphError, match="input_forget"):
        SourceModel(recurrent_model("LSTM", input_forget=1))


# ---- end to end: PyTorch's recurrent layers ---------------------------------------------------------

torch = pytest.importorskip("torch", reason="the end-to-end tests compare against PyTorch")


class Recurrent(torch.nn.Module):
    """nn.LSTM / GRU / RNN, 2 layers, bidirectional, batch_first; returns every output."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(torch.nn, kind)(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        y, state = self.rnn(x)
        return (y, *state) if isinstance(state, tuple) else (y, state)


def export(net, x, n_out, dynamic):
    f = io.BytesIO()
    names = ["y", "h", "c"][:n_out]
    axes = {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}} if dynamic else None
    torch.onnx.export(net, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=names,
                      dynamic_axes=axes)
    return onnx.load_from_string(f.getvalue()), names


@pytest.mark.parametrize("kind, dynamic", [("LSTM", False), ("LSTM", True), ("GRU", True), ("GRU", False),
                                           ("RNN", False)])
def test_torch_recurrent_layers_jvp_and_vjp_match_torch(kind, dynamic):
    """dynamic: batch and sequence axes exported dynamic; the layers become Scans, the emitted graphs keep both axes."""
    net = Recurrent(kind).eval()
    x32 = torch.randn(2, T, INPUT)
    model, names = export(net, x32, 3 if kind == "LSTM" else 2, dynamic)
    net64, x = net.double(), x32.double()
    v = torch.randn_like(x)
    ys, ys_dot = torch.func.jvp(net64, (x,), (v,))
    m64 = to_float64(model)
    jvp_model, vjp_model = jacgraph.compile(m64, emit="jvp"), jacgraph.compile(m64, emit="vjp")
    if dynamic:
        assert [d.dim_param for d in jvp_model.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
    out = runtime.run(runtime.session(jvp_model), {"x": x.numpy(), "x_dot": v.numpy()})
    for name, y, y_dot in zip(names, ys, ys_dot):
        # float64 throughout: the lowering and torch differ only by summation order (~1e-15 relative)
        assert relative_error(out[name], y.detach().numpy()) < 1e-10
        assert relative_error(out[f"{name}_dot"], y_dot.detach().numpy()) < 1e-10, f"{kind}: {name}_dot vs torch"
    xg = x.clone().requires_grad_(True)
    us = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(net64(xg), us)
    cotangents = {f"{n}_bar": u.numpy() for n, u in zip(names, us)}
    grads = runtime.run(runtime.session(vjp_model), {"x": x.numpy(), **cotangents})
    assert relative_error(grads["x_bar"], xg.grad.numpy()) < 1e-10, f"{kind}: x_bar differs from torch.autograd"
    # the float32 source runs too: primal within float32 rounding of torch's
    out32 = runtime.run(runtime.session(jacgraph.compile(model, emit="jvp")),
                        {"x": x32.numpy(), "x_dot": v.float().numpy()})
    assert relative_error(out32["y"], ys[0].detach().numpy()) < 1e-5


def test_parameter_gradients_are_the_source_weights():
    """wrt="params": exactly W, R, B, P get gradients (the lowering's own constants are not parameters);
    each checked against a float64 central difference of <u, Y> along a random weight direction."""
    model = to_float64(recurrent_model("LSTM", direction="bidirectional", peepholes=True, seq_lens=True))
    feeds = feeds_for(model, dtype=np.float64)
    rng = np.random.default_rng(3)
    u = rng.standard_normal((T, 2, BATCH, HIDDEN))  # cotangent of Y; Y_h and Y_c get zero
    cotangents = {"Y_bar": u, "Y_h_bar": np.zeros((2, BATCH, HIDDEN)), "Y_c_bar": np.zeros((2, BATCH, HIDDEN))}
    grads = runtime.run(runtime.session(jacgraph.compile(model, emit="vjp", wrt="params")), {**feeds, **cotangents})
    assert {k[:-4] for k in grads if k.endswith("_bar") and k[:-4] not in feeds} == {"W", "R", "B", "P"}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h = 1e-6
    for name in ("W", "R", "B", "P"):
        direction = rng.standard_normal(weights[name].shape)
        values = []
        for sign in (1, -1):
            moved = onnx.ModelProto()
            moved.CopyFrom(model)
            for t in moved.graph.initializer:
                if t.name == name:
                    t.CopyFrom(onnx.numpy_helper.from_array(weights[name] + sign * h * direction, name))
            values.append(np.vdot(u, runtime.run(runtime.session(lowered(moved)), feeds)["Y"]))
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(np.vdot(direction, grads[f"{name}_bar"]) - fd) <= 1e-6 * max(1.0, abs(fd)), name


def test_recurrence_and_function_op_inside_if_branches():
    """An exported voice model runs its LSTM inside an If branch: bodies are lowered and expanded in place."""
    rng = np.random.default_rng(5)
    weights = {"W": (1, 4 * HIDDEN, INPUT), "R": (1, 4 * HIDDEN, HIDDEN), "B": (1, 8 * HIDDEN), "Wp": (INPUT, HIDDEN),
               "scale": (HIDDEN,)}
    inits = [onnx.numpy_helper.from_array((0.5 * rng.standard_normal(s)).astype(np.float32), n)
             for n, s in weights.items()]
    state = [1, BATCH, HIDDEN]
    then = helper.make_graph([helper.make_node("LSTM", ["X", "W", "R", "B"], ["", "h_then"], hidden_size=HIDDEN)],
                             "then", [], [helper.make_tensor_value_info("h_then", TensorProto.FLOAT, state)])
    axes = onnx.numpy_helper.from_array(np.array([0], np.int64))
    other = helper.make_graph([helper.make_node("Constant", [], ["time_axis"], value=axes),
                               helper.make_node("ReduceMean", ["X", "time_axis"], ["m"]),
                               helper.make_node("MatMul", ["m", "Wp"], ["p"]),
                               helper.make_node("RMSNormalization", ["p", "scale"], ["h_else"])],
                              "else", [], [helper.make_tensor_value_info("h_else", TensorProto.FLOAT, state)])
    graph = helper.make_graph([helper.make_node("If", ["use_lstm"], ["h"], then_branch=then, else_branch=other)],
                              "voice",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, BATCH, INPUT]),
                               helper.make_tensor_value_info("use_lstm", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, state)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = runtime.max_ir_version()
    proto = lowered(model)
    body_ops = {n.op_type for n in all_nodes(proto.graph)}
    assert not body_ops & {"LSTM", "RMSNormalization"}, body_ops
    m64 = to_float64(proto)
    # float64 after lowering: RMSNormalization's body computes in float32 (stash_type) until converted
    jvp_model, vjp_model = jacgraph.compile(m64, emit="jvp"), jacgraph.compile(m64, emit="vjp")
    runtime.session(jacgraph.compile(model, emit="vjp"))  # the float32 source compiles and loads as well
    for use_lstm in (True, False):
        x = rng.standard_normal((T, BATCH, INPUT)).astype(np.float32)
        feeds = {"X": x, "use_lstm": np.array(use_lstm)}
        expected = runtime.run(runtime.session(model), feeds)["h"]
        assert relative_error(runtime.run(runtime.session(proto), feeds)["h"], expected) < FORWARD_TOL
        feeds64 = {"X": x.astype(np.float64), "use_lstm": np.array(use_lstm)}
        v, u = rng.standard_normal(x.shape), rng.standard_normal(state)
        errors = check_jvp(m64, jvp_model, feeds64, {"X": v})
        assert errors["h"] < FD_TOL, (use_lstm, errors)
        h_dot_name = jvp_model.graph.output[1].name  # the pass may name it h_dot_N when h_dot is taken inside
        h_dot = runtime.run(runtime.session(jvp_model), {**feeds64, "X_dot": v})[h_dot_name]
        names = [i.name for i in vjp_model.graph.input][2:] + [o.name for o in vjp_model.graph.output][1:]
        h_bar_name, x_bar_name = names  # positional, like h_dot: the pass may suffix a taken name
        x_bar = runtime.run(runtime.session(vjp_model), {**feeds64, h_bar_name: u})[x_bar_name]
        assert abs(np.vdot(h_dot, u) - np.vdot(v, x_bar)) <= 1e-10 * max(1.0, abs(np.vdot(h_dot, u)))
