"""One benchmark over three model suites: jacgraph's JVP (or VJP) against the forward, onnx-ad 0.3 and PyTorch.

    python examples/bench_suite.py [--mode jvp|vjp] [--suite archs,zoo,transformers] [--models resnet18,vgg19]
                                   [--threads 1] [--runs 10] [--budget 60] [--cpu-time] [--warm] [--no-memory]
                                   [--json out.json]
    python examples/bench_suite.py --tables out.json      (the tables of a saved run again)

Suites:
  archs         the 14 PyTorch architectures of examples/architectures.py (batch 1, BatchNorm folded);
  zoo           the onnx "light" model zoo shipped in the onnx wheel (onnx/backend/test/data/light: AlexNet,
                DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512), input
                1x3x224x224, converted from opset 9 to 17 with onnx's version converter (onnx-ad refuses opset 9's
                2-D Softmax). The light files store each large weight as ConstantOfShape(0.02); these are replaced
                by random initializers of the same shape and dtype, seed 0 (He-normal for Conv/Gemm weights,
                uniform(0.5, 1.5) for BatchNormalization scales/variances and the Mul scales DenseNet and
                Inception v2 unfold them into, normal(0, 0.1) for the rest); the small tensors the file keeps
                are used as stored. The Gemm before a final Softmax is scaled (its alpha and beta) to logits of
                standard deviation 1 at the input: random weights saturated resnet50's and shufflenet's Softmax to
                exact 0/1 (J v = 0); logits with no spread to scale are left as they are, and the row's notes
                say so. No PyTorch module exists for these, so there is no PyTorch column;
  transformers  the Hugging Face exports of examples/transformer_exports.py (tiny random configs, legacy exporter,
                opset 17), PyTorch module = the same wrapped model;
  transformers_large  the same architectures at larger sizes (transformer_exports.LARGE: 64 tokens x 256, 224x224
                images), where kernels rather than per-node overhead set the time; not in the default suites.

Per model, with --mode jvp: onnxruntime forward, jacgraph's JVP (the default strategy) and onnx-ad 0.3's
forward-mode graph are timed interleaved in one process (examples/bench_jvp.measure), then torch.func.jvp in a
loop of its own; with --mode vjp: forward, jacgraph's input-gradient and all-parameter VJP, onnx-ad's reverse mode
for the same two, torch.func.vjp and PyTorch forward+backward (examples/bench_vjp.measure). Medians of --runs, at
most: a model whose runs would take more than --budget seconds of the timing clock gets fewer (at least 3), and
the table gives the count. --cpu-time times with the calling thread's CPU time (valid with --threads 1: every
kernel runs in that thread), which leaves out the time other processes hold the core on a shared machine.
--warm runs each call once more, untimed, just before its timed run: interleaved single calls time each graph
right after its neighbour, and a neighbour that streams through tens of MB (onnx-ad's reverse graphs) evicts the
next one's weights, which made the mlp forward 4x slower in --mode vjp; with --warm every graph is timed with its
own data in cache, the same condition for all. Peak
RSS of each graph is measured in a fresh process. A model or comparison that fails is a row or cell saying why;
the run goes on. Goals (issue 14): JVP <= 2.2x forward and onnx-ad / jacgraph >= 1.25 on every model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper, version_converter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import architectures, bench_jvp, bench_vjp, transformer_exports  # noqa: E402
from jacgraph import runtime  # noqa: E402

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
ZOO = {"alexnet": "light_bvlc_alexnet", "densenet121": "light_densenet121", "inception_v1": "light_inception_v1",
       "inception_v2": "light_inception_v2", "resnet50": "light_resnet50", "shufflenet": "light_shufflenet",
       "squeezenet": "light_squeezenet", "vgg19": "light_vgg19", "zfnet512": "light_zfnet512"}
OPSET = 17  # the zoo files are opset 9; converted with onnx's version converter (outputs unchanged: checked)
TRANSFORMERS = list(transformer_exports.MODELS)
JVP_GOAL, ONNX_AD_GOAL = 2.2, 1.25
# timing rounds cost about this many forwards (forward, jacgraph, onnx-ad; and twice that in reverse mode)
ROUND_COST = {"jvp": 8, "vjp": 20}
NOTE_KEY = "bench_suite.note"  # a model's metadata entry saying what the benchmark could not do to it (its row says so)


def _role(name, consumers):
    """How a filled tensor is used: 'weight' (Conv/Gemm input 1), 'scale' (positive: BatchNormalization's scale
    and variance, the Mul a BatchNorm was unfolded into), or 'shift'; through Unsqueeze/Reshape to the user."""
    for op, index, out in consumers.get(name, []):
        if op in ("Unsqueeze", "Reshape") and index == 0:
            return _role(out, consumers)
        if op in ("Conv", "Gemm") and index == 1:
            return "weight"
        if (op == "BatchNormalization" and index in (1, 4)) or op == "Mul":
            return "scale"
    return "shift"


def _random_tensor(rng, shape, dtype, role, transposed):
    if role == "weight":  # He-normal: the activations of a ReLU network keep their scale layer after layer
        fan_in = shape[0] if (len(shape) == 2 and not transposed) else int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(dtype)
    if role == "scale":
        return rng.uniform(0.5, 1.5, shape).astype(dtype)
    return (0.1 * rng.standard_normal(shape)).astype(dtype)


def zoo_model(name, seed=0):
    """(model, x): the light zoo model with random weights in place of its ConstantOfShape fills (see above);
    inputs reduced to the image (the file also lists its initializers as inputs)."""
    # opset 9 -> 17 first, while the weights are still fills (fast): onnx-ad refuses opset 9's 2-D Softmax
    model = version_converter.convert_version(onnx.load(os.path.join(LIGHT, ZOO[name] + ".onnx")), OPSET)
    graph, rng = model.graph, np.random.default_rng(seed)
    stored = {t.name: t for t in graph.initializer}
    consumers = {}
    for node in graph.node:
        for i, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append((node.op_type, i, node.output[0]))
    transposed = {node.input[1] for node in graph.node if node.op_type == "Gemm"
                  and any(a.name == "transB" and a.i for a in node.attribute)}
    nodes, filled = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in stored:
            shape = tuple(numpy_helper.to_array(stored[node.input[0]]))
            dtype = helper.tensor_dtype_to_np_dtype(node.attribute[0].t.data_type) if node.attribute else np.float32
            out = node.output[0]
            value = _random_tensor(rng, shape, dtype, _role(out, consumers), out in transposed)
            filled.append(numpy_helper.from_array(value, out))
        else:
            nodes.append(node)
    used = {i for node in nodes for i in node.input}
    kept = [t for t in graph.initializer if t.name in used] + filled
    data = [i for i in graph.input if i.name not in stored]
    del graph.node[:], graph.initializer[:], graph.input[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept)
    graph.input.extend(data)
    model.ir_version = max(model.ir_version, 4)  # initializers that are not graph inputs need IR 4
    onnx.checker.check_model(model)
    dims = [d.dim_value for d in data[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    _unsaturate(model, x)
    return model, x


def _unsaturate(model, x):
    """Scale the Gemm that feeds a final Softmax so that its logits at x have unit standard deviation. With random
    weights the residual sums grow block after block: resnet50's and shufflenet's Softmax gave exact 0s and a 1,
    so J v was exactly 0 and the check against onnx-ad compared zeros. The shapes, and so the timings, are the
    same. Logits of no spread at x (all equal: zero weights, say) have no scale to divide by: the model is left
    unchanged and says so in its metadata (NOTE_KEY), which the benchmark row's notes repeat."""
    last = model.graph.node[-1]
    gemm = next((n for n in model.graph.node if last.input[0] in n.output), None)
    if last.op_type != "Softmax" or gemm is None or gemm.op_type != "Gemm":
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(last.input[0], onnx.TensorProto.FLOAT, None))
    logits = runtime.run(probe, {model.graph.input[0].name: x}, [last.input[0]])[last.input[0]]
    spread = float(logits.astype(np.float64).std())
    if not spread > np.finfo(np.float32).eps * float(np.abs(logits).max()):  # no spread beyond rounding, or NaN
        model.metadata_props.add(key=NOTE_KEY, value=f"classifier not rescaled (its logits at x have spread "
                                                     f"{spread:.1e}: nothing to scale by)")
        return
    for name in ("alpha", "beta"):  # Y = alpha·A·B + beta·C: both scaled
        attr = next((a for a in gemm.attribute if a.name == name), None)
        if attr is None:
            gemm.attribute.append(helper.make_attribute(name, 1.0 / spread))
        else:
            attr.f /= spread


