"""`jacgraph bound | lipschitz | sense`: the commands that run an analysis and report numbers (or an .npz)."""
from __future__ import annotations

import argparse

import numpy as np

from ..errors import JacgraphError
from ..model import SourceModel
from ..progress import stage
from . import memory
from .files import check_output, load_array, parse_shape, save_npz
from .options import add_common, add_output, integer, names, real
from .report import print_json, require_finite


# ---- bound --------------------------------------------------------------------------------------

def cmd_bound(args) -> int:
    from ..passes.recurjac import bound

    check_output(args.output, ".npz", [args.model, args.x0])
    x0 = load_array(args.x0)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    with stage("loading the model"):
        src = SourceModel(args.model)
    memory.fixed_shapes(src, shape)
    # a batch [N, *sample] has the model input's rank (batch axis included); one point has one axis fewer
    rank = len(src.inputs[0].type.tensor_type.shape.dim) or 2
    points = len(x0) if x0.ndim >= rank else 1
    if args.optimize_slopes:  # always the graph lowering, with a gradient graph and per-neuron slopes
        from ..passes.alpha_crown import working_set
        need = working_set(src, shape, points)
    else:
        need = memory.bound_working_set(src, shape, points)
    memory.check(need, f"bound for {points} point(s)" + (" with optimised slopes" if args.optimize_slopes else ""),
                 "Give fewer points in --x0, a smaller --input-shape or no --optimize-slopes", args.max_memory)
    # progress: the stage notes jacgraph.cli prints (point i of N included), not a second tqdm bar beside them
    r = bound(src, x0, args.eps, norm=args.norm, method=args.method, optimize_slopes=args.optimize_slopes,
              input_shape=shape, threads=args.threads or None,
              progress=False)
    require_finite("the Jacobian bound", r["J_lower"], r["J_upper"], r["lipschitz"], r["induced"])
    if args.output:
        save_npz(args.output, {**r, "norm": np.array(args.norm), "method": np.array(args.method)},
                 [args.model, args.x0])
    q = {"inf": "1", "2": "2"}[args.norm]
    if args.json:
        print_json({"norm": args.norm, "dual_norm": q, "method": args.method, "optimize_slopes": args.optimize_slopes,
                    "eps": r["eps"],
                    "lipschitz": r["lipschitz"], "induced": r["induced"],
                    "mean_width": (r["J_upper"] - r["J_lower"]).mean(axis=(1, 2)), "wrote": args.output})
        return 0
    for n in range(len(r["eps"])):
        slopes = f", slopes optimised by {args.optimize_slopes} steps" if args.optimize_slopes else ""
        print(f"point {n}: l_{args.norm} ball of radius {r['eps'][n]:g}, {args.method} bounds{slopes}, "
              f"mean width {np.mean(r['J_upper'][n] - r['J_lower'][n]):.4g}")
        for i, L in enumerate(r["lipschitz"][n]):
            print(f"  output {i}: local Lipschitz bound (max ||grad y_{i}||_{q}) {L:.6g}")
        print(f"  whole Jacobian: ||J||_{args.norm}->{args.norm} <= {r['induced'][n]:.6g}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def add_bound(sub):
    from ..passes.recurjac import METHODS, NORMS

    p = sub.add_parser("bound", help="sound Jacobian bounds and local Lipschitz constants over an input ball",
                       description="Elementwise bounds on MODEL's Jacobian over the ball of radius --eps around each "
                                   "point of --x0, and the local Lipschitz constants they give. Prints them; "
                                   "-o writes J_lower, J_upper, lipschitz, induced, eps, norm, method to a .npz. "
                                   "Work past 2 s prints its stage on stderr (loading, lowering, emitting the bound "
                                   "graph, creating the session, point i of N); one point is one onnxruntime "
                                   "session run, which reports nothing until it ends.")
    p.add_argument("model", help="the source ONNX model (one float input and one output; `jacgraph inspect` says "
                                 "whether the bound passes take it)")
    p.add_argument("--x0", required=True, help=".npy file: one point (the model's per-sample shape) or a batch [N, ...]")
    p.add_argument("--eps", required=True, type=real(low=0), help="radius of the ball around each point (>= 0)")
    p.add_argument("--norm", choices=NORMS, default="inf", help="the ball's norm (default inf)")
    p.add_argument("--method", choices=METHODS, default="recurjac",
                   help="recurjac (default) or interval (the plain interval chain, for comparison)")
    p.add_argument("--input-shape", help="fixed input shape when the model's is symbolic, e.g. 1,3,32,32")
    p.add_argument("--optimize-slopes", type=integer(0), default=0, metavar="N",
                   help="optimise the lower-line slopes of the ReLU/LeakyReLU relaxations (alpha-CROWN) by N "
                        "projected gradient (Adam) steps per point, the gradient from jacgraph's VJP of the bound graph: "
                        "one slope per bounded neuron and side where a back-substitution runs at once, one per unit "
                        "where it runs in chunks of rows (large CNNs); "
                        "every step's bounds are sound and the elementwise best are kept, so they are never wider than "
                        "without. Costs about N runs of the bound and gradient graphs per point; uses the graph "
                        "lowering. Default 0: off (CROWN's slopes)")
    add_output(p, "write J_lower, J_upper, lipschitz, induced, eps to this .npz")
    add_common(p, memory=True)
    p.set_defaults(func=cmd_bound)


# ---- lipschitz ----------------------------------------------------------------------------------

def cmd_lipschitz(args) -> int:
    from ..passes.lipschitz import analyze

    shape = parse_shape(args.input_shape) if args.input_shape else None
    memory.fixed_shapes(SourceModel(args.model), shape)
    report = analyze(args.model, method=args.method, input_shape=shape, iterations=args.iterations,
                     exact_limit=args.exact_limit, top_k=args.top_k, seed=args.seed)
    results = [r for r in (report.autolip, report.seqlip, report.lipsdp) if r and "skipped" not in r]
    require_finite("the Lipschitz bound", *[r[k] for r in results for k in ("bound", "estimate", "value")
                                            if isinstance(r.get(k), (int, float))])
    if args.json:
        print_json(report.as_dict())
    else:
        print_lipschitz(report)
    return 0


def print_lipschitz(report):
    if report.layers:
        print(f"{'layer':>5} {'op':16s} {'in -> out':24s} {'act':11s} {'norm (estimate)':>16s} {'bound':>13s} {'via':8s} {'time s':>8s}")
        for r in report.layers:
            shapes = f"{'x'.join(map(str, r['in']))} -> {'x'.join(map(str, r['out']))}"
            print(f"{r['layer']:>5} {r['op'][:16]:16s} {shapes:24s} {str(r['activation']):11s} {r['norm_estimate']:16.8g} "
                  f"{r['bound']:13.8g} {r['bound_method']:8s} {r['power_seconds'] + r['bound_seconds']:8.3f}")
    if report.seqlip and report.seqlip["pairs"]:
        print(f"\n{'pair':>7} {'units':>6} {'factor':>13s} {'bound':>13s}  {'search':28s} {'time s':>8s}")
        for p in report.seqlip["pairs"]:
            print(f"{p['pair'][0]:>3}-{p['pair'][1]:<3} {p['units']:6d} {p['value']:13.8g} {p['bound']:13.8g}  "
                  f"{p['method']:28s} {p['seconds']:8.3f}")
    print()
    if report.autolip:
        a = report.autolip
        print(f"AutoLip bound     {a['bound']:.6g}   (guaranteed; {a['seconds']:.2f} s)")
        print(f"AutoLip estimate  {a['estimate']:.6g}   (estimate: power-iteration norms, not a bound)")
    if report.seqlip:
        s = report.seqlip
        if s.get("dag"):  # pairs: chains from node pair[0] into the linear node pair[1]
            print(f"SeqLip bound      {s['bound']:.6g}   (guaranteed: SeqLip on {len(s['pairs'])} chains inside the "
                  f"DAG, AutoLip's rules through its joins and pooling; {s['seconds']:.2f} s)")
        elif s["exact"]:
            print(f"SeqLip bound      {s['bound']:.6g}   (guaranteed: exact search over activation patterns; "
                  f"{s['seconds']:.2f} s)")
        else:
            print(f"SeqLip estimate   {s['value']:.6g}   (estimate: greedy search beyond {s['exact_limit']} units, "
                  f"not a bound; {s['seconds']:.2f} s)")
            print(f"SeqLip bound      {s['bound']:.6g}   (guaranteed: exact pairs, midpoint bound on the others)")
    d = report.lipsdp
    if d and "skipped" in d:
        print(f"LipSDP skipped    ({d['skipped']})")
    elif d:
        how = f"{d['solver']} SDP, {d['rows']} rows" if d["solver"] else d["status"]
        if d["guaranteed"]:
            print(f"LipSDP bound      {d['bound']:.6g}   (guaranteed: the solver's T checked in float64; {how}; "
                  f"{d['seconds']:.2f} s)")
        else:
            print(f"LipSDP bound      none   (the solver's T failed the float64 check; {how})")
        print(f"LipSDP estimate   {d['value']:.6g}   (estimate: the solver's sqrt(rho), not a bound)")


def add_lipschitz(sub):
    from ..passes.seqlip import EXACT_CAP, EXACT_LIMIT, TOP_K

    p = sub.add_parser("lipschitz", help="global l2 Lipschitz upper bounds (AutoLip, SeqLip, LipSDP)",
                       description="Global l2 Lipschitz bounds and estimates of MODEL, each labelled bound "
                                   "(guaranteed) or estimate. Prints them; writes nothing.")
    p.add_argument("model", help="the source ONNX model (a feed-forward chain, or a DAG with residual joins, "
                                 "concat and pooling: AutoLip and SeqLip)")
    p.add_argument("--method", choices=["autolip", "seqlip", "lipsdp", "all"], default="all",
                   help="all: LipSDP only when the model is a chain within its size limit (else skipped with a note)")
    p.add_argument("--input-shape", help="fixed input shape, e.g. 1,3,32,32 (needed for Conv models without one)")
    p.add_argument("--iterations", type=integer(1), default=1000, help="power-iteration cap per layer (default 1000)")
    p.add_argument("--exact-limit", type=integer(0, EXACT_CAP), default=EXACT_LIMIT,
                   help=f"SeqLip: exact search over 2^n patterns up to n units (default {EXACT_LIMIT}, at most {EXACT_CAP})")
    p.add_argument("--top-k", type=integer(1), default=TOP_K,
                   help=f"SeqLip greedy search: singular directions kept (default {TOP_K})")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the power iteration's start (default 0)")
    add_common(p, threads=False)
    p.set_defaults(func=cmd_lipschitz)


# ---- sense --------------------------------------------------------------------------------------

def cmd_sense(args) -> int:
    from ..passes.sensing import sense
    from .files import save_npz_sparse

    check_output(args.output, ".npz", [args.model, args.x0])
    x0 = load_array(args.x0)
    src = SourceModel(args.model)
    try:
        shapes = memory.fixed_shapes(src, x0.shape, (args.inputs or [None])[0])
    except JacgraphError:  # an x0 of the wrong shape: sense() names the declared one
        shapes = memory.fixed_shapes(src, None, (args.inputs or [None])[0])
    m, n = shapes.output_elements, x0.size
    budget = args.budget or 4 * n
    dense = args.pattern == "dense"
    # the calls' outputs and probes, and for the dense pattern an m x n pattern and J
    need = 8.0 * budget * (m + n) + (9.0 * m * n if dense else 0.0) + shapes.activations
    memory.check(need, f"sense with the {args.pattern} pattern", "Give a smaller --budget" +
                 (" or use --pattern structural" if dense else ""), args.max_memory)
    # progress: the stage notes jacgraph.cli prints (forward call i of N, rows done), not a tqdm bar beside them
    res = sense(src.proto, x0, budget=args.budget, robust=args.robust, pattern=args.pattern, step=args.step,
                seed=args.seed, inputs=args.inputs, progress=False)
    require_finite("the sensed Jacobian", res.J if isinstance(res.J, np.ndarray) else res.J.data)
    if args.output:
        save_npz_sparse(args.output, res.J, [args.model, args.x0])
    if args.json:
        print_json({"shape": list(res.J.shape), "pattern": args.pattern, "colours": res.colours,
                    "min_calls": res.min_calls, "calls": res.calls, "robust": res.robust, "step": res.step,
                    "estimated_error": res.estimated_error, "flagged_calls": res.flagged_calls,
                    "corrupted_calls": res.corrupted_calls.tolist(), "fallback_rows": res.fallback_rows,
                    "nonfinite_calls": res.nonfinite_calls, "wrote": args.output})
        return 0
    rows, cols = res.J.shape
    print(f"{args.model}: {rows} x {cols} Jacobian, {args.pattern} pattern, {res.colours} colours "
          f"(minimum {res.min_calls} calls)")
    method = ("L1 regression: least-squares refit on the calls kept, certified by a duality gap" if res.robust
              else "least squares")
    print(f"forward calls used: {res.calls}; recovery: {method}; step {res.step:g}")
    if res.nonfinite_calls:
        print(f"calls that returned NaN/inf (left out): {res.nonfinite_calls}")
    if res.robust:
        print(f"calls flagged as corrupted (in most rows): {res.flagged_calls}"
              + (f" (calls {', '.join(map(str, res.corrupted_calls))}; numbered from 0)" if res.flagged_calls else ""))
        print(f"rows not certified on the fast path (solved by the exact L1 fit, ADMM or HiGHS): {res.fallback_rows}")
    if res.estimated_error is None:
        print("estimated relative error: n/a (no redundant calls; raise --budget above the minimum)")
    else:
        print(f"estimated relative error (from residuals; an estimate, not a bound): {res.estimated_error:.2e}")
    if args.output:
        print(f"wrote {args.output} (scipy.sparse.load_npz; rows: output elements, columns: x elements)")
    return 0


def add_sense(sub):
    from ..passes.sensing import PATTERNS

    p = sub.add_parser("sense", help="recover J(x0) of a black box from forward calls (Jacobian sensing)",
                       description="Recover J(x0) of MODEL from forward calls only. Prints how; -o writes J as a "
                                   "scipy.sparse .npz.")
    p.add_argument("model", help="the ONNX model, called forward only")
    p.add_argument("--x0", required=True, help="the point, a .npy file of the input's shape")
    p.add_argument("--budget", type=integer(1), help="forward calls (default 2*(colours+1), 4*colours with --robust)")
    p.add_argument("--robust", action="store_true", help="L1 regression: tolerates a fraction of corrupted calls")
    p.add_argument("--pattern", choices=PATTERNS, default="structural",
                   help="structural: from the graph (no calls); dense: assume nothing (n colours)")
    p.add_argument("--step", type=real(above=0), help="perturbation size h (> 0; default 1e-3*max(1, rms(x0)))")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the random perturbations (default 0)")
    p.add_argument("--inputs", type=names, help="the float input to perturb (default: the only one)")
    add_output(p, "write J as a scipy.sparse .npz (scipy.sparse.load_npz)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)
    add_common(p, threads=False, memory=True)
    p.set_defaults(func=cmd_sense)
