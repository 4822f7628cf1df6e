"""`jacgraph compile | inspect | bench | verify`: each command checks its inputs, outputs and memory first."""
from __future__ import annotations

import importlib

from .. import EMITS, compile as compile_model, pass_module
from ..errors import JacgraphError
from ..model import SourceModel, load
from . import memory
from .files import check_output, output_paths, parse_input_shapes, write_atomic
from .options import add_common, add_output, integer, names, real
from .report import finite_or_none, print_json, say

# compile options (argparse dest) that each emit accepts; anything else given is an error
EMIT_OPTIONS = {
    "jvp": ("inputs", "tangents", "strategy"),
    "vjp": ("inputs", "wrt"),
    "hvp": ("inputs", "tangents", "strategy", "y_bar"),
    "jfb": ("state", "tol", "max_iter", "fixed_iterations", "readout", "loss", "wrt"),
    "jacobian": ("inputs", "sparse", "probes"),
    "recurjac": ("norm", "input_shape"),
    "autolip": ("input_shape",),
}
SEVERAL_GRAPHS = ("jfb", "autolip")
COMPILE_OPTIONS = sorted({k for ks in EMIT_OPTIONS.values() for k in ks} - {"input_shape"})


# ---- compile ------------------------------------------------------------------------------------

def cmd_compile(args) -> int:
    given = {k: getattr(args, k) for k in COMPILE_OPTIONS + ["input_shape"] if getattr(args, k, None) not in (None, False)}
    stray = [k for k in given if k not in EMIT_OPTIONS[args.emit] and k != "input_shape"]
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise JacgraphError(f"{flags} does not apply to --emit {args.emit}; it accepts "
                            f"{', '.join('--' + k.replace('_', '-') for k in EMIT_OPTIONS[args.emit])}.")
    if "input_shape" in given and "input_shape" not in EMIT_OPTIONS[args.emit] \
            and not all("=" in text for text in given["input_shape"]):
        raise JacgraphError(f"a bare --input-shape DIMS does not apply to --emit {args.emit}; name the input: "
                            "--input-shape NAME=DIMS (e.g. x=1,3,224,224).")
    if "input_shape" in given:  # NAME=DIMS entries apply to every emit (jacgraph.lowering); a bare DIMS is per-pass
        named, bare = parse_input_shapes(given.pop("input_shape"))
        if named:
            given["input_shapes"] = named
        if bare:
            given["input_shape"] = bare
    if "wrt" in given and given["wrt"] != "params":
        given["wrt"] = names(given["wrt"])
    inputs = [args.model, args.readout]
    # emits of several graphs write STEM.<graph>.onnx (each checked again before writing): -o may be a stem
    check_output(args.output, "" if args.emit in SEVERAL_GRAPHS else ".onnx", inputs)
    proto = load(args.model)
    guard_compile(args, proto, given)
    result = compile_model(proto, emit=args.emit, **given)
    paths = output_paths(args.output, result)
    write_atomic(paths, inputs, external_data=args.external_data)
    summaries = {path: {p.key: p.value for p in model.metadata_props}.get("jacgraph.summary") for path, model in paths.items()}
    if args.json:
        print_json({"emit": args.emit, "wrote": list(paths), "summaries": summaries})
        return 0
    for path, summary in summaries.items():
        print(f"wrote {path}")
        if summary:  # a pass's one-line report (e.g. the Jacobian's colour count)
            print(summary)
    return 0


