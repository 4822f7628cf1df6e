"""What long-running library work is doing now, for the command line's progress notes.

    with progress.stage("lowering the model"):
        ...

Library code only names its stage; it never prints. `jacgraph.cli` watches the running command from its
main thread and prints `jacgraph CMD: <stage> (N s)` on stderr once the command has run for ~2 s (never
with --quiet). Stages nest: leaving one restores the stage around it. A single onnxruntime session run
is one stage: nothing inside it can report how far it has got.
"""
from __future__ import annotations

from contextlib import contextmanager

_current = [None]


def current() -> str | None:
    """The innermost stage running now (None: none named)."""
    return _current[0]


@contextmanager
def stage(name: str):
    before = _current[0]
    _current[0] = name
    try:
        yield
    finally:
        _current[0] = before


def reset():
    _current[0] = None
