"""Every JVP rule against float64 central differences, one or more cases per op (cases are data).

Tolerance: central differences with h = 1e-6 in float64 have truncation error O(h²·f''') ~ 1e-12 and
round-off ~ 1e-16/h ~ 1e-10 relative; inputs are sampled at least 0.05 away from every kink, far
beyond the h·|v| ~ 1e-5 perturbation, so 1e-6 relative leaves two orders of margin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jacgraph import runtime
from jacgraph.passes import jvp
from jacgraph.rules.jvp import JVP, NCHW_ONLY
from jacgraph.testing import central_difference, reference_session, relative_error, run_reference, to_float64

TOL = 1e-6
H = 1e-6


@dataclass
class Case:
    op: str
    inputs: dict                      # differentiated float inputs: name -> shape
    args: list                        # node input names, in order ("" for an omitted optional input)
    attrs: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)   # name -> numpy array (initializers)
    n_out: int = 1
    kinks: tuple = ()                 # sampled inputs stay 0.05 away from these values
    positive: bool = False            # sample |x| + 0.5
    opset: int = 18
    id: str = ""
    extra_nodes: list = field(default_factory=list)  # nodes run before the op (for multi-node cases)
    covers: tuple = ()                # further op types this case exercises
    declare: dict = field(default_factory=dict)  # declared input shapes where they differ (symbolic dims)
    out_shapes: dict = field(default_factory=dict)  # output shapes shape inference cannot find (computed axes)

    def model(self):
        outputs = [f"y{i}" for i in range(self.n_out)]
        node = helper.make_node(self.op, self.args, outputs, **self.attrs)
        inits = [numpy_helper.from_array(v, k) for k, v in self.consts.items()]
        graph = helper.make_graph(
            self.extra_nodes + [node], "case",
            [helper.make_tensor_value_info(n, TensorProto.DOUBLE, self.declare.get(n, s)) for n, s in self.inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model = onnx.shape_inference.infer_shapes(model)
        for out in model.graph.output:  # declare the output types shape inference found
            for vi in model.graph.value_info:
                if vi.name == out.name:
                    out.CopyFrom(vi)
            if out.name in self.out_shapes:
                out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.DOUBLE, self.out_shapes[out.name]))
        return model

    def sample(self, rng, shape):
        x = rng.standard_normal(shape)
        if self.positive:
            return np.abs(x) + 0.5
        for _ in range(100):
            near = np.zeros(shape, bool)
            for k in self.kinks:
                near |= np.abs(x - k) < 0.05
            if not near.any():
                break
            x[near] = rng.standard_normal(int(near.sum()))
        return x


def f64(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def i64(*values):
    return np.array(values, dtype=np.int64)


X = {"x": (2, 3, 4)}
X4 = {"x": (2, 3, 5, 5)}


def _body(nodes, inputs, outputs):
    """A Loop/Scan/If body over (3,) float64 values: inputs/outputs are (name, elem type or None) pairs."""
    typed = lambda pairs: [helper.make_tensor_value_info(n, t or TensorProto.DOUBLE, [] if t else [3])  # noqa: E731
                           for n, t in pairs]
    return helper.make_graph(nodes, "body", typed(inputs), typed(outputs))


# Control flow (jacgraph/rules/control_flow.py; nesting, captures and K tangents in tests/test_control_flow.py):
# bodies read x and w from the outer scope; the If's condition depends on x.
CONTROL_FLOW_CASES = [
    Case("If", {"x": (3,)}, ["c"], consts={"w": f64(3), "zero": np.array(0.0)},
         extra_nodes=[helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0), helper.make_node("Greater", ["sx", "zero"], ["c"])],
         attrs={"then_branch": _body([helper.make_node("Sin", ["x"], ["sin_x"]), helper.make_node("Mul", ["sin_x", "w"], ["yt"])],
                                     [], [("yt", None)]),
                "else_branch": _body([helper.make_node("Mul", ["x", "x"], ["ye"])], [], [("ye", None)])},
         covers=("ReduceSum", "Greater")),
    # (only a scan output: ONNX shape inference gives a Loop's carried outputs no shape, which this table's
    # model builder needs; carried state is tested in tests/test_control_flow.py. An explicit cond: onnx's
    # reference evaluator runs no iteration when it is omitted)
    Case("Loop", {"x": (3,)}, ["M", "go"], consts={"M": np.array(3, np.int64), "go": np.array(True), "w": f64(3)},
         attrs={"body": _body([helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.DOUBLE),
                               helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "fi"], ["a"]),
                               helper.make_node("Tanh", ["a"], ["row"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
                              [("i", TensorProto.INT64), ("c_in", TensorProto.BOOL)],
                              [("c_out", TensorProto.BOOL), ("row", None)])}),
    Case("Scan", {"s": (3,), "xs": (4, 3)}, ["s", "xs"], n_out=2, consts={"w": f64(3)},
         attrs={"num_scan_inputs": 1, "body": _body(
             [helper.make_node("Mul", ["s_in", "x_t"], ["sx"]), helper.make_node("Add", ["sx", "w"], ["a"]),
              helper.make_node("Sin", ["a"], ["s_out"]), helper.make_node("Exp", ["s_in"], ["row"])],
             [("s_in", None), ("x_t", None)], [("s_out", None), ("row", None)])}),
]
AB = {"a": (2, 3), "b": (2, 3)}

# Indexing, scatter and signal ops (jacgraph/rules: the "indexing, scatter and signal ops" sections).
# Sampled values are standard normal: ties (scatter max/min, TopK) and zeros (CumProd, scatter mul,
# LpPool) have probability zero.
IDX2 = np.array([[1], [3]], np.int64)
ELEMENT_IDX = np.array([[0, 2], [1, 0], [2, 1]], np.int64)
INDEXING_CASES = [
    Case("ScatterND", {"data": (4, 3), "updates": (2, 3)}, ["data", "idx", "updates"], consts={"idx": IDX2}),
    Case("ScatterND", {"data": (4, 3), "updates": (2, 3)}, ["data", "idx", "updates"], attrs={"reduction": "add"},
         consts={"idx": np.array([[1], [1]], np.int64)}, id="scatternd-add-repeated"),
    Case("ScatterND", {"data": (4, 3), "updates": (2, 3)}, ["data", "idx", "updates"], attrs={"reduction": "mul"},
         consts={"idx": np.array([[2], [2]], np.int64)}, id="scatternd-mul-repeated"),
    Case("ScatterND", {"data": (4, 3), "updates": (2, 3)}, ["data", "idx", "updates"], attrs={"reduction": "max"},
         consts={"idx": np.array([[0], [0]], np.int64)}, id="scatternd-max-repeated"),
    Case("ScatterND", {"data": (2, 3, 4), "updates": (2,)}, ["data", "idx", "updates"],
         consts={"idx": np.array([[0, 1, 2], [1, 2, 3]], np.int64)}, opset=13, id="scatternd-elements-opset13"),
    Case("ScatterElements", {"data": (3, 3), "updates": (3, 2)}, ["data", "idx", "updates"], attrs={"axis": 1},
         consts={"idx": ELEMENT_IDX}),
    Case("ScatterElements", {"data": (3, 3), "updates": (3, 2)}, ["data", "idx", "updates"],
         attrs={"axis": 0, "reduction": "add"}, consts={"idx": ELEMENT_IDX}, id="scatterelements-add"),
    Case("ScatterElements", {"data": (3, 3), "updates": (3, 2)}, ["data", "idx", "updates"],
         attrs={"axis": 1, "reduction": "min"}, consts={"idx": np.array([[0, 0], [1, 1], [2, 2]], np.int64)},
         id="scatterelements-min-repeated"),
    Case("GatherND", X, ["x", "idx"], consts={"idx": np.array([[0, 1], [1, 2], [0, 1]], np.int64)}),
    Case("GatherND", X, ["x", "idx"], attrs={"batch_dims": 1}, consts={"idx": np.array([[2], [0]], np.int64)},
         id="gathernd-batch-dims"),
    Case("TopK", {"x": (3, 5)}, ["x", "k"], consts={"k": i64(2)}, n_out=2),
    Case("TopK", {"x": (3, 5)}, ["x", "k"], attrs={"axis": 0, "largest": 0}, consts={"k": i64(2)}, n_out=2,
         id="topk-smallest-axis0"),
    Case("Compress", {"x": (3, 4)}, ["x", "cond"], attrs={"axis": 0}, consts={"cond": np.array([True, False, True])}),
    Case("Compress", {"x": (3, 4)}, ["x", "cond"], consts={"cond": np.array([False, True, True, False, True])},
         id="compress-flat"),
    Case("CumProd", {"x": (2, 5)}, ["x", "axis"], consts={"axis": np.array(1, np.int64)}, kinks=(0,), opset=26),
    Case("CumProd", {"x": (2, 5)}, ["x", "axis"], attrs={"exclusive": 1, "reverse": 1},
         consts={"axis": np.array(-1, np.int64)}, kinks=(0,), opset=26, id="cumprod-exclusive-reverse"),
    Case("LpPool", {"x": (1, 2, 5, 5)}, ["x"], attrs={"kernel_shape": [2, 2], "p": 2}, kinks=(0,)),
    Case("LpPool", {"x": (1, 2, 5, 5)}, ["x"], attrs={"kernel_shape": [3, 3], "p": 3, "strides": [2, 2],
                                                     "pads": [1, 1, 1, 1]}, kinks=(0,), id="lppool-p3-strided-padded"),
    Case("GlobalLpPool", {"x": (2, 3, 4, 4)}, ["x"], attrs={"p": 2}, kinks=(0,)),
    Case("Col2Im", {"x": (1, 8, 16)}, ["x", "image", "block"], consts={"image": i64(5, 5), "block": i64(2, 2)}),
    Case("Col2Im", {"x": (1, 4, 9)}, ["x", "image", "block"], attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]},
         consts={"image": i64(5, 5), "block": i64(2, 2)}, id="col2im-strided-padded"),
    Case("DFT", {"x": (2, 8, 1)}, ["x", "", "axis"], consts={"axis": np.array(1, np.int64)}, opset=20),
    Case("DFT", {"x": (2, 8, 1)}, ["x", "", "axis"], attrs={"onesided": 1}, consts={"axis": np.array(1, np.int64)},
         opset=20, id="dft-onesided"),
    Case("DFT", {"x": (3, 6, 2)}, ["x", "len"], attrs={"inverse": 1, "axis": 1}, consts={"len": np.array(6, np.int64)},
         opset=17, id="dft-inverse-complex-opset17"),
    # (onesided given: onnx 1.23's shape inference reads a missing onesided as 0, the runtimes as the default 1)
    Case("STFT", {"signal": (1, 16, 1), "window": (8,)}, ["signal", "step", "window"], attrs={"onesided": 1},
         consts={"step": np.array(4, np.int64)}, opset=17),
    Case("STFT", {"signal": (2, 16, 1)}, ["signal", "step", "", "length"], attrs={"onesided": 0},
         consts={"step": np.array(3, np.int64), "length": np.array(6, np.int64)}, opset=17, id="stft-no-window"),
    Case("Pad", {"x": (2, 3), "v": ()}, ["x", "pads", "v"], consts={"pads": i64(1, 0, 0, 2)}, id="pad-value-input"),
    Case("Pad", {"v": ()}, ["x", "pads", "v"], consts={"x": f64(2, 3), "pads": i64(0, 1, 2, 0)},
         id="pad-only-value-active"),
    Case("Pad", X, ["x", "pads"], consts={"pads": i64(0, 1, 0, 0, 2, 1)}, opset=17, id="pad-opset17"),  # Swin's jg_Pad
    Case("MaxUnpool", {"x": (1, 1, 2, 2)}, ["x", "idx"], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         consts={"idx": np.array([5, 7, 13, 15], np.int64).reshape(1, 1, 2, 2)}),
    Case("ReverseSequence", {"x": (4, 3)}, ["x", "lens"], attrs={"time_axis": 0, "batch_axis": 1},
         consts={"lens": i64(4, 2, 1)}),
    Case("DepthToSpace", {"x": (1, 8, 2, 3)}, ["x"], attrs={"blocksize": 2, "mode": "DCR"}, id="depthtospace-dcr"),
    Case("TensorScatter", {"cache": (2, 5, 3), "update": (2, 2, 3)}, ["cache", "update", "at"],
         consts={"at": i64(1, 3)}, opset=24),
    Case("TensorScatter", {"cache": (2, 4, 3), "update": (2, 2, 3)}, ["cache", "update", "at"], attrs={"mode": "circular"},
         consts={"at": i64(3, 0)}, opset=24, id="tensorscatter-circular"),
    Case("Einsum", {"a": (4,), "b": (4,)}, ["a", "b"], attrs={"equation": "i,i"}, id="einsum-implicit-inner"),
    Case("Einsum", {"a": (2, 3, 3)}, ["a"], attrs={"equation": "...ii->...i"}, id="einsum-ellipsis-diagonal"),
    Case("Einsum", {"a": (3, 4)}, ["a"], attrs={"equation": "ij->i"}, id="einsum-sum"),
    Case("Einsum", {"a": (3, 3)}, ["a"], attrs={"equation": "ii"}, id="einsum-trace"),
    Case("Tile", {"x": (2, 3)}, ["x", "rep"], extra_nodes=[helper.make_node("Shape", ["x"], ["rep"])],
         covers=("Shape",), id="tile-computed-repeats"),
    Case("Resize", X4, ["x", "", "", "sizes"], attrs={"mode": "linear"}, consts={"hw": i64(7, 4)},
         extra_nodes=[helper.make_node("Shape", ["x"], ["s"], end=2), helper.make_node("Concat", ["s", "hw"], ["sizes"], axis=0)],
         covers=("Shape", "Concat"), id="resize-computed-sizes"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "strides": [1, 2], "storage_order": 1}, n_out=2,
         id="maxpool-storage-order-1"),  # column-major Indices: the rules read a row-major copy's
    # GridSample: image and grid both differentiated (ONNX's own cases differentiate the image only)
    Case("GridSample", {"x": (1, 2, 3, 4), "grid": (1, 2, 3, 2)}, ["x", "grid"], attrs={"mode": "linear"}, opset=20),
    Case("GridSample", {"x": (2, 1, 3, 4), "grid": (2, 3, 2, 2)}, ["x", "grid"],
         attrs={"mode": "linear", "padding_mode": "border", "align_corners": 1}, opset=20, id="gridsample-border-aligned"),
    Case("GridSample", {"x": (1, 1, 2, 3, 4), "grid": (1, 2, 2, 2, 3)}, ["x", "grid"], attrs={"mode": "linear"}, opset=20,
         id="gridsample-volumetric"),
    Case("GridSample", {"x": (1, 2, 3, 4), "grid": (1, 2, 3, 2)}, ["x", "grid"], attrs={"mode": "nearest"}, opset=20,
         id="gridsample-nearest"),
    Case("GridSample", {"x": (1, 2, 3, 4)}, ["x", "grid"], attrs={"mode": "cubic"}, consts={"grid": f64(1, 2, 3, 2) / 2},
         opset=20, id="gridsample-cubic-image"),
    # computed scales / roi: the reverse pass probes the interpolation matrices in the emitted graph
    Case("Resize", X4, ["x", "", "sc"], attrs={"mode": "cubic"}, consts={"s0": np.array([1, 1, 2.0, 1.5], np.float32)},
         extra_nodes=[helper.make_node("Identity", ["s0"], ["sc"])], covers=("Identity",), id="resize-computed-scales"),
    Case("Resize", X4, ["x", "roi", "", "sz"], attrs={"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                                                    "extrapolation_value": 3.0},
         consts={"r0": np.array([0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]), "s0": i64(2, 3, 4, 7)},
         extra_nodes=[helper.make_node("Identity", ["r0"], ["roi"]), helper.make_node("Identity", ["s0"], ["sz"])],
         covers=("Identity",), id="resize-computed-crop-extrapolated"),
]

def _rms_nodes(inverse=None):
    """x² -> ReduceMean over `axes` -> + ε -> Sqrt = r, then d = 1/r as Div(1, r) or Reciprocal(r) (or none, for
    a final Div(x, r)): RMSNorm as T5 and LLaMA exports write it (the JVP rule emits one tangent for the chain)."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
             helper.make_node("Add", ["ms", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["r"])]
    if inverse == "Div":
        nodes.append(helper.make_node("Div", ["one", "r"], ["d"]))
    elif inverse == "Reciprocal":
        nodes.append(helper.make_node("Reciprocal", ["r"], ["d"]))
    return nodes