def guard_compile(args, proto, given):
    """Refuse before compiling what would not fit in memory: the graph itself, a dense Jacobian, bound matrices."""
    src = SourceModel(proto, input_shapes=given.get("input_shapes"))
    x = (given.get("inputs") or src.float_inputs() or [None])[0]
    shape = given.get("input_shape") or given.get("input_shapes", {}).get(x)
    shapes = memory.fixed_shapes(src, shape, x)
    need = 3.0 * shapes.weights  # the source, the emitted graph and its serialized bytes
    fix = "Free memory on this machine"
    if args.emit == "jacobian":
        need += shapes.activations
        if not given.get("sparse"):
            need += float(shapes.output_elements) * shapes.input_elements * shapes.itemsize
            fix = "Use --sparse (only the structural nonzeros) or a smaller --input-shape"
    elif args.emit == "recurjac":
        need += memory.bound_working_set(src, shape)
        fix = "Use a smaller --input-shape, or `jacgraph lipschitz --method autolip` (no dense layer matrices)"
    memory.check(need, f"compile --emit {args.emit}", fix, args.max_memory)


def add_compile(sub):
    c = sub.add_parser("compile", help="emit a derivative model", description="Emit an ONNX model computing a "
                       "derivative quantity of MODEL. Writes -o PATH (several files STEM.<graph>.onnx for emits "
                       "with several graphs).")
    c.add_argument("model", help="the source ONNX model (.onnx; external .onnx.data beside it is read too)")
    c.add_argument("--emit", required=True, choices=list(EMITS), help="what the emitted graph computes")
    add_output(c, "the .onnx file to write (an existing file there is replaced only when the compile succeeds)",
               required=True)
    c.add_argument("--external-data", action="store_true",
                   help="keep the weights in PATH.data beside the output (needed above protobuf's 2 GiB)")
    c.add_argument("--inputs", type=names, help="comma-separated inputs to differentiate (default: every float input)")
    c.add_argument("--tangents", type=integer(1), help="jvp: K directions in one run (x_dot gets a leading axis of K)")
    c.add_argument("--strategy", choices=["twopass", "batched", "auto"],
                   help="jvp: tangent ops separate, batched with the primal, or auto (batched where the op is "
                        "weight-bound; the default)")
    c.add_argument("--wrt", help="vjp/jfb: 'params' or comma-separated initializer names to differentiate")
    c.add_argument("--y-bar", action="store_true",
                   help="hvp: f = <y, y_bar> with y_bar an input (the default when no output is one scalar)")
    c.add_argument("--state", help="jfb: the state input z of T(z, x)")
    c.add_argument("--tol", type=real(above=0), help="jfb: relative residual tolerance (> 0)")
    c.add_argument("--max-iter", type=integer(1), help="jfb: iteration cap")
    c.add_argument("--fixed-iterations", type=integer(1), help="jfb: constant trip count (no dynamic Loop exit)")
    c.add_argument("--readout", help="jfb: readout model R(z*) (.onnx)")
    c.add_argument("--loss", choices=["cross_entropy", "mse"], help="jfb: loss for the readout graph")
    c.add_argument("--sparse", action="store_true", help="jacobian: emit indices + values")
    c.add_argument("--probes", choices=["auto", "columns", "rows"], help="jacobian: JVP (columns) or VJP (rows) probes")
    c.add_argument("--norm", choices=["inf", "2"], help="recurjac: the input ball's norm")
    c.add_argument("--input-shape", action="append",
                   help="NAME=DIMS fixes input NAME's dims, e.g. x=1,3,224,224 (repeatable; every emit; a name in DIMS "
                        "keeps that axis symbolic); a bare DIMS is recurjac/autolip's input shape")
    add_common(c, threads=False, memory=True)
    c.set_defaults(func=cmd_compile)


# ---- inspect ------------------------------------------------------------------------------------

