"""The one error type users see: a message that names the problem and the fix (CLI exit code 2)."""

import re


class JacgraphError(Exception):
    """Bad input or an unsupported model. str(e) is the one-paragraph message shown to the user."""


class NeedsOpset(JacgraphError):
    """A rule needs an op version newer than the source model declares; jacgraph.compile upgrades the source
    (onnx.version_converter) to `opset` and emits again. str(e) says what needs it, for direct pass callers."""

    def __init__(self, opset: int, what: str, have: int):
        self.opset = opset
        super().__init__(f"{what} needs opset {opset}; the model has opset {have}. jacgraph.compile (and the CLI) "
                         f"upgrade the model to opset {opset} first; a direct pass call needs the model re-exported "
                         f"with opset_version >= {opset}.")


def internal_error(what: str, error: Exception, node=None) -> JacgraphError:
    """A failure inside jacgraph or a library it drives (a rule, onnx.checker, onnxruntime), said in one paragraph
    that names the source node: the library's own multi-line report is cut to its first informative sentence."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.strip().startswith("==>")]
    detail = re.sub(r"\[\w+Error\] |Inference error\(s\): ", "", lines[0] if lines else type(error).__name__)[:240]
    where = f" while differentiating {node.op_type} node '{node.name or node.output[0]}'" if node is not None else ""
    return JacgraphError(f"jacgraph failed{where}: {what} ({type(error).__name__}: {detail}). This is a bug in "
                         "jacgraph, not in your model: please report it with the model attached.")
