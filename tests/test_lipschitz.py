"""AutoLip / SeqLip (passes/lipschitz.py, seqlip.py, lipschitz_dag.py) and LipSDP (passes/lipsdp.py): certified
per-layer bounds, the emitted A / A^T / power graphs, soundness against the exact Lipschitz constant of tiny ReLU
MLPs, labels, and the command line."""
from __future__ import annotations

import itertools
import json
import math
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from examples.lipschitz_exact import exact_lipschitz, forward, mlp_onnx, random_mlp
from jacgraph import runtime, spectral
from jacgraph.cli import main
from jacgraph.errors import JacgraphError
from jacgraph.model import SourceModel
from jacgraph.passes import lipschitz as L
from jacgraph.passes import seqlip
from jacgraph.testing import reference_session


# ---- models -------------------------------------------------------------------------------------

def chain(layers, in_shape, batch="N", out_features=None):
    """An ONNX chain from (op, weights..., attrs) tuples; float32 like exported models."""
    nodes, inits, cur = [], [], "x"
    for i, (op, *consts, attrs) in enumerate(layers):
        names = []
        for j, c in enumerate(consts):
            inits.append(numpy_helper.from_array(np.asarray(c, np.float32), f"c{i}_{j}"))
            names.append(f"c{i}_{j}")
        out = f"v{i}" if i < len(layers) - 1 else "y"
        nodes.append(helper.make_node(op, [cur, *names], [out], name=f"n{i}", **attrs))
        cur = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *in_shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_features] if out_features else None)
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    return model


def conv_net(rng, spatial=True):
    """Conv (stride 2: the adjoint needs output_padding) -> Relu -> grouped dilated Conv with asymmetric pads
    -> Relu -> Flatten -> Gemm -> Relu -> Reshape -> Conv (a stage whose Conv sits behind a Reshape)."""
    layers = [
        ("Conv", rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
        ("Relu", {}),
        ("Conv", rng.standard_normal((4, 2, 3, 2)), dict(pads=[1, 0, 1, 1], dilations=[1, 2], group=2)),
        ("Relu", {}),
        ("Flatten", {}),
        ("Gemm", rng.standard_normal((18, 4 * 4 * 3)), rng.standard_normal(18), dict(transB=1)),
        ("Relu", {}),
        ("Reshape", np.asarray([0, 2, 3, 3]), {}),
        ("Conv", rng.standard_normal((3, 2, 2, 2)), dict(strides=[2, 2], pads=[0, 0, 1, 1])),
    ]
    model = chain(layers, (2, 8, 8) if spatial else (2, "H", "W"))
    init = model.graph.initializer
    for i, t in enumerate(init):  # the Reshape target must stay int64
        if t.name == "c7_0":
            init[i].CopyFrom(numpy_helper.from_array(np.asarray([0, 2, 3, 3], np.int64), t.name))
    return model


@pytest.fixture(scope="module")
def cnn():
    return conv_net(np.random.default_rng(1))


def dense_svd_top(M):
    return float(np.linalg.svd(M, compute_uv=False)[0])


# ---- certified per-layer bounds -----------------------------------------------------------------

@pytest.mark.parametrize("case", ["gauss", "wide", "tall", "rank1", "clustered", "huge", "tiny", "zero"])
def test_gram_bound_is_an_upper_bound_within_1e6(case):
    rng = np.random.default_rng(len(case))
    W = {"gauss": lambda: rng.standard_normal((40, 40)), "wide": lambda: rng.standard_normal((7, 90)),
         "tall": lambda: rng.standard_normal((120, 9)), "rank1": lambda: np.outer(rng.standard_normal(30), rng.standard_normal(20)),
         "clustered": lambda: np.linalg.qr(rng.standard_normal((30, 30)))[0] @ np.diag(1 - 1e-9 * np.arange(30)),
         "huge": lambda: 1e150 * rng.standard_normal((20, 25)), "tiny": lambda: 1e-150 * rng.standard_normal((20, 25)),
         "zero": lambda: np.zeros((5, 6))}[case]()
    sigma = dense_svd_top(W)
    bound = spectral.gram_bound(W)
    assert bound >= sigma
    # 1e-6: the agreement target; Gram iteration converges to sigma, the rounding allowance is ~1e-12
    assert bound <= sigma * (1 + 1e-6)


def circulant_conv_matrix(W, grid, dilations, group):
    """Dense matrix of the stride-1 circular correlation on the grid (the oracle for the Fourier bound)."""
    M, Cg = W.shape[:2]
    C = Cg * group
    size = int(np.prod(grid))
    A = np.zeros((M * size, C * size))
    positions = list(itertools.product(*[range(n) for n in grid]))
    for m in range(M):
        g = m // (M // group)
        for c in range(Cg):
            for k in itertools.product(*[range(s) for s in W.shape[2:]]):
                for p in positions:
                    q = tuple((p[i] + k[i] * dilations[i]) % grid[i] for i in range(len(grid)))
                    A[m * size + np.ravel_multi_index(p, grid), (g * Cg + c) * size + np.ravel_multi_index(q, grid)] += W[(m, c, *k)]
    return A


CONVS = [  # (in_shape, kernel shape, attrs)
    ((2, 6, 6), (3, 2, 3, 3), dict(pads=[1, 1, 1, 1])),
    ((2, 7, 5), (4, 2, 3, 3), dict(pads=[1, 0, 1, 2], strides=[2, 2])),
    ((4, 6, 6), (4, 2, 2, 3), dict(pads=[0, 1, 1, 0], dilations=[2, 1], group=2)),
    ((3, 5, 5), (2, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 1])),
    ((2, 9), (3, 2, 4), dict(pads=[2, 1], strides=[3])),
]


