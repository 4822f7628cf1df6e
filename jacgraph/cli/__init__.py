"""The command line: `jacgraph compile | inspect | bench | verify | bound | lipschitz | sense`.

One convention for every command (docs/using-the-cli.md): -o/--output for what it writes, checked
before any work; --json (valid JSON); --quiet; --threads; --max-memory for the memory guard; exit
codes 0 (done), 1 (verify found the graph wrong), 2 (bad input, a one-paragraph `jacgraph: error:`,
nothing written), 3 (a bug in jacgraph: `jacgraph: internal error:`), 130 (interrupted, nothing half-written),
143 (ended by SIGTERM, likewise).

The command runs in a worker thread while the main thread waits, so Ctrl-C is seen within a fraction of
a second even while onnxruntime, numpy or a solver holds the worker in native code: the main thread
then removes the command's temporary files and ends the process (exit 130). SIGTERM (a job scheduler, `kill`,
a container stopping) is handled the same way, exit 143. Work that outlasts ~2 s
gets a progress line on stderr (unless --quiet).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from importlib import metadata

from .. import progress
from ..errors import JacgraphError
from .analysis import add_bound, add_lipschitz, add_sense
from .commands import add_bench, add_compile, add_inspect, add_verify
from .files import atomic_output, output_paths, parse_shape, remove_live_temporaries, write_atomic
from .options import Parser
from .report import quiet

__all__ = ["main", "parser", "atomic_output", "write_atomic", "output_paths", "parse_shape"]

INTERNAL_ERROR = 3
TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended
PROGRESS_AFTER_S = 2.0
PROGRESS_EVERY_S = 10.0
STAGE_EVERY_S = 1.0


def version() -> str:
    try:
        return metadata.version("jacgraph")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> Parser:
    p = Parser(prog="jacgraph", description="Compile ONNX models into ONNX models of their derivatives. "
               "Exit codes: 0 done, 1 verify failed, 2 bad input (nothing written), 3 internal error, 130 interrupted, "
               "143 terminated (SIGTERM).")
    p.add_argument("--version", action="version", version=f"jacgraph {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_compile, add_inspect, add_bench, add_verify, add_bound, add_lipschitz, add_sense):
        add(sub)
    return p


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except JacgraphError as e:
        return _error(e)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    return run_command(args)


def _error(e) -> int:
    print(f"jacgraph: error: {e}", file=sys.stderr)
    return 2


def run_command(args) -> int:
    """Run args.func(args) in a worker thread; the main thread watches for Ctrl-C and reports progress."""
    outcome = {}

    def work():
        try:
            outcome["code"] = args.func(args)
        except BaseException as e:  # handed to the main thread, which reports it
            outcome["error"] = e

    worker = threading.Thread(target=work, name=f"jacgraph {args.command}", daemon=True)
    started = time.monotonic()
    progress.reset()  # a stage left by an earlier command in this process
    previous = _catch_sigterm()
    try:
        worker.start()
        _wait(worker, args, started)
    except KeyboardInterrupt:
        _interrupted(args)
    except _Terminated:
        _interrupted(args, TERMINATED, "terminated (SIGTERM)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    error = outcome.get("error")
    if isinstance(error, JacgraphError):
        return _error(error)
    if isinstance(error, KeyboardInterrupt):
        _interrupted(args)
    if isinstance(error, BrokenPipeError):  # `jacgraph inspect M | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice: no flush error at exit
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    if error is not None:
        return _internal_error(error)
    return outcome.get("code", 0)


def _internal_error(error) -> int:
    """Not bad input but a bug in jacgraph: one paragraph with where it happened (JACGRAPH_DEBUG=1: the traceback)."""
    if os.environ.get("JACGRAPH_DEBUG"):
        traceback.print_exception(error)
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {os.path.basename(where.filename)}:{where.lineno} in {where.name}" if where else ""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    print(f"jacgraph: internal error: {type(error).__name__}{': ' + detail if detail else ''}{at}. This is a bug in "
          "jacgraph, not in your input; nothing was written. Please report it with the command line "
          "(JACGRAPH_DEBUG=1 prints the traceback).", file=sys.stderr)
    return INTERNAL_ERROR


def _wait(worker, args, started):
    """Once the command has run PROGRESS_AFTER_S: its stage (jacgraph.progress) when that changes, at most one
    line per STAGE_EVERY_S, and at least every PROGRESS_EVERY_S."""
    last, shown = None, None
    while worker.is_alive():
        worker.join(0.1)
        now, note = time.monotonic(), progress.current() or "working"
        due = now - started >= PROGRESS_AFTER_S and (
            last is None or now - last >= PROGRESS_EVERY_S or (note != shown and now - last >= STAGE_EVERY_S))
        if worker.is_alive() and due and not quiet(args):
            print(f"jacgraph {args.command}: {note} ({now - started:.0f} s)", file=sys.stderr, flush=True)
            last, shown = now, note


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread (which only waits for the worker) by _on_sigterm."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _catch_sigterm():
    """SIGTERM to _on_sigterm while a command runs: the handler to put back afterwards, or None where none was set.
    None on a thread other than the main one (only it may set a handler), and where the present handler was not
    set from Python (signal.getsignal gives None: a program embedding Python installed it in C). Python could not
    put that one back (SIG_DFL in its place would make SIGTERM kill the host), so it is left alone: SIGTERM then
    does what the host chose, not jacgraph's clean exit 143."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _interrupted(args, code=130, what="interrupted"):
    """Ctrl-C (or SIGTERM): no partial output (temporaries removed; finished files were renamed whole), exit now."""
    remove_live_temporaries()
    print(f"jacgraph {args.command}: {what}; nothing partial was written", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