def _arch(name, folder):
    path = os.path.join(folder, name + ".onnx")
    architectures.export(name, path, batch=1)
    return onnx.load(path), architectures.example_input(name, batch=1).numpy(), architectures.build(name)


def _transformer(name, _folder):
    module, x = transformer_exports.build(name)
    with warnings.catch_warnings():  # the tracer's warnings about Python branches on shapes: fixed shapes here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return transformer_exports.export(module, x, "legacy"), x, module


def _zoo(name, _folder):
    return (*zoo_model(name), None)


SUITES = {"archs": (list(architectures.ARCHITECTURES), _arch), "zoo": (list(ZOO), _zoo),
          "transformers": (TRANSFORMERS, _transformer),
          "transformers_large": (list(transformer_exports.LARGE), _transformer)}


def runs_for(source, x, mode, args, clock):
    """--runs, or fewer (but at least 3) when that many rounds would take more than --budget seconds."""
    sess = runtime.session(source, threads=args.threads)
    feeds = {source.graph.input[0].name: x}
    sess.run(None, feeds)
    t0 = clock()
    sess.run(None, feeds)
    round_s = (clock() - t0) * ROUND_COST[mode] * (2 if args.warm else 1)
    return min(args.runs, max(3, int(args.budget / max(round_s, 1e-9))))