@pytest.mark.parametrize("in_shape,kshape,attrs", CONVS)
def test_fourier_bound_is_the_circulant_norm_and_bounds_the_conv(in_shape, kshape, attrs):
    rng = np.random.default_rng(sum(in_shape))
    Wk = rng.standard_normal(kshape)
    model = chain([("Conv", Wk, attrs)], in_shape)
    (stage,) = L.lower(model)
    geometry = spectral.conv_geometry(stage.conv, stage.conv["in_shape"])
    fourier = spectral.conv_fft_bound(geometry, stage.conv["in_shape"])
    nd = len(kshape) - 2
    grid = [in_shape[1 + i] + geometry["pads"][i] + geometry["pads"][i + nd] for i in range(nd)]
    circulant = dense_svd_top(circulant_conv_matrix(stage.conv["W"], grid, geometry["dilations"], geometry["group"]))
    # the FFT route and the dense circulant agree to rounding; the allowance inside is < 1e-12
    assert circulant <= fourier <= circulant * (1 + 1e-10)
    assert fourier >= dense_svd_top(stage.matrix())  # the zero-padded strided Conv is a restriction of it
    bound, how = spectral.certified_bound(stage)
    assert dense_svd_top(stage.matrix()) <= bound <= dense_svd_top(stage.matrix()) * (1 + 1e-6)


# ---- per-layer norms and the emitted graphs -----------------------------------------------------

def test_layer_norms_match_svd_mlp():
    ws, bs = random_mlp(3, dims=[20, 50, 30, 10])
    report = L.analyze(mlp_onnx(ws, bs), method="autolip")
    assert len(report.layers) == 3
    for row, W in zip(report.layers, ws):
        sigma = dense_svd_top(W)  # the source weights, independent of the lowering
        # 1e-6 relative: the target; power iteration in float64 converges far below it here
        assert abs(row["norm_estimate"] - sigma) <= 1e-6 * sigma
        assert sigma <= row["bound"] <= sigma * (1 + 1e-6)


def test_layer_norms_match_svd_conv(cnn):
    stages = L.lower(cnn)
    report = L.analyze(cnn, method="autolip")
    assert [r["op"] for r in report.layers] == ["Conv", "Conv", "Flatten+Gemm", "Reshape+Conv"]
    for row, stage in zip(report.layers, stages):
        sigma = dense_svd_top(stage.matrix())
        assert abs(row["norm_estimate"] - sigma) <= 1e-6 * sigma
        assert sigma <= row["bound"] <= sigma * (1 + 1e-6)


def _run(model, feeds):
    return runtime.run(model, feeds)


def test_operator_and_adjoint_graphs(cnn):
    """A u = M u (the lowered matrix), and <A u, v> = <u, A^T v> in float32 onnxruntime."""
    graphs = L.build(cnn)
    stages = L.lower(cnn)
    rng = np.random.default_rng(0)
    paddings = []
    for i, stage in enumerate(stages):
        op, adj = graphs[f"layer{i}.op"], graphs[f"layer{i}.adj"]
        onnx.checker.check_model(op, full_check=True)
        paddings += [list(a.ints) for n in adj.graph.node if n.op_type == "ConvTranspose"
                     for a in n.attribute if a.name == "output_padding"]
        u = rng.standard_normal((1, *stage.in_shape)).astype(np.float32)
        v = rng.standard_normal((1, *stage.out_shape)).astype(np.float32)
        Au = next(iter(_run(op, {op.graph.input[0].name: u}).values()))
        ATv = next(iter(_run(adj, {adj.graph.input[0].name: v}).values()))
        M = stage.matrix()
        assert Au.shape == v.shape and ATv.shape == u.shape
        # float32 kernels on sums of <= 50 terms: 1e-5 relative to the vector norms
        assert np.linalg.norm(Au.ravel() - M @ u.ravel()) <= 1e-5 * np.linalg.norm(M @ u.ravel())
        assert np.linalg.norm(ATv.ravel() - M.T @ v.ravel()) <= 1e-5 * np.linalg.norm(M.T @ v.ravel())
        lhs, rhs = float(Au.ravel() @ v.ravel()), float(u.ravel() @ ATv.ravel())
        assert abs(lhs - rhs) <= 1e-5 * np.linalg.norm(Au) * np.linalg.norm(v)
    assert any(any(p) for p in paddings), "no adjoint needed output_padding: the stride-2 case is not exercised"


