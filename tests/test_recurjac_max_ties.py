"""passes/recurjac.py at eps = 0 where max-pool windows tie exactly at non-zero values (a convolution without
padding over a constant image: in exact arithmetic every window's members are the same number). The bound
graph computes those members' bounds by sums in different orders, so one member can come out an ulp above the
others and look dominant; then the other tied members' derivatives, torch's own Jacobian at the point and almost every
one-sided derivative were outside the bound (by up to 0.11). Review R1 of 09c41f5 (the bug is older).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples import bounds_models
from jacgraph.passes import recurjac
from jacgraph.runtime import session

# Bound and autograd are float64 through three layers with entries O(1): round-off ~1e-16; a wrong tie
# decision moves an entry by O(0.1).
TOL = 1e-9
STEP = 1e-7  # one-sided pieces: J at x0 + STEP d (piecewise linear net, no kink but the ties within 1e-4)


class ConstTieCNN(nn.Module):
    """conv 3x3 (no padding) -> max pool 3x3 / 2 -> ReLU -> linear, on a constant 2 x 9 x 9 image."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(3 * 9, 4)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(F.max_pool2d(self.conv(x), 3, 2)), 1))


def _jacobians(net, X):
    f = lambda x: net(x.reshape(1, 2, 9, 9)).reshape(-1)  # noqa: E731
    return torch.func.vmap(torch.func.jacrev(f))(torch.tensor(X)).detach().numpy()


def test_exact_ties_at_non_zero_values_hold_every_one_sided_derivative_at_eps_zero():
    torch.manual_seed(53)
    net = ConstTieCNN().double().eval()
    model = bounds_models.export_bytes(net, (2, 9, 9))
    x0 = np.full((1, 2, 9, 9), 0.7)
    z = net.conv(torch.tensor(x0)).detach().numpy().reshape(3, -1)
    # in exact arithmetic every member of a channel is the same sum; float sums differ by an ulp at most
    assert np.abs(z - z[:, :1]).max() <= 1e-15, "the windows must tie (a constant conv output per channel)"
    relu_in = F.max_pool2d(net.conv(torch.tensor(x0)), 3, 2).detach().numpy()
    assert np.abs(relu_in).min() > 1e-4, "no ReLU kink within STEP"
    sess = session(recurjac.build(model, lowering="graph"), provider="CPUExecutionProvider")
    lo, hi = (v[0] for v in sess.run(None, {"x0": x0, "eps": np.array([0.0])})[:2])
    d = np.random.default_rng(0).uniform(-1, 1, (2000, x0.size))
    X = np.concatenate([x0.reshape(1, -1), x0.reshape(1, -1) + STEP * d])
    J = _jacobians(net, X)
    assert len({j.tobytes() for j in np.round(J[1:], 9)}) > 100, "the directions must reach many pieces"
    below, above = (lo - J).max(), (J - hi).max()
    assert below <= TOL and above <= TOL, f"a one-sided derivative is outside by {max(below, above):.3g}"
    # the tie bound is the limit of the bounds over small balls, not narrower
    lo_s, hi_s = (v[0] for v in sess.run(None, {"x0": x0, "eps": np.array([1e-9])})[:2])
    np.testing.assert_allclose(np.mean(hi - lo), np.mean(hi_s - lo_s), rtol=1e-6)


def test_no_tie_is_still_exact_at_eps_zero():
    """The tie slack decides nothing at a generic point: the bound is still the Jacobian there."""
    torch.manual_seed(53)
    net = ConstTieCNN().double().eval()
    model = bounds_models.export_bytes(net, (2, 9, 9))
    x0 = np.random.default_rng(1).standard_normal((1, 2, 9, 9))
    sess = session(recurjac.build(model, lowering="graph"), provider="CPUExecutionProvider")
    lo, hi = (v[0] for v in sess.run(None, {"x0": x0, "eps": np.array([0.0])})[:2])
    J = _jacobians(net, x0.reshape(1, -1))[0]
    np.testing.assert_allclose(lo, J, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, J, rtol=0, atol=1e-12)
