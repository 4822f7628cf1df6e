"""`jacgraph compile | inspect | bench | verify` and the passes' own commands (bound, lipschitz, sense)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile

import onnx

from . import EMITS, compile as compile_model, pass_module
from .errors import JacgraphError

# compile options (argparse dest) that each emit accepts; anything else given is an error
EMIT_OPTIONS = {
    "jvp": ("inputs", "tangents", "strategy"),
    "vjp": ("inputs", "wrt"),
    "jfb": ("state", "tol", "max_iter", "fixed_iterations", "readout", "loss", "wrt"),
    "jacobian": ("inputs", "sparse", "probes"),
    "recurjac": ("norm", "input_shape"),
    "autolip": ("input_shape",),
}
PLUGIN_COMMANDS = ("recurjac", "lipschitz", "sensing")


@contextlib.contextmanager
def atomic_output(path, suffix=".onnx", flag="-o"):
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise JacgraphError(f"the output folder {folder} does not exist. Create it or choose another {flag} path.")
    fd, tmp = tempfile.mkstemp(prefix=".jacgraph-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; an output is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(models: dict):
    """Write {path: ModelProto} all-or-nothing: every file is written before any is renamed into place."""
    with contextlib.ExitStack() as stack:
        for path, model in models.items():
            onnx.save(model, stack.enter_context(atomic_output(path)))


def output_paths(out: str, result) -> dict:
    if isinstance(result, onnx.ModelProto):
        return {out: result}
    stem = out[:-5] if out.endswith(".onnx") else out
    return {f"{stem}.{suffix}.onnx": model for suffix, model in result.items()}


def parse_shape(text):
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise JacgraphError(f"--input-shape {text!r} is not a shape; write it like 1,3,32,32.") from None


def parse_input_shapes(texts):
    """--input-shape values: NAME=DIMS (repeatable; dims may be names, which stay symbolic) -> {name: dims},
    and at most one bare DIMS (the recurjac/autolip input shape)."""
    named, bare = {}, []
    for text in texts:
        if "=" not in text:
            bare.append(parse_shape(text))
            continue
        name, dims = text.rsplit("=", 1)
        tokens = dims.split("x") if "," not in dims and dims.replace("x", "").isdigit() else dims.split(",")
        named[name.strip()] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in tokens if d.strip()]
        if not name.strip() or not named[name.strip()]:
            raise JacgraphError(f"--input-shape {text!r} is not NAME=DIMS; write it like x=1,3,224,224.")
    if len(bare) > 1:
        raise JacgraphError("--input-shape without a NAME= may be given once; name each input: --input-shape x=1,3,32,32.")
    return named, (bare[0] if bare else None)


def cmd_compile(args) -> int:
    given = {k: getattr(args, k) for k in ("inputs", "tangents", "strategy", "wrt", "state", "tol", "max_iter",
                                          "fixed_iterations", "readout", "loss", "sparse", "probes", "norm", "input_shape")
             if getattr(args, k) is not None and getattr(args, k) is not False}
    if "input_shape" in given:  # NAME=DIMS entries apply to every emit (jacgraph.lowering); a bare DIMS is per-pass
        named, bare = parse_input_shapes(given.pop("input_shape"))
        if named:
            given["input_shapes"] = named
        if bare:
            given["input_shape"] = bare
    allowed = EMIT_OPTIONS[args.emit]
    stray = [k for k in given if k not in allowed and k != "input_shapes"]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise JacgraphError(f"{flags} does not apply to --emit {args.emit}; it accepts "
                            f"{', '.join('--' + k.replace('_', '-') for k in allowed)}.")
    if "inputs" in given:
        given["inputs"] = [n.strip() for n in given["inputs"].split(",") if n.strip()]
    if args.emit == "vjp" and "wrt" in given and given["wrt"] != "params":
        given["wrt"] = [n.strip() for n in given["wrt"].split(",") if n.strip()]
    result = compile_model(args.model, emit=args.emit, **given)
    paths = output_paths(args.output, result)
    write_atomic(paths)
    for path, model in paths.items():
        print(f"wrote {path}")
        summary = {p.key: p.value for p in model.metadata_props}.get("jacgraph.summary")
        if summary:  # a pass's one-line report (e.g. the Jacobian's colour count)
            print(summary)
    return 0


def emit_support(src, emit):
    """True if `emit` can compile this model, else the reason in a few words."""
    try:
        pass_module(emit)
        if emit in ("jvp", "vjp", "jacobian"):
            from .passes.jvp import missing_rules

            table_module = {"jvp": "jacgraph.rules.jvp", "vjp": "jacgraph.rules.transpose",
                            "jacobian": "jacgraph.rules.jvp"}[emit]
            table = importlib.import_module(table_module)
            table = table.JVP if emit != "vjp" else table.VJP
            missing = missing_rules(src, src.float_inputs(), table)
            return True if not missing else "no rule for " + ", ".join(sorted(missing))
        if emit in ("recurjac", "autolip"):
            from . import layers

            layers.lower(src)
            return True
        return True if emit != "jfb" else "needs --state (a T(z, x) model)"
    except ImportError:
        return "not available in this version"
    except JacgraphError as e:
        return str(e).split(". ")[0]


def inspect_report(path) -> dict:
    from .model import SourceModel
    from .passes.jvp import missing_rules
    from .rules.jvp import JVP

    src = SourceModel(path)
    shapes = lambda values: {v.name: list(src.shape(v.name) or []) for v in values}  # noqa: E731
    return {
        "opset": src.opset, "nodes": len(src.nodes), "cpa": src.is_cpa,
        "inputs": shapes(src.inputs), "outputs": shapes(src.outputs),
        "ops": dict(src.op_counts().most_common()),
        "missing_jvp": dict(missing_rules(src, src.float_inputs(), JVP)),
        "emits": {emit: emit_support(src, emit) for emit in EMITS},
    }


def cmd_inspect(args) -> int:
    info = inspect_report(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}: opset {info['opset']}, {info['nodes']} nodes, "
          f"{'CPA (continuous piecewise-affine)' if info['cpa'] else 'not CPA'}")
    print(f"inputs:  {', '.join(f'{n} {s}' for n, s in info['inputs'].items())}")
    print(f"outputs: {', '.join(f'{n} {s}' for n, s in info['outputs'].items())}")
    print("op counts:")
    for op, n in info["ops"].items():
        mark = "" if op not in info["missing_jvp"] else "   <- no JVP rule"
        print(f"  {op:24s} {n:5d}{mark}")
    print(f"emits: {', '.join(e + ('' if ok is True else f' (no: {ok})') for e, ok in info['emits'].items())}")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench

    result = bench(args.model, emit=args.emit, runs=args.runs, threads=args.threads,
                   tangents=args.tangents, strategy=args.strategy, memory=not args.no_memory,
                   profile_runs=args.runs if args.profile else 0)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {args.emit} (strategy {result['strategy']}, tangents {result['tangents']}), "
          f"{result['threads']} thread(s), median of {result['runs']} interleaved runs")
    print(f"  forward  {result['forward_ms']:9.3f} ms")
    print(f"  {args.emit:8s} {result['emitted_ms']:9.3f} ms   ratio {result['ratio']:.2f}")
    if "forward_peak_mb" in result:
        print(f"  peak RSS forward {result['forward_peak_mb']:.1f} MB, {args.emit} {result['emitted_peak_mb']:.1f} MB, "
              f"ratio {result['memory_ratio']:.2f} (activation growth {result['forward_growth_mb']:.1f} MB vs "
              f"{result['emitted_growth_mb']:.1f} MB)")
    if "profile" in result:
        from .bench import format_profile

        print(f"  per-op kernel time of one run (onnxruntime profiler, mean of {args.runs} runs):")
        print(format_profile(result["profile"]["forward"], result["profile"]["emitted"], args.emit))
    return 0


def cmd_verify(args) -> int:
    from .testing import verify

    errors = verify(args.model, seed=args.seed, h=args.h)
    worst = max(errors.values())
    for name, err in errors.items():
        print(f"{name}: relative error vs float64 central differences {err:.2e}")
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAILED'}: worst {worst:.2e} (tolerance {args.tol:g})")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jacgraph", description="Compile ONNX models into ONNX models of their derivatives.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="emit a derivative model")
    c.add_argument("model")
    c.add_argument("--emit", required=True, choices=list(EMITS))
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--inputs", help="comma-separated inputs to differentiate (default: every float input)")
    c.add_argument("--tangents", type=int, help="jvp: K directions in one run (x_dot gets a leading axis of K)")
    c.add_argument("--strategy", choices=["twopass", "batched"], help="jvp: tangent ops separate, or batched with the primal")
    c.add_argument("--wrt", help="vjp/jfb: 'params' or comma-separated initializer names to differentiate")
    c.add_argument("--state", help="jfb: the state input z of T(z, x)")
    c.add_argument("--tol", type=float, help="jfb: relative residual tolerance")
    c.add_argument("--max-iter", type=int, help="jfb: iteration cap")
    c.add_argument("--fixed-iterations", type=int, help="jfb: constant trip count (no dynamic Loop exit)")
    c.add_argument("--readout", help="jfb: readout model R(z*)")
    c.add_argument("--loss", choices=["cross_entropy", "mse"], help="jfb: loss for the readout graph")
    c.add_argument("--sparse", action="store_true", help="jacobian: emit indices + values")
    c.add_argument("--probes", choices=["auto", "columns", "rows"], help="jacobian: JVP (columns) or VJP (rows) probes")
    c.add_argument("--norm", choices=["inf", "2"], help="recurjac: the input ball's norm")
    c.add_argument("--input-shape", action="append",
                   help="NAME=DIMS fixes input NAME's dims, e.g. x=1,3,224,224 (repeatable; every emit; a name in DIMS "
                        "keeps that axis symbolic); a bare DIMS is recurjac/autolip's input shape")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="op counts, CPA or not, supported emits, ops without rules")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    bch = sub.add_parser("bench", help="time the emitted graph against the forward model in onnxruntime")
    bch.add_argument("model")
    bch.add_argument("--emit", default="jvp", choices=["jvp"])
    bch.add_argument("--runs", type=int, default=50)
    bch.add_argument("--threads", type=int, default=0, help="intra-op threads for both sessions (0: onnxruntime's default)")
    bch.add_argument("--tangents", type=int)
    bch.add_argument("--strategy", choices=["twopass", "batched"])
    bch.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs")
    bch.add_argument("--profile", action="store_true", help="per-op kernel times of both graphs (onnxruntime profiler)")
    bch.add_argument("--json", action="store_true")
    bch.set_defaults(func=cmd_bench)

    v = sub.add_parser("verify", help="check an emitted JVP graph against float64 central differences")
    v.add_argument("model")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--h", type=float, default=1e-7, help="central-difference step (float64)")
    v.add_argument("--tol", type=float, default=1e-4)
    v.set_defaults(func=cmd_verify)

    for name in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(f"jacgraph.passes.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"jacgraph.passes.{name}":
                continue
            raise
        if hasattr(module, "add_command"):
            module.add_command(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except JacgraphError as e:
        print(f"jacgraph: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
