"""`jacgraph sense`: Jacobians of a black box from forward calls, robust to corrupted calls.

Oracle: the exact Jacobian from float64 torch.func.jacfwd on the same weights.
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

from jacgraph.cli import main
from jacgraph.passes import sensing

SHAPE = (1, 2, 10, 10)


@pytest.fixture(scope="module")
def conv_layer():
    """A conv layer (2 -> 3 channels, 3x3, padding 1): 18 colours for 200 inputs; returns (model, x0, J)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1).eval()
    f = io.BytesIO()
    torch.onnx.export(layer, torch.randn(*SHAPE), f, input_names=["x"], output_names=["y"], dynamo=False)
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    J = torch.func.jacfwd(layer.double())(torch.from_numpy(x0).double()).detach().numpy().reshape(300, 200)
    return onnx.load_from_string(f.getvalue()), x0, J


def corrupted(budget, fraction, seed):
    """A corrupt hook: `fraction` of the calls return arbitrary values (uniform in ±1000), the rest are exact."""
    rng = np.random.default_rng(seed)
    bad = set(rng.choice(budget, int(round(fraction * budget)), replace=False).tolist())

    def corrupt(p, y):
        return rng.uniform(-1e3, 1e3, y.shape) if p in bad else y
    return corrupt, bad


def rel(a, b):
    a = a.toarray() if sp.issparse(a) else a
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_robust_recovers_conv_layer_despite_corrupted_calls_least_squares_does_not(conv_layer):
    model, x0, J = conv_layer
    colours = 18
    budget = 4 * colours
    # A conv layer is affine, so forward differences are exact at any step; step 1 puts the signal h·J·d well
    # above float32 rounding of f (~6e-8 relative), which is what limits the recovered J.
    for seed in range(3):
        corrupt, bad = corrupted(budget, 0.10, seed)
        robust = sensing.sense(model, x0, budget=budget, robust=True, step=1.0, seed=seed, corrupt=corrupt,
                               progress=False)
        corrupt, _ = corrupted(budget, 0.10, seed)  # the same calls corrupted the same way
        ls = sensing.sense(model, x0, budget=budget, robust=False, step=1.0, seed=seed, corrupt=corrupt,
                           progress=False)
        assert robust.colours == colours and robust.calls == ls.calls == budget <= 4 * robust.colours
        assert rel(robust.J, J) < 1e-6
        assert rel(ls.J, J) > 1e-1  # one corrupted call spreads over every coefficient of every row
        assert robust.flagged_calls == len(bad) == 7
        assert robust.estimated_error < 1e-6 and ls.estimated_error > 1e-1  # the estimate tells them apart


def test_calls_returning_nan_are_left_out(conv_layer):
    model, x0, J = conv_layer
    res = sensing.sense(model, x0, budget=40, step=1.0, progress=False,
                        corrupt=lambda p, y: np.full_like(y, np.nan) if p % 10 == 3 else y)
    assert res.calls == 40 and res.nonfinite_calls == 4 and rel(res.J, J) < 1e-6


def test_least_squares_is_fine_on_clean_calls_and_errors_follow_the_estimate(conv_layer):
    model, x0, J = conv_layer
    clean = sensing.sense(model, x0, budget=19, step=1.0, progress=False)
    assert clean.min_calls == 19 and rel(clean.J, J) < 1e-5  # exactly determined: no redundancy, no estimate
    assert clean.estimated_error is None
    rng = np.random.default_rng(0)
    noisy = sensing.sense(model, x0, budget=80, step=0.1, progress=False,
                          corrupt=lambda p, y: y + 1e-3 * rng.standard_normal(y.shape))
    error = rel(noisy.J, J)
    # the residual-based estimate is a statistical estimate: within a factor 3 of the truth here
    assert noisy.estimated_error / 3 < error < 3 * noisy.estimated_error
    assert 1e-5 < error < 1e-1
    # with only Gaussian noise the robust fit keeps (nearly) every call and matches least squares on them
    for budget in (36, 80):
        calls = [np.random.default_rng(budget), np.random.default_rng(budget)]
        fits = [sensing.sense(model, x0, budget=budget, robust=robust, step=0.1, progress=False,
                              corrupt=lambda p, y, g=g: y + 1e-3 * g.standard_normal(y.shape))
                for robust, g in zip((False, True), calls)]
        assert fits[1].estimated_error is not None and fits[1].flagged_calls == 0
        assert rel(fits[1].J, J) < 1.2 * rel(fits[0].J, J)


