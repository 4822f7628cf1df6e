"""The rule-table type every transformation uses, the one zero-derivative op list, the elementwise family,
and the one place Conv/pool window geometry (pads, strides, dilations, auto_pad) is resolved.

A table maps an ONNX op_type to a rule. Rules are registered with `TABLE.register("Op", ...)` (a
decorator); `TABLE.missing(src, wrt)` counts the ops on the differentiated path that have no rule, and
`TABLE.check(src, wrt)` raises the one error that lists them all with counts.

Elementwise family: `elementwise("Op")` registers a slope function `slope(b, x, y, attrs) -> f'(x)` (a
tensor name in the builder `b`); every table built with a `family` maker (JVP, VJP, PATTERN) then has a
rule for "Op" made from that one slope. A new smooth unary op is one slope function and one test row.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import JacgraphError

# Ops whose outputs are integer, boolean or piecewise constant: the derivative is zero everywhere it exists.
ZERO_DERIVATIVE_OPS = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "ArgMax", "ArgMin", "NonZero",
    "EyeLike", "Sign", "Floor", "Ceil", "Round", "IsNaN", "IsInf", "Hardmax", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor", "BitwiseNot",
})

# op_type -> slope(b, x, y, attrs): the elementwise family (filled by jacgraph.rules.slopes)
SLOPES: dict = {}


def elementwise(*op_types):
    """Register `slope(b, x, y, attrs) -> f'(x)` for y = f(x); JVP, VJP and PATTERN rules follow from it."""
    def register(slope):
        for op in op_types:
            SLOPES[op] = slope
        return slope
    return register


def op_key(node) -> str:
    """The op's name in tables and error messages: op_type, prefixed by its domain outside the default one."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def unsupported_error(missing: Counter, what: str) -> JacgraphError:
    listed = ", ".join(f"{op} (x{n})" for op, n in sorted(missing.items()))
    return JacgraphError(
        f"{what} has no rule for {sum(missing.values())} node(s) of {len(missing)} op type(s): {listed}. "
        "Run `jacgraph inspect MODEL` for the full op table; replace these ops when exporting, or file an issue "
        "asking for the rules.")


class RuleTable:
    """op_type -> rule, for one transformation; reads like a dict (`op in T`, `T[op]`, `set(T)`).

    `family(op, slope)` makes this table's rule for an elementwise op from its slope function; ops
    registered explicitly take precedence over the family.
    """

    def __init__(self, name: str, what: str, family=None):
        self.name, self.what, self.family = name, what, family
        self.rules: dict = {}
        self._made: dict = {}

    def register(self, *op_types):
        def register(fn):
            for op in op_types:
                self.rules[op] = fn
            return fn
        return register

    def __setitem__(self, op, fn):
        self.rules[op] = fn

    def __getitem__(self, op):
        if op in self.rules:
            return self.rules[op]
        if self.family is not None and op in SLOPES:
            if op not in self._made:
                self._made[op] = self.family(op, SLOPES[op])
            return self._made[op]
        raise KeyError(op)

    def get(self, op, default=None):
        return self[op] if op in self else default

    def __contains__(self, op):
        return op in self.rules or (self.family is not None and op in SLOPES)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def keys(self):
        return sorted(set(self.rules) | (set(SLOPES) if self.family is not None else set()))

    def items(self):
        return [(op, self[op]) for op in self.keys()]

    def __repr__(self):
        return f"RuleTable({self.name}, {len(self)} ops)"

    def missing(self, src, wrt=None, also=()) -> Counter:
        """Ops on the path from `wrt` (default: every float input) without a rule here or in any table of `also`."""
        tables = (self, *also)
        nodes = src.active_nodes(src.float_inputs() if wrt is None else wrt)
        return Counter(op_key(n) for n in nodes
                       if n.domain not in ("", "ai.onnx") or any(n.op_type not in t for t in tables))

    def check(self, src, wrt=None, also=(), what=None):
        """Raise the one error listing every op on the differentiated path that has no rule."""
        missing = self.missing(src, wrt, also)
        if missing:
            raise unsupported_error(missing, what or self.what)


# ---- Conv / pooling window geometry -------------------------------------------------------------

@dataclass
class WindowGeometry:
    """A sliding window op's geometry with auto_pad resolved to explicit (begin, end) pads.

    in_spatial/out_spatial are the spatial shapes when static, else None; begin/end are None only when
    auto_pad is SAME_* and a spatial shape is unknown (the pads depend on it).
    """
    kernel: list
    strides: list
    dilations: list
    begin: list | None
    end: list | None
    in_spatial: list | None
    out_spatial: list | None
    auto_pad: str = "NOTSET"

    @property
    def pads(self):
        return None if self.begin is None else self.begin + self.end

    @property
    def disjoint(self) -> bool:
        """No input cell is read by two windows."""
        return all(st >= dil * (k - 1) + 1 for k, st, dil in zip(self.kernel, self.strides, self.dilations))


