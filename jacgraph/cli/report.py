"""What commands print: JSON that is valid JSON (a NaN is an error, not `NaN`), progress notes on stderr."""
from __future__ import annotations

import json
import math
import sys

from ..errors import JacgraphError


def finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def print_json(obj):
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_plain)
    except ValueError:
        raise JacgraphError("the result holds NaN or infinite values, which are no result (and not JSON). Check the "
                            "inputs: an enormous --eps, a model that overflows at this point.") from None
    print(text)


def _plain(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def quiet(args) -> bool:
    """No progress on stderr: --quiet, or --json with stderr not a terminal (a caller reading JSON from a
    pipe or a log gets no notes mixed into the captured stderr)."""
    return bool(getattr(args, "quiet", False) or (getattr(args, "json", False) and not sys.stderr.isatty()))


def say(args, message):
    """A progress note on stderr, unless quiet(args)."""
    if not quiet(args):
        print(message, file=sys.stderr, flush=True)


def require_finite(what: str, *arrays):
    """A result that is not finite is an error, never an OK."""
    import numpy as np

    for a in arrays:
        if not np.all(np.isfinite(np.asarray(a, np.float64))):
            raise JacgraphError(f"{what} is not finite (NaN or inf): no result. The input is out of the range where "
                                "it can be computed in floating point (e.g. an enormous --eps); use smaller values.")