def test_dense_pattern_needs_n_plus_one_calls(conv_layer):
    model, x0, J = conv_layer
    res = sensing.sense(model, x0, budget=240, pattern="dense", step=1.0, progress=False)
    assert isinstance(res.J, np.ndarray) and res.colours == 200 and res.min_calls == 201
    assert rel(res.J, J) < 1e-4  # 201 unknowns per row from 240 float32 calls: conditioning costs digits


def test_progress_bar_over_calls(conv_layer, capsys):
    model, x0, _ = conv_layer
    sensing.sense(model, x0, budget=20, step=1.0, progress=True)
    assert "forward calls" in capsys.readouterr().err


def test_cli_sense_writes_npz(conv_layer, tmp_path, capsys):
    model, x0, J = conv_layer
    path, xpath, out = tmp_path / "conv.onnx", tmp_path / "x.npy", tmp_path / "J.npz"
    onnx.save(model, path)
    np.save(xpath, x0)
    assert main(["sense", str(path), "--x0", str(xpath), "--budget", "72", "--robust", "--step", "1",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "forward calls used: 72" in text and "estimated relative error" in text and "18 colours" in text
    assert rel(sp.load_npz(out), J) < 1e-6


def no_float_input_model(path):
    table = numpy_helper.from_array(np.ones((5, 3), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("case,needle", [
    ("wrong_shape", "declared [1, 2, 10, 10]"),
    ("low_budget", "minimum of 19 calls"),
    ("no_float_input", "no floating-point input"),
    ("missing_x0", "no such file"),
    ("nan_x0", "NaN"),
    ("unreadable_structure", "--pattern dense"),
    ("bad_step", "not a positive number"),
])
def test_cli_errors_exit_2_and_write_nothing(case, needle, conv_layer, tmp_path, capsys):
    model, x0, _ = conv_layer
    path, xpath, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "J.npz"
    onnx.save(model, path)
    np.save(xpath, x0)
    args = ["sense", str(path), "--x0", str(xpath), "--out", str(out), "--no-progress"]
    if case == "wrong_shape":
        np.save(xpath, x0[:, :, :9])
    elif case == "low_budget":
        args += ["--budget", "18"]
    elif case == "bad_step":
        args += ["--step", "0"]
    elif case == "no_float_input":
        no_float_input_model(path)
        np.save(xpath, np.zeros(2, np.int64))
    elif case == "missing_x0":
        args[3] = str(tmp_path / "nothing.npy")
    elif case == "nan_x0":
        np.save(xpath, np.full(SHAPE, np.nan, np.float32))
    elif case == "unreadable_structure":  # TopK has no pattern rule: the structural pattern is unknown
        k = numpy_helper.from_array(np.array([2], np.int64), "k")
        graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["y", "i"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                                   helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])], [k])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        np.save(xpath, np.arange(5, dtype=np.float32).reshape(1, 5))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "jacgraph: error:" in err
    assert not out.exists()


def test_dense_pattern_senses_what_the_structure_pass_cannot_read(tmp_path):
    """TopK (no pattern rule) as a black box: y = the two largest of x, so J selects them."""
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["y", "i"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, [1, 2])], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x0 = np.array([[0.0, 3.0, 1.0, 5.0, 2.0]], np.float32)
    res = sensing.sense(model, x0, budget=12, pattern="dense", step=1e-2, progress=False)
    expected = np.zeros((2, 5))
    expected[0, 3] = expected[1, 1] = 1  # y = (x[3], x[1]); steps of 1e-2 never reorder values 1 apart
    np.testing.assert_allclose(res.J, expected, atol=1e-4)  # float32 rounding of x0 + h·d over h = 1e-2


def corrupted_regression(N, s, R, fraction, seed=0):
    """y = A z + tiny noise for R rows sharing the design A (intercept last), `fraction` of the calls corrupted."""
    rng = np.random.default_rng(seed)
    A = np.hstack([rng.standard_normal((N, s - 1)), np.ones((N, 1))])
    Z = rng.standard_normal((s, R))
    Y = A @ Z + 1e-9 * rng.standard_normal((N, R))
    bad = rng.choice(N, int(round(fraction * N)), replace=False)
    Y[bad] = rng.uniform(-1e3, 1e3, (len(bad), R))
    return A, Y, Z, bad


@pytest.mark.parametrize("fraction", [0.1, 0.2])
def test_admm_fits_match_the_linear_program_row_by_row(fraction):
    A, Y, Z, bad = corrupted_regression(240, 41, 4, fraction)
    got, keeps = sensing._fit_l1_rows(A, Y)
    for j in range(Y.shape[1]):
        z_lp, keep_lp = sensing._fit_l1(A, Y[:, j])
        np.testing.assert_array_equal(keeps[:, j], keep_lp)
        assert set(np.flatnonzero(~keeps[:, j])) == set(bad.tolist())
        np.testing.assert_allclose(got[:, j], z_lp, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got[:, j], Z[:, j], rtol=0, atol=1e-8)


