"""If, Loop and Scan in both modes (jacgraph/rules/control_flow.py), nesting and outer-scope captures included.

Models are built in float64 with onnx.helper. Every emitted graph passes onnx.checker full_check (the
passes run it) and runs in onnxruntime with full optimizations, which is also the float64 evaluator here:
onnx's ReferenceEvaluator has no Scan with a reverse direction, and onnxruntime's CPU kernels of the ops
used here (MatMul, Add, Mul, Sin, Tanh, Exp, ReduceSum, Less, Loop, Scan, If) take float64.
JVP: against float64 central differences, relative error < 1e-6 (h = 1e-6: truncation ~h², round-off
~1e-16/h, both far below; a wrong rule is off by order 1), the TOL of tests/test_rules_jvp.py.
VJP: the dot-product test <J v, u> = <v, Jᵀ u> with J v from the (checked) JVP graph: both sides are exact
float64 linear algebra, so they agree to round-off (1e-10, the DOT_TOL of tests/test_rules_transpose.py).
Parameter gradients of captured initializers: against central differences, 1e-6.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from jacgraph import runtime
from jacgraph.errors import JacgraphError
from jacgraph.passes import jvp, vjp
from jacgraph.testing import central_difference, relative_error

D = T.DOUBLE
TOL, DOT_TOL, H = 1e-6, 1e-10, 1e-6
W = np.array([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6], [0.3, 0.2, 0.1]])


def vi(name, elem=D, shape=None):
    return h.make_tensor_value_info(name, elem, shape)


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def model(nodes, inputs, outputs, inits=()):
    graph = h.make_graph(nodes, "m", inputs, outputs, list(inits))
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


# ---- models -------------------------------------------------------------------------------------

def if_branches(then_out="yt", else_out="ye"):
    """then: sin(x @ W); else: x * x * w2. Both read x, W, w2 from the outer scope."""
    then = h.make_graph([h.make_node("MatMul", ["x", "W"], ["t1"]), h.make_node("Sin", ["t1"], [then_out])],
                        "then", [], [vi(then_out, D, [3])])
    other = h.make_graph([h.make_node("Mul", ["x", "x"], ["e1"]), h.make_node("Mul", ["e1", "w2"], [else_out])],
                         "else", [], [vi(else_out, D, [3])])
    return then, other


def if_model():
    then, other = if_branches()
    return model([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                 [vi("x", D, [3]), vi("c", T.BOOL, [])], [vi("y", D, [3])],
                 [init("W", W), init("w2", [1.5, -2.0, 0.7])])


def loop_body(dynamic):
    """s_out = tanh(s_in @ W + x), k_out = k_in + 1 (an integer counter), scan output s_out * s_in.
    dynamic: cond_out = sum(s_out²)·(it + 1) < limit (a data-dependent stop); "while": and it < 20."""
    nodes = [h.make_node("MatMul", ["s_in", "W"], ["m"]), h.make_node("Add", ["m", "x"], ["a"]),
             h.make_node("Tanh", ["a"], ["s_out"]), h.make_node("Add", ["k_in", "one"], ["k_out"]),
             h.make_node("Mul", ["s_out", "s_in"], ["scan"])]
    if dynamic:
        nodes += [h.make_node("Mul", ["s_out", "s_out"], ["sq"]), h.make_node("ReduceSum", ["sq"], ["ss"], keepdims=0),
                  h.make_node("Cast", ["it"], ["fit"], to=D), h.make_node("Add", ["fit", "oned"], ["steps"]),
                  h.make_node("Mul", ["ss", "steps"], ["score"]),
                  h.make_node("Less", ["score", "limit"], ["c_out" if dynamic != "while" else "below"])]
    if dynamic == "while":  # no trip count: the body itself stops after 20 steps at most
        nodes += [h.make_node("Less", ["it", "twenty"], ["early"]), h.make_node("And", ["below", "early"], ["c_out"])]
    elif not dynamic:
        nodes.append(h.make_node("Identity", ["c_in"], ["c_out"]))
    return h.make_graph(nodes, "body", [vi("it", T.INT64, []), vi("c_in", T.BOOL, []), vi("s_in", D, [3]),
                                        vi("k_in", T.INT64, [])],
                        [vi("c_out", T.BOOL, []), vi("s_out", D, [3]), vi("k_out", T.INT64, []), vi("scan", D, [3])])


def loop_model(dynamic=False, start="s0"):
    """dynamic: the trip count M is an input and the body's cond stops early; "while": no M at all."""
    inputs = [vi("x", D, [3])] + ([vi("s0", D, [3])] if start == "s0" else [])
    inputs += [vi("M", T.INT64, []), vi("limit", D, [])] if dynamic is True else []
    inputs += [vi("limit", D, [])] if dynamic == "while" else []
    inits = [init("W", W), init("one", np.int64(1)), init("k0", np.int64(0)), init("true", np.array(True)),
             init("twenty", np.int64(20)), init("oned", np.array(1.0))]
    inits += [] if dynamic else [init("M", np.int64(4))]
    trips = "" if dynamic == "while" else "M"
    return model([h.make_node("Loop", [trips, "true", start, "k0"], ["s", "k", "ys"], body=loop_body(dynamic))], inputs,
                 [vi("s", D, [3]), vi("k", T.INT64, []), vi("ys", D, ["T", 3])], inits)