def test_power_graph_reproduces_top_singular_value(cnn):
    src = SourceModel(cnn)
    stages = L.lower(src)
    for i in (0, 2):  # a Conv (float64 through onnx.reference) and a dense layer (float64 onnxruntime)
        graph = L.power_graph(src, stages[i], i, np.float64)
        sigma = dense_svd_top(stages[i].matrix())
        if i == 0:
            sess = reference_session(graph)
            u0 = np.random.default_rng(0).standard_normal((1, *stages[i].in_shape))
            est, u, history = sess.run(None, {graph.graph.input[0].name: u0, graph.graph.input[1].name: np.asarray(300, np.int64),
                                              graph.graph.input[2].name: np.asarray(1e-13)})
        else:
            est, its, u = L.power_norm(graph, stages[i], 1000)
            history = None
        # relative 1e-6: the target (spectral gap >= 3% here, so 300 iterations get far below it)
        assert abs(float(est) - sigma) <= 1e-6 * sigma
        if history is not None:  # power iteration on a PSD matrix never decreases its estimate
            assert np.all(np.diff(history) >= -1e-12 * sigma)


# ---- the exact oracle ---------------------------------------------------------------------------

def test_exact_oracle_counts_regions_of_a_line_arrangement():
    """One hidden layer on R^2: n lines in general position cut the plane into 1 + n + n(n-1)/2 regions."""
    for n in (3, 5, 7):
        ws, bs = random_mlp(100 + n, dims=[2, n, 1])
        _, regions = exact_lipschitz(ws, bs)
        assert len(regions) == 1 + n + n * (n - 1) // 2


def test_exact_oracle_jacobians_at_witnesses_and_against_all_patterns():
    ws, bs = random_mlp(7, dims=[3, 5, 4, 2])
    L_exact, regions = exact_lipschitz(ws, bs)
    h = 1e-7
    for J, x in regions:  # the region's Jacobian is the network's at the region's interior point
        Jfd = np.stack([(forward(ws, bs, x + h * e) - forward(ws, bs, x - h * e)) / (2 * h) for e in np.eye(3)], axis=1)
        # float64 central differences of a function that is linear near x: error ~ eps/h = 1e-9
        assert np.allclose(Jfd, J, atol=1e-6 * (1 + np.abs(J).max()))
    # sampled gradients never exceed it
    X = np.random.default_rng(0).standard_normal((300, 3)) * 3
    for x in X:
        Jfd = np.stack([(forward(ws, bs, x + h * e) - forward(ws, bs, x - h * e)) / (2 * h) for e in np.eye(3)], axis=1)
        assert np.linalg.norm(Jfd, 2) <= L_exact * (1 + 1e-6)
    # one hidden layer with n <= d units: every pattern is a region, so the exact constant is the max over all
    ws, bs = random_mlp(8, dims=[4, 3, 2])
    L_exact, regions = exact_lipschitz(ws, bs)
    every = max(np.linalg.norm(ws[1] @ np.diag(s) @ ws[0], 2) for s in itertools.product([0, 1], repeat=3))
    assert len(regions) == 8 and abs(L_exact - every) <= 1e-12 * every


# ---- soundness ----------------------------------------------------------------------------------

def small_net(seed):
    """Tiny nets for the soundness sweep: input 2-3, 1-2 hidden layers of 3-5 units (a fraction of a second each)."""
    rng = np.random.default_rng(1000 + seed)
    dims = [int(rng.integers(2, 4))] + [int(rng.integers(3, 6)) for _ in range(int(rng.integers(1, 3)))] + [int(rng.integers(1, 4))]
    return random_mlp(seed, dims)


@pytest.fixture(scope="module")
def tiny_reports():
    """(exact constant, analyze(method="all")) for the 32 tiny nets, shared by the AutoLip/SeqLip and LipSDP sweeps."""
    out = []
    for seed in range(32):
        ws, bs = small_net(seed)
        out.append((exact_lipschitz(ws, bs)[0], L.analyze(mlp_onnx(ws, bs), method="all")))
    return out


def test_guaranteed_bounds_dominate_the_exact_constant_on_32_nets(tiny_reports):
    ratios = []
    for seed, (exact, report) in enumerate(tiny_reports):
        auto, seq = report.autolip["bound"], report.seqlip["bound"]
        assert report.seqlip["exact"]
        # no tolerance: both bounds carry their float64 rounding allowance
        assert auto >= exact and seq >= exact, (seed, auto, seq, exact)
        assert seq <= auto * (1 + 1e-9)  # exact pair maxima never exceed the product of the pair's norms
        ratios.append((auto / exact, seq / exact))
    # SeqLip is tight on some nets (one hidden layer, every pattern reachable): the test can see a bound that is too small
    assert min(r[1] for r in ratios) < 1 + 1e-9