def test_rows_the_admm_does_not_certify_fall_back_to_the_linear_program(monkeypatch):
    A, Y, Z, _ = corrupted_regression(120, 21, 2, 0.1)
    solved = []
    exact = sensing._fit_l1
    monkeypatch.setattr(sensing, "_fit_l1", lambda A, y, **k: solved.append(1) or exact(A, y, **k))
    got, _ = sensing._fit_l1_rows(A, Y, iterations=10)  # too few iterations to reach the duality gap
    assert len(solved) == 2
    np.testing.assert_allclose(got, Z, rtol=0, atol=1e-8)


def test_progress_bar_over_robust_fits(conv_layer, capsys):
    model, x0, _ = conv_layer
    sensing.sense(model, x0, budget=40, robust=True, step=1.0, progress=True)
    assert "robust fits" in capsys.readouterr().err


# ---- the fast path of the robust fit (issue 14) -------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.2])
def test_fast_path_recovers_J_and_names_exactly_the_corrupted_calls(conv_layer, fraction):
    model, x0, J = conv_layer
    budget = 72  # 4 x 18 colours
    corrupt, bad = corrupted(budget, fraction, seed=3)
    res = sensing.sense(model, x0, budget=budget, robust=True, step=1.0, seed=3, corrupt=corrupt, progress=False)
    assert rel(res.J, J) < 1e-6  # the tolerance of the test above: float32 rounding of f at step 1
    assert sorted(res.corrupted_calls.tolist()) == sorted(bad) and res.flagged_calls == len(bad)
    assert res.fallback_rows == 0  # every row certified by its duality gap, none sent to ADMM or HiGHS


def test_corrupted_calls_are_numbered_among_all_calls_when_some_return_nan(conv_layer):
    model, x0, J = conv_layer
    corrupt, bad = corrupted(72, 0.1, seed=4)
    nan_calls = {5, 6, 40}
    res = sensing.sense(model, x0, budget=72, robust=True, step=1.0, seed=4, progress=False,
                        corrupt=lambda p, y: np.full_like(y, np.nan) if p in nan_calls else corrupt(p, y))
    assert res.nonfinite_calls == len(nan_calls) and rel(res.J, J) < 1e-6
    assert set(res.corrupted_calls.tolist()) == bad - nan_calls


@pytest.mark.parametrize("fraction", [0.1, 0.2])
def test_fast_path_agrees_with_the_linear_program_row_by_row(fraction, monkeypatch):
    A, Y, Z, bad = corrupted_regression(240, 41, 4, fraction, seed=1)
    monkeypatch.setattr(sensing, "_fit_l1_rows", lambda *a, **k: pytest.fail("the fast path fell back"))
    got, keep, fallback = sensing._fit_robust(sensing._Design(A), Y)
    assert fallback == 0
    for j in range(Y.shape[1]):
        z_lp, keep_lp = sensing._fit_l1(A, Y[:, j])  # HiGHS's L1 fit, then least squares on its inliers
        np.testing.assert_array_equal(keep[:, j], keep_lp)
        assert set(np.flatnonzero(~keep[:, j])) == set(bad.tolist())
        np.testing.assert_allclose(got[:, j], z_lp, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got[:, j], Z[:, j], rtol=0, atol=1e-8)


def test_rows_with_their_own_corrupted_calls_are_fitted_row_by_row():
    """Corruption that is not shared by the rows (each row its own bad calls): the common trimming drops the
    union, and each row's refit keeps all but its own; the result is still the linear program's."""
    A, Y, Z, _ = corrupted_regression(300, 21, 3, 0.0, seed=2)
    rng = np.random.default_rng(5)
    own = [rng.choice(300, 20, replace=False) for _ in range(3)]
    for j, calls in enumerate(own):
        Y[calls, j] = rng.uniform(-1e3, 1e3, len(calls))
    got, keep, fallback = sensing._fit_robust(sensing._Design(A), Y)
    assert fallback == 0
    for j, calls in enumerate(own):
        assert set(np.flatnonzero(~keep[:, j])) == set(calls.tolist())
        z_lp, keep_lp = sensing._fit_l1(A, Y[:, j])
        np.testing.assert_array_equal(keep[:, j], keep_lp)
        np.testing.assert_allclose(got[:, j], z_lp, rtol=0, atol=1e-9)


