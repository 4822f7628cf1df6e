"""The elementwise family: one slope function per smooth (or piecewise smooth) unary op y = f(x).

Each `slope(b, x, y, attrs)` emits f'(x) through the builder `b` (x, y: source value names; attrs: the
node's attributes with schema defaults). The JVP (ẏ = ẋ·f'), VJP (x̄ = ḡ·f') and sparsity rules of
the op all follow from it (jacgraph.rules.registry). At a kink the slope's value is written in its
docstring and matches PyTorch where PyTorch has the op.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from .registry import elementwise


def s(b, value, like):
    return b.scalar(value, like)


def _where_positive(b, x, positive, other, threshold=0.0):
    """x > threshold ? positive : other."""
    return b.Where(b.Greater(x, s(b, threshold, x)), positive, other)


@elementwise("Sigmoid")
def sigmoid(b, x, y, attrs):
    """ẏ = ẋ·y(1-y)."""
    return b.Mul(y, b.Sub(s(b, 1.0, x), y))


@elementwise("Tanh")
def tanh(b, x, y, attrs):
    """ẏ = ẋ·(1-y²)."""
    return b.Sub(s(b, 1.0, x), b.Mul(y, y))


@elementwise("Exp")
def exp(b, x, y, attrs):
    """ẏ = ẋ·y."""
    return y


@elementwise("Log")
def log(b, x, y, attrs):
    """ẏ = ẋ/x."""
    return b.Reciprocal(x)


@elementwise("Sqrt")
def sqrt(b, x, y, attrs):
    """ẏ = ẋ/(2y)."""
    return b.Reciprocal(b.Mul(y, s(b, 2.0, x)))


@elementwise("Reciprocal")
def reciprocal(b, x, y, attrs):
    """ẏ = -ẋ·y²."""
    return b.Neg(b.Mul(y, y))


@elementwise("Erf")
def erf(b, x, y, attrs):
    """ẏ = ẋ·(2/√π)·exp(-x²)."""
    return b.Mul(b.Exp(b.Neg(b.Mul(x, x))), s(b, 2.0 / math.sqrt(math.pi), x))


@elementwise("Sin")
def sin(b, x, y, attrs):
    """ẏ = ẋ·cos(x)."""
    return b.Cos(x)


@elementwise("Cos")
def cos(b, x, y, attrs):
    """ẏ = -ẋ·sin(x)."""
    return b.Neg(b.Sin(x))


@elementwise("Tan")
def tan(b, x, y, attrs):
    """ẏ = ẋ·(1+y²)."""
    return b.Add(s(b, 1.0, x), b.Mul(y, y))


@elementwise("Sinh")
def sinh(b, x, y, attrs):
    """ẏ = ẋ·cosh(x)."""
    return b.Cosh(x)


@elementwise("Cosh")
def cosh(b, x, y, attrs):
    """ẏ = ẋ·sinh(x)."""
    return b.Sinh(x)


def _inv_sqrt(b, value):
    return b.Reciprocal(b.Sqrt(value))


@elementwise("Asin")
def asin(b, x, y, attrs):
    """ẏ = ẋ/√(1-x²)."""
    return _inv_sqrt(b, b.Sub(s(b, 1.0, x), b.Mul(x, x)))


@elementwise("Acos")
def acos(b, x, y, attrs):
    """ẏ = -ẋ/√(1-x²)."""
    return b.Neg(_inv_sqrt(b, b.Sub(s(b, 1.0, x), b.Mul(x, x))))


@elementwise("Atan")
def atan(b, x, y, attrs):
    """ẏ = ẋ/(1+x²)."""
    return b.Reciprocal(b.Add(s(b, 1.0, x), b.Mul(x, x)))


@elementwise("Asinh")
def asinh(b, x, y, attrs):
    """ẏ = ẋ/√(x²+1)."""
    return _inv_sqrt(b, b.Add(b.Mul(x, x), s(b, 1.0, x)))


@elementwise("Acosh")
def acosh(b, x, y, attrs):
    """ẏ = ẋ/√(x²-1) (x > 1)."""
    return _inv_sqrt(b, b.Sub(b.Mul(x, x), s(b, 1.0, x)))


@elementwise("Atanh")
def atanh(b, x, y, attrs):
    """ẏ = ẋ/(1-x²) (|x| < 1)."""
    return b.Reciprocal(b.Sub(s(b, 1.0, x), b.Mul(x, x)))


@elementwise("Softplus")
def softplus(b, x, y, attrs):
    """ẏ = ẋ·sigmoid(x)."""
    return b.Sigmoid(x)


@elementwise("Softsign")
def softsign(b, x, y, attrs):
    """ẏ = ẋ/(1+|x|)²."""
    d = b.Add(s(b, 1.0, x), b.Abs(x))
    return b.Reciprocal(b.Mul(d, d))


@elementwise("Elu")
def elu(b, x, y, attrs):
    """ẏ = ẋ·(x > 0 ? 1 : y + α); at 0 the slope is α (as PyTorch)."""
    return _where_positive(b, x, s(b, 1.0, x), b.Add(y, s(b, attrs["alpha"], x)))


@elementwise("Celu")
def celu(b, x, y, attrs):
    """y = max(0, x) + min(0, α(exp(x/α) - 1)): ẏ = ẋ·(x > 0 ? 1 : exp(x/α)); at 0 the slope is 1 (both sides agree)."""
    return _where_positive(b, x, s(b, 1.0, x), b.Exp(b.Mul(x, s(b, 1.0 / attrs["alpha"], x))))


@elementwise("Selu")
def selu(b, x, y, attrs):
    """ẏ = ẋ·(x > 0 ? γ : y + αγ); at 0 the slope is αγ."""
    gamma, alpha = attrs["gamma"], attrs["alpha"]
    return _where_positive(b, x, s(b, gamma, x), b.Add(y, s(b, alpha * gamma, x)))


@elementwise("ThresholdedRelu")
def thresholded_relu(b, x, y, attrs):
    """y = x·[x > α]: ẏ = ẋ·[x > α]; at x = α the slope is 0 (the function jumps there)."""
    return b.Cast(b.Greater(x, s(b, attrs["alpha"], x)), to=b.src.dtype(x))


@elementwise("Shrink")
def shrink(b, x, y, attrs):
    """y = x ± bias outside [-λ, λ], 0 inside: ẏ = ẋ·[|x| > λ]; at |x| = λ the slope is 0."""
    return b.Cast(b.Greater(b.Abs(x), s(b, attrs["lambd"], x)), to=b.src.dtype(x))


@elementwise("HardSwish")
def hard_swish(b, x, y, attrs):
    """ẏ = ẋ·(x < -3 ? 0 : x > 3 ? 1 : x/3 + 1/2); at ±3 the middle piece, as PyTorch.

    float32: h + m·(h - 1/2) with h = HardSigmoid(x) (α = 1/6, β = 1/2: exactly 0 below -3, 1 above 3, 0 and 1 at
    -3 and 3) and m = [|x| <= 3] = HardSigmoid(2^100·(3⁺ - |x|)), 3⁺ the float after 3 (a power-of-two scale keeps
    the sign exact and a nonzero value is at least 2^78). No Where or comparison: onnxruntime's float Where costs
    about three Muls (hardswish_se JVP 0.92x; docs/benchmarks/jvp-profile.md section 7)."""
    if b.src.dtype(x) == TensorProto.FLOAT:
        h = b.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5)
        edge = float(np.nextafter(np.float32(3), np.float32(4))) * 2.0**100
        inside = b.HardSigmoid(b.Abs(x), alpha=-2.0**100, beta=edge)
        return b.Add(h, b.Mul(inside, b.Sub(h, s(b, 0.5, x))))
    middle = b.Add(b.Mul(x, s(b, 1.0 / 3.0, x)), s(b, 0.5, x))
    upper = b.Where(b.Greater(x, s(b, 3.0, x)), s(b, 1.0, x), middle)
    return b.Where(b.Less(x, s(b, -3.0, x)), s(b, 0.0, x), upper)


@elementwise("Mish")
def mish(b, x, y, attrs):
    """y = x·tanh(softplus(x)): ẏ = ẋ·(t + x·sigmoid(x)·(1 - t²)), t = tanh(softplus(x))."""
    t = b.Tanh(b.Softplus(x))
    return b.Add(t, b.Mul(b.Mul(x, b.Sigmoid(x)), b.Sub(s(b, 1.0, x), b.Mul(t, t))))


@elementwise("Swish")
def swish(b, x, y, attrs):
    """y = x·σ(αx): ẏ = ẋ·(σ + αx·σ(1-σ)), σ = sigmoid(αx)."""
    alpha = attrs.get("alpha", 1.0)
    sig = b.Sigmoid(b.Mul(x, s(b, alpha, x)))
    return b.Add(sig, b.Mul(b.Mul(x, s(b, alpha, x)), b.Mul(sig, b.Sub(s(b, 1.0, x), sig))))


@elementwise("Gelu")
def gelu(b, x, y, attrs):
    """ẏ = ẋ·(Φ(x) + x·φ(x)); tanh approximation: its exact derivative."""
    if attrs.get("approximate", "none") == "tanh":
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        x2 = b.Mul(x, x)
        u = b.Mul(b.Mul(x, b.Add(s(b, 1.0, x), b.Mul(x2, s(b, k, x)))), s(b, c, x))
        th = b.Tanh(u)
        du = b.Mul(b.Add(s(b, 1.0, x), b.Mul(x2, s(b, 3 * k, x))), s(b, c, x))
        sech2 = b.Sub(s(b, 1.0, x), b.Mul(th, th))
        return b.Add(b.Mul(b.Add(s(b, 1.0, x), th), s(b, 0.5, x)), b.Mul(b.Mul(b.Mul(x, sech2), du), s(b, 0.5, x)))
    cdf = b.Mul(b.Add(s(b, 1.0, x), b.Erf(b.Mul(x, s(b, 1.0 / math.sqrt(2.0), x)))), s(b, 0.5, x))
    pdf = b.Mul(b.Exp(b.Mul(b.Mul(x, x), s(b, -0.5, x))), s(b, 1.0 / math.sqrt(2.0 * math.pi), x))
    return b.Add(cdf, b.Mul(x, pdf))