RMS = dict(consts={"two": np.array(2.0), "eps": np.array(1e-3), "one": np.array(1.0), "axes": i64(-1)},
           covers=("Pow", "ReduceMean", "Sqrt", "Reciprocal"))
RMS_CASES = [
    Case("Mul", X, ["x", "d"], extra_nodes=_rms_nodes("Div"), id="rmsnorm-written-out", **RMS),
    Case("Mul", X, ["d", "x"], extra_nodes=_rms_nodes("Reciprocal"), id="rmsnorm-reciprocal-two-axes",
         **{**RMS, "consts": {**RMS["consts"], "axes": i64(1, 2)}}),
    Case("Div", X, ["x", "r"], extra_nodes=_rms_nodes(), id="rmsnorm-divided", **RMS),
    # d read by another node too: the chain's values have tangents of their own and the rules go node by node
    Case("Mul", X, ["x", "d"], extra_nodes=_rms_nodes("Div") + [helper.make_node("Neg", ["d"], ["unused"])],
         id="rmsnorm-d-read-twice", **RMS),
    # a ReduceMean with empty axes and noop_with_empty_axes=1 is the identity: the chain's mean(u·ẋ) is u·ẋ itself
    Case("Mul", X, ["x", "d"], extra_nodes=[helper.make_node("ReduceMean", ["sq", "no_axes"], ["ms"], noop_with_empty_axes=1)
                                            if n.op_type == "ReduceMean" else n for n in _rms_nodes("Div")],
         id="rmsnorm-mean-is-identity", **{**RMS, "consts": {**RMS["consts"], "no_axes": i64()}}),
    # a one-element ε of higher rank than x makes the chain's values of higher rank: node by node (the chain's axes
    # and tangent are x's)
    Case("Mul", X, ["x", "d"], extra_nodes=_rms_nodes("Div"), id="rmsnorm-eps-raises-rank",
         **{**RMS, "consts": {**RMS["consts"], "eps": np.full((1, 1, 1, 1), 1e-3)}}),
    # SiLU x·sigmoid(x) (LLaMA, MobileViT): one tangent ẋ·(s + y(1-s)) at the Mul; then with s read twice
    Case("Mul", X, ["x", "sg"], extra_nodes=[helper.make_node("Sigmoid", ["x"], ["sg"])], covers=("Sigmoid",),
         id="silu-written-out"),
    Case("Mul", X, ["sg", "x"], extra_nodes=[helper.make_node("Sigmoid", ["x"], ["sg"]),
                                             helper.make_node("Neg", ["sg"], ["unused"])], id="silu-s-read-twice"),
]