def bench_model(suite, name, mode, args, clock, folder):
    row = {"suite": suite, "name": name}
    t0 = time.perf_counter()
    try:
        source, x, module = SUITES[suite][1](name, folder)
        row.update({"note": p.value for p in source.metadata_props if p.key == NOTE_KEY})
        row["runs"] = runs_for(source, x, mode, args, clock)
        measure = bench_jvp.measure if mode == "jvp" else bench_vjp.measure
        row.update(measure(source, x, module, args.threads, row["runs"], clock, True, memory=not args.no_memory,
                           warm=args.warm, **({"strategies": [bench_jvp.DEFAULT]} if mode == "jvp" else {})))
    except Exception as e:  # pylint: disable=broad-exception-caught  # one model's failure is a row, not the end
        row["error"] = bench_jvp.failure(e)
    row["seconds"] = time.perf_counter() - t0
    return row


def ms_cell(row, key):
    """A table cell: row[key] in ms, or '—' where the row has no such number (the notes say why)."""
    return f"{row[key]:.3f}" if key in row else "—"


def ratio_cell(row, key, goal=None, at_most=True):
    """A table cell: the ratio row[key], with 'ok' / '**miss**' against goal when one is given; '—' if absent."""
    if key not in row:
        return "—"
    if goal is None:
        return f"{row[key]:.2f}"
    met = row[key] <= goal if at_most else row[key] >= goal
    return f"{_near(row[key], goal)} {'ok' if met else '**miss**'}"


def _near(value, goal):
    """value to 2 digits, or 3 where 2 would print the goal itself (1.247 misses 1.25: not '1.25')."""
    return f"{value:.3f}" if round(value, 2) == goal else f"{value:.2f}"


def memory_cell(row, keys):
    """A table cell: the peak RSS (MB) of each graph in keys, '—' for one not measured."""
    return ", ".join(f"{row[k + '_peak_mb']:.0f}" if k + "_peak_mb" in row else "—" for k in keys)


def notes_cell(row):
    """A table cell: why a number is missing (each *error of the row) and which comparisons disagree."""
    notes = [row["note"]] if "note" in row else []  # about the model itself (see _unsaturate)
    notes += [f"{k[:-6] if k.endswith('_error') else k}: {v}" for k, v in row.items() if k.endswith("error")]
    notes += [f"{k[:-len('_difference')]}: differs from jacgraph's by {v:.1e}" for k, v in row.items()
              if k.endswith("_difference") and not v <= 1e-3]  # NaN (a NaN or inf result) is a note too
    return "; ".join(notes).replace("|", "/")


JVP_COLUMNS = ["model", "runs", "forward ms", "jacgraph JVP ms", "JVP / forward (goal <= 2.2)", "onnx-ad JVP ms",
               "onnx-ad / forward", "onnx-ad / jacgraph (goal >= 1.25)", "torch.func.jvp ms",
               "torch.func.jvp / jacgraph", "peak RSS MB: forward, JVP, onnx-ad", "notes"]