def emit_support(src, emit):
    """True if `emit` can compile this model, else the reason in a few words."""
    try:
        pass_module(emit)
        if emit in ("jvp", "vjp", "jacobian", "hvp"):
            from ..passes.jvp import missing_rules

            table_module = {"jvp": "jacgraph.rules.jvp", "vjp": "jacgraph.rules.transpose",
                            "jacobian": "jacgraph.rules.jvp", "hvp": "jacgraph.rules.transpose"}[emit]
            table = importlib.import_module(table_module)
            table = table.JVP if emit not in ("vjp", "hvp") else table.VJP
            if not src.float_inputs():
                return "no float input"
            missing = missing_rules(src, src.float_inputs(), table)
            return True if not missing else "no rule for " + ", ".join(sorted(missing))
        if emit in ("recurjac", "autolip"):
            from .. import layers

            # both bound DAGs (residual, concat, pooling)
            layers.lower_graph(src) if not layers.is_chain(src) else layers.lower(src)
            return True
        return True if emit != "jfb" else "needs --state (a T(z, x) model)"
    except ImportError:
        return "not available in this version"
    except JacgraphError as e:
        return str(e).split(". ")[0]


def inspect_report(path) -> dict:
    from ..passes.jvp import missing_rules
    from ..rules.jvp import JVP

    src = SourceModel(path)
    shapes = lambda values: {v.name: list(src.shape(v.name) or []) for v in values}  # noqa: E731
    floats = src.float_inputs()
    return {
        "opset": src.opset, "nodes": len(src.nodes), "float_inputs": floats,
        "cpa": bool(floats) and not src.non_cpa_ops, "non_cpa_ops": src.non_cpa_ops,
        "inputs": shapes(src.inputs), "outputs": shapes(src.outputs),
        "ops": dict(src.op_counts().most_common()),
        "missing_jvp": dict(missing_rules(src, floats, JVP)) if floats else {},
        "emits": {emit: emit_support(src, emit) for emit in EMITS},
    }


def cpa_words(info) -> str:
    if not info["float_inputs"]:
        return "no float input (nothing to differentiate; CPA does not apply)"
    if info["cpa"]:
        return "CPA (continuous piecewise-affine)"
    return f"not CPA (because of {', '.join(info['non_cpa_ops'])})"


def cmd_inspect(args) -> int:
    info = inspect_report(args.model)
    if args.json:
        print_json(info)
        return 0
    print(f"{args.model}: opset {info['opset']}, {info['nodes']} nodes, {cpa_words(info)}")
    print(f"inputs:  {', '.join(f'{n} {s}' for n, s in info['inputs'].items())}")
    print(f"outputs: {', '.join(f'{n} {s}' for n, s in info['outputs'].items())}")
    print("op counts:")
    for op, n in info["ops"].items():
        mark = "" if op not in info["missing_jvp"] else "   <- no JVP rule"
        print(f"  {op:24s} {n:5d}{mark}")
    print(f"emits: {', '.join(e + ('' if ok is True else f' (no: {ok})') for e, ok in info['emits'].items())}")
    return 0


def add_inspect(sub):
    i = sub.add_parser("inspect", help="op counts, CPA or not, supported emits, ops without rules",
                       description="Describe MODEL: shapes, op counts, CPA or not (and which ops make it not), "
                                   "which emits compile it. Writes nothing.")
    i.add_argument("model", help="the ONNX model to describe")
    add_common(i, threads=False)
    i.set_defaults(func=cmd_inspect)


# ---- bench --------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    from ..bench import bench, format_profile

    src = SourceModel(args.model)
    shapes = memory.fixed_shapes(src)
    K = args.tangents or 1
    # both sessions' activations, K tangent copies of each in the JVP, x_dot, and the weights twice
    need = shapes.activations * (K + 2.0) + 2.0 * shapes.weights
    memory.check(need, f"bench with {K} tangent(s)", "Use fewer --tangents", args.max_memory)
    say(args, f"jacgraph bench: compiling and timing {args.runs} interleaved runs")
    result = bench(args.model, emit=args.emit, runs=args.runs, threads=args.threads,
                   tangents=args.tangents, strategy=args.strategy, memory=not args.no_memory,
                   profile_runs=args.runs if args.profile else 0)
    if args.json:
        print_json(result)
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
        print(f"  per-op kernel time of one run (onnxruntime profiler, mean of {args.runs} runs):")
        print(format_profile(result["profile"]["forward"], result["profile"]["emitted"], args.emit))
    return 0


