"""jacgraph: a graph compiler over ONNX that emits models computing derivative quantities.

    import jacgraph
    jvp_model = jacgraph.compile("model.onnx", emit="jvp")   # (x, x_dot) -> (y, y_dot)
"""
from __future__ import annotations

import importlib
import os

from .errors import JacgraphError, NeedsOpset

_here = os.path.dirname(os.path.abspath(__file__))
_source_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "passes")) and os.path.isfile(os.path.join(_source_root, "passes", "__init__.py")):
    # a source checkout (pytest from the repo root): the top-level passes/ folder is jacgraph.passes
    __path__.append(_source_root)

# emit name -> pass module (under jacgraph.passes) that defines build(model, **options)
EMITS = {
    "jvp": "jvp",
    "vjp": "vjp",
    "hvp": "hvp",
    "jfb": "jfb",
    "jacobian": "jacobian",
    "recurjac": "recurjac",
    "autolip": "lipschitz",
}


def pass_module(emit: str):
    if emit not in EMITS:
        raise JacgraphError(f"--emit {emit!r} is not known; choose one of {', '.join(EMITS)}.")
    try:
        return importlib.import_module(f"jacgraph.passes.{EMITS[emit]}")
    except ModuleNotFoundError as e:
        if e.name == f"jacgraph.passes.{EMITS[emit]}":
            raise JacgraphError(f"--emit {emit} is not available in this version of jacgraph.") from None
        raise


def compile(model, emit: str = "jvp", **options):
    """Compile an ONNX model (path, bytes or ModelProto) into a new model that computes `emit`.

    Returns a ModelProto, or a dict of named ModelProtos for emits that write several graphs. When a rule
    needs a newer op version than the model declares (ScatterElements reduction='add' is opset 16), the
    model is converted up to that opset (onnx.version_converter) and the emitted model declares it.
    The input model is never modified. `input_shapes={input: dims}` fixes dynamic input dims first (a name
    in dims keeps that axis symbolic), so shape arithmetic folds to constants (jacgraph.lowering).
    """
    if options.get("input_shapes"):
        from .lowering import with_input_shapes

        model = with_input_shapes(model, options["input_shapes"])
    options.pop("input_shapes", None)
    module = pass_module(emit)
    try:
        return module.build(model, **options)
    except NeedsOpset as e:  # convert the model up to the opset the rule needs, and emit again
        from .model import upgrade_opset

        return module.build(upgrade_opset(model, e.opset), **options)


__all__ = ["compile", "JacgraphError", "EMITS"]