def _gelu_erf_nodes(scale_op="Div"):
    """BERT's GELU x·(erf(x/√2) + 1), the 0.5 left outside: z = Div(x, √2) (or Mul(x, 1/√2)), Erf, Add 1."""
    return [helper.make_node(scale_op, ["x", "root2" if scale_op == "Div" else "inv_root2"], ["z"]),
            helper.make_node("Erf", ["z"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"])]


def _gelu_tanh_nodes():
    """GPT-2's GELU 0.5x·(1 + tanh(k·(x + c·x³))) as exported: h = 0.5x, Pow 3, Mul c, Add x, Mul k, Tanh, Add 1."""
    return [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Pow", ["x", "three"], ["cube"]),
            helper.make_node("Mul", ["cube", "c"], ["q"]), helper.make_node("Add", ["x", "q"], ["r"]),
            helper.make_node("Mul", ["r", "k"], ["i"]), helper.make_node("Tanh", ["i"], ["th"]),
            helper.make_node("Add", ["th", "one"], ["a"])]


GELU_CONSTS = {"root2": np.array(np.sqrt(2.0)), "inv_root2": np.array(np.sqrt(0.5)), "one": np.array(1.0),
               "half": np.array(0.5), "three": np.array(3.0), "c": np.array(0.044715), "k": np.array(np.sqrt(2 / np.pi))}
GELU_CASES = [
    Case("Mul", X, ["x", "a"], extra_nodes=_gelu_erf_nodes(), consts=GELU_CONSTS, covers=("Erf",), id="gelu-erf"),
    Case("Mul", X, ["a", "x"], extra_nodes=_gelu_erf_nodes("Mul"), consts=GELU_CONSTS, id="gelu-erf-mul"),
    Case("Mul", X, ["h", "a"], extra_nodes=_gelu_tanh_nodes(), consts=GELU_CONSTS, covers=("Tanh",), id="gelu-tanh"),
    # an inner value read elsewhere: node by node
    Case("Mul", X, ["h", "a"], extra_nodes=_gelu_tanh_nodes() + [helper.make_node("Neg", ["i"], ["unused"])],
         consts=GELU_CONSTS, id="gelu-tanh-inner-read-twice"),
    Case("Mul", X, ["x", "a"], extra_nodes=_gelu_erf_nodes(), consts={**GELU_CONSTS, "root2": np.full((1, 1, 1, 1), 1.7)},
         id="gelu-erf-scale-raises-rank"),  # z of higher rank than x: node by node
]

def _bn_then(*nodes):
    """BatchNormalization of x (mean and bias 0: ReLU's kink stays at x = 0) into `nodes` (its output is "n")."""
    return [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-3), *nodes]


BN_FOLD = dict(consts={"scale": f64(4, seed=3), "bias": np.zeros(4), "mean": np.zeros(4), "var": np.abs(f64(4)) + 0.5,
                       "w": f64(5, 4, 3, 3), "w2": f64(4, 2, 3, 3)},
               kinks=(0,), covers=("BatchNormalization", "Relu"))
# A BatchNormalization read only by Convs, directly or through a Relu, has its scale folded into the tangent Convs'
# weights (scale_folds_into_convs); read by anything else, or by a grouped Conv, node by node.
BN_FOLD_CASES = [
    Case("Conv", {"x": (2, 4, 5, 5)}, ["r", "w"], extra_nodes=_bn_then(helper.make_node("Relu", ["n"], ["r"])),
         id="batchnorm-relu-conv-folded", **BN_FOLD),
    Case("Conv", {"x": (2, 4, 5, 5)}, ["n", "w"], attrs={"pads": [1, 1, 1, 1]}, extra_nodes=_bn_then(),
         id="batchnorm-conv-folded", **{**BN_FOLD, "consts": {**BN_FOLD["consts"], "bias": f64(4), "mean": f64(4)}}),
    Case("Conv", {"x": (2, 4, 5, 5)}, ["r", "w2"], attrs={"group": 2}, extra_nodes=_bn_then(helper.make_node("Relu", ["n"], ["r"])),
         id="batchnorm-relu-grouped-conv", **BN_FOLD),
    Case("Conv", {"x": (2, 4, 5, 5)}, ["r", "w"], extra_nodes=_bn_then(helper.make_node("Relu", ["n"], ["r"]),
                                                                      helper.make_node("Neg", ["r"], ["unused"])),
         id="batchnorm-relu-read-twice", **BN_FOLD),
    # after a Conv that only it reads, onnxruntime fuses the tangent BN into the tangent Conv: node by node
    Case("Conv", {"x": (2, 4, 5, 5)}, ["r", "w"], extra_nodes=[
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"])], id="conv-batchnorm-relu-conv", covers=("BatchNormalization", "Relu"),
         consts={**BN_FOLD["consts"], "w0": f64(4, 4, 3, 3, seed=5), "bias": f64(4, seed=6)}),
]


CASES = [
    # --- zero tangents (integer paths, comparisons, piecewise constant) --------------------------
    Case("Shape", X, ["x"]),
    Case("Size", X, ["x"]),
    Case("Equal", AB, ["a", "b"]), Case("Less", AB, ["a", "b"]), Case("Greater", AB, ["a", "b"]),
    Case("LessOrEqual", AB, ["a", "b"]), Case("GreaterOrEqual", AB, ["a", "b"]),
    Case("Not", X, ["m"], extra_nodes=[helper.make_node("Greater", ["x", "zero"], ["m"])], consts={"zero": np.array(0.0)}),
    Case("And", X, ["m", "m"], extra_nodes=[helper.make_node("Greater", ["x", "zero"], ["m"])], consts={"zero": np.array(0.0)}),
    Case("Or", X, ["m", "m"], extra_nodes=[helper.make_node("Greater", ["x", "zero"], ["m"])], consts={"zero": np.array(0.0)}),
    Case("Xor", X, ["m", "m"], extra_nodes=[helper.make_node("Greater", ["x", "zero"], ["m"])], consts={"zero": np.array(0.0)}),
    Case("ArgMax", X, ["x"], attrs={"axis": 1}), Case("ArgMin", X, ["x"], attrs={"axis": 2}),
    Case("NonZero", X, ["m"], extra_nodes=[helper.make_node("Greater", ["x", "zero"], ["m"])], consts={"zero": np.array(0.0)}),
    Case("Sign", X, ["x"], kinks=(0,)), Case("Floor", X, ["x"], kinks=(-2, -1, 0, 1, 2)),
    Case("Ceil", X, ["x"], kinks=(-2, -1, 0, 1, 2)), Case("Round", X, ["x"], kinks=(-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)),
    Case("IsNaN", X, ["x"]), Case("IsInf", X, ["x"]),
    *[Case(op, X, ["k", "k"][:n], extra_nodes=[helper.make_node("Cast", ["x"], ["k"], to=TensorProto.INT64)],
           kinks=(-2, -1, 0, 1, 2), covers=("Cast",)) for op, n in [("BitwiseAnd", 2), ("BitwiseOr", 2), ("BitwiseXor", 2),
                                                                   ("BitwiseNot", 1)]],
    Case("BitShift", X, ["k", "one"], attrs={"direction": "LEFT"}, consts={"one": np.array(1, np.uint32)},
         extra_nodes=[helper.make_node("Cast", ["x"], ["k"], to=TensorProto.UINT32)], kinks=(0, 1, 2), positive=True,
         covers=("Cast",)),
    Case("ConstantOfShape", X, ["s"], attrs={"value": numpy_helper.from_array(np.array([2.0]))},
         extra_nodes=[helper.make_node("Shape", ["x"], ["s"])]),
    Case("Range", X, ["start", "limit", "delta"], consts={"start": np.array(0, np.int64), "delta": np.array(1, np.int64)},
         extra_nodes=[helper.make_node("Size", ["x"], ["limit"])]),
    Case("EyeLike", {"x": (3, 4)}, ["x"]),
    Case("Constant", X, [], attrs={"value": numpy_helper.from_array(np.ones(3))}),
    # --- structural and linear -------------------------------------------------------------------
    Case("Identity", X, ["x"]),
    Case("Dropout", X, ["x"], n_out=1),
    Case("Dropout", X, ["x"], n_out=2, id="dropout-mask"),
    Case("Reshape", X, ["x", "shape"], consts={"shape": i64(0, -1)}),
    Case("Reshape", X, ["x", "shape"], consts={"shape": i64(4, 3, 2)}, id="reshape-full"),
    Case("Flatten", X4, ["x"], attrs={"axis": 2}),
    Case("Squeeze", {"x": (2, 1, 3)}, ["x", "axes"], consts={"axes": i64(1)}),
    Case("Unsqueeze", X, ["x", "axes"], consts={"axes": i64(0, -1)}),
    Case("Transpose", X, ["x"], attrs={"perm": [2, 0, 1]}),
    Case("Transpose", X, ["x"], id="transpose-default"),
    Case("Concat", {"a": (2, 3), "b": (2, 4)}, ["a", "b", "c"], attrs={"axis": -1}, consts={"c": f64(2, 2)}),
    Case("Split", {"x": (2, 6)}, ["x", "split"], attrs={"axis": 1}, consts={"split": i64(2, 4)}, n_out=2),
    Case("Split", {"x": (4, 3)}, ["x"], attrs={"axis": 0, "num_outputs": 2}, n_out=2, id="split-num-outputs"),
    Case("Split", {"x": (2, 6)}, ["x"], attrs={"axis": 1, "split": [1, 5]}, n_out=2, opset=11, id="split-opset11-converted"),
    Case("Slice", X, ["x", "starts", "ends", "axes", "steps"],
         consts={"starts": i64(1, 0), "ends": i64(3, -1), "axes": i64(2, -2), "steps": i64(1, 2)}),
    Case("Slice", X, ["x", "starts", "ends"], consts={"starts": i64(1, 1), "ends": i64(2, 3)}, id="slice-default-axes"),
    Case("Gather", X, ["x", "idx"], attrs={"axis": 1}, consts={"idx": i64(2, 0, 0)}),
    Case("Gather", X, ["x", "idx"], attrs={"axis": -1}, consts={"idx": np.array([[1, 3], [0, 0]], np.int64)}, id="gather-2d"),
    Case("GatherElements", {"x": (3, 4)}, ["x", "idx"], attrs={"axis": 1},
         consts={"idx": np.array([[0, 3], [1, 1], [2, 0]], np.int64)}),
    Case("Pad", X4, ["x", "pads", "value"], attrs={"mode": "constant"},
         consts={"pads": i64(0, 0, 1, 2, 0, 1, 0, 1), "value": np.array(3.0)}),
    Case("Pad", X4, ["x", "pads"], attrs={"mode": "reflect"}, consts={"pads": i64(0, 0, 2, 1, 0, 0, 1, 2)}, id="pad-reflect"),
    Case("Pad", X4, ["x", "pads"], attrs={"mode": "edge"}, consts={"pads": i64(0, 0, 2, 1, 0, 0, 1, 2)}, id="pad-edge"),
    Case("Pad", X4, ["x", "pads", "", "axes"], attrs={"mode": "constant"}, consts={"pads": i64(1, 2, 0, 1), "axes": i64(2, -1)},
         id="pad-axes"),
    Case("Expand", {"x": (3, 1)}, ["x", "shape"], consts={"shape": i64(2, 3, 4)}),
    Case("Tile", X, ["x", "rep"], consts={"rep": i64(1, 2, 2)}),
    Case("Trilu", {"x": (2, 4, 4)}, ["x", "k"], attrs={"upper": 0}, consts={"k": np.array(1, np.int64)}),
    Case("CumSum", X, ["x", "axis"], attrs={"reverse": 1}, consts={"axis": np.array(1, np.int64)}),
    Case("DepthToSpace", {"x": (1, 8, 2, 3)}, ["x"], attrs={"blocksize": 2, "mode": "CRD"}),
    Case("SpaceToDepth", {"x": (1, 2, 4, 6)}, ["x"], attrs={"blocksize": 2}),
    Case("Resize", X4, ["x", "", "scales"], attrs={"mode": "linear"}, consts={"scales": np.array([1, 1, 2.0, 1.5], np.float32)}),
    Case("Resize", X4, ["x", "", "scales"], attrs={"mode": "nearest"}, consts={"scales": np.array([1, 1, 2.0, 2.0], np.float32)},
         id="resize-nearest"),
    Case("Resize", X4, ["x", "", "", "sizes"], attrs={"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
         consts={"sizes": i64(2, 3, 7, 8)}, id="resize-cubic-sizes"),
    Case("Resize", X4, ["x", "roi", "", "sizes"], attrs={"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"},
         consts={"roi": np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7]), "sizes": i64(2, 3, 4, 6)}, id="resize-crop"),
    Case("Neg", X, ["x"]),
    Case("Add", AB, ["a", "b"]),
    Case("Add", {"a": (2, 3, 4), "b": (3, 1)}, ["a", "b"], id="add-broadcast"),
    Case("Add", {"b": (4,)}, ["c", "b"], consts={"c": f64(2, 3, 4)}, id="add-const-broadcast-up"),
    Case("Sub", {"a": (2, 3, 4), "b": (4,)}, ["a", "b"]),
    Case("Sub", {"b": (3, 1)}, ["c", "b"], consts={"c": f64(2, 3, 4)}, id="sub-const-first"),
    Case("Sum", {"a": (2, 3), "b": (3,)}, ["a", "b", "c"], consts={"c": f64(2, 3)}),
    Case("Mean", {"a": (2, 3), "b": (1, 3)}, ["a", "b", "a"]),
    Case("Mul", {"a": (2, 3, 4), "b": (3, 1)}, ["a", "b"]),
    Case("Mul", {"a": (2, 3)}, ["a", "c"], consts={"c": f64(3)}, id="mul-const"),
    Case("Div", {"a": (2, 3), "b": (3,)}, ["a", "b"], kinks=(0,)),
    Case("Div", {"b": (2, 3)}, ["c", "b"], consts={"c": f64(2, 3)}, kinks=(0,), id="div-const-numerator"),
    Case("MatMul", {"a": (2, 3, 4), "b": (4, 5)}, ["a", "b"]),
    Case("MatMul", {"a": (4,), "b": (2, 4, 3)}, ["a", "b"], id="matmul-vector-batched"),
    Case("MatMul", {"a": (2, 3, 4), "b": (4,)}, ["a", "b"], id="matmul-batched-vector"),
    Case("MatMul", {"a": (3, 4), "b": (2, 4, 5)}, ["a", "b"], id="matmul-broadcast"),
    Case("MatMul", {"a": (4,), "b": (4,)}, ["a", "b"], id="matmul-dot"),
    Case("Gemm", {"a": (3, 4)}, ["a", "w", "c"], attrs={"transB": 1, "alpha": 0.7, "beta": 2.0},
         consts={"w": f64(5, 4), "c": f64(5)}),
    Case("Gemm", {"a": (4, 3), "w": (4, 5), "c": (3, 5)}, ["a", "w", "c"], attrs={"transA": 1, "alpha": 1.5, "beta": 0.5},
         id="gemm-all-active"),
    Case("Conv", X4, ["x", "w", "bias"], attrs={"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]},
         consts={"w": f64(4, 3, 3, 2), "bias": f64(4)}),
    Case("Conv", {"x": (1, 4, 6, 6)}, ["x", "w"], attrs={"group": 2, "auto_pad": "SAME_UPPER"}, consts={"w": f64(6, 2, 3, 3)},
         id="conv-groups-same"),
    Case("Conv", {"x": (1, 4, 6, 6)}, ["x", "w"], attrs={"group": 4, "pads": [1, 1, 1, 1]}, consts={"w": f64(4, 1, 3, 3)},
         id="conv-depthwise"),
    Case("Conv", {"x": (2, 2, 7), "bias": (3,)}, ["x", "w", "bias"], attrs={"pads": [1, 1]}, consts={"w": f64(3, 2, 3)},
         id="conv-1d-bias-active"),
    Case("ConvTranspose", X4, ["x", "w", "bias"], attrs={"strides": [2, 2], "output_padding": [1, 0], "pads": [1, 0, 0, 1]},
         consts={"w": f64(3, 2, 3, 3), "bias": f64(2)}),
    Case("BatchNormalization", X4, ["x", "scale", "bias", "mean", "var"], attrs={"epsilon": 1e-3},
         consts={"scale": f64(3), "bias": f64(3), "mean": f64(3), "var": np.abs(f64(3)) + 0.5}),
    Case("AveragePool", X4, ["x"], attrs={"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "strides": [2, 1],
                                          "count_include_pad": 0}),
    Case("AveragePool", X4, ["x"], attrs={"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, id="avgpool-ceil"),
    Case("GlobalAveragePool", X4, ["x"]),
    Case("ReduceSum", X, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(0, 2)}),
    Case("ReduceSum", X, ["x"], id="reducesum-all"),
    Case("ReduceMean", X, ["x", "axes"], consts={"axes": i64(-1)}),
    Case("ReduceMean", X, ["x"], attrs={"axes": [1], "keepdims": 0}, opset=13, id="reducemean-opset13"),
    Case("Einsum", {"a": (2, 3), "b": (3, 4)}, ["a", "b"], attrs={"equation": "ij,jk->ik"}),
    Case("Einsum", {"a": (2, 3, 4)}, ["a", "w"], attrs={"equation": "bij,jk->bik"}, consts={"w": f64(4, 5)}, id="einsum-const"),
    # --- CPA ops ----------------------------------------------------------------------------------
    Case("Relu", X, ["x"], kinks=(0,)),
    Case("LeakyRelu", X, ["x"], attrs={"alpha": 0.1}, kinks=(0,)),
    Case("PRelu", X, ["x", "slope"], consts={"slope": f64(3, 1)}, kinks=(0,)),
    Case("PRelu", {"x": (2, 3, 4), "slope": (4,)}, ["x", "slope"], kinks=(0,), id="prelu-slope-active"),
    Case("Clip", X, ["x", "lo", "hi"], consts={"lo": np.array(-0.5), "hi": np.array(0.8)}, kinks=(-0.5, 0.8)),
    Case("Clip", X, ["x", "", "hi"], consts={"hi": np.array(0.3)}, kinks=(0.3,), id="clip-max-only"),
    Case("HardSigmoid", X, ["x"], attrs={"alpha": 0.4, "beta": 0.5}, kinks=(-1.25, 1.25)),
    Case("Abs", X, ["x"], kinks=(0,)),
    Case("Max", {"a": (2, 3), "b": (3,)}, ["a", "b", "c"], consts={"c": f64(2, 3)}),
    Case("Min", {"a": (2, 3), "b": (2, 3)}, ["a", "b"]),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [2, 2], "strides": [2, 1]}),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2], "ceil_mode": 1},
         id="maxpool-pads-ceil"),
    Case("MaxPool", {"x": (1, 2, 7, 7)}, ["x"], attrs={"kernel_shape": [2, 2], "dilations": [2, 2]}, id="maxpool-dilated"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [2, 2]}, n_out=2, id="maxpool-with-indices"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]},
         declare={"x": ("n", 3, "h", "w")}, id="maxpool-dynamic-shape"),
    Case("MaxPool", {"x": (2, 3, 6, 6)}, ["x"], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
         declare={"x": ("n", 3, "h", "w")}, id="maxpool-dynamic-shape-ceil"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
         declare={"x": ("n", 3, "h", "w")}, id="maxpool-dynamic-same-indices"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [2, 3], "auto_pad": "SAME_LOWER", "strides": [2, 2]},
         id="maxpool-same-lower"),
    Case("MaxPool", {"x": (2, 3, 9)}, ["x"], attrs={"kernel_shape": [3], "strides": [2], "ceil_mode": 1}, id="maxpool-1d-ceil"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, id="maxpool-nonoverlapping"),
    Case("MaxPool", X4, ["x"], attrs={"kernel_shape": [2, 2], "strides": [2, 3], "pads": [1, 0, 0, 1], "ceil_mode": 1},
         id="maxpool-nonoverlapping-padded-ceil"),
    Case("GlobalMaxPool", X4, ["x"]),
    Case("ReduceMax", X, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(1, 2)}),
    Case("ReduceMin", X, ["x"], attrs={"axes": [0], "keepdims": 1}, opset=13),
    # --- the Reduce family: every op with constant, computed and empty axes (noop_with_empty_axes) ---
    Case("ReduceProd", X, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(1)}),
    Case("ReduceL1", X, ["x", "axes"], consts={"axes": i64(0, 2)}, kinks=(0,)),
    Case("ReduceL2", X, ["x"], attrs={"keepdims": 0}),
    Case("ReduceLogSum", X, ["x", "axes"], consts={"axes": i64(-1)}, positive=True),
    Case("ReduceLogSumExp", X, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(1)}),
    Case("ReduceSumSquare", X, ["x"], attrs={"axes": [1]}, opset=13, id="reducesumsquare-opset13"),
    Case("ReduceProd", X, ["x"], attrs={"axes": [0, 2], "keepdims": 0}, opset=13, id="reduceprod-opset13"),
    *[Case(op, X, ["x", "axes"], attrs={"keepdims": keep, "noop_with_empty_axes": noop}, positive=op == "ReduceLogSum",
           kinks=(0,) if op == "ReduceL1" else (), consts={"first": i64(0), "none": i64(0)},
           extra_nodes=[helper.make_node("Shape", ["x"], ["shape"]),  # axes computed at run time: [shape[0]] = [2], or []
                        helper.make_node("Gather", ["shape", "first"], ["axes"]) if one_axis else
                        helper.make_node("Slice", ["shape", "first", "none"], ["axes"])],
           out_shapes={"y0": (2, 3, 1) if one_axis else (2, 3, 4) if noop else (1, 1, 1)},
           covers=("Shape", "Slice", "Gather"), id=f"{op.lower()}-computed-{'axis' if one_axis else 'empty'}-{keep}{noop}")
      for op in ("ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                 "ReduceSumSquare", "ReduceMax", "ReduceMin")
      for one_axis, keep, noop in ((True, 1, 0), (False, 1, 0), (False, 1, 1))],  # (keepdims=0: y's rank unknown)
    *[Case(op, X, ["x", "axes"], attrs={"noop_with_empty_axes": 1}, consts={"axes": i64()}, id=f"{op.lower()}-noop")
      for op in ("ReduceSum", "ReduceProd", "ReduceMax")],
    # --- smooth ops ---------------------------------------------------------------------------------
    Case("Sigmoid", X, ["x"]), Case("Tanh", X, ["x"]), Case("Exp", X, ["x"]),
    Case("Log", X, ["x"], positive=True), Case("Sqrt", X, ["x"], positive=True),
    Case("Reciprocal", X, ["x"], positive=True), Case("Erf", X, ["x"]), Case("Sin", X, ["x"]), Case("Cos", X, ["x"]),
    Case("Softplus", X, ["x"]), Case("Softsign", X, ["x"], kinks=(0,)),
    Case("Elu", X, ["x"], attrs={"alpha": 0.7}, kinks=(0,)),
    Case("Selu", X, ["x"], kinks=(0,)),
    Case("HardSwish", {"x": (4, 50)}, ["x"], kinks=(-3, 3)),
    Case("Gelu", X, ["x"], opset=20), Case("Gelu", X, ["x"], attrs={"approximate": "tanh"}, opset=20, id="gelu-tanh"),
    Case("Tan", X, ["x"], kinks=(-4.712, -1.571, 1.571, 4.712)),
    Case("Sinh", X, ["x"]), Case("Cosh", X, ["x"]), Case("Atan", X, ["x"]), Case("Asinh", X, ["x"]),
    *[Case(op, X, ["t"], extra_nodes=[helper.make_node("Tanh", ["x"], ["t"])], covers=("Tanh",))  # |t| < 1
      for op in ("Asin", "Acos", "Atanh")],
    Case("Acosh", X, ["t"], positive=True, consts={"one": np.array(1.0)},
         extra_nodes=[helper.make_node("Add", ["x", "one"], ["t"])]),  # t >= 1.5
    Case("Mish", X, ["x"], opset=18), Case("Celu", X, ["x"], attrs={"alpha": 0.8}, kinks=(0,), opset=28),
    Case("Shrink", X, ["x"], attrs={"lambd": 0.5, "bias": 0.2}, kinks=(-0.5, 0.5)),
    Case("ThresholdedRelu", X, ["x"], attrs={"alpha": 0.3}, kinks=(0.3,)),
    Case("Swish", X, ["x"], attrs={"alpha": 0.7}, opset=24),
    Case("Pow", {"x": (2, 3)}, ["x", "p"], consts={"p": np.array(2.5)}, positive=True),
    Case("Pow", {"x": (2, 3), "p": (3,)}, ["x", "p"], positive=True, id="pow-both-active"),
    Case("Pow", {"x": (2, 3)}, ["x", "p"], consts={"p": np.array([0.0, 1.0, 3.0])}, id="pow-integer-exponents"),
    Case("Mod", {"a": (2, 3)}, ["a", "b"], attrs={"fmod": 1}, consts={"b": np.array(1.0)}, kinks=(-3, -2, -1, 0, 1, 2, 3)),
    Case("Mod", {"a": (2, 3), "b": (2, 3)}, ["a", "b"], attrs={"fmod": 1}, positive=True, id="mod-both-active"),
    Case("Mod", X, ["k", "three"], consts={"three": np.array(3, np.int64)}, covers=("Cast",), kinks=(-2, -1, 0, 1, 2),
         extra_nodes=[helper.make_node("Cast", ["x"], ["k"], to=TensorProto.INT64)], id="mod-integer"),
    Case("LpNormalization", X, ["x"], attrs={"axis": 1, "p": 2}),
    Case("LpNormalization", X, ["x"], attrs={"axis": -1, "p": 1}, kinks=(0,), id="lpnormalization-p1"),
    Case("Hardmax", X, ["x"], attrs={"axis": 1}),
    Case("Softmax", X, ["x"], attrs={"axis": 1}),
    Case("LogSoftmax", X, ["x"], attrs={"axis": -1}),
    Case("Where", AB, ["m", "a", "b"], extra_nodes=[helper.make_node("Greater", ["a", "b"], ["m"])]),
    Case("Where", {"a": (2, 3)}, ["m", "a", "c"], consts={"c": f64(3)},
         extra_nodes=[helper.make_node("Greater", ["a", "c"], ["m"])], id="where-one-branch"),
    Case("Cast", X, ["x"], attrs={"to": TensorProto.DOUBLE}),
    Case("Cast", X, ["x"], attrs={"to": TensorProto.INT64}, kinks=(-2, -1, 0, 1, 2), id="cast-int"),
    Case("LRN", X4, ["x"], attrs={"size": 3, "alpha": 0.3, "beta": 0.75, "bias": 1.5}),
    Case("LRN", {"x": (1, 6, 2, 2)}, ["x"], attrs={"size": 4}, id="lrn-even"),
    Case("LRN", X4, ["x"], attrs={"size": 5, "alpha": 0.2, "beta": 0.6, "bias": 2.0}, id="lrn-pow"),  # Pow, not Sqrt
    Case("LayerNormalization", X, ["x", "scale", "bias"], attrs={"axis": -1, "epsilon": 1e-3},
         consts={"scale": f64(4), "bias": f64(4)}),
    Case("LayerNormalization", {"x": (2, 3, 4), "scale": (3, 4), "bias": (3, 4)}, ["x", "scale", "bias"], attrs={"axis": 1},
         id="layernorm-all-active"),
    Case("InstanceNormalization", X4, ["x", "scale", "bias"], consts={"scale": f64(3), "bias": f64(3)}),
    Case("BatchNormalization", {"x": (2, 3, 4, 5), "scale": (3,), "bias": (3,), "mean": (3,), "var": (3,)},
         ["x", "scale", "bias", "mean", "var"], attrs={"epsilon": 1e-3}, positive=True, id="batchnorm-all-active"),
    Case("BatchNormalization", {"x": (4, 3), "scale": (3,), "mean": (3,), "var": (3,)}, ["x", "scale", "bias", "mean", "var"],
         consts={"bias": f64(3)}, positive=True, id="batchnorm-2d-params-active"),
    Case("InstanceNormalization", {"x": (2, 3, 4, 5), "scale": (3,), "bias": (3,)}, ["x", "scale", "bias"],
         attrs={"epsilon": 1e-3}, id="instancenorm-all-active"),
    *CONTROL_FLOW_CASES,
    *INDEXING_CASES,
    *RMS_CASES,
    *GELU_CASES,
    *BN_FOLD_CASES,
]


