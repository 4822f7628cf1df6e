"""The exact l2 Lipschitz constant of tiny ReLU MLPs, by enumerating their linear regions.

A ReLU MLP f(x) = W_k relu(... relu(W_1 x + b_1) ...) + b_k is continuous and piecewise linear on
R^d, so its Lipschitz constant is the largest spectral norm of its Jacobian over the full-dimensional
linear regions. The regions are enumerated depth first, one unit at a time: a unit splits the current
region (a polyhedron) by the hyperplane where its pre-activation is zero, and a side is kept when an
LP (scipy's HiGHS) finds a ball of positive radius inside it. Exponential in the number of units:
meant for nets of a few dozen units on inputs of a few dimensions (tests and the AutoLip/SeqLip
ratio benchmark).

    ws, bs = random_mlp(seed=0)
    L, regions = exact_lipschitz(ws, bs)
    onnx_model = mlp_onnx(ws, bs)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from scipy.optimize import linprog

RADIUS_TOL = 1e-9  # a region whose inscribed ball is thinner than this (relative to its scale) is a boundary


def random_mlp(seed, dims=None):
    """A tiny random ReLU MLP: input 2-3, 1-3 hidden layers of 3-6 units, output 1-3 (weights N(0, 1/fan_in))."""
    rng = np.random.default_rng(seed)
    if dims is None:
        depth = int(rng.integers(1, 4))
        dims = [int(rng.integers(2, 4))] + [int(rng.integers(3, 7)) for _ in range(depth)] + [int(rng.integers(1, 4))]
    ws = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.5 * rng.standard_normal(o) for o in dims[1:]]
    return ws, bs


def mlp_onnx(ws, bs, dtype=np.float64, batch="N") -> onnx.ModelProto:
    """Gemm (transB, torch Linear layout) + Relu chain, input 'x' [batch, d], output 'y'."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, cur = [], [], "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        inits += [numpy_helper.from_array(np.asarray(w, dtype), f"w{i}"), numpy_helper.from_array(np.asarray(b, dtype), f"b{i}")]
        out = "y" if i == len(ws) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [out], transB=1, name=f"gemm{i}"))
        cur = out
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, [batch, ws[0].shape[1]])],
                              [helper.make_tensor_value_info("y", elem, [batch, ws[-1].shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def forward(ws, bs, x):
    for i, (w, b) in enumerate(zip(ws, bs)):
        x = x @ w.T + b
        if i < len(ws) - 1:
            x = np.maximum(x, 0)
    return x


def _inscribed_ball(G, h):
    """Largest ball in {x: G x <= h} (radius capped at 1): (radius, centre)."""
    d = G.shape[1]
    norms = np.linalg.norm(G, axis=1)
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.c_[G, norms], b_ub=h,
                  bounds=[(None, None)] * d + [(None, 1.0)], method="highs")
    if res.status != 0:
        return 0.0, None
    return -res.fun, res.x[:d]


def exact_lipschitz(ws, bs):
    """(L, regions): the exact l2 Lipschitz constant and, per full-dimensional region, (Jacobian, interior point)."""
    d = ws[0].shape[1]
    units = [(layer, j) for layer in range(len(ws) - 1) for j in range(ws[layer].shape[0])]
    regions = []
    scale = 1.0 + max(np.abs(b).max() for b in bs)

    def descend(k, G, h, centre, M, c, z_M, z_c, signs):
        # M, c: the map x -> input of the current layer; z_M, z_c: this layer's pre-activations (affine in x)
        if k == len(units):
            D = np.asarray(signs[-z_M.shape[0]:], float)
            J = ws[-1] @ (D[:, None] * z_M)
            regions.append((J, centre))
            return
        layer, j = units[k]
        if j == 0 and k > 0:  # a new layer: its pre-activations from the finished one's pattern
            D = np.asarray(signs[-ws[layer - 1].shape[0]:], float)
            M, c = D[:, None] * z_M, D * z_c
            z_M, z_c = ws[layer] @ M, ws[layer] @ c + bs[layer]
        a, off = z_M[j], z_c[j]
        if np.linalg.norm(a) < 1e-12 * scale:  # constant on this region: its sign is decided
            descend(k + 1, G, h, centre, M, c, z_M, z_c, signs + [off > 0])
            return
        margin = (a @ centre + off) / np.linalg.norm(a)
        here = margin > 0  # the centre's side holds a ball around it: no LP needed for that side
        for active in (here, not here):
            row, rhs = (-a, off) if active else (a, -off)  # active: a x + off >= 0
            G2, h2 = np.vstack([G, row]), np.r_[h, rhs]
            if active == here and abs(margin) > RADIUS_TOL * scale:
                r, x = 1.0, centre
            else:
                r, x = _inscribed_ball(G2, h2)
            if r > RADIUS_TOL * scale:
                descend(k + 1, G2, h2, x, M, c, z_M, z_c, signs + [active])

    G0, h0 = np.zeros((0, d)), np.zeros(0)
    if not units:
        return float(np.linalg.norm(ws[0], 2)), [(ws[0], np.zeros(d))]
    descend(0, G0, h0, np.zeros(d), np.eye(d), np.zeros(d), ws[0], bs[0], [])
    return max(float(np.linalg.norm(J, 2)) for J, _ in regions), regions


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        print("usage: python examples/lipschitz_exact.py OUT.onnx [SEED]   (writes a tiny ReLU MLP, prints its exact constant)")
        sys.exit(1)
    ws, bs = random_mlp(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    onnx.save(mlp_onnx(ws, bs), sys.argv[1])
    L, regions = exact_lipschitz(ws, bs)
    print(f"wrote {sys.argv[1]}: layers {[ws[0].shape[1]] + [w.shape[0] for w in ws]}, {len(regions)} linear regions, "
          f"exact l2 Lipschitz constant {L:.6g}")
