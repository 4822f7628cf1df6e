"""Small DAG networks for the bound passes (RecurJac, Lipschitz): residual, concat, pooling, branches.

    net = build("resnet_cnn", seed=0)            # a float64 torch module in eval() mode
    onnx_bytes = export_bytes(net, INPUT_SHAPES["resnet_cnn"])

Inputs are 1x8x8 (the MLP: 16 features) so that the tests can sample thousands of float64 Jacobians
in seconds; "cifar_cnn" is the 3x32x32 scale model of issue 13 (four convs, two of stride 2) and
"resnet_cifar" a 3x32x32 ResNet-style one (three residual blocks with BatchNorm, one of stride 2).
BatchNorm layers get random running statistics so that folding them is exercised.
"""
from __future__ import annotations

import io
import warnings

import torch
from torch import nn


class ResidualMLP(nn.Module):
    def __init__(self, d=16, h=24, out=5):
        super().__init__()
        self.inp, self.f1, self.f2, self.out = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, out)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.f1(h))
        h = torch.relu(h + self.f2(h))
        return self.out(h)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNetCNN(nn.Module):
    """stem conv, two residual blocks (BN), global average pool, linear."""

    def __init__(self, c=4, out=5):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(c), ResBlock(c))
        self.head = nn.Linear(c, out)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class DenseCNN(nn.Module):
    """two dense layers: each concatenates its input with BN-ReLU-conv features, then avg-pool."""

    def __init__(self, c=3, growth=3, out=5):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn1, self.c1 = nn.BatchNorm2d(c), nn.Conv2d(c, growth, 3, padding=1)
        self.bn2, self.c2 = nn.BatchNorm2d(c + growth), nn.Conv2d(c + growth, growth, 3, padding=1)
        self.head = nn.Linear((c + 2 * growth) * 16, out)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([h, self.c1(torch.relu(self.bn1(h)))], 1)
        h = torch.cat([h, self.c2(torch.relu(self.bn2(h)))], 1)
        return self.head(torch.flatten(nn.functional.avg_pool2d(h, 2), 1))


class PoolCNN(nn.Module):
    """conv -> relu -> maxpool -> conv -> relu -> linear."""

    def __init__(self, out=5):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6 * 16, out)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.head(torch.flatten(torch.relu(self.c2(h)), 1))


class InceptionCNN(nn.Module):
    """branches 1x1 / 3x3 / 3x3-maxpool(stride 1)-1x1 concatenated, then a strided conv and a linear."""

    def __init__(self, out=5):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 2, 1)
        self.b3 = nn.Conv2d(4, 3, 3, padding=1)
        self.bp = nn.Conv2d(4, 2, 1)
        self.down = nn.Conv2d(7, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 16, out)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        branches = [self.b1(h), torch.tanh(self.b3(h)), self.bp(nn.functional.max_pool2d(h, 3, 1, padding=1))]
        h = torch.relu(self.down(torch.relu(torch.cat(branches, 1))))
        return self.head(torch.flatten(h, 1))


class UNetCNN(nn.Module):
    """1x8x8 U-Net: conv-BN-relu, maxpool to 4x4, conv-relu, then back to 8x8 twice: a stride-2 ConvTranspose
    (padded to the skip's size as U-Net code does: pads computed from the shapes) concatenated with the skip,
    and nn.Upsample (nearest) added after the fusing conv; a linear head."""

    def __init__(self, c=3, out=5):
        super().__init__()
        self.enc, self.bn = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.mid = nn.Conv2d(c, c, 3, padding=1)
        self.up_t = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.up_n = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(2 * c, c, 3, padding=1)
        self.head = nn.Linear(c * 64, out)

    def forward(self, x):
        skip = torch.relu(self.bn(self.enc(x)))
        h = torch.relu(self.mid(nn.functional.max_pool2d(skip, 2)))
        up = self.up_t(h)
        dy, dx = skip.size(2) - up.size(2), skip.size(3) - up.size(3)
        up = nn.functional.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        h = torch.relu(self.fuse(torch.cat([skip, up], 1))) + self.up_n(h)
        return self.head(torch.flatten(h, 1))