def test_seqlip_of_an_aligned_linear_chain_is_the_norm_of_the_product():
    """LeakyRelu(alpha=1) is the identity, so every pair is 'linear'. With W_i = Q_{i+1} diag(s_i) Q_i^T the
    singular vectors of neighbours line up and the product of the pair norms equals ||W4 W3 W2 W1|| = prod s_i[0]:
    this pins the sqrt(S) split between pairs (a wrong split over- or under-counts a layer's singular values)."""
    rng = np.random.default_rng(9)
    n, k = 6, 4
    Q = [np.linalg.qr(rng.standard_normal((n, n)))[0] for _ in range(k + 1)]
    s = [np.sort(rng.uniform(0.5, 3.0, n))[::-1] for _ in range(k)]
    ws = [Q[i + 1] @ np.diag(s[i]) @ Q[i].T for i in range(k)]
    layers = []
    for i, w in enumerate(ws):
        layers.append(("Gemm", w, np.zeros(n), {"transB": 1}))
        if i < k - 1:
            layers.append(("LeakyRelu", {"alpha": 1.0}))
    report = L.analyze(chain(layers, (n,), out_features=n), method="seqlip")
    W32 = [np.asarray(w, np.float32).astype(np.float64) for w in ws]
    product = np.linalg.norm(W32[3] @ W32[2] @ W32[1] @ W32[0], 2)
    assert [p["method"] for p in report.seqlip["pairs"]] == ["linear"] * 3
    # 1e-6: the float32 weights are aligned only to ~1e-7; a wrong split is off by a factor sqrt(s) >= 1.2
    assert abs(report.seqlip["bound"] - product) <= 1e-6 * product


ACTIVATION_FUNCTIONS = {"Tanh": lambda z, a: np.tanh(z), "Sigmoid": lambda z, a: 1 / (1 + np.exp(-z)),
                        "LeakyRelu": lambda z, a: np.where(z > 0, z, a.get("alpha", 0.01) * z),
                        "HardSigmoid": lambda z, a: np.clip(a.get("alpha", 0.2) * z + a.get("beta", 0.5), 0, 1)}


