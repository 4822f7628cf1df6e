"""The memory guard: estimate what a command will allocate and refuse before allocating it.

Estimates come from shapes alone (ONNX shape inference with the input shape fixed), never from
running anything, so a refusal is immediate. They are estimates: the largest terms of what the
command holds at once, not an exact peak. The limit is --max-memory, by default the memory the
machine has available now (MemAvailable in /proc/meminfo).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, shape_inference

from ..errors import JacgraphError
from ..model import SourceModel


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory; what a command may use by default."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40  # unknown: do not refuse


def check(need: float, what: str, fix: str, limit: int | None):
    """Refuse when `need` bytes exceed `limit` (None: the available memory); `fix` names the option that reduces it."""
    given = limit is not None
    limit = limit if given else available_bytes()
    if need > limit:
        source = "the --max-memory limit" if given else "the memory available on this machine (MemAvailable)"
        raise JacgraphError(f"{what} needs an estimated {_size(need)}, more than {source} of {_size(limit)}. {fix}, or "
                            "raise --max-memory if the estimate is too cautious. Nothing was allocated or written.")


def _size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


@dataclass
class Shapes:
    """Sizes in bytes at a fixed input shape: every tensor the graph computes, the weights, x and the outputs."""
    activations: int
    weights: int
    input_elements: int
    output_elements: int
    itemsize: int


def fixed_shapes(src: SourceModel, input_shape=None, x: str | None = None) -> Shapes:
    """Shape-infer a copy of the model with x's shape fixed (input_shape, with or without the batch axis) and
    every other symbolic dimension 1. A shape that does not fit the model is a JacgraphError here, before
    any pass starts lowering or allocating."""
    proto = onnx.ModelProto()
    proto.CopyFrom(src.proto)
    x = x or (src.float_inputs() or [None])[0]
    for inp in proto.graph.input:
        if inp.name not in src.initializers:
            dims = inp.type.tensor_type.shape.dim
            shape = list(input_shape) if inp.name == x and input_shape is not None else []
            _set_dims(dims, [1] + shape if len(shape) == len(dims) - 1 else shape)
    del proto.graph.value_info[:]
    try:
        proto = shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as e:
        if input_shape is None:  # symbolic dims set to 1 may not fit (a Flatten->Gemm): the pass says what to give
            return fixed_shapes_loose(src, proto, x)
        from ..model import _inference_reason

        given = f"--input-shape {','.join(map(str, input_shape))}" if input_shape is not None else "the input shape"
        raise JacgraphError(f"{given} does not fit the model: ONNX shape inference fails at "
                            f"{_inference_reason(e)}. Give the shape the model was exported for.") from None
    return _sizes(src, proto, x)


def _set_dims(dims, sizes):
    """Each dim to its size in `sizes` (when given as a number), a symbolic one left over to 1."""
    given = {i: int(v) for i, v in enumerate(sizes) if str(v).isdigit()} if len(sizes) == len(dims) else {}
    for i, d in enumerate(dims):
        if i in given or not d.HasField("dim_value"):
            d.Clear()
            d.dim_value = given.get(i, 1)


def fixed_shapes_loose(src, proto, x) -> Shapes:
    try:
        proto = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        pass
    return _sizes(src, proto, x)


def _sizes(src, proto, x) -> Shapes:
    sizes = {}
    for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        t = vi.type.tensor_type
        if vi.name in src.initializers or not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize if t.elem_type else 4
        sizes[vi.name] = (int(np.prod(dims, dtype=np.float64)), itemsize)
    weights = sum(int(np.prod(t.dims, dtype=np.float64)) * _itemsize(t.data_type) for t in proto.graph.initializer)
    n = sizes.get(x, (0, 4))[0] if x else 0
    m = sum(sizes.get(o.name, (0, 4))[0] for o in proto.graph.output)
    return Shapes(activations=sum(e * s for e, s in sizes.values()), weights=weights, input_elements=n,
                  output_elements=m, itemsize=sizes.get(x, (0, 4))[1] if x else 4)


def _itemsize(elem_type) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        return 8


def bound_working_set(src: SourceModel, input_shape=None, points: int = 1) -> float:
    """RecurJac/interval bound graphs. A chain: every stage's dense float64 matrix is a constant of the graph
    (held about 6 times: the array, the graph, onnxruntime's folded transpose, |W|, W+ and W-), plus the
    backward recursion's bounds [2, outputs, units] per stage and the [points, outputs, inputs] results.
    A model the pass lowers as a graph (not a chain, or a chain too big for dense stages): its structured
    operators, the largest back-substitution step (capped by the pass's memory limit; chunked or
    interval-only beyond it) and the per-node bounds (recurjac.graph_working_set). The step is sized for
    every row and the dense RecurJac step: CROWN over the undecided units only and the factored RecurJac
    step (chosen at run time) hold no more, so the estimate is what the worst eps can take."""
    from .. import layers
    from ..passes import recurjac

    try:
        stages = layers.lower(src, input_shape)
    except JacgraphError:  # not a plain chain: the pass lowers it as a graph
        try:
            return recurjac.graph_working_set(src, input_shape, points)
        except JacgraphError:  # the pass itself says why it cannot
            return 0.0
    matrices = sum(float(s.in_features) * s.out_features for s in stages)
    if 8 * matrices > recurjac.PROTO_LIMIT:  # the pass takes the graph lowering (structured operators) then
        return recurjac.graph_working_set(src, input_shape, points)
    m, n = stages[-1].out_features, stages[0].in_features
    recursion = sum(4.0 * m * s.in_features for s in stages)
    return 8.0 * (6 * matrices + recursion + 4.0 * points * m * n)