VJP_COLUMNS = ["model", "runs", "forward ms", "VJP x ms", "VJP x / forward", "onnx-ad x ms", "onnx-ad x / jacgraph",
               "VJP params ms", "VJP params / forward", "onnx-ad params ms", "onnx-ad params / jacgraph",
               "torch.func.vjp x ms", "PyTorch fwd+bwd ms", "PyTorch fwd+bwd / jacgraph params",
               "peak RSS MB: forward, VJP x, VJP params", "notes"]


def _jvp_cells(r):
    return [ms_cell(r, "forward_ms"), ms_cell(r, f"{bench_jvp.DEFAULT}_ms"),
            ratio_cell(r, f"{bench_jvp.DEFAULT}_ratio", JVP_GOAL), ms_cell(r, "onnx_ad_ms"),
            ratio_cell(r, "onnx_ad_ratio"), ratio_cell(r, "onnx_ad_over_jvp", ONNX_AD_GOAL, at_most=False),
            ms_cell(r, "torch_jvp_ms"), ratio_cell(r, "torch_over_jvp"), memory_cell(r, ["forward", "jvp", "onnx_ad"])]


def _vjp_cells(r):
    r = {**r, **bench_vjp.peer_ratios(r)}  # rows saved before the row carried them, and bench_cuda.py's
    return [ms_cell(r, "forward_ms"), ms_cell(r, "vjp_x_ms"), ratio_cell(r, "vjp_x_ratio"),
            ms_cell(r, "onnx_ad_x_ms"), ratio_cell(r, "onnx_ad_x_over_vjp"), ms_cell(r, "vjp_params_ms"),
            ratio_cell(r, "vjp_params_ratio"), ms_cell(r, "onnx_ad_params_ms"),
            ratio_cell(r, "onnx_ad_params_over_vjp"), ms_cell(r, "torch_x_ms"), ms_cell(r, "torch_fwd_bwd_ms"),
            ratio_cell(r, "torch_fwd_bwd_over_vjp"), memory_cell(r, ["forward", "vjp_x", "vjp_params"])]


# per mode: the ratios whose median over a suite is reported (key, label)
MEDIANS = {"jvp": [(f"{bench_jvp.DEFAULT}_ratio", "JVP / forward"), ("onnx_ad_ratio", "onnx-ad / forward"),
                   ("onnx_ad_over_jvp", "onnx-ad / jacgraph"), ("torch_over_jvp", "torch.func.jvp / jacgraph")],
           "vjp": [("vjp_x_ratio", "VJP x / forward"), ("onnx_ad_x_ratio", "onnx-ad x / forward"),
                   ("vjp_params_ratio", "VJP params / forward"), ("onnx_ad_params_ratio", "onnx-ad params / forward"),
                   ("torch_fwd_bwd_ratio", "PyTorch fwd+bwd / forward"),
                   ("onnx_ad_x_over_vjp", "onnx-ad x / jacgraph"),
                   ("onnx_ad_params_over_vjp", "onnx-ad params / jacgraph"),
                   ("torch_fwd_bwd_over_vjp", "PyTorch fwd+bwd / jacgraph params")]}


def medians(rows, mode):
    """{label: median over the rows that have it} of the mode's ratios."""
    out = {}
    rows = [{**r, **bench_vjp.peer_ratios(r)} for r in rows] if mode == "vjp" else rows  # as in _vjp_cells
    for key, label in MEDIANS[mode]:
        values = [r[key] for r in rows if key in r]
        if values:
            out[label] = float(np.median(values))
    return out


def goal_misses(rows):
    """JVP rows missing a goal: 'model: what' strings."""
    misses = []
    for r in rows:
        ratio = r.get(f"{bench_jvp.DEFAULT}_ratio")
        if ratio is not None and ratio > JVP_GOAL:
            misses.append(f"{r['name']}: JVP / forward {_near(ratio, JVP_GOAL)} > {JVP_GOAL}")
        if r.get("onnx_ad_over_jvp") is not None and r["onnx_ad_over_jvp"] < ONNX_AD_GOAL:
            shown = _near(r["onnx_ad_over_jvp"], ONNX_AD_GOAL)
            misses.append(f"{r['name']}: onnx-ad / jacgraph {shown} < {ONNX_AD_GOAL}")
    return misses


