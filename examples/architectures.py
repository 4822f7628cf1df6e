"""Fourteen small PyTorch architectures and their ONNX export, for examples and benchmarks.

Every model is CPU-friendly (a few ms per batch-1 forward pass), randomly initialised under a
fixed seed, and put in eval() mode. BatchNorm layers get non-trivial running statistics (see
`_set_batchnorm_stats`), so the exported BatchNormalization nodes are never the identity.

    python examples/architectures.py OUT_DIR [NAME ...]

exports each model to OUT_DIR/NAME.onnx and prints its op types, parameter count and the largest
difference between onnxruntime and PyTorch on a random input.
"""

import collections
import functools
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    """Conv (no bias) + BatchNorm + activation (act=None for none)."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --- 1. MLP ---------------------------------------------------------------------------------

def mlp():
    """784-256-256-10 multilayer perceptron with ReLU."""
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


# --- 2. Maxout MLP ---------------------------------------------------------------------------

class Maxout(nn.Module):
    """Linear to k*units, then max over the k pieces (Max of slices, or ReduceMax)."""

    def __init__(self, cin, units, k, reduce=False):
        super().__init__()
        self.units, self.k, self.reduce = units, k, reduce
        self.linear = nn.Linear(cin, units * k)

    def forward(self, x):
        h = self.linear(x)
        if self.reduce:  # exports as Reshape + ReduceMax
            return h.reshape(-1, self.k, self.units).amax(dim=1)
        pieces = [h[:, i * self.units:(i + 1) * self.units] for i in range(self.k)]
        return functools.reduce(torch.maximum, pieces)  # exports as Slice + Max


def maxout_mlp():
    """784-240-240-10 maxout network (k=3 then k=2); one layer uses Max, the other ReduceMax."""
    return nn.Sequential(Maxout(784, 240, 3), Maxout(240, 240, 2, reduce=True),
                         nn.Linear(240, 10))


# --- 3. LeNet --------------------------------------------------------------------------------

def lenet():
    """LeNet-5 on 1x28x28: two Conv-ReLU-MaxPool stages and three Linear layers."""
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(),
                         nn.Linear(400, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


# --- 4. AlexNet-style ------------------------------------------------------------------------

def alexnet_style():
    """AlexNet-style on 3x96x96: 11x11 stride-4 conv, overlapping 3/2 max-pools, dropout MLP."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),   # 23 -> 11
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),             # 11 -> 5
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),             # 5 -> 2
        nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(256, 256), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10))


# --- 5. VGG-style ----------------------------------------------------------------------------

def vgg_style():
    """VGG-style on 3x32x32: [32,32,M,64,64,M,128,128,M] 3x3 Conv-BN-ReLU blocks, MLP head."""
    layers, cin = [], 3
    for v in [32, 32, "M", 64, 64, "M", 128, 128, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(),
                         nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(256, 10))


# --- 6. ResNet-18 ----------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv-BN, identity or 1x1 Conv-BN shortcut, ReLU after add."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnet18():
    """ResNet-18 (BasicBlocks [2,2,2,2], channels 64..512) on 3x64x64, 10 classes."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


# --- 7. DenseNet-style -----------------------------------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 bottleneck, BN-ReLU-Conv3x3; output concatenated onto the input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(),
                                  nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


def densenet_style():
    """DenseNet-BC-style on 3x32x32: 3 dense blocks of 4 layers (growth 12), AvgPool transitions."""
    growth, c = 12, 24
    layers = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
    for block in range(3):
        for _ in range(4):
            layers.append(DenseLayer(c, growth))
            c += growth
        if block < 2:  # transition: BN-ReLU-Conv1x1 (halve channels) - AvgPool 2x2
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                       nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


# --- 8. MobileNetV2-style --------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual if shapes match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenetv2_style():
    """MobileNetV2-style on 3x64x64: inverted residuals, depthwise convs, ReLU6, width 0.5."""
    layers, cin = [conv_bn(3, 16, 3, 2, act=nn.ReLU6)], 16
    for t, c, n, s in [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 3, 2), (6, 48, 2, 2), (6, 80, 2, 1)]:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers, conv_bn(cin, 320, 1, act=nn.ReLU6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(320, 10))


# --- 9. SqueezeNet-style ---------------------------------------------------------------------

class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], dim=1)


def squeezenet_style():
    """SqueezeNet 1.1-style on 3x64x64: fire modules, ceil_mode max-pools, conv classifier."""
    pool = functools.partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),          # 31 -> 15
        Fire(64, 16, 64), Fire(128, 16, 64), pool(),               # 15 -> 7
        Fire(128, 32, 128), Fire(256, 32, 128), pool(),            # 7 -> 3
        Fire(256, 48, 192), Fire(384, 64, 256),
        nn.Dropout(0.5), nn.Conv2d(512, 10, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


# --- 10. Inception-style ---------------------------------------------------------------------

class InceptionBlock(nn.Module):
    """GoogLeNet inception block: 1x1 | 1x1-3x3 | 1x1-5x5 | maxpool(3,1,1)-1x1, concatenated."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