class CifarCNN(nn.Module):
    """3x32x32: conv3x3(16) conv4x4/2(32) conv3x3(32) conv4x4/2(64) linear(10)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                               nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                               nn.Flatten(), nn.Linear(64 * 8 * 8, 10))

    def forward(self, x):
        return self.f(x)


class StridedCNN(nn.Module):
    """1x8x8, cifar_cnn in small: conv3x3(3), conv4x4/2(4), conv3x3(4), linear(5) (the tests' strided CNN)."""

    def __init__(self, out=5):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 4, 2, 1), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, out))

    def forward(self, x):
        return self.f(x)


class DownBlock(nn.Module):
    """A stride-2 residual block from c_in to c_out channels; the skip is a strided 1x1 conv with BN."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out)
        self.skip, self.bs = nn.Conv2d(c_in, c_out, 1, 2), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bs(self.skip(x)) + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNetCifar(nn.Module):
    """3x32x32 ResNet-style: stem conv3x3(c)-BN-ReLU, a residual block at c channels, a stride-2 block to
    2c channels, a residual block at 2c, global average pool, linear(10)."""

    def __init__(self, c=8, out=10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(ResBlock(c), DownBlock(c, 2 * c), ResBlock(2 * c))
        self.head = nn.Linear(2 * c, out)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class RecurJacMLP(nn.Module):
    """The MLP of the RecurJac benchmark, 784-256-256-10 ReLU, TRAINED at construction (20 epochs of Adam
    under the caller's torch seed) on examples/lipsdp_digits784.py's 28x28 digits (no MNIST download here):
    the first 1500 images train, the other 297 test. `accuracy` is (train, test); `example_input` the first
    test image [1, 784] (float64), the point x0 the benches bound at."""

    def __init__(self, epochs=20):
        super().__init__()
        from examples.lipsdp_digits784 import digits784

        self.f = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        X, y = digits784()
        opt = torch.optim.Adam(self.parameters(), 1e-3)
        for _ in range(epochs):
            for i in range(0, 1500, 64):
                opt.zero_grad()
                nn.functional.cross_entropy(self.f(X[i:min(i + 64, 1500)]), y[i:min(i + 64, 1500)]).backward()
                opt.step()
        with torch.no_grad():
            hit = (self.f(X).argmax(1) == y).double()
        self.accuracy = (hit[:1500].mean().item(), hit[1500:].mean().item())
        self.example_input = X[1500:1501].double().numpy()

    def forward(self, x):
        return self.f(x)


MODELS = {"residual_mlp": ResidualMLP, "resnet_cnn": ResNetCNN, "densenet_cnn": DenseCNN,
          "pool_cnn": PoolCNN, "inception_cnn": InceptionCNN, "cifar_cnn": CifarCNN, "unet_cnn": UNetCNN,
          "strided_cnn": StridedCNN, "resnet_cifar": ResNetCifar, "recurjac_mlp": RecurJacMLP}
INPUT_SHAPES = {"residual_mlp": (16,), "cifar_cnn": (3, 32, 32), "resnet_cifar": (3, 32, 32), "recurjac_mlp": (784,)}
for _name in MODELS:
    INPUT_SHAPES.setdefault(_name, (1, 8, 8))


def build(name, seed=0):
    """The model `name`, random weights under `seed`, random BN statistics, float64, eval()."""
    torch.manual_seed(seed)
    net = MODELS[name]()
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.double().eval()


def export_bytes(net, shape, opset=17, dynamic_batch=True) -> bytes:
    """ONNX bytes (input x [N, *shape], output y, dynamic batch unless dynamic_batch=False: then [1, *shape]),
    BatchNorm kept as a node."""
    buf = io.BytesIO()
    x = torch.zeros((1, *shape), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.float(), (x.float(),), buf, dynamo=False, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None)
    net.double()
    return buf.getvalue()
