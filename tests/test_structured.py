"""jacgraph/structured.py: convolutions recognised in sparse matrices, and their patch-wise forward and
adjoint maps (im2col, stride phases) against the sparse matrix itself, in onnxruntime float64."""
import numpy as np
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper

from jacgraph.layers import conv_sparse
from jacgraph.model import SourceModel
from jacgraph.rules.bounds import BoundBuilder
from jacgraph.runtime import session
from jacgraph.structured import KINDS, find_conv

# (input shape, kernel shape, attributes): strides, asymmetric pads, dilation, groups, 1-d and 3-d
CASES = [
    ((3, 8, 8), (4, 3, 3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1]}),
    ((2, 9, 7), (3, 2, 4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 9, 7), (3, 2, 3, 2), {"strides": [2, 3], "pads": [0, 1, 2, 0]}),
    ((2, 10), (3, 2, 5), {"strides": [3], "pads": [2, 1]}),
    ((4, 6, 6), (4, 1, 3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1], "group": 4}),
    ((4, 7, 7), (6, 2, 3, 3), {"strides": [2, 1], "pads": [1, 0, 1, 2], "group": 2}),
    ((2, 9, 9), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2]}),
    ((2, 5, 4, 6), (2, 2, 2, 3, 2), {"strides": [1, 2, 2], "pads": [0, 1, 0, 1, 1, 1]}),
    ((3, 4, 4), (5, 3, 4, 4), {"strides": [1, 1], "pads": [0, 0, 0, 0]}),  # one output position
]


def conv_matrix(in_shape, w_shape, a, rng):
    nd = len(in_shape) - 1
    attrs = {"strides": a["strides"], "pads": a["pads"], "dilations": a.get("dilations", [1] * nd),
             "group": a.get("group", 1)}
    W = rng.standard_normal(w_shape)
    osp = tuple((in_shape[1 + d] + attrs["pads"][d] + attrs["pads"][d + nd] - attrs["dilations"][d] * (w_shape[2 + d] - 1)
                 - 1) // attrs["strides"][d] + 1 for d in range(nd))
    out_shape = (w_shape[0],) + osp
    return conv_sparse(W, in_shape, out_shape, attrs), out_shape


def run_patches(conv, n_in, n_out, X, Y):
    """Every kind's forward on X [.., n_in] and adjoint on Y [.., n_out], both ways, emitted and run in onnxruntime."""
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    b = BoundBuilder(SourceModel(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])))
    b.add_input("X", TensorProto.DOUBLE, [None, None, n_in])
    b.add_input("Y", TensorProto.DOUBLE, [None, None, n_out])
    for kind in KINDS:  # both ways of each map: gather first (PatchMap) and contract first (ContractMap)
        for maps, inp, name in zip(conv.candidates(kind), ("X", "Y"), ("fwd", "adj")):
            for way, patch in zip(("gather", "contract"), maps):
                out = patch.emit(b, inp, [None if a is None else b.const(a) for a in patch.arrays()])
                b.identity_as(out, f"{name}_{way}_{kind}")
                b.add_output(f"{name}_{way}_{kind}", TensorProto.DOUBLE, [None, None, None])
    sess = session(b.build("patches"), provider="CPUExecutionProvider")
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"X": X, "Y": Y})))


@pytest.mark.parametrize("in_shape,w_shape,attrs", CASES)
def test_patch_maps_equal_the_sparse_matrix(in_shape, w_shape, attrs):
    rng = np.random.default_rng(len(in_shape) + w_shape[0])
    M, out_shape = conv_matrix(in_shape, w_shape, attrs, rng)
    conv = find_conv(M, in_shape, out_shape)
    assert conv is not None
    X, Y = rng.standard_normal((2, 3, M.shape[1])), rng.standard_normal((2, 3, M.shape[0]))
    got = run_patches(conv, M.shape[1], M.shape[0], X, Y)
    for kind, f in KINDS.items():
        Mk = M.copy()
        Mk.data = f(Mk.data)
        want_fwd, want_adj = X @ Mk.T.toarray(), Y @ Mk.toarray()
        # float64 sums of <= 300 products of O(1) numbers in another order: round-off ~1e-14
        for way in ("gather", "contract"):
            np.testing.assert_allclose(got[f"fwd_{way}_{kind}"], want_fwd, rtol=0, atol=1e-12)
            np.testing.assert_allclose(got[f"adj_{way}_{kind}"], want_adj, rtol=0, atol=1e-12)


def test_what_is_no_convolution_is_not_taken_for_one():
    rng = np.random.default_rng(0)
    M, out_shape = conv_matrix((2, 6, 6), (3, 2, 3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1]}, rng)
    M = M.tolil()
    M[7, 8] += 1.0  # one entry off the shared kernel
    assert find_conv(M.tocsr(), (2, 6, 6), out_shape) is None
    # an average pool without the padding in its count: the border rows divide by fewer
    ones, pooled = conv_matrix((1, 6, 6), (1, 1, 3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1]}, rng)
    ones.data[:] = 1.0
    avg = sp.diags(1.0 / np.diff(ones.indptr)) @ ones
    assert find_conv(avg, (1, 6, 6), pooled) is None
    assert find_conv(sp.random(36, 72, density=0.2, random_state=1, format="csr"), (2, 6, 6), (1, 6, 6)) is None
    assert find_conv(M.tocsr(), (72,), out_shape) is None  # flat features: no spatial axes to read