def scan_body(state="s_in", out="s_out"):
    """s_out = sin(s_in @ W + x_t * z_t); y_t = s_out * v (v from the outer scope); y2_t = exp(s_in)."""
    return h.make_graph([h.make_node("MatMul", [state, "W"], ["m"]), h.make_node("Mul", ["x_t", "z_t"], ["xz"]),
                         h.make_node("Add", ["m", "xz"], ["a"]), h.make_node("Sin", ["a"], [out]),
                         h.make_node("Mul", [out, "v"], ["y_t"]), h.make_node("Exp", [state], ["y2_t"])],
                        "body", [vi(state, D, [3]), vi("x_t", D, [3]), vi("z_t", D, [3])],
                        [vi(out, D, [3]), vi("y_t", D, [3]), vi("y2_t", D, [3])])


def scan_node(start, outputs, body):
    """Scan inputs X [4, 3] along axis 0 and Z [3, 4] along axis 1 backwards; outputs Y stacked on axis 0,
    Y2 on the last axis, backwards."""
    return h.make_node("Scan", [start, "X", "Z"], outputs, body=body, num_scan_inputs=2, scan_input_axes=[0, 1],
                       scan_input_directions=[0, 1], scan_output_axes=[0, -1], scan_output_directions=[0, 1])


def scan_model():
    return model([scan_node("s0", ["s", "Y", "Y2"], scan_body())],
                 [vi("s0", D, [3]), vi("X", D, [4, 3]), vi("Z", D, [3, 4]), vi("v", D, [3])],
                 [vi("s", D, [3]), vi("Y", D, [4, 3]), vi("Y2", D, [3, 4])], [init("W", W)])