def case_id(case):
    return case.id or case.op


# ops whose JVP rule emits the primal itself, from the tangent's intermediates (LRN: x·d^-β in place of the LRN
# node), so it equals the source's up to rounding
PRIMAL_RECOMPUTED = {"LRN"}


def run_case(case, K, strategy="twopass"):
    model = case.model()
    emitted = jvp.build(model, tangents=K, strategy=strategy)
    rng = np.random.default_rng(1)
    feeds = {name: case.sample(rng, shape) for name, shape in case.inputs.items()}
    directions = {name: rng.standard_normal(((K,) if K else ()) + shape) for name, shape in case.inputs.items()}
    props = {p.key: p.value for p in emitted.metadata_props}
    import json

    dot_in = dict(json.loads(props["jacgraph.tangent_inputs"]))
    dot_out = dict(json.loads(props["jacgraph.tangent_outputs"]))
    out = run_reference(reference_session(emitted), {**feeds, **{dot_in[k]: v for k, v in directions.items()}})
    src_sess = reference_session(model)
    primal = run_reference(src_sess, feeds)
    for y, value in primal.items():  # the primal outputs pass through unchanged
        if strategy == "twopass" and case.op not in PRIMAL_RECOMPUTED:
            np.testing.assert_array_equal(out[y], value)
        else:  # batched runs the primal inside a 2N-batch call, whose BLAS blocking may round differently
            np.testing.assert_allclose(out[y], value, rtol=0, atol=1e-12 * max(1.0, np.abs(value).max()))
    for k in range(K or 1):
        v = {n: (d if K is None else d[k]) for n, d in directions.items()}
        fd = central_difference(src_sess, feeds, v, H)
        for y, y_dot in dot_out.items():
            got = out[y_dot] if K is None else out[y_dot][k]
            if y not in fd:  # integer or boolean output
                assert not np.any(got), f"{y}: an integer output must have a zero tangent"
                continue
            assert got.shape == np.shape(fd[y])
            err = relative_error(got, fd[y])
            assert err < TOL, f"{case_id(case)} output {y} direction {k}: relative error {err:.2e}"