def table(rows, mode):
    columns, cells = (JVP_COLUMNS, _jvp_cells) if mode == "jvp" else (VJP_COLUMNS, _vjp_cells)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        body = cells(r) if "error" not in r else ["—"] * (len(columns) - 3)
        lines.append("| " + " | ".join([r["name"], str(r.get("runs", "—"))] + body + [notes_cell(r)]) + " |")
    lines.append("")
    lines.append("medians: " + ", ".join(f"{k} {v:.2f}" for k, v in medians(rows, mode).items()))
    return "\n".join(lines)


def save_json(path, data):
    """Write data to path whole or not at all (a temporary file, then a rename). A NaN or inf (a difference against
    onnx-ad when one result is not finite) is written as JSON's NaN/Infinity, which json.load reads back; the tables
    flag it in the notes."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def selected(args):
    """[(suite, name)] in suite order; an unknown suite or model name is an error naming the known ones."""
    suites = args.suite.split(",")
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"bench_suite: unknown suite {s!r}; the suites are {', '.join(SUITES)}.")
    pairs = [(s, n) for s in suites for n in SUITES[s][0]]
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {n for _, n in pairs})
        if unknown:
            raise SystemExit(f"bench_suite: no model {', '.join(unknown)} in suites {args.suite}; they have "
                             f"{', '.join(n for _, n in pairs)}.")
        pairs = [(s, n) for s, n in pairs if n in wanted]
    return pairs


def report(rows, settings):
    """The tables of one run (its rows and settings), per suite, and the goal misses."""
    mode = settings["mode"]
    before, after = settings["load_average"]
    where = settings.get("provider", "CPU") + (f" ({settings['device']})" if "device" in settings else "")
    print(f"\n{mode.upper()}, onnxruntime {settings['onnxruntime']} {where}, threads={settings['threads']}, batch 1, "
          f"median of the runs given, interleaved{' (warm)' if settings.get('warm') else ''}, {settings['clock']}; "
          f"1-minute load average {before:.1f} -> "
          f"{after:.1f}; {settings['date']}")
    for suite in dict.fromkeys(r["suite"] for r in rows):
        print(f"\n### {suite}\n")
        print(table([r for r in rows if r["suite"] == suite], mode))
    if mode == "jvp":
        misses = goal_misses([r for r in rows if "error" not in r])
        print("\ngoal misses:" + ("".join(f"\n- {m}" for m in misses) if misses else " none"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["jvp", "vjp"], default="jvp")
    p.add_argument("--suite", default="archs,zoo,transformers", help="comma-separated: " + ", ".join(SUITES))
    p.add_argument("--models", help="comma-separated model names (default: every model of the suites)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="timed rounds per model, at most (median)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timing per model: fewer rounds (at least 3) where --runs would take longer")
    p.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time (use with --threads 1)")
    p.add_argument("--warm", action="store_true",
                   help="run each call once untimed just before its timed run (each timed with its data in cache)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes (a fresh process per graph)")
    p.add_argument("--json", help="write the rows and the run's settings to this JSON file")
    p.add_argument("--tables", metavar="JSON", help="print the tables of a run saved with --json; run nothing")
    args = p.parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            saved = json.load(f)
        report(saved["rows"], saved["settings"])
        return
    pairs = selected(args)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    load_before = os.getloadavg()[0]
    rows = []

    def settings():
        return {"mode": args.mode, "threads": args.threads, "max_runs": args.runs, "budget_s": args.budget,
                "warm": args.warm, "clock": "thread CPU time" if args.cpu_time else "wall clock",
                "load_average": [load_before, os.getloadavg()[0]],
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as folder:
        for suite, name in pairs:
            rows.append(bench_model(suite, name, args.mode, args, clock, folder))
            r = rows[-1]
            status = r.get("error") or ", ".join(f"{label} {r[key]:.2f}" for key, label in MEDIANS[args.mode]
                                                 if key in r)
            print(f"[{suite}] {name}: {status} ({r.get('runs', 0)} runs, {r['seconds']:.0f} s)", flush=True)
            if args.json:  # after every model: a long run stopped early keeps the rows it has
                save_json(args.json, {"settings": settings(), "rows": rows})
    report(rows, settings())


if __name__ == "__main__":
    main()