def activation_net(act, attrs, final=None, seed=5):
    """(ONNX model, float64 numpy net): 3 -> 6 -> 5 -> 2 with `act` after both hidden layers, `final` on the output."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((6, 3)), rng.standard_normal((5, 6)), rng.standard_normal((2, 5))]
    bs = [rng.standard_normal(w.shape[0]) for w in ws]
    layers = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        layers.append(("Gemm", w, b, {"transB": 1}))
        if i < 2 or final:
            layers.append((act if i < 2 else final, attrs if i < 2 else {}))
    W32 = [np.asarray(w, np.float32).astype(np.float64) for w in ws]
    B32 = [np.asarray(b, np.float32).astype(np.float64) for b in bs]

    def net(x):
        for i, (w, b) in enumerate(zip(W32, B32)):
            x = w @ x + b
            x = ACTIVATION_FUNCTIONS[act](x, attrs) if i < 2 else x
        return ACTIVATION_FUNCTIONS[final](x, {}) if final else x
    return chain(layers, (3,), out_features=2), net


def sampled_jacobian_norm(net, rng, points=300):
    """max ||J(x)||_2 by float64 central differences (h = 1e-6) at random points: a lower bound on the constant."""
    h, worst = 1e-6, 0.0
    for x in rng.standard_normal((points, 3)) * 2:
        J = np.stack([(net(x + h * e) - net(x - h * e)) / (2 * h) for e in np.eye(3)], axis=1)
        worst = max(worst, np.linalg.norm(J, 2))
    return worst


@pytest.mark.parametrize("act,attrs", [("Tanh", {}), ("Sigmoid", {}), ("LeakyRelu", {"alpha": 0.2}), ("LeakyRelu", {"alpha": -0.5})])
def test_smooth_and_leaky_activations_bound_sampled_jacobians(act, attrs):
    model, net = activation_net(act, attrs)
    report = L.analyze(model, method="all")
    worst = sampled_jacobian_norm(net, np.random.default_rng(5))
    # 1e-6: central-difference error of a smooth (or piecewise-linear, away from kinks) function at h=1e-6
    assert worst <= report.autolip["bound"] * (1 + 1e-6)
    assert worst <= report.seqlip["bound"] * (1 + 1e-6)


# ---- SeqLip beyond the exact limit --------------------------------------------------------------

def test_greedy_is_below_exact_and_midpoint_bound_above():
    rng = np.random.default_rng(11)
    for lo, hi in [(0.0, 1.0), (0.1, 1.0), (-0.5, 1.0)]:
        A, B = rng.standard_normal((4, 12)), rng.standard_normal((12, 5))
        exact = seqlip._pair_exact(A, B, lo, hi)
        greedy = seqlip._pair_greedy(A, B, lo, hi, top_k=4)
        mid = seqlip._pair_midpoint_bound(A, B, lo, hi)
        assert greedy <= exact * (1 + 1e-12) and exact <= mid * (1 + 1e-12)
        assert mid <= max(abs(lo), abs(hi)) * np.linalg.norm(A, 2) * np.linalg.norm(B, 2) * (1 + 1e-12)


def test_beyond_the_limit_is_labelled_estimate(tmp_path, capsys):
    ws, bs = random_mlp(4, dims=[2, 10, 5, 2])
    exact, _ = exact_lipschitz(ws, bs)
    full = L.analyze(mlp_onnx(ws, bs), method="seqlip")
    cut = L.analyze(mlp_onnx(ws, bs), method="seqlip", exact_limit=8)
    assert full.seqlip["exact"] and not cut.seqlip["exact"]
    assert "estimate" in cut.seqlip["pairs"][0]["method"]
    assert cut.seqlip["bound"] >= full.seqlip["bound"] >= exact
    path = tmp_path / "m.onnx"
    onnx.save(mlp_onnx(ws, bs), path)
    assert main(["lipschitz", str(path), "--exact-limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "SeqLip estimate" in out and "not a bound" in out and "SeqLip bound" in out


# ---- LipSDP -------------------------------------------------------------------------------------

def test_lipsdp_dominates_the_exact_constant_and_stays_below_autolip_on_32_nets(tiny_reports):
    pytest.importorskip("cvxpy")
    ratios = []
    for seed, (exact, report) in enumerate(tiny_reports):
        d = report.lipsdp
        assert d["guaranteed"], (seed, d)
        # no tolerance: the bound is the solver's T checked in float64 with a rounding margin
        assert d["bound"] >= exact, (seed, d["bound"], exact)
        # T = t_k I per layer reproduces AutoLip's product (t_k = the squared norm of the layers after it), so the
        # optimum is at most AutoLip; 1e-6: the SDP asks for M <= -1e-7 I (normalised units), plus the check's margin
        assert d["bound"] <= report.autolip["bound"] * (1 + 1e-6), seed
        ratios.append(d["bound"] / exact)
    # LipSDP is tight on some of these nets: a bound that is too small would show
    assert min(ratios) < 1 + 1e-6


def test_lipsdp_check_finds_the_smallest_verified_rho_and_rejects_a_bad_t():
    pytest.importorskip("cvxpy")
    from jacgraph.passes import lipsdp as S

    ws, bs = random_mlp(7, dims=[3, 5, 4, 2])
    boxes = [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0)]
    m, bx, e = S.normalise(ws, boxes)
    rho, t, status = S.solve(m, bx, "CLARABEL")
    verified = S.certify(m, bx, t)
    assert np.linalg.eigvalsh(S.lmi(m, bx, verified, t))[-1] < 0
    # the smallest for this T, to 1e-6: M(rho) is affine in rho, and the check's margin is ~1e-13 here
    assert np.linalg.eigvalsh(S.lmi(m, bx, verified * (1 - 1e-6), t))[-1] > 0
    assert S.certify(m, bx, np.zeros_like(t)) is None  # T = 0 leaves W_l^T W_l >= 0 in the hidden block
    exact, _ = exact_lipschitz(ws, bs)
    bounds = {}
    for solver in ("BARRIER", "CLARABEL", "SCS"):  # SCS, the last fallback, returns a less accurate T: the check still holds
        d = S.lipsdp(ws, boxes, solver=solver)
        assert d["guaranteed"] and d["solver"] == solver and d["bound"] >= exact
        bounds[solver] = d["bound"]
    # the barrier method and Clarabel (interior point) reach the same optimum: 1e-6 is the SDP's delta margin
    np.testing.assert_allclose(bounds["BARRIER"], bounds["CLARABEL"], rtol=1e-6)


def test_lipsdp_scales_exactly_with_the_weights():
    """Weights 2^-20 .. 1e4 in size and sigmoid slopes (1/4) are normalised by powers of two: the bound scales."""
    pytest.importorskip("cvxpy")
    from jacgraph.passes import lipsdp as S

    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((5, 3)), rng.standard_normal((4, 5)), rng.standard_normal((2, 4))]
    boxes = [(0.0, 0.25), (0.0, 0.25), (1.0, 1.0)]
    base = S.lipsdp(ws, boxes)["bound"]
    scaled = S.lipsdp([ws[0] * 1e4, ws[1] * 2.0 ** -20, ws[2] * 3.0], boxes)["bound"]
    # the SDP's optimum scales exactly; 1e-5: solver accuracy (1e-8) and the 1e-7 tightening, relative to rho
    assert abs(scaled / (base * 1e4 * 2.0 ** -20 * 3.0) - 1) <= 1e-5


def test_lipsdp_of_a_linear_chain_is_the_norm_of_the_product():
    """LeakyRelu(alpha=1) is the identity: the slope box is the point {1}, the constant is ||W4 W3 W2 W1||."""
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(9)
    ws = [rng.standard_normal((6, 6)) for _ in range(4)]
    layers = []
    for i, w in enumerate(ws):
        layers.append(("Gemm", w, np.zeros(6), {"transB": 1}))
        if i < 3:
            layers.append(("LeakyRelu", {"alpha": 1.0}))
    report = L.analyze(chain(layers, (6,), out_features=6), method="lipsdp")
    W32 = [np.asarray(w, np.float32).astype(np.float64) for w in ws]
    product = np.linalg.norm(W32[3] @ W32[2] @ W32[1] @ W32[0], 2)
    # exactness needs t -> infinity; M <= -1e-7 I caps t, which costs 4e-4 here (AutoLip is 10x, SeqLip 3x)
    assert product <= report.lipsdp["bound"] <= product * (1 + 1e-3)


@pytest.mark.parametrize("act,attrs,final", [("Tanh", {}, None), ("Sigmoid", {}, None), ("Sigmoid", {}, "Sigmoid"),
                                             ("HardSigmoid", {"alpha": 0.5, "beta": 0.5}, None),
                                             ("LeakyRelu", {"alpha": -0.5}, "Tanh")])
def test_lipsdp_bounds_sampled_jacobians_of_smooth_and_leaky_nets(act, attrs, final):
    pytest.importorskip("cvxpy")
    model, net = activation_net(act, attrs, final)
    report = L.analyze(model, method="all")
    d = report.lipsdp
    assert d["guaranteed"]
    worst = sampled_jacobian_norm(net, np.random.default_rng(6))
    # 1e-6: central-difference error at h = 1e-6
    assert worst <= d["bound"] * (1 + 1e-6)
    assert d["bound"] <= report.autolip["bound"] * (1 + 1e-6)


def test_cli_lipsdp_printout_json_and_size_limit(tmp_path, capsys):
    pytest.importorskip("cvxpy")
    from jacgraph.passes import lipsdp as S

    ws, bs = random_mlp(0, dims=[3, 5, 4, 2])
    exact, _ = exact_lipschitz(ws, bs)
    path = tmp_path / "m.onnx"
    onnx.save(mlp_onnx(ws, bs), path)
    assert main(["lipschitz", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LipSDP bound" in out and "(guaranteed" in out and "LipSDP estimate" in out and "not a bound" in out
    assert main(["lipschitz", str(path), "--method", "lipsdp", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["autolip"] is None and report["seqlip"] is None
    assert report["lipsdp"]["guaranteed"] and report["lipsdp"]["bound"] >= exact and report["lipsdp"]["solver"] == "BARRIER"

    big = tmp_path / "big.onnx"  # input 8 + 130 hidden units: one pair of 138 > PAIR_LIMIT
    onnx.save(mlp_onnx(*random_mlp(1, dims=[8, 130, 2])), big)
    assert main(["lipschitz", str(big), "--method", "lipsdp"]) == 2
    err = capsys.readouterr().err
    assert f"limit {S.PAIR_LIMIT}" in err and "--method seqlip" in err and "--method autolip" in err
    assert main(["lipschitz", str(big)]) == 0  # --method all: LipSDP skipped with a note, the others run
    out = capsys.readouterr().out
    assert "LipSDP skipped" in out and "AutoLip bound" in out and "SeqLip bound" in out
    assert main(["lipschitz", str(big), "--json"]) == 0
    assert "too large for LipSDP" in json.loads(capsys.readouterr().out)["lipsdp"]["skipped"]


def test_lipsdp_without_cvxpy_uses_the_barrier_method(tmp_path, capsys, monkeypatch):
    """cvxpy only provides the fallback solvers: without it the barrier method solves and the check verifies."""
    from jacgraph.passes import lipsdp as S

    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)  # as if cvxpy were not installed
    path = tmp_path / "m.onnx"
    ws, bs = random_mlp(0, dims=[3, 5, 2])
    onnx.save(mlp_onnx(ws, bs), path)
    assert main(["lipschitz", str(path), "--method", "lipsdp", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["lipsdp"]
    assert d["solver"] == "BARRIER" and d["guaranteed"] and d["bound"] >= exact_lipschitz(ws, bs)[0]
    with pytest.raises(JacgraphError, match="CLARABEL: not installed"):
        S.lipsdp(ws, [(0.0, 1.0), (1.0, 1.0)], solver="CLARABEL")


# ---- command line -------------------------------------------------------------------------------

def test_cli_emit_autolip_and_lipschitz_json(tmp_path, capsys):
    model = conv_net(np.random.default_rng(1), spatial=False)
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    out = tmp_path / "lip.onnx"
    assert main(["compile", str(path), "--emit", "autolip", "-o", str(out), "--input-shape", "1,2,8,8"]) == 0
    written = sorted(p for p in os.listdir(tmp_path) if p.startswith("lip."))
    assert written == sorted(f"lip.layer{i}.{k}.onnx" for i in range(4) for k in ("op", "adj", "power"))
    power = onnx.load(tmp_path / "lip.layer1.power.onnx")
    assert any(n.op_type == "Loop" for n in power.graph.node)
    assert [i.name for i in power.graph.input] == ["u0", "iterations", "tol"]
    assert [o.name for o in power.graph.output] == ["sigma", "u", "sigma_history"]
    capsys.readouterr()
    assert main(["lipschitz", str(path), "--input-shape", "1,2,8,8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stages = L.lower(model, input_shape=(1, 2, 8, 8))
    autolip = math.prod(dense_svd_top(s.matrix()) for s in stages)
    assert autolip <= report["autolip"]["bound"] <= autolip * (1 + 1e-5)
    assert [r["bound_method"] for r in report["layers"]][:2] == ["gram", "gram"]
    assert report["seqlip"]["bound"] <= report["autolip"]["bound"] * (1 + 1e-9)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(conv_net(rng, spatial=False), dynamic)
    out = tmp_path / "o.onnx"
    assert main(["compile", str(dynamic), "--emit", "autolip", "-o", str(out)]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["lipschitz", str(dynamic)]) == 2
    assert "--input-shape" in capsys.readouterr().err

    odd = chain([("Gemm", rng.standard_normal((4, 3)), rng.standard_normal(4), {"transB": 1}), ("Sin", {}),
                 ("Gemm", rng.standard_normal((4, 4)), rng.standard_normal(4), {"transB": 1}), ("Softmax", {"axis": 1})], (3,))
    odd_path = tmp_path / "odd.onnx"
    onnx.save(odd, odd_path)
    assert main(["compile", str(odd_path), "--emit", "autolip", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Sin (x1)" in err and "Softmax (x1)" in err
    assert main(["lipschitz", str(odd_path)]) == 2
    mlp = tmp_path / "mlp.onnx"
    onnx.save(mlp_onnx(*random_mlp(0)), mlp)
    assert main(["lipschitz", str(mlp), "--exact-limit", "40"]) == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.")]


# ---- AutoLip over DAGs: residual joins, concat, average and max pooling ---------------------------

@pytest.mark.parametrize("name", ["residual_mlp", "resnet_cnn", "densenet_cnn", "pool_cnn", "inception_cnn"])
def test_autolip_and_seqlip_on_dag_models_are_above_sampled_jacobian_norms(name):
    """The DAG AutoLip and SeqLip bounds >= ||J(x)||_2 at 2000 sampled points (two scales) and after 10 steps
    of gradient ascent on ||J(x)||_2 from the 4 best samples (float64 torch autograd Jacobians). SeqLip on the
    chains inside the DAG is below AutoLip on every one of these models (its chains exist in each)."""
    from examples import bounds_models
    from examples.lipschitz_bounds import sampled_lower_bound

    net, shape = bounds_models.build(name), bounds_models.INPUT_SHAPES[name]
    report = L.analyze(bounds_models.export_bytes(net, shape), method="all")
    bound = report.autolip["bound"]
    assert report.seqlip["dag"] and report.seqlip["pairs"] and report.seqlip["bound"] < bound
    worst = sampled_lower_bound(net, shape, samples=2000, best=4, steps=10)
    assert worst <= report.seqlip["bound"] <= bound, (worst, report.seqlip["bound"], bound)
    assert "skipped" in report.lipsdp and report.autolip["estimate"] <= bound * (1 + 1e-9)


def test_seqlip_on_a_dag_alone_and_lipsdp_is_a_clear_error():
    from examples import bounds_models

    model = bounds_models.export_bytes(bounds_models.build("resnet_cnn"), (1, 8, 8))
    alone = L.analyze(model, method="seqlip")
    assert alone.autolip is None and alone.seqlip["bound"] == L.analyze(model, method="all").seqlip["bound"]
    with pytest.raises(JacgraphError, match="--method seqlip or autolip"):
        L.analyze(model, method="lipsdp")


@pytest.mark.parametrize("name", ["densenet_cnn", "residual_mlp"])
def test_emit_autolip_on_a_dag_runs_in_onnxruntime_and_matches_the_api(name, tmp_path, capsys):
    """`compile --emit autolip` on a DAG: three graphs per linear node (its inputs stacked -> its output); in
    onnxruntime the op graph is the lowered node's matrix, the adjoint passes the dot-product test, and power
    iteration gives the norm `jacgraph lipschitz` reports for that node (a Lanczos SVD there)."""
    from examples import bounds_models
    from jacgraph import layers

    shape = bounds_models.INPUT_SHAPES[name]
    model = bounds_models.export_bytes(bounds_models.build(name), shape)
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    assert main(["compile", str(path), "--emit", "autolip", "-o", str(tmp_path / "lip.onnx")]) == 0
    capsys.readouterr()
    rows = {r["layer"]: r for r in L.analyze(model, method="autolip").layers}
    graph = layers.lower_graph(SourceModel(model))
    written = sorted(p for p in os.listdir(tmp_path) if p.startswith("lip."))
    assert written == sorted(f"lip.node{k}.{g}.onnx" for k in rows for g in ("op", "adj", "power"))
    rng = np.random.default_rng(0)
    for k, row in rows.items():
        node = graph.nodes[k]
        A = np.hstack([M.toarray() for M in node.mats])
        op, adj, power = (onnx.load(tmp_path / f"lip.node{k}.{g}.onnx") for g in ("op", "adj", "power"))
        assert {p.key: p.value for p in power.metadata_props}["jacgraph.emit"] == "autolip"
        u, v = rng.standard_normal((1, A.shape[1])), rng.standard_normal((1, A.shape[0]))
        Au = runtime.session(op).run(None, {"u": u})[0]
        ATv = runtime.session(adj).run(None, {"v": v})[0]
        np.testing.assert_allclose(Au, u @ A.T, rtol=1e-12, atol=1e-12)
        assert abs(float((Au * v).sum() - (u * ATv).sum())) <= 1e-12 * np.abs(A).sum()
        # densenet's node 1 has sigma_2/sigma_1 = 0.99984: power iteration needs ~20000 steps there (the Loop stops
        # when sigma^2 changes by < 1e-13 relative); then it, the Lanczos estimate and the SVD agree to ~1e-10
        sigma, _, _ = L.power_norm(power, L.graph_stages(graph)[k], 30000)
        np.testing.assert_allclose([sigma, row["norm_estimate"]], np.linalg.norm(A, 2), rtol=1e-8)
        assert sigma <= row["bound"]


def test_lipsdp_input_reduction_to_the_row_space_gives_the_same_bound():
    """A first layer wider than tall (12 -> 5) is reduced to its 5-dim row space: the same LipSDP bound
    (to the solver's accuracy) from a smaller SDP, still above the sampled Jacobian norms."""
    from jacgraph.passes import lipsdp as S

    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((5, 12)), rng.standard_normal((4, 5)), rng.standard_normal((3, 4))]
    boxes = [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0)]
    full, reduced = S.lipsdp(ws, boxes, reduce=False), S.lipsdp(ws, boxes)
    assert full["guaranteed"] and reduced["guaranteed"]
    assert reduced["rows"] == 5 + 5 + 4 and full["rows"] == 12 + 5 + 4 and reduced["input_reduced_from"] == 12
    np.testing.assert_allclose(reduced["bound"], full["bound"], rtol=1e-4)
    X = rng.standard_normal((4000, 12)) * 3
    h1 = X @ ws[0].T > 0
    h2 = (np.maximum(X @ ws[0].T, 0) @ ws[1].T) > 0
    norms = [np.linalg.norm(ws[2] @ (m2[:, None] * ws[1]) @ (m1[:, None] * ws[0]), 2) for m1, m2 in zip(h1, h2)]
    assert max(norms) <= reduced["bound"]