def loop_in_if_model():
    """then: the fixed-trip Loop of loop_model (its body reads x and W two scopes up); else: tanh(x)."""
    loop = h.make_node("Loop", ["M", "true", "x", "k0"], ["ls", "lk", "lys"], body=loop_body(False))
    then = h.make_graph([loop, h.make_node("Mul", ["ls", "w2"], ["yt"])], "then", [], [vi("yt", D, [3])])
    other = h.make_graph([h.make_node("Tanh", ["x"], ["ye"])], "else", [], [vi("ye", D, [3])])
    return model([h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                 [vi("x", D, [3]), vi("c", T.BOOL, [])], [vi("y", D, [3])],
                 [init("W", W), init("w2", [1.5, -2.0, 0.7]), init("one", np.int64(1)), init("k0", np.int64(0)),
                  init("true", np.array(True)), init("M", np.int64(3))])


def scan_in_loop_model():
    """A Loop of 2 steps whose body runs the Scan of scan_model from the carried state (X, Z, v, W read from
    the top scope) and adds the Scan's Y to a carried accumulator; the Loop stacks the Scan's Y2."""
    inner = scan_node("ls_in", ["ls_out", "iy", "iy2"], scan_body("q_in", "q_out"))
    body = h.make_graph([inner, h.make_node("Add", ["acc_in", "iy"], ["acc_out"]),
                         h.make_node("Identity", ["c_in"], ["c_out"])], "outer_body",
                        [vi("it", T.INT64, []), vi("c_in", T.BOOL, []), vi("ls_in", D, [3]), vi("acc_in", D, [4, 3])],
                        [vi("c_out", T.BOOL, []), vi("ls_out", D, [3]), vi("acc_out", D, [4, 3]), vi("iy2", D, [3, 4])])
    return model([h.make_node("Loop", ["M", "true", "s0", "acc0"], ["s", "acc", "ys2"], body=body)],
                 [vi("s0", D, [3]), vi("X", D, [4, 3]), vi("Z", D, [3, 4]), vi("v", D, [3])],
                 [vi("s", D, [3]), vi("acc", D, [4, 3]), vi("ys2", D, [2, 3, 4])],
                 [init("W", W), init("M", np.int64(2)), init("true", np.array(True)), init("acc0", np.zeros((4, 3)))])


def feeds_for(name, rng):
    x = {"x": rng.standard_normal(3)}
    scan = {"s0": rng.standard_normal(3), "X": rng.standard_normal((4, 3)), "Z": rng.standard_normal((3, 4)),
            "v": rng.standard_normal(3)}
    return {
        "if-then": (if_model, {**x, "c": np.array(True)}),
        "if-else": (if_model, {**x, "c": np.array(False)}),
        "loop-fixed": (loop_model, {**x, "s0": rng.standard_normal(3)}),
        "loop-state-is-capture": (lambda: loop_model(start="x"), x),
        # a data-dependent stop: sum(s²)·(it + 1) < 6 ends these after a few of at most 10 (20) steps
        "loop-dynamic": (lambda: loop_model(True), {**x, "s0": rng.standard_normal(3), "M": np.array(10, np.int64),
                                                    "limit": np.array(6.0)}),
        "loop-while": (lambda: loop_model("while"), {**x, "s0": rng.standard_normal(3), "limit": np.array(6.0)}),
        "loop-zero-trips": (lambda: loop_model(True), {**x, "s0": rng.standard_normal(3), "M": np.array(0, np.int64),
                                                       "limit": np.array(1.5)}),
        "scan": (scan_model, scan),
        "loop-in-if-then": (loop_in_if_model, {**x, "c": np.array(True)}),
        "loop-in-if-else": (loop_in_if_model, {**x, "c": np.array(False)}),
        "scan-in-loop": (scan_in_loop_model, scan),
    }[name]


NAMES = ["if-then", "if-else", "loop-fixed", "loop-state-is-capture", "loop-dynamic", "loop-while", "loop-zero-trips", "scan",
         "loop-in-if-then", "loop-in-if-else", "scan-in-loop"]


# ---- helpers ------------------------------------------------------------------------------------

class Float64Session:
    """onnxruntime in the shape of onnx's ReferenceEvaluator (output_names, run(None, feeds)), for
    jacgraph.testing.central_difference."""

    def __init__(self, m):
        self.sess = runtime.session(m)
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_names = {i.name for i in self.sess.get_inputs()}

    def run(self, _, feeds):
        return self.sess.run(None, {k: np.asarray(v) for k, v in feeds.items() if k in self.input_names})

    def __call__(self, feeds):
        return dict(zip(self.output_names, self.run(None, feeds)))


def props(m):
    return {p.key: json.loads(p.value) if p.value[:1] in "[{" else p.value for p in m.metadata_props}


def float_inputs(feeds):
    return [k for k, v in feeds.items() if np.asarray(v).dtype == np.float64]


def run_jvp(m, feeds, directions, K=None):
    emitted = jvp.build(m, tangents=K)
    p = props(emitted)
    dot_in, dot_out = dict(p["jacgraph.tangent_inputs"]), dict(p["jacgraph.tangent_outputs"])
    out = Float64Session(emitted)({**feeds, **{dot_in[x]: d for x, d in directions.items()}})
    return emitted, out, dot_out


# ---- forward mode -------------------------------------------------------------------------------

def check_jvp(m, feeds, rng, K=None, label=""):
    """The JVP of `m` against float64 central differences, K stacked tangents or one."""
    directions = {x: rng.standard_normal(((K,) if K else ()) + np.shape(feeds[x])) for x in float_inputs(feeds)}
    _, out, dot_out = run_jvp(m, feeds, directions, K)
    src = Float64Session(m)
    primal = src(feeds)
    for y, value in primal.items():
        np.testing.assert_array_equal(out[y], value)  # the primal passes through unchanged
    for k in range(K or 1):
        fd = central_difference(src, feeds, {x: d if K is None else d[k] for x, d in directions.items()}, H)
        for y, y_dot in dot_out.items():
            got = out[y_dot] if K is None else out[y_dot][k]
            if y not in fd:  # the integer counter
                assert not np.any(got)
                continue
            assert got.shape == fd[y].shape
            assert relative_error(got, fd[y]) < TOL, f"{label} {y}: {relative_error(got, fd[y]):.2e}"


@pytest.mark.parametrize("K", [None, 2], ids=["one-tangent", "K=2"])
@pytest.mark.parametrize("name", NAMES)
def test_jvp_matches_central_differences(name, K):
    rng = np.random.default_rng(0)
    make, feeds = feeds_for(name, rng)
    check_jvp(make(), feeds, rng, K, name)


def test_integer_counter_and_cond_carry_no_tangent():
    """The Loop of loop_model carries (s, k): the tangent Loop carries one more value (s's tangent), not two."""
    emitted = jvp.build(loop_model())
    loop = next(n for n in emitted.graph.node if n.op_type == "Loop")
    assert len(loop.input) == 2 + 2 + 1
    body = loop.attribute[0].g
    assert [o.type.tensor_type.elem_type for o in body.output] == [T.BOOL, D, T.INT64, D, D, D]


# ---- reverse mode -------------------------------------------------------------------------------

def check_dot_product(m, feeds, rng, label=""):
    """<J v, u> (J v from the JVP graph) against <v, Jᵀ u> (the VJP graph)."""
    xs = float_inputs(feeds)
    directions = {x: rng.standard_normal(np.shape(feeds[x])) for x in xs}
    _, out, dot_out = run_jvp(m, feeds, directions)
    emitted = vjp.build(m, inputs=xs)
    p = props(emitted)
    bars, grads = dict(p["jacgraph.cotangent_inputs"]), dict(p["jacgraph.gradient_outputs"])
    u = {y: rng.standard_normal(np.shape(out[y])) for y in bars}
    got = Float64Session(emitted)({**feeds, **{bars[y]: u[y] for y in bars}})
    for y in bars:  # the primal outputs pass through unchanged
        np.testing.assert_array_equal(got[y], out[y])
    forward = sum(np.sum(out[dot_out[y]] * u[y]) for y in bars)
    reverse = sum(np.sum(directions[x] * got[grads[x]]) for x in xs)
    assert abs(forward - reverse) <= DOT_TOL * max(abs(forward), 1.0), f"{label}: <Jv,u> {forward} vs <v,J'u> {reverse}"


@pytest.mark.parametrize("name", NAMES)
def test_vjp_dot_product(name):
    rng = np.random.default_rng(1)
    make, feeds = feeds_for(name, rng)
    check_dot_product(make(), feeds, rng, name)


@pytest.mark.parametrize("first", ["jvp", "vjp"])
@pytest.mark.parametrize("name", NAMES)
def test_second_order(name, first):
    """The passes compose through control flow: the JVP and VJP graphs of a JVP/VJP graph (jvp of vjp is
    the Hessian-vector product) checked like first-order ones, on the first graph's own inputs."""
    rng = np.random.default_rng(5)
    make, feeds = feeds_for(name, rng)
    m = make()
    inner = jvp.build(m) if first == "jvp" else vjp.build(m, inputs=float_inputs(feeds))
    primal = Float64Session(m)(feeds)
    p = props(inner)
    shapes = {bar: np.shape(primal[y]) for y, bar in p.get("jacgraph.cotangent_inputs", [])}
    shapes.update({dot: np.shape(feeds[x]) for x, dot in p.get("jacgraph.tangent_inputs", [])})
    inner_feeds = {**feeds, **{name: rng.standard_normal(shape) for name, shape in shapes.items()}}
    check_jvp(inner, inner_feeds, rng, label=f"jvp of {first} of {name}")
    check_dot_product(inner, inner_feeds, rng, label=f"vjp of {first} of {name}")


def with_initializer(m, name, value):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(init(name, value))
    return out


@pytest.mark.parametrize("name", ["loop-dynamic", "scan", "loop-in-if-then", "scan-in-loop"])
def test_gradient_of_captured_parameter(name):
    """W is read only inside the bodies (two scopes down in loop-in-if): its gradient is accumulated over
    the iterations of the reverse sweep; checked against central differences along a random direction."""
    rng = np.random.default_rng(2)
    make, feeds = feeds_for(name, rng)
    m = make()
    emitted = vjp.build(m, inputs=float_inputs(feeds), wrt=["W"])
    p = props(emitted)
    bars, grads = dict(p["jacgraph.cotangent_inputs"]), dict(p["jacgraph.gradient_outputs"])
    src = Float64Session(m)
    u = {y: rng.standard_normal(np.shape(v)) for y, v in src(feeds).items() if y in bars}
    w_bar = Float64Session(emitted)({**feeds, **{bars[y]: u[y] for y in bars}})[grads["W"]]
    V = rng.standard_normal(W.shape)
    plus, minus = (Float64Session(with_initializer(m, "W", W + s * H * V))(feeds) for s in (1, -1))
    fd = sum(np.sum((plus[y] - minus[y]) / (2 * H) * u[y]) for y in bars)
    assert relative_error(np.sum(w_bar * V), fd) < TOL


def test_reverse_sweep_replays_the_dynamic_trip_count():
    """The forward Loop stores one row per executed iteration; the reverse Loop runs over exactly those."""
    rng = np.random.default_rng(3)
    _, feeds = feeds_for("loop-dynamic", rng)
    m = loop_model(True)
    trips = Float64Session(m)(feeds)["ys"].shape[0]
    assert 1 < trips < 10  # the cond stopped the loop after some steps, before M = 10
    emitted = vjp.build(m, inputs=["x", "s0"])
    loop = next(n for n in emitted.graph.node if n.op_type == "Loop")
    stored = next(o for o in loop.output if o.startswith("s_in_stored"))  # s_in of every iteration
    probe = onnx.ModelProto()
    probe.CopyFrom(emitted)
    probe.graph.output.append(vi(stored, D, None))
    p = props(emitted)
    out = Float64Session(probe)({**feeds, **{bar: np.ones(3) if y == "s" else np.ones((trips, 3))
                                             for y, bar in p["jacgraph.cotangent_inputs"]}})
    assert out[stored].shape[0] == trips


# ---- errors and exports ---------------------------------------------------------------------------

def test_missing_rule_inside_a_body_is_named():
    """An op without rules inside a body (a custom-domain op here) gets the one error naming it and the body."""
    body = h.make_graph([h.make_node("Frobnicate", ["s_in"], ["s_out"], domain="com.example"),
                         h.make_node("Identity", ["c_in"], ["c_out"])],
                        "body", [vi("it", T.INT64, []), vi("c_in", T.BOOL, []), vi("s_in", D, [3])],
                        [vi("c_out", T.BOOL, []), vi("s_out", D, [3])])
    graph = h.make_graph([h.make_node("Loop", ["M", "", "x"], ["s"], body=body)], "m", [vi("x", D, [3])],
                         [vi("s", D, [3])], [init("M", np.int64(2))])
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.example", 1)])
    for build in (jvp.build, vjp.build):
        with pytest.raises(JacgraphError, match=r"inside Loop 's'.*com\.example\.Frobnicate \(x1\)"):
            build(m)


def test_growing_loop_state():
    """A Loop that grows its carried value (Concat): forward mode follows it; reverse mode, which stacks each
    iteration's state, refuses it with a reason instead of emitting a graph onnxruntime would fail on."""
    body = h.make_graph([h.make_node("Concat", ["acc_in", "x"], ["acc_out"], axis=0),
                         h.make_node("Identity", ["c_in"], ["c_out"])], "body",
                        [vi("it", T.INT64, []), vi("c_in", T.BOOL, []), vi("acc_in", D, None)],
                        [vi("c_out", T.BOOL, []), vi("acc_out", D, None)])
    m = model([h.make_node("Loop", ["M", "true", "x"], ["acc"], body=body)], [vi("x", D, [3])], [vi("acc", D, ["n"])],
              [init("M", np.int64(3)), init("true", np.array(True))])
    rng = np.random.default_rng(7)
    check_jvp(m, {"x": rng.standard_normal(3)}, rng, label="growing state")
    with pytest.raises(JacgraphError, match=r"changes the shape of its carried value 'x' from \[3\] to \[6\]"):
        vjp.build(m)


torch = pytest.importorskip("torch")


class CondModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def positive(self, x):
        return torch.sin(self.lin(x))

    def other(self, x):
        return torch.tanh(x) * 2.0

    def forward(self, x):
        return torch.cond(x.sum() > 0, self.positive, self.other, (x,))


class LoopModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 3) * 0.5)

    def forward(self, x, n: int):
        s = x
        for _ in range(n):
            s = torch.tanh(s @ self.w + x)
        return s