def test_the_certificate_refuses_a_fit_that_keeps_a_corrupted_call():
    A, Y, _, bad = corrupted_regression(240, 41, 2, 0.1, seed=3)
    design = sensing._Design(A)
    centre, scale, C = sensing._normalised(Y)
    good = np.ones(Y.shape, bool)
    good[bad] = False
    sloppy = good.copy()
    sloppy[bad[0]] = True  # one corrupted call kept: the least-squares fit is smeared by it
    for keep, expected in ((good, True), (sloppy, False)):
        Z = np.stack([design.solve(keep[:, j], Y[:, [j]])[:, 0] for j in range(2)], axis=1)
        ok = sensing._certified(design, C, (A @ Z - centre) / scale, keep, sensing.GAP)
        assert ok.tolist() == [expected, expected]


def clean_regression(N=120, s=11, R=2, seed=6):
    """Gaussian noise (1e-3) and no corrupted call."""
    rng = np.random.default_rng(seed)
    A = np.hstack([rng.standard_normal((N, s - 1)), np.ones((N, 1))])
    return A, A @ rng.standard_normal((s, R)) + 1e-3 * rng.standard_normal((N, R))


def test_clean_rows_the_fast_path_cannot_certify_get_the_exact_vertex_not_the_admm(monkeypatch):
    """No corrupted call: the least-squares refit is not an L1 minimiser to 1e-3 (the certificate's gap is the
    calls' own residuals), so both rows fall back; the exact vertex (IRLS, simplex pivots) solves them, and
    neither ADMM nor HiGHS runs. The result is HiGHS's: the same flags and coefficients."""
    A, Y = clean_regression()
    monkeypatch.setattr(sensing, "_fit_l1_rows", lambda *a, **k: pytest.fail("the exact vertex fell back to ADMM"))
    got, keep, fallback = sensing._fit_robust(sensing._Design(A), Y)
    assert fallback == 2
    for j in range(2):
        z_lp, keep_lp = sensing._fit_l1(A, Y[:, j])
        np.testing.assert_array_equal(keep[:, j], keep_lp)
        np.testing.assert_allclose(got[:, j], z_lp, rtol=0, atol=1e-9)


def test_rows_the_exact_vertex_cannot_solve_go_to_the_admm(monkeypatch):
    A, Y = clean_regression()
    sent = []
    admm = sensing._fit_l1_rows
    monkeypatch.setattr(sensing, "_l1_vertex", lambda A, y: None)
    monkeypatch.setattr(sensing, "_fit_l1_rows", lambda A, Y, **k: sent.append(Y.shape[1]) or admm(A, Y, **k))
    got, keep, fallback = sensing._fit_robust(sensing._Design(A), Y)
    assert fallback == 2 and sent == [2]
    for j in range(2):
        z_lp, keep_lp = sensing._fit_l1(A, Y[:, j])
        np.testing.assert_array_equal(keep[:, j], keep_lp)
        np.testing.assert_allclose(got[:, j], z_lp, rtol=0, atol=1e-9)


@pytest.mark.parametrize("N, s", [(120, 11), (400, 41)])
def test_the_exact_vertex_is_the_linear_programs_minimiser_on_clean_calls(N, s):
    """Unique L1 minimiser (generic Gaussian design and noise): the vertex equals HiGHS's to 1e-9, interpolates
    s calls exactly, and its multipliers certify it (|ν| <= 1 on the interpolated calls), checked here anew.
    HiGHS runs at feasibility tolerance 1e-9: at its default 1e-7 it stopped one pivot short on a row of a
    1000 x 101 case (seed 101, objective 0.73909803 against the vertex's 0.73909798, coefficients 2.7e-9
    apart; that case takes 20 s here, so it is not run)."""
    A, Y = clean_regression(N, s, R=3, seed=s)
    for y in Y.T:
        z = sensing._l1_vertex(A, y)
        np.testing.assert_allclose(z, sensing._l1_highs(A, y, tolerance=1e-9), rtol=0, atol=1e-9)
        r = A @ z - y
        basis = np.argsort(np.abs(r))[:s]
        assert np.abs(r[basis]).max() < 1e-12 and np.sort(np.abs(r))[s] > 1e-9  # s calls interpolated, no more
        outside = np.ones(N, bool)
        outside[basis] = False
        nu = np.linalg.solve(A[basis].T, -A[outside].T @ np.sign(r[outside]))
        assert np.abs(nu).max() <= 1 + 1e-9


def test_the_exact_vertex_of_calls_that_fit_exactly():
    """A saturated output (every call returns the same value): the fit is exact, the objective is 0."""
    A, _ = clean_regression()
    z = sensing._l1_vertex(A, np.full(len(A), -1.0))
    np.testing.assert_allclose(z, np.r_[np.zeros(A.shape[1] - 1), -1.0], rtol=0, atol=1e-12)
