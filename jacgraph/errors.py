"""The one error type users see: a message that names the problem and the fix (CLI exit code 2)."""


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
