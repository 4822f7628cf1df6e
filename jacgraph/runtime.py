"""onnxruntime sessions: CUDA when it really loads, else CPU (said once); numpy in, numpy out."""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
import onnx
from onnx import helper

from .errors import JacgraphError


def _ort():
    import onnxruntime

    return onnxruntime


def _probe_model(ir_version=None, opset=13):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version:
        model.ir_version = ir_version
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The highest ONNX IR version the installed onnxruntime accepts (onnx may write a newer one)."""
    ort = _ort()
    for ir in range(onnx.IR_VERSION, 6, -1):
        try:
            ort.InferenceSession(_probe_model(ir), providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 7


# onnxruntime's CUDA provider runs float32 Conv/MatMul in TF32 (a 10-bit mantissa) by default on Ampere and newer
# GPUs: on an H200, jacgraph's and onnx-ad's J v of the zoo CNNs then differed by 1e-3 to 2e-2 (relative), and by
# less than 1e-3 with TF32 off (docs/benchmarks/cuda.md, "TF32"). Derivatives are checked against float64
# references, so jacgraph asks for full float32.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


@functools.lru_cache(maxsize=None)
def providers() -> tuple:
    """CUDA first when its provider library really loads (not merely listed), else CPU; said once."""
    ort = _ort()
    forced = os.environ.get("JACGRAPH_PROVIDER", "").lower()
    if forced == "cpu" or "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("CPUExecutionProvider",)
    ort.set_default_logger_severity(4)  # a failed CUDA load logs errors; we say it in one line instead
    try:
        sess = ort.InferenceSession(_probe_model(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        ok = sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:
        ok = False
    finally:
        ort.set_default_logger_severity(3)
    if ok:
        print("jacgraph: running on onnxruntime's CUDA execution provider", file=sys.stderr)
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    print("jacgraph: CUDA provider listed but its libraries do not load (CUDA 13 / cuDNN 9 needed); running on CPU",
          file=sys.stderr)
    return ("CPUExecutionProvider",)


def session(model, threads: int | None = None, optimize: bool = True, provider: str | None = None,
            profile_prefix: str | None = None):
    """An InferenceSession for a ModelProto or path, with full graph optimizations by default
    (profile_prefix: onnxruntime's profiler writes a JSON trace there, see jacgraph.bench.profile)."""
    ort = _ort()
    opts = ort.SessionOptions()
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not isinstance(model, onnx.ModelProto):
        from .model import load

        model = load(model)
    if model.ir_version > max_ir_version():  # onnx writes a newer IR than onnxruntime reads; the graph is the same
        lowered = onnx.ModelProto()
        lowered.CopyFrom(model)
        lowered.ir_version = max_ir_version()
        model = lowered
    chosen = [(p, PROVIDER_OPTIONS.get(p, {})) for p in ((provider,) if provider else providers())]
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:  # one message cannot hold it: onnxruntime reads it from files
            return _session_from_files(ort, model, opts, chosen)
        return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=chosen)
    except Exception as e:
        raise ort_error("could not load the model", e, model) from None


def ort_error(what: str, error: Exception, model=None) -> JacgraphError:
    """An onnxruntime failure as one paragraph naming the node it reports (its status prefix and dumps cut)."""
    import re

    text = " ".join(str(error).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    found = re.search(r"node with name '([^']+)'|Node \(([^)]+)\)|node name: ([^\s)]+)", text)
    name = next((g for g in found.groups() if g), None) if found else None
    op = next((n.op_type for n in (model.graph.node if model is not None else []) if n.name == name), None)
    where = f" at {op + ' ' if op else ''}node '{name}'" if name else ""
    return JacgraphError(f"onnxruntime {what}{where}: {text[:300]}. If jacgraph emitted this model, this is a bug in "
                         "jacgraph: please report it with the source model attached.")


PROTOBUF_LIMIT = (2 << 30) - 1  # bytes of one serialized protobuf message


def _session_from_files(ort, model, opts, providers):
    """A model over 2 GiB: written with its weights as external data to a temporary folder, loaded from there
    (onnxruntime reads the weights while building the session, so the folder can go afterwards)."""
    import tempfile

    copy = onnx.ModelProto()  # onnx.save with external data moves the caller's tensors out of the proto
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="jacgraph-session-") as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
        return ort.InferenceSession(path, sess_options=opts, providers=providers)


def run(model_or_session, feeds: dict, outputs=None) -> dict:
    """Run once; returns {output name: numpy array}."""
    sess = model_or_session if hasattr(model_or_session, "run") else session(model_or_session)
    names = outputs or [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, {k: np.asarray(v) for k, v in feeds.items()})
    except Exception as e:
        model = model_or_session if isinstance(model_or_session, onnx.ModelProto) else None
        raise ort_error("failed while running the model", e, model) from None
    return dict(zip(names, values))
