"""Float64 reference evaluation with onnx's ReferenceEvaluator (onnxruntime has no float64 Conv).

A core helper: the compiler uses it (the reverse pass reads Resize's interpolation matrices off the op
itself; the Lipschitz pass runs its float64 graphs), and so do the numerical checkers in jacgraph.testing.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def _exact_reference_ops():
    """Overrides for onnx 1.23's reference evaluator, which computes Erf and Gelu in float32, sums
    LRN's window over a range of the batch size instead of the channel count, and reports wrong
    MaxPool indices at stride 1 (MaxPool runs in onnxruntime instead: its float64 kernel and the
    argmax it reports are the convention the JVP rule pins); GatherElements along an axis longer than 64
    and GlobalLpPool, which it cannot run, are added. Conv and ConvTranspose with explicit pads take one matmul
    per kernel tap over strided slices (onnx's gathers Conv's im2col matrix by fancy indexing, 4-6x slower on few
    channels, and adds ConvTranspose's taps one element at a time in Python: 85% of a U-Net's float64 Jacobian;
    its ConvTranspose also mixes up channels when group > 1)."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops import op_conv, op_conv_transpose
    from onnx.reference.ops import op_grid_sample
    from onnx.reference.ops import op_loop
    from scipy.special import erf

    class Conv(op_conv.Conv):
        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, pads=pads, strides=strides)
            nd, (N, C), group, M, kernel = X.ndim - 2, X.shape[:2], group or 1, W.shape[0], W.shape[2:]
            strides, dilations = strides or [1] * nd, dilations or [1] * nd
            pads = [0] * 2 * nd if auto_pad == "VALID" or not pads else pads
            padded = np.pad(X, [(0, 0), (0, 0), *zip(pads[:nd], pads[nd:])])
            out_shape = [(n - d * (k - 1) - 1) // s + 1
                         for n, d, k, s in zip(padded.shape[2:], dilations, kernel, strides)]
            w = W.reshape(group, M // group, C // group, *kernel)
            out = np.zeros((N, group, M // group, int(np.prod(out_shape))), X.dtype)
            for tap in np.ndindex(*kernel):  # one matmul per kernel tap over a strided slice: no im2col matrix
                at = tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                           for t, d, s, o in zip(tap, dilations, strides, out_shape))
                out += w[(..., *tap)] @ padded[(slice(None), slice(None), *at)].reshape(N, group, C // group, -1)
            out = out.reshape(N, M, *out_shape)
            return ((out if B is None else out + B.reshape(1, -1, *[1] * nd)).astype(X.dtype, copy=False),)

    class ConvTranspose(op_conv_transpose.ConvTranspose):  # the same sums as onnx's, in the same tap order
        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            if auto_pad not in (None, "NOTSET") or output_shape is not None:
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, output_padding=output_padding,
                                    output_shape=output_shape, pads=pads, strides=strides)
            nd, (N, C), group, kernel, inner = X.ndim - 2, X.shape[:2], group or 1, W.shape[2:], X.shape[2:]
            strides, dilations = strides or [1] * nd, dilations or [1] * nd
            pads, output_padding = pads or [0] * 2 * nd, output_padding or [0] * nd
            M = W.shape[1] * group
            w = W.reshape(group, C // group, -1).transpose(0, 2, 1)
            taps = (w @ X.reshape(N, group, C // group, -1)).reshape(N, M, *kernel, *inner)
            full = [s * (i - 1) + p + d * (k - 1) + 1
                    for s, i, p, d, k in zip(strides, inner, output_padding, dilations, kernel)]
            out = np.zeros((N, M, *full), X.dtype)
            for tap in np.ndindex(*kernel):
                at = tuple(slice(t * d, t * d + s * (i - 1) + 1, s)
                           for t, d, s, i in zip(tap, dilations, strides, inner))
                out[(slice(None), slice(None), *at)] += taps[(slice(None), slice(None), *tap)]
            out = out[(slice(None), slice(None), *(slice(b, f - e) for b, e, f in zip(pads[:nd], pads[nd:], full)))]
            return ((out if B is None else out + B.reshape(1, -1, *[1] * nd)).astype(X.dtype, copy=False),)

    class Erf(OpRun):
        def _run(self, x):
            return (erf(x).astype(x.dtype),)

    class Gelu(OpRun):
        def _run(self, x, approximate="none"):
            if approximate == "tanh":
                inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
                return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
            return ((0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype),)

    class MaxPool(OpRun):
        def _run(self, x, **_):
            from .runtime import max_ir_version, session

            node = onnx.NodeProto()
            node.CopyFrom(self.onnx_node)
            del node.input[:], node.output[:]
            node.input.append("x")
            node.output.extend(["y", "indices"])
            dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
            graph = helper.make_graph([node], "maxpool", [helper.make_tensor_value_info("x", dtype, x.shape)],
                                      [helper.make_tensor_value_info("y", dtype, None),
                                       helper.make_tensor_value_info("indices", TensorProto.INT64, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            model.ir_version = max_ir_version()
            y, indices = session(model, provider="CPUExecutionProvider").run(None, {"x": x})
            return (y, indices)[:len(self.onnx_node.output)]

    class LRN(OpRun):
        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            channels = x.shape[1]
            below, above = (size - 1) // 2, size // 2
            squares = np.zeros_like(x)
            for c in range(channels):
                squares[:, c] = np.sum(x[:, max(0, c - below):min(channels, c + above + 1)] ** 2, axis=1)
            return ((x / (bias + (alpha / size) * squares) ** beta).astype(x.dtype),)

    class GatherElements(OpRun):  # onnx's uses np.choose, which refuses an axis longer than 64
        def _run(self, data, indices, axis=None):
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            corner = tuple(slice(None) if d == axis % data.ndim else slice(0, n) for d, n in enumerate(indices.shape))
            return (np.take_along_axis(data[corner], indices, axis=axis),)  # indices may be shorter off the axis

    class LpNormalization(OpRun):  # onnx's sums x**p, not |x|**p: wrong for p = 1 (onnxruntime uses |x|)
        def _run(self, x, axis=None, p=None):
            norm = np.sum(np.abs(x) ** p, axis=axis, keepdims=True) ** (1.0 / p)
            return (np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm)).astype(x.dtype),)

    class GlobalLpPool(OpRun):  # onnx's evaluator has none
        def _run(self, x, p=None):
            spatial = tuple(range(2, x.ndim))
            return ((np.sum(np.abs(x) ** p, axis=spatial, keepdims=True) ** (1.0 / p)).astype(x.dtype),)

    class GridSample(op_grid_sample.GridSample):  # onnx's turns grid coordinates into pixels in float32
        def _gs_denormalize_coordinates(self, n, dims, align_corners: bool):
            return np.array([self._gs_denormalize(n=v, length=d, align_corners=align_corners) for v, d in zip(n, dims)])

    class Loop(op_loop.Loop):
        """onnx's Loop joins scan-output rows of rank >= 2 with np.vstack (concatenated, not stacked on a new
        axis as the spec and onnxruntime do) and runs no iteration when the optional cond is omitted."""

        def __init__(self, onnx_node, run_params):
            super().__init__(onnx_node, run_params)
            run_body, self.scans, self.K = self._run_body, self.K, 0  # K = 0: rows are collected here instead

            def run_and_keep_rows(*args, **kwargs):
                outputs = run_body(*args, **kwargs)
                self.rows.append(outputs[len(outputs) - self.scans:])
                return outputs
            self._run_body = run_and_keep_rows

        def _run(self, M, cond, *args, **kwargs):
            self.rows = []
            res = super()._run(M, np.array(True) if cond is None else cond, *args, **kwargs)
            stacked = [np.stack([row[k] for row in self.rows]) if self.rows else np.empty((0,)) for k in range(self.scans)]
            return tuple(res[:len(res) - self.scans]) + tuple(stacked)

    return [Erf, Gelu, LRN, MaxPool, GatherElements, GlobalLpPool, GridSample, LpNormalization, Loop, Conv,
            ConvTranspose]


def reference_session(model: onnx.ModelProto):
    """onnx's reference evaluator: slow but float64 everywhere (onnxruntime has no float64 Conv)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=_exact_reference_ops())


def run_reference(sess, feeds: dict) -> dict:
    names = sess.output_names
    return dict(zip(names, sess.run(None, feeds)))