@pytest.mark.parametrize("name", ["dag", "conv_chain"])
def test_verify_checks_autolip_graphs_and_fails_a_broken_one(name, tmp_path, capsys):
    """`verify --source`: op/adj graphs against the operator rebuilt from the source, power graphs by
    sigma <= ||A u||; each graph with its weights scaled by 1.01 FAILS (exit 1); without --source: exit 2."""
    from examples import bounds_models

    if name == "dag":
        model, shape = bounds_models.export_bytes(bounds_models.build("inception_cnn"), (1, 8, 8)), []
    else:  # float32 Conv graphs, which verify runs as emitted (onnxruntime has no float64 ConvTranspose)
        model, shape = conv_net(np.random.default_rng(1), spatial=False).SerializeToString(), ["--input-shape", "1,2,8,8"]
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    assert main(["compile", str(path), "--emit", "autolip", "-o", str(tmp_path / "lip.onnx"), *shape]) == 0
    graphs = sorted(p for p in os.listdir(tmp_path) if p.startswith("lip."))
    for g in graphs[:6]:
        assert main(["verify", str(tmp_path / g), "--source", str(path)]) == 0, g
        broken = onnx.load(tmp_path / g)
        for init in broken.graph.initializer:
            if init.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and np.prod(init.dims) > 1:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        onnx.save(broken, tmp_path / "broken.onnx")
        assert main(["verify", str(tmp_path / "broken.onnx"), "--source", str(path)]) == 1, g
    assert main(["verify", str(tmp_path / graphs[0])]) == 2
    assert "--source" in capsys.readouterr().err