@pytest.mark.parametrize("K", [None, 3], ids=["one-tangent", "K=3"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jvp_rule(case, K):
    run_case(case, K)


BATCHED_CASES = [c for c in CASES if c.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


@pytest.mark.parametrize("K", [None, 2], ids=["one-tangent", "K=2"])
@pytest.mark.parametrize("case", BATCHED_CASES, ids=case_id)
def test_batched_strategy(case, K):
    run_case(case, K, strategy="batched")


def _jvp_at(case, feeds, directions):
    emitted = jvp.build(case.model())
    out = run_reference(reference_session(emitted), {**feeds, **{f"{k}_dot": v for k, v in directions.items()}})
    return out["y0_dot"], central_difference(reference_session(case.model()), feeds, directions, H)["y0"]


def test_reduce_prod_with_zeros():
    """∂Πx/∂x_j is the product of the others, zeros included: a row with one zero (its slot gets the product of the
    rest, the others 0) and one with two zeros (all 0). Πx is multilinear, so central differences are exact up to
    round-off."""
    x = f64(3, 4, seed=3)
    x[0, 1] = 0.0
    x[1, 0] = x[1, 3] = 0.0
    got, fd = _jvp_at(Case("ReduceProd", {"x": (3, 4)}, ["x", "axes"], attrs={"keepdims": 0}, consts={"axes": i64(1)}),
                      {"x": x}, {"x": f64(3, 4, seed=4)})
    assert relative_error(got, fd) < TOL and np.all(np.isfinite(got))


def test_pow_edge_points():
    """x^p at x = 0: ∂/∂x = p·x^(p-1) is 0 for p = 0 (not 0·inf) and for p = 2, 1 for p = 1; ∂/∂p = y·log(x) is
    taken as 0 at x = 0 (as PyTorch), which central differences in p give too (0^(p±h) = 0 for p > h)."""
    x = np.array([[0.0, 0.0, 0.0], [0.7, -1.3, 2.0]])
    exponents = np.array([0.0, 1.0, 2.0])
    got, fd = _jvp_at(Case("Pow", {"x": (2, 3)}, ["x", "p"], consts={"p": exponents}), {"x": x}, {"x": f64(2, 3, seed=5)})
    assert relative_error(got, fd) < TOL and np.all(np.isfinite(got))
    base = np.array([[0.0, 0.0, 0.0], [0.7, 1.3, 2.0]])
    got, fd = _jvp_at(Case("Pow", {"p": (3,)}, ["x", "p"], consts={"x": base}), {"p": np.array([0.5, 1.0, 2.5])},
                      {"p": f64(3, seed=6)})
    assert relative_error(got, fd) < TOL and np.all(np.isfinite(got))


def _softmax_2d(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


BEFORE_OPSET_13 = {"Softmax": _softmax_2d, "LogSoftmax": lambda z: np.log(_softmax_2d(z)),
                   "Hardmax": lambda z: np.eye(z.shape[1])[z.argmax(axis=1)]}


@pytest.mark.parametrize("opset", [7, 11])
@pytest.mark.parametrize("op", sorted(BEFORE_OPSET_13))
def test_softmax_family_before_opset_13(op, opset):
    """Before opset 13 these ops coerce x to 2-D at `axis` (here [2, 3·4]). onnx's reference evaluator runs them with
    the opset-13 meaning, so the oracle is the spec's formula in numpy: primal to round-off, tangent against its
    float64 central differences (TOL as above); Hardmax is piecewise constant (tangent exactly 0)."""
    emitted = jvp.build(Case(op, X, ["x"], attrs={"axis": 1}, opset=opset).model())
    rng = np.random.default_rng(3)
    x, v = rng.standard_normal(X["x"]), rng.standard_normal(X["x"])
    out = run_reference(reference_session(emitted), {"x": x, "x_dot": v})

    def f(z):
        return BEFORE_OPSET_13[op](z.reshape(2, 12)).reshape(z.shape)

    np.testing.assert_allclose(out["y0"], f(x), rtol=1e-12, atol=1e-14)
    assert relative_error(out["y0_dot"], (f(x + H * v) - f(x - H * v)) / (2 * H)) < TOL


# Rules whose op has no float64 form (the table's cases are float64), checked elsewhere in float64 copies
COVERED_ELSEWHERE = {"DequantizeLinear": "tests/test_conformance.py (its scale is float/float16/bfloat16 only)"}


def test_every_rule_has_a_case():
    covered = {c.op for c in CASES} | {op for c in CASES for op in c.covers} | set(COVERED_ELSEWHERE)
    missing = sorted(set(JVP) - covered)
    assert not missing, f"JVP rules without a test case: {missing}"


def test_float32_layer_norm_reuses_the_primal_mean_and_inv_std_dev():
    """A float32 LayerNormalization's rule reads the primal node's own Mean and InvStdDev outputs (the float64 cases
    above recompute them: those outputs are float/bfloat16 only). Checked in onnxruntime float32 against float64
    central differences of the source's float64 copy: float32 round-off (6e-8) through 8-term means and the
    normalisation stays far below 1e-5."""
    case = Case("LayerNormalization", {"x": (2, 3, 8), "scale": (8,), "bias": (8,)}, ["x", "scale", "bias"],
                attrs={"axis": -1, "epsilon": 1e-3})
    model = case.model()
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    emitted = jvp.build(model)
    norms = [n for n in emitted.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 1 and all(norms[0].output[1:3])
    assert sum(n.op_type == "ReduceMean" for n in emitted.graph.node) == 2  # the tangent's two means only
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s) for k, s in case.inputs.items()}
    dirs = {k: rng.standard_normal(s) for k, s in case.inputs.items()}
    got = runtime.run(runtime.session(emitted), {**{k: v.astype(np.float32) for k, v in feeds.items()},
                                                 **{f"{k}_dot": v.astype(np.float32) for k, v in dirs.items()}})
    fd = central_difference(reference_session(to_float64(model)), feeds, dirs, H)["y0"]
    assert relative_error(got["y0_dot"], fd) < 1e-5


def test_float32_layer_norm_jvp_of_jvp_differentiates_the_reused_statistics():
    """The float32 JVP graph reads the primal LayerNormalization's Mean and InvStdDev; differentiating that graph
    again must differentiate them too, not treat them as constants (jacgraph.lowering expands a LayerNormalization
    whose Mean/InvStdDev are read into its function body). Oracle: the float64 model's JVP of JVP (statistics
    recomputed, checked by the closure cases), run in onnx's reference evaluator; float32 round-off through two
    derivative levels stays far below 1e-4."""
    case = Case("LayerNormalization", {"x": (2, 3, 8), "scale": (8,), "bias": (8,)}, ["x", "scale", "bias"],
                attrs={"axis": -1, "epsilon": 1e-3})
    model64 = case.model()
    model32 = onnx.ModelProto()
    model32.CopyFrom(model64)
    for value in list(model32.graph.input) + list(model32.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    twice32, twice64 = jvp.build(jvp.build(model32)), jvp.build(jvp.build(model64))
    rng = np.random.default_rng(4)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]) for i in twice64.graph.input}
    got = runtime.run(runtime.session(twice32), {k: v.astype(np.float32) for k, v in feeds.items()})
    want = run_reference(reference_session(twice64), feeds)
    got_outputs, want_outputs = [o.name for o in twice32.graph.output], [o.name for o in twice64.graph.output]
    assert len(got_outputs) == len(want_outputs) == 4  # y, ẏ and their tangents
    for got_name, want_name in zip(got_outputs, want_outputs):  # the same outputs in order (fresh names differ)
        assert relative_error(got[got_name], want[want_name]) < 1e-4, got_name


def test_written_out_rms_norm_gets_one_tangent_for_the_chain():
    """RMSNorm written out (T5, LLaMA) gets its tangent d·(ẋ - u·mean(u·ẋ)) at the chain's end: 5 tangent nodes
    (Mul, ReduceMean, Mul, Sub, Mul) and the output's Identity, none for the chain's inside (node by node: 14).
    Its values are checked against central differences by the rmsnorm cases of test_jvp_rule."""
    for case in RMS_CASES[:3]:
        model = case.model()
        emitted = jvp.build(model)
        assert len(emitted.graph.node) - len(model.graph.node) == 6, case.id


def test_written_out_gelu_gets_one_tangent():
    """GELU's erf form gets ẋ·(a + z·erf'(z)) at Mul(x, a): 7 tangent nodes and the output's Identity (node by node
    10); the tanh form ḣ·(a + (1 - th²)·(i + 2kc·x³)) at Mul(h, a): 7 and h's own Mul (node by node 14). Values:
    the gelu cases of test_jvp_rule."""
    counts = []
    for case in GELU_CASES:
        model = case.model()
        counts.append(len(jvp.build(model).graph.node) - len(model.graph.node))
    assert counts[:3] == [8, 8, 9] and counts[3] > 9, counts  # the last: an inner value read twice, node by node


def test_written_out_silu_gets_one_tangent():
    """SiLU x·sigmoid(x) gets ẋ·(s + y·(1 - s)) at its Mul: 4 tangent nodes and the output's Identity (node by
    node: 6). On a float32 NCHW value onnxruntime holds in NCHWc (a 16-channel Conv's output), 1 - s is a depthwise
    1x1 Conv (weight -1, bias 1) instead of a Sub: checked in onnxruntime float32 against float64 central
    differences of the source's float64 copy (float32 round-off through a Conv and the gate stays far below 1e-5)."""
    case = next(c for c in RMS_CASES if c.id == "silu-written-out")
    model = case.model()
    assert len(jvp.build(model).graph.node) - len(model.graph.node) == 5
    rng = np.random.default_rng(5)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [conv, helper.make_node("Sigmoid", ["c"], ["sg"]), helper.make_node("Mul", ["c", "sg"], ["y0"])]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [numpy_helper.from_array(rng.standard_normal([16, 3, 3, 3]).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    emitted = jvp.build(model)
    assert [n.attribute[0].i for n in emitted.graph.node if n.op_type == "Conv" and n.input[0] == "sg"] == [16]
    x, v = rng.standard_normal([1, 3, 6, 6]), rng.standard_normal([1, 3, 6, 6])
    got = runtime.run(runtime.session(emitted), {"x": x.astype(np.float32), "x_dot": v.astype(np.float32)})
    fd = central_difference(reference_session(to_float64(model)), {"x": x}, {"x": v}, H)["y0"]
    assert relative_error(got["y0_dot"], fd) < 1e-5


def test_float32_lrn_runs_no_lrn_kernel():
    """The LRN rule emits the primal as x·d^-β from the tangent's d (onnxruntime's LRN kernel was a third of AlexNet's
    forward): no LRN node is left, y equals onnxruntime's LRN to float32 rounding, ẏ matches float64 central
    differences (AlexNet's constants: size 5, α 1e-4, β 0.75, bias 1)."""
    node = helper.make_node("LRN", ["x"], ["y0"], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 5, 5])  # noqa: E731
    model = helper.make_model(helper.make_graph([node], "lrn", [info("x")], [info("y0")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    emitted = jvp.build(model)
    assert "LRN" not in {n.op_type for n in emitted.graph.node}
    rng = np.random.default_rng(0)
    x, v = 10 * rng.standard_normal([1, 8, 5, 5]), rng.standard_normal([1, 8, 5, 5])  # α·mean(x²) ~ 1e-2: d ≠ bias
    got = runtime.run(runtime.session(emitted), {"x": x.astype(np.float32), "x_dot": v.astype(np.float32)})
    want = runtime.run(runtime.session(model), {"x": x.astype(np.float32)})["y0"]
    assert relative_error(got["y0"], want) < 1e-6
    fd = central_difference(reference_session(to_float64(model)), {"x": x}, {"x": v}, H)["y0"]
    assert relative_error(got["y0_dot"], fd) < 1e-5


def test_batchnorm_read_only_by_convs_runs_no_tangent_batchnorm():
    """BN -> ReLU -> Conv and BN -> Conv: the tangent path has no BatchNormalization (its scale is in the tangent
    Conv's weights); read twice or by a grouped Conv it keeps its own. Values: the batchnorm cases of test_jvp_rule."""
    counts = {c.id: sum(n.op_type == "BatchNormalization" for n in jvp.build(c.model()).graph.node) for c in BN_FOLD_CASES}
    assert counts == {"batchnorm-relu-conv-folded": 1, "batchnorm-conv-folded": 1, "batchnorm-relu-grouped-conv": 2,
                      "batchnorm-relu-read-twice": 2, "conv-batchnorm-relu-conv": 2}, counts


def test_residual_add_of_a_pooled_tangent_runs_in_nchwc():
    """A residual Add of a max pool's tangent (onnxruntime's Indices and a Gather: NCHW only) and a Conv's tangent
    (NCHWc) passes the pooled one through an identity depthwise Conv (into_nchwc), so the Add and what follows stay in
    NCHWc. Checked in onnxruntime float32 against float64 central differences of the source's float64 copy (float32
    round-off through two Convs stays far below 1e-5), and the Conv is there."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("MaxPool", ["r0"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "p"], ["y0"])]
    weights = [numpy_helper.from_array(rng.standard_normal([16, c, 3, 3]).astype(np.float32) / 4, w)
               for w, c in (("w0", 3), ("w1", 16))]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1, 16, 5, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    emitted = jvp.build(model)
    identity = [n for n in emitted.graph.node if n.op_type == "Conv" and n.input[1].startswith("identity")]
    pooled = next(n for n in emitted.graph.node if identity[0].input[0] in n.output) if len(identity) == 1 else None
    assert pooled is not None and pooled.op_type in NCHW_ONLY  # the pool's selection (Gather from its Indices today)
    x, v = rng.standard_normal([1, 3, 10, 10]), rng.standard_normal([1, 3, 10, 10])
    got = runtime.run(runtime.session(emitted), {"x": x.astype(np.float32), "x_dot": v.astype(np.float32)})
    fd = central_difference(reference_session(to_float64(model)), {"x": x}, {"x": v}, H)["y0"]
    assert relative_error(got["y0_dot"], fd) < 1e-5


def test_batched_gemm_adds_its_constant_bias_through_c():
    """The batched Gemm over concat(x, ẋ) takes β·C on the primal rows and 0 on the tangents' as its C input (one
    constant), so no Add follows its Split; values: the gemm case of test_batched_strategy (one tangent and K = 2)."""
    case = next(c for c in BATCHED_CASES if c.op == "Gemm" and not c.id)
    for K in (None, 2):
        ops = [n.op_type for n in jvp.build(case.model(), tangents=K, strategy="batched").graph.node]
        assert ops.count("Gemm") == 1 and "Add" not in ops, ops


def test_residual_add_of_a_channel_broadcast_pooled_tangent():
    """Conv (16 channels) + MaxPool of a 1-channel Conv: the pooled tangent [N, 1, H, W] broadcasts over y's channels,
    so it cannot go through into_nchwc's 16-group identity Conv (onnxruntime failed: ReorderInput channels % 4);
    values against float64 central differences of the source's float64 copy, as in the test above."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w1"], ["z"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["z"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c0", "p"], ["y0"])]
    weights = [numpy_helper.from_array(rng.standard_normal([c, 3, 3, 3]).astype(np.float32), w)
               for w, c in (("w0", 16), ("w1", 1))]
    graph = helper.make_graph(nodes, "broadcast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [1, 16, 8, 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, v = rng.standard_normal([2, 1, 3, 8, 8])
    got = runtime.run(runtime.session(jvp.build(model)), {"x": x.astype(np.float32), "x_dot": v.astype(np.float32)})
    fd = central_difference(reference_session(to_float64(model)), {"x": x}, {"x": v}, H)["y0"]
    assert relative_error(got["y0_dot"], fd) < 1e-5