def inception_style():
    """GoogLeNet-style on 3x32x32: stem, three inception blocks, max-pool, global average pool."""
    return nn.Sequential(conv_bn(3, 64, 3),
                         InceptionBlock(64, 32, 48, 64, 8, 16, 16),       # -> 128
                         InceptionBlock(128, 64, 64, 96, 16, 48, 32),     # -> 240
                         nn.MaxPool2d(3, 2, 1),                           # 32 -> 16
                         InceptionBlock(240, 96, 48, 104, 8, 24, 32),     # -> 256
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


# --- 11. ShuffleNet-style --------------------------------------------------------------------

def channel_shuffle(x, groups):
    """(N, g*c, H, W) -> (N, c*g, H, W) by reshape-transpose-reshape."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: chunk-split channels (stride 1) or two branches (stride 2), concat, shuffle.

    The branch's first 1x1 conv is grouped (groups=2), as in ShuffleNetV1.
    """

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        bin_ = cin if stride == 2 else cin // 2
        self.branch = nn.Sequential(conv_bn(bin_, half, 1, groups=2),
                                    conv_bn(half, half, 3, stride, groups=half, act=None),
                                    conv_bn(half, half, 1))
        self.shortcut = None
        if stride == 2:
            self.shortcut = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, act=None),
                                          conv_bn(cin, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], dim=1)
        else:
            out = torch.cat([self.shortcut(x), self.branch(x)], dim=1)
        return channel_shuffle(out, 2)


