"""passes/recurjac.py at eps = 0 on DAG models with max pooling: where every unit is decided the bound is the
exact Jacobian (zero width), checked against a float64 central difference of the source; where max-pool
windows tie exactly it holds each window's tied derivatives and no more (not their sum); the same graphs stay
sound (2000+ sampled Jacobians) at small eps.
"""
import numpy as np
import onnx
import torch
from test_recurjac import TOL, assert_dag_sound, bounds, jacobians
from torch import nn

from examples import bounds_models
from jacgraph.passes import recurjac
from jacgraph.reference import reference_session, run_reference
from jacgraph.runtime import session
from jacgraph.testing import to_float64

# Bound and oracle are float64 through a few layers of width <= 320 with entries O(1): round-off ~1e-15.
EXACT = 1e-12
# Central difference with h = 1e-6 on outputs O(1): round-off ~1e-16 / h = 1e-10, no truncation error while
# no unit crosses a kink within h (the bound's own exactness check, EXACT, is the sharp one).
FD_TOL = 1e-7


class PoolMixCNN(nn.Module):
    """The model a review found loose at eps 0 (mean width 0.03): conv -> LeakyReLU -> a residual ReLU block,
    then a concat of a 1x1 conv, a LeakyReLU branch and the block's output, a max pool over the first five
    channels (the two branches and one block channel, whose dead units tie at 0), an average pool over the
    rest, a linear head. LeakyReLU slopes are powers of two: ONNX stores alpha as float32."""

    def __init__(self, c=4, out=5):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.r1, self.r2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.p, self.q = nn.Conv2d(c, 2, 1), nn.Conv2d(c, 2, 3, padding=1)
        self.head = nn.Linear((4 + c) * 16, out)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.stem(x), 0.125)
        block = torch.relu(h + self.r2(torch.relu(self.r1(h))))
        cat = torch.cat([self.p(h), nn.functional.leaky_relu(self.q(h), 0.25), block], 1)
        pooled = torch.cat([nn.functional.max_pool2d(cat[:, :5], 2), nn.functional.avg_pool2d(cat[:, 5:], 2)], 1)
        return self.head(torch.flatten(pooled, 1))


def _pool_mix(seed=0):
    torch.manual_seed(seed)
    net = PoolMixCNN().double().eval()
    return net, bounds_models.export_bytes(net, (1, 8, 8))


def central_difference_jacobian(model_bytes, x0, h=1e-6):
    """[outputs, inputs] float64 central differences of the source model: all 2n points in one batch."""
    n = x0.size
    sess = reference_session(to_float64(onnx.load_from_string(model_bytes)))
    steps = np.concatenate([np.eye(n), -np.eye(n)]) * h
    y = run_reference(sess, {"x": (x0.reshape(1, -1) + steps).reshape((2 * n,) + x0.shape[1:])})["y"]
    return ((y[:n] - y[n:]) / (2 * h)).T


def test_eps_zero_with_max_and_average_pools_gives_the_exact_jacobian():
    """Fails before the fix: CROWN's and the interval step's bounds of one point crossed by round-off
    (l > u by 2e-16), the max pool's winner then looked unable to win, its derivative interval was [1, 0],
    and the bound had mean width 0.0288 at eps 0 (1.3e-18 at eps 1e-12)."""
    _, model = _pool_mix()
    x0 = np.random.default_rng(1).standard_normal((1, 1, 8, 8))
    sess = recurjac.build(model, lowering="graph")
    lo, hi = bounds(sess, x0, [0.0])
    assert float(np.max(hi - lo)) <= EXACT, f"eps 0 is not exact: mean width {float(np.mean(hi - lo)):.3g}"
    fd = central_difference_jacobian(model, x0)
    np.testing.assert_allclose(lo[0], fd, rtol=0, atol=FD_TOL)
    np.testing.assert_allclose(hi[0], fd, rtol=0, atol=FD_TOL)


def test_the_same_model_is_sound_at_small_eps():
    net, model = _pool_mix()
    x0 = np.random.default_rng(1).standard_normal((1, 8, 8))
    widths, unstable = assert_dag_sound(model, net, (1, 8, 8), x0, [0.0, 1e-3, 0.05])
    assert widths[0] <= EXACT and widths[1] > widths[0] and max(unstable) > 0, (widths, unstable)


class TieCNN(nn.Module):
    """conv3x3 (2 channels) -> 2x2 max pool -> linear: at x = 0 every conv output is its channel's bias, so all
    32 windows tie exactly and each tied member has its own (nonzero) derivative."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 16, 3)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.max_pool2d(self.conv(x), 2), 1))


def test_exact_ties_at_eps_zero_give_each_windows_tied_derivatives_not_their_sum():
    """At a tie the one-sided derivatives pick one member per window. The tightest elementwise bound that
    lets every window pick any tied member is, per entry, the sum over windows of the min / max over its
    members of (head weight x member's derivative). Before, a max node's part entered the back-substitution
    as an interval per member, [0, 1] each, which allows their sum: mean width 0.206 against 0.156."""
    torch.manual_seed(0)
    net = TieCNN().double().eval()
    model = bounds_models.export_bytes(net, (1, 8, 8))
    lo, hi = bounds(recurjac.build(model, lowering="graph"), np.zeros((1, 1, 8, 8)), [0.0])
    conv = jacobians(lambda x: net.conv(x.reshape(1, 1, 8, 8)).reshape(-1), np.zeros((1, 64)))[0]  # [2 * 8 * 8, 64]
    members = conv.reshape(2, 4, 2, 4, 2, 64).transpose(0, 1, 3, 2, 4, 5).reshape(32, 4, 64)  # [window, member, x]
    terms = net.head.weight.detach().numpy()[:, :, None, None] * members[None]  # [output, window, member, x]
    np.testing.assert_allclose(lo[0], terms.min(2).sum(1), rtol=0, atol=EXACT)
    np.testing.assert_allclose(hi[0], terms.max(2).sum(1), rtol=0, atol=EXACT)
    # every one-sided derivative: the Jacobian just off x = 0 in 2000 directions (and torch's tie rule at 0)
    d = np.random.default_rng(0).standard_normal((2000, 64))
    J = jacobians(lambda x: net(x.reshape(1, 1, 8, 8)).reshape(-1), np.concatenate([np.zeros((1, 64)), 1e-9 * d]))
    assert (lo[0] - J).max() <= TOL and (J - hi[0]).max() <= TOL
    # sound around the tie too (every window stays tied-or-undecided there: the same width, which a ball can't shrink)
    widths, _ = assert_dag_sound(model, net, (1, 8, 8), np.zeros((1, 8, 8)), [1e-3, 0.05])
    assert np.mean(hi - lo) - EXACT <= widths[0] <= widths[1] + EXACT, (np.mean(hi - lo), widths)


def test_a_batch_through_max_pools_equals_its_points_one_by_one():
    """The max node's lines are per point of the batch (its possible winners [b, n, K]): three points at eps
    0, 0.05 and 0.3 in one run give the bounds of three runs."""
    _, model = _pool_mix()
    x0 = np.random.default_rng(3).standard_normal((3, 1, 8, 8))
    eps = [0.0, 0.05, 0.3]
    sess = session(recurjac.build(model, lowering="graph"), provider="CPUExecutionProvider")
    together = bounds(sess, x0, eps)
    for i in range(3):
        for got, want in zip(bounds(sess, x0[i:i + 1], eps[i:i + 1]), together):
            np.testing.assert_allclose(got[0], want[i], rtol=0, atol=EXACT, equal_nan=False)