def test_verify_fails_a_power_graph_whose_sigma_falls_short(tmp_path, capsys):
    """Old: a power graph reporting sigma x 0.5 (or x 0.001) passed, since only sigma <= ||A u|| was checked."""
    from examples import bounds_models

    path = tmp_path / "m.onnx"
    path.write_bytes(bounds_models.export_bytes(bounds_models.build("residual_mlp"), (16,)))
    assert main(["compile", str(path), "--emit", "autolip", "-o", str(tmp_path / "lip.onnx")]) == 0
    power = sorted(p for p in os.listdir(tmp_path) if p.startswith("lip.") and "power" in p)
    assert power
    for g in power:
        assert main(["verify", str(tmp_path / g), "--source", str(path)]) == 0, g
        short = onnx.load(tmp_path / g)
        sigma = short.graph.output[0].name
        for node in short.graph.node:
            node.output[:] = [o + "_raw" if o == sigma else o for o in node.output]
        dtype = helper.tensor_dtype_to_np_dtype(short.graph.output[0].type.tensor_type.elem_type)
        short.graph.initializer.append(numpy_helper.from_array(np.asarray(0.5, dtype), "half"))
        short.graph.node.append(helper.make_node("Mul", [sigma + "_raw", "half"], [sigma]))
        onnx.save(short, tmp_path / "short.onnx")
        assert main(["verify", str(tmp_path / "short.onnx"), "--source", str(path)]) == 1, g
        assert "FAILED" in capsys.readouterr().out