def resolve_window(attrs, kernel, in_spatial=None, out_spatial=None, transpose=False) -> WindowGeometry:
    """Geometry from a node's attributes (schema defaults filled) and its static spatial shapes.

    SAME_UPPER/SAME_LOWER: Conv and pools pad so that out = ceil(in/stride) (out_spatial defaults to that),
    total = (out-1)·s + d·(k-1) + 1 - in, the odd cell at the end for SAME_UPPER, at the start for SAME_LOWER.
    ConvTranspose (transpose=True) with SAME_* or output_shape: see _transpose_pads (the same split, with
    output_padding in the total; its end may be negative).
    """
    kernel = list(kernel)
    d = len(kernel)
    strides = list(attrs.get("strides") or [1] * d)
    dilations = list(attrs.get("dilations") or [1] * d)
    pads = list(attrs.get("pads") or [0] * 2 * d)
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    in_spatial = list(in_spatial) if _static(in_spatial) else None
    out_spatial = list(out_spatial) if _static(out_spatial) else None
    if out_spatial is None and in_spatial is not None and auto_pad.startswith("SAME") and not transpose:
        out_spatial = [-(-n // s) for n, s in zip(in_spatial, strides)]
    begin, end = pads[:d], pads[d:]
    if transpose and (auto_pad in ("SAME_UPPER", "SAME_LOWER") or attrs.get("output_shape")):
        begin, end = _transpose_pads(attrs, kernel, strides, dilations, in_spatial, auto_pad)
    elif auto_pad == "VALID":
        begin, end = [0] * d, [0] * d
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if in_spatial is None or out_spatial is None:
            begin = end = None
        else:
            begin, end = [], []
            for i in range(d):
                span = dilations[i] * (kernel[i] - 1) + 1
                total = max(0, (out_spatial[i] - 1) * strides[i] + span - in_spatial[i])
                small = total // 2
                first = small if auto_pad == "SAME_UPPER" else total - small
                begin.append(first)
                end.append(total - first)
    return WindowGeometry(kernel, strides, dilations, begin, end, in_spatial, out_spatial, auto_pad)


def _transpose_pads(attrs, kernel, strides, dilations, in_spatial, auto_pad):
    """ConvTranspose's (begin, end) with auto_pad SAME_* or output_shape, as onnxruntime does and the ONNX spec says:
    out = output_shape or in·s, total = s·(in-1) + output_padding + d·(k-1) + 1 - out, begin = total//2 for SAME_UPPER
    and total - total//2 otherwise (explicit pads are ignored), end = total - begin. An out past the full size
    (total < 0) gets begin 0 and a negative end: zeros appended. (None, None) for output_shape and an unknown in."""
    d = len(kernel)
    extra = list(attrs.get("output_padding") or [0] * d)
    output_shape = list(attrs.get("output_shape") or [])[-d:]
    if output_shape and in_spatial is None:
        return None, None
    begin, end = [], []
    for i in range(d):
        # without output_shape out = in·s: total = output_padding + span - s, whatever in is
        total = extra[i] + dilations[i] * (kernel[i] - 1) + 1 - strides[i]
        total += strides[i] * in_spatial[i] - output_shape[i] if output_shape else 0
        padded = max(total, 0)
        first = padded // 2 if auto_pad == "SAME_UPPER" else padded - padded // 2
        begin.append(first)
        end.append(total - first)
    return begin, end


def window_geometry(src, node) -> WindowGeometry:
    """The geometry of a Conv, ConvTranspose or pool node of source model `src` (see resolve_window)."""
    attrs = src.attrs(node)
    kernel = attrs.get("kernel_shape")
    if not kernel and len(node.input) > 1:
        kernel = list((src.shape(node.input[1]) or [])[2:])
    if not kernel or not _static(kernel):
        raise JacgraphError(f"{node.op_type} '{node.name}': the kernel shape is unknown; give kernel_shape.")
    xs, ys = src.shape(node.input[0]), src.shape(node.output[0])
    geometry = resolve_window(attrs, kernel, None if xs is None else xs[2:], None if ys is None else ys[2:],
                              transpose=node.op_type == "ConvTranspose")
    extra = list(attrs.get("output_padding") or [0] * len(kernel))
    if node.op_type == "ConvTranspose" and any(extra) and str(attrs.get("auto_pad", "")).startswith("SAME") \
            and xs is not None and ys is not None and _static(xs[2:]) and _static(ys[2:]) \
            and geometry.begin is not None:
        out = transpose_output_size(geometry, xs[2:], extra, kernel)
        if out != list(ys[2:]):  # e.g. SAME_* with output_padding: onnx's shape inference and onnxruntime differ
            raise JacgraphError(
                f"ConvTranspose '{node.name}': it computes a {out} output (as onnxruntime and the ONNX spec do) but "
                f"the model declares {list(ys[2:])} (ONNX shape inference; auto_pad SAME_* with output_padding is "
                "where they disagree), so a derivative graph would be shaped wrongly. Give explicit pads instead "
                "of auto_pad, or drop output_padding.")
    return geometry


def transpose_output_size(geometry, in_spatial, output_padding, kernel) -> list:
    """A ConvTranspose's output spatial size: s·(in-1) + output_padding + d·(k-1) + 1 - begin - end."""
    return [s * (n - 1) + e + dil * (k - 1) + 1 - lo - hi for s, n, e, dil, k, lo, hi in
            zip(geometry.strides, in_spatial, output_padding, geometry.dilations, kernel, geometry.begin, geometry.end)]


def _static(shape):
    return shape is not None and all(isinstance(v, int) for v in shape)
