"""jacgraph.reference: the float64 reference evaluator's Conv and ConvTranspose against PyTorch's (float64) and
onnx's own implementation, over strides, pads, dilations, output padding, groups and 1-3 spatial dims."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from jacgraph.reference import reference_session

# (spatial dims, stride, pad, dilation, group): every combination in 2-D, one each in 1-D and 3-D
CASES = [(2, *c) for c in itertools.product([1, 2, 3], [0, 1], [1, 2], [1, 2])] + [(1, 2, 1, 2, 2), (3, 2, 1, 1, 2)]


def _model(op, bias, **attrs):
    names = ["X", "W"] + (["B"] if bias else [])
    node = helper.make_node(op, names, ["Y"], **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names],
                              [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _torch(fn, X, W, B, **kw):
    return fn(torch.from_numpy(X), torch.from_numpy(W), None if B is None else torch.from_numpy(B), **kw).numpy()


@pytest.mark.parametrize("nd,s,p,d,g", CASES)
def test_conv_equals_torch(nd, s, p, d, g):
    rng = np.random.default_rng(nd * 100 + s * 10 + p + d + g)
    X, W = rng.standard_normal((3, 4, *[7, 6, 5][:nd])), rng.standard_normal((6, 4 // g, *[3, 2, 2][:nd]))
    for B in (None, rng.standard_normal(6)):
        feeds = {"X": X, "W": W, **({} if B is None else {"B": B})}
        model = _model("Conv", B is not None, strides=[s] * nd, pads=[p] * 2 * nd, dilations=[d] * nd, group=g)
        got = reference_session(model).run(None, feeds)[0]
        fn = [torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][nd - 1]
        want = _torch(fn, X, W, B, stride=s, padding=p, dilation=d, groups=g)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, feeds)[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("nd,s,p,d,g", CASES)
def test_conv_transpose_equals_torch(nd, s, p, d, g):
    """Against torch, and bit for bit against onnx's own where that one runs (group 1, output padding below
    the stride): the same products summed in the same order."""
    rng = np.random.default_rng(nd * 100 + s * 10 + p + d + g)
    X, W = rng.standard_normal((3, 4, *[5, 4, 3][:nd])), rng.standard_normal((4, 6 // g, *[3, 2, 2][:nd]))
    for B, op in itertools.product((None, rng.standard_normal(6)), sorted({0, min(s, d) - 1, max(s, d) - 1})):
        feeds = {"X": X, "W": W, **({} if B is None else {"B": B})}
        model = _model("ConvTranspose", B is not None, strides=[s] * nd, pads=[p] * 2 * nd, dilations=[d] * nd,
                       group=g, output_padding=[op] * nd)
        got = reference_session(model).run(None, feeds)[0]
        fn = [torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
              torch.nn.functional.conv_transpose3d][nd - 1]
        want = _torch(fn, X, W, B, stride=s, padding=p, dilation=d, groups=g, output_padding=op)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        if g == 1 and op < s:
            np.testing.assert_array_equal(got, ReferenceEvaluator(model).run(None, feeds)[0])


def test_same_padding_goes_to_onnx():
    """auto_pad SAME_* is onnx's own computation (not reimplemented)."""
    rng = np.random.default_rng(0)
    feeds = {"X": rng.standard_normal((2, 3, 7, 6)), "W": rng.standard_normal((4, 3, 3, 3))}
    for op in ("Conv", "ConvTranspose"):
        w = feeds["W"] if op == "Conv" else feeds["W"].transpose(1, 0, 2, 3).copy()
        model = _model(op, False, auto_pad="SAME_UPPER", strides=[2, 2])
        np.testing.assert_array_equal(reference_session(model).run(None, {**feeds, "W": w})[0],
                                      ReferenceEvaluator(model).run(None, {**feeds, "W": w})[0])