def shufflenet_style():
    """ShuffleNetV2-style on 3x64x64: stages of [1 down + 3] shuffle units, widths 48/96/192."""
    layers, cin = [conv_bn(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1)], 24
    for cout in [48, 96, 192]:
        layers += [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(3)]
        cin = cout
    return nn.Sequential(*layers, conv_bn(cin, 512, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


# --- 12. U-Net -------------------------------------------------------------------------------

def double_conv(cin, cout):
    """Two 3x3 Conv-BN-ReLU."""
    return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    """U-Net on 1x64x64: 3 down / 3 up levels; upsampling by ConvTranspose2d, bilinear, nearest."""

    def __init__(self, cin=1, classes=2, c=16):
        super().__init__()
        self.enc1, self.enc2 = double_conv(cin, c), double_conv(c, 2 * c)
        self.enc3, self.mid = double_conv(2 * c, 4 * c), double_conv(4 * c, 8 * c)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.dec3 = double_conv(8 * c, 4 * c)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 nn.Conv2d(4 * c, 2 * c, 1))
        self.dec2 = double_conv(4 * c, 2 * c)
        self.up1 = nn.Conv2d(2 * c, c, 1)  # applied after nearest-neighbour interpolation
        self.dec1 = double_conv(2 * c, c)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(m), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        up1 = self.up1(F.interpolate(d2, scale_factor=2, mode="nearest"))
        d1 = self.dec1(torch.cat([up1, e1], dim=1))
        return self.head(d1)


def unet():
    """U-Net on 1x64x64 (widths 16..128), 2 output channels."""
    return UNet()


# --- 13. Leaky CNN ---------------------------------------------------------------------------

def leaky_cnn():
    """CNN on 3x32x32 with LeakyReLU(0.1), a channel-wise PReLU and a scalar PReLU."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(32, 32, 3, padding=1), nn.PReLU(32), nn.MaxPool2d(2),          # 32 -> 16
        nn.Conv2d(32, 64, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(64, 64, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),     # 16 -> 8
        nn.Conv2d(64, 128, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),    # 8 -> 4
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 128), nn.PReLU(),
        nn.Linear(128, 10))


# --- 14. HardSwish + squeeze-excitation ------------------------------------------------------

class SqueezeExcite(nn.Module):
    """Global average pool, reduce, ReLU, expand, gate (HardSigmoid or Sigmoid), rescale x.

    conv=True uses 1x1 convs (MobileNetV3 style), conv=False uses Linear layers (SENet style).
    """

    def __init__(self, c, reduced, conv=True, gate=nn.Hardsigmoid):
        super().__init__()
        self.conv = conv
        if conv:
            self.fc = nn.Sequential(nn.Conv2d(c, reduced, 1), nn.ReLU(),
                                    nn.Conv2d(reduced, c, 1), gate())
        else:
            self.fc = nn.Sequential(nn.Linear(c, reduced), nn.ReLU(),
                                    nn.Linear(reduced, c), gate())

    def forward(self, x):
        if self.conv:
            return x * self.fc(F.adaptive_avg_pool2d(x, 1))
        s = x.mean(dim=(2, 3))
        return x * self.fc(s)[:, :, None, None]


class MBConvSE(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise, squeeze-excite, 1x1 project, HardSwish."""

    def __init__(self, cin, cout, k, stride, expand, se):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(conv_bn(cin, hidden, 1, act=nn.Hardswish),
                                  conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.Hardswish),
                                  se(hidden),
                                  conv_bn(hidden, cout, 1, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def hardswish_se():
    """MobileNetV3-style on 3x64x64: HardSwish, squeeze-excitation gates (HardSigmoid and Sigmoid)."""
    hsig = lambda c: SqueezeExcite(c, c // 4)                                  # 1x1 conv + HardSigmoid
    sig = lambda c: SqueezeExcite(c, c // 4, conv=False, gate=nn.Sigmoid)      # Linear + Sigmoid
    return nn.Sequential(
        conv_bn(3, 16, 3, 2, act=nn.Hardswish),                                # 64 -> 32
        MBConvSE(16, 24, 3, 2, 4, hsig),                                       # 32 -> 16
        MBConvSE(24, 24, 3, 1, 3, hsig),
        MBConvSE(24, 40, 5, 2, 3, sig),                                        # 16 -> 8
        MBConvSE(40, 40, 5, 1, 3, sig),
        MBConvSE(40, 80, 3, 2, 4, hsig),                                       # 8 -> 4
        conv_bn(80, 256, 1, act=nn.Hardswish),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(256, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, 10))


# --- registry --------------------------------------------------------------------------------

ARCHITECTURES = {
    "mlp": (mlp, (784,)),
    "maxout_mlp": (maxout_mlp, (784,)),
    "lenet": (lenet, (1, 28, 28)),
    "alexnet_style": (alexnet_style, (3, 96, 96)),
    "vgg_style": (vgg_style, (3, 32, 32)),
    "resnet18": (resnet18, (3, 64, 64)),
    "densenet_style": (densenet_style, (3, 32, 32)),
    "mobilenetv2_style": (mobilenetv2_style, (3, 64, 64)),
    "squeezenet_style": (squeezenet_style, (3, 64, 64)),
    "inception_style": (inception_style, (3, 32, 32)),
    "shufflenet_style": (shufflenet_style, (3, 64, 64)),
    "unet": (unet, (1, 64, 64)),
    "leaky_cnn": (leaky_cnn, (3, 32, 32)),
    "hardswish_se": (hardswish_se, (3, 64, 64)),
}


def example_input(name, batch=1, seed=0):
    """A standard-normal input of the architecture's shape, drawn under `seed`."""
    shape = ARCHITECTURES[name][1]
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _init_weights(model):
    """Kaiming-normal weights (keeps activations O(1) through depth) and small random biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)


@torch.no_grad()
def _set_batchnorm_stats(model, name):
    """Give every BatchNorm random but sensible affine parameters and running statistics.

    The running mean/var are the statistics of one batch of random inputs (so activations stay
    O(1) and about half of the ReLUs are active), then perturbed at random: mean + N(0, 0.1),
    var * U(0.5, 2); gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1). None of them is the identity.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for bn in bns:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.momentum = 1.0  # running stats := statistics of the calibration batch
    model.train()
    model(example_input(name, batch=8, seed=12345))
    for bn in bns:
        bn.momentum = 0.1
        bn.running_mean += 0.1 * torch.randn_like(bn.running_mean)
        bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.5, 2.0)


def build(name, seed=0):
    """The architecture `name`, randomly initialised under `seed`, in eval() mode."""
    constructor = ARCHITECTURES[name][0]
    torch.manual_seed(seed)
    model = constructor()
    _init_weights(model)
    _set_batchnorm_stats(model, name)
    return model.eval()


def export(name, path, batch=1, seed=0, fold_batchnorm=True):
    """Export build(name, seed) at a fixed batch size to ONNX (opset 17, input x, output y).

    By default the exporter folds every BatchNorm that directly follows a Conv into the Conv's
    weights (only densenet_style, whose BNs precede their convs, keeps BatchNormalization nodes).
    fold_batchnorm=False keeps every BatchNorm as an inference-mode BatchNormalization node.
    """
    model = build(name, seed)
    x = example_input(name, batch, seed)
    # PRESERVE exports the model in its current (eval) mode without the Conv+BN folding pass.
    mode = torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE
    # The legacy TorchScript exporter (dynamo=False) works for all 14 and gives clean graphs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation; PRESERVE advice (model is in eval)
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, training=mode,
                          input_names=["x"], output_names=["y"])
    return path


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def main(argv):
    if not argv:
        print("usage: python examples/architectures.py OUT_DIR [NAME ...]")
        return 2
    import numpy as np
    import onnx
    import onnxruntime as ort

    out_dir, names = argv[0], argv[1:] or list(ARCHITECTURES)
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        path = export(name, os.path.join(out_dir, name + ".onnx"))
        ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
        x = example_input(name)
        with torch.no_grad():
            expected = build(name)(x).numpy()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
        diff = float(np.max(np.abs(got - expected)))
        print(f"{name}: {parameter_count(build(name)):,} parameters, "
              f"onnxruntime vs torch max |diff| {diff:.2e}")
        print("   ", dict(sorted(ops.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