def export_cond(path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CondModule(), (torch.randn(2, 3),), path, dynamo=True, verbose=False)
    return path


def export_loop(path):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # TorchScript keeps a data-dependent Python loop as an ONNX Loop
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(LoopModule()), (torch.randn(2, 3), 4), path, dynamo=False,
                          input_names=["x", "n"], output_names=["y"])
    return path


@pytest.mark.parametrize("export", [export_cond, export_loop], ids=["torch.cond-If", "torchscript-Loop"])
def test_torch_exports_match_autograd(export, tmp_path):
    """JVP and VJP of PyTorch exports (float32 in onnxruntime) against torch.func.jvp / autograd in float64:
    float32 round-off over a few layers is ~1e-6 relative; 1e-4 leaves margin, a wrong rule is off by O(1)."""
    path = export(str(tmp_path / "m.onnx"))
    m = onnx.load(path)
    assert {"If", "Loop"} & {n.op_type for n in m.graph.node}
    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    module = (CondModule() if export is export_cond else LoopModule()).double()
    cases = [np.abs(rng.standard_normal((2, 3))), -np.abs(rng.standard_normal((2, 3)))]  # both branches
    for x in cases if export is export_cond else cases[:1]:
        extra = {} if export is export_cond else {"n": np.array(4, np.int64)}
        v, u = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
        if export is export_cond:  # torch.func cannot trace torch.cond eagerly: the taken branch itself
            f = module.positive if x.sum() > 0 else module.other
        else:
            f = lambda t: module(t, 4)  # noqa: E731
        xt = torch.tensor(x, requires_grad=True)
        y, y_dot = torch.func.jvp(f, (xt,), (torch.tensor(v),))
        (x_bar,) = torch.autograd.grad(f(xt), xt, torch.tensor(u))
        x_name = m.graph.input[0].name
        e = jvp.build(m, inputs=[x_name])
        p = props(e)
        feeds = {x_name: x.astype(np.float32), **extra}
        out = runtime.run(e, {**feeds, dict(p["jacgraph.tangent_inputs"])[x_name]: v.astype(np.float32)})
        y_name = m.graph.output[0].name
        assert relative_error(out[y_name], y.detach().numpy()) < 1e-5  # the export computes the same function
        assert relative_error(out[dict(p["jacgraph.tangent_outputs"])[y_name]], y_dot.detach().numpy()) < 1e-4
        r = vjp.build(m, inputs=[x_name])
        p = props(r)
        got = runtime.run(r, {**feeds, dict(p["jacgraph.cotangent_inputs"])[y_name]: u.astype(np.float32)})
        assert relative_error(got[dict(p["jacgraph.gradient_outputs"])[x_name]], x_bar.numpy()) < 1e-4


def test_jvp_and_vjp_of_the_jfb_fixed_point_loop(tmp_path):
    """jacgraph's own JFB pass emits a Loop that runs to a residual tolerance (a data-dependent trip count):
    its JVP (the derivative of the iterations as run, not the implicit one) matches central differences of
    the float64 fixed-point graph, and its VJP passes the dot-product test."""
    from test_jfb import ResidualT, export

    from jacgraph.passes import jfb
    from jacgraph.testing import to_float64

    torch.manual_seed(0)
    path = export(ResidualT().eval(), (4, 10), (4, 4), tmp_path / "T.onnx", True)
    fixed_point = to_float64(jfb.build(path, state="z")["fixed_point"])
    assert any(n.op_type == "Loop" for n in fixed_point.graph.node)
    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal((4, 4))}  # the parameters are inputs defaulting to their values
    assert 5 < Float64Session(fixed_point)(feeds)["iterations"] < 100  # stopped by the tolerance
    check_jvp(fixed_point, feeds, rng, label="jfb fixed point")
    check_dot_product(fixed_point, feeds, rng, label="jfb fixed point")
