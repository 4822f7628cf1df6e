"""Option parsing shared by every command: checked numeric types, and the options every command takes.

Every numeric option is checked when the command line is parsed (range and finiteness), so nonsense
such as `--top-k -2` or `--eps 1e400` stops with exit code 2 before any model is read.
"""
from __future__ import annotations

import argparse
import math
import sys

from ..errors import JacgraphError


class UsageError(JacgraphError):
    """A command line argparse refused (exit code 2, like every JacgraphError)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a JacgraphError (one `jacgraph: error:` paragraph) not a bare exit."""

    def error(self, message):
        raise UsageError(f"{message}. See `{self.prog} --help`.")


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_words(low, high, 'integer')}, got {value}")
        return value
    return parse


def real(low: float | None = None, high: float | None = None, above: float | None = None):
    """An argparse type: a finite float >= low (or > above) and <= high."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if above is not None and value <= above:
            words = "a positive number" if above == 0 else f"a number > {above:g}"
            raise argparse.ArgumentTypeError(f"{text} is not {words}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_words(low, high, 'number')}, got {text}")
        return value
    return parse


def _range_words(low, high, kind):
    if low == 1 and high is None and kind == "integer":
        return "a positive integer"
    if high is None:
        return f"an {kind} >= {low:g}" if kind == "integer" else f"a {kind} >= {low:g}"
    if low is None:
        return f"an {kind} <= {high:g}" if kind == "integer" else f"a {kind} <= {high:g}"
    return f"an {kind} from {low:g} to {high:g}" if kind == "integer" else f"a {kind} from {low:g} to {high:g}"


def names(text):
    """An argparse type: a comma-separated list of names, none of them empty."""
    items = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in items):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names (an empty name is not "
                                         "a name; leave the option out to mean every one)")
    return items


def memory_size(text):
    """An argparse type: bytes, as 1500000000, 1.5G, 800M or 64K."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = scale.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in scale else t) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 8G, 500M or 1000000000") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return int(value)


class _DeprecatedOut(argparse.Action):
    """--out, kept working for old scripts; the option is -o/--output."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("jacgraph: note: --out is deprecated; use -o/--output", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output(p, what: str, required=False):
    p.add_argument("-o", "--output", required=required, metavar="PATH", help=what)
    p.add_argument("--out", dest="output", action=_DeprecatedOut, help=argparse.SUPPRESS)


def add_common(p, json=True, threads=True, memory=False):
    """The options every command takes: --json, --quiet, --threads and the memory guard's --max-memory."""
    if json:
        p.add_argument("--json", action="store_true", help="print the result as one JSON object (valid JSON: no NaN)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    if threads:
        p.add_argument("--threads", type=integer(0), default=0, metavar="N",
                       help="onnxruntime intra-op threads (default 0: onnxruntime's choice)")
    if memory:
        p.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                       help="refuse work estimated to need more memory than this, e.g. 8G (default: the "
                            "machine's available memory, MemAvailable in /proc/meminfo)")