def add_bench(sub):
    b = sub.add_parser("bench", help="time the emitted graph against the forward model in onnxruntime",
                       description="Time the emitted JVP graph against MODEL's forward pass, interleaved, in one "
                                   "process; peak memory of each in a fresh process. Writes nothing.")
    b.add_argument("model", help="the source ONNX model")
    b.add_argument("--emit", default="jvp", choices=["jvp"], help="the graph to time (jvp)")
    b.add_argument("--runs", type=integer(1), default=50, help="timed runs of each graph (median reported; default 50)")
    b.add_argument("--tangents", type=integer(1), help="K directions in one JVP run")
    b.add_argument("--strategy", choices=["twopass", "batched", "auto"], help="jvp strategy (default: the pass's)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs")
    b.add_argument("--profile", action="store_true", help="per-op kernel times of both graphs (onnxruntime profiler)")
    add_common(b, memory=True)
    b.set_defaults(func=cmd_bench)


# ---- verify -------------------------------------------------------------------------------------

def cmd_verify(args) -> int:
    from ..verify import verify
    from .files import load_array

    x0 = load_array(args.x0) if args.x0 else None
    say(args, f"jacgraph verify: checking {args.model} in float64")
    kind, checks = verify(args.model, seed=args.seed, h=args.h, tol=args.tol, source=args.source, x0=x0,
                          eps=args.eps, samples=args.samples)
    ok = bool(checks) and all(c.ok for c in checks)
    if args.json:
        print_json({"kind": kind, "ok": ok, "tolerance": args.tol,
                    "checks": [{"name": c.name, "value": finite_or_none(c.value), "limit": c.limit, "ok": c.ok,
                                "what": c.what} for c in checks]})
        return 0 if ok else 1
    for c in checks:
        print(f"{'ok    ' if c.ok else 'FAILED'} {c.name}: {c.value:.3g} (limit {c.limit:g}; {c.what})")
    failed = [c.name for c in checks if not c.ok]
    print(f"{'OK' if ok else 'FAILED'}: {kind} graph, {len(checks)} check(s)"
          + (f", failed: {', '.join(failed)}" if failed else "")
          + ("" if checks else " (the graph names no output to compare: nothing was checked)"))
    return 0 if ok else 1


def add_verify(sub):
    v = sub.add_parser("verify", help="check an emitted graph numerically (exit 1 when it fails)",
                       description="Check a graph emitted by jacgraph: jvp against float64 central differences, vjp "
                                   "by the dot-product identity, jacobian against J v by central differences, "
                                   "hvp against central differences of its gradient, recurjac bounds by sampling "
                                   "true Jacobians in the ball, jfb fixed_point/jfb_grad graphs against T and "
                                   "autolip graphs against the layer operator (all three need --source). "
                                   "NaN or inf anywhere fails. Exit 0: OK, 1: FAILED, 2: bad input.")
    v.add_argument("model", help="the emitted graph to check")
    v.add_argument("--seed", type=integer(0), default=0, help="seed of the random point and directions (default 0)")
    v.add_argument("--h", type=real(above=0), default=1e-7, help="central-difference step, float64 (default 1e-7)")
    v.add_argument("--tol", type=real(above=0), default=1e-4,
                   help="largest relative error that passes (default 1e-4)")
    v.add_argument("--source", help="recurjac, autolip: the source model the graph was compiled from; jfb "
                                    "fixed_point/jfb_grad: the T(z, x) model")
    v.add_argument("--x0", help="recurjac: .npy point(s) at the ball's centre (default: a random point)")
    v.add_argument("--eps", type=real(low=0), help="recurjac: the ball's radius (default 0.1)")
    v.add_argument("--samples", type=integer(1), default=2000, help="recurjac: points sampled (default 2000)")
    add_common(v, threads=False)
    v.set_defaults(func=cmd_verify)
