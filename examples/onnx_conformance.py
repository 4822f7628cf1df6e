"""ONNX's node conformance cases, differentiated by jacgraph and by onnx-ad, checked in float64.

    python examples/onnx_conformance.py                       # every case, both tools, writes the docs page
    python examples/onnx_conformance.py --ops Gather,Pad --tools jacgraph --no-markdown
    python examples/onnx_conformance.py --json out.json --timeout 120 --jobs 2

Cases: `onnx.backend.test.case.node.collect_testcases()`, the default-domain ones (not the
`_expanded` copies) with a floating-point graph input that the operator schema does not mark
non-differentiable and that reaches a floating-point output. The point is the case's own input.

Oracle: the case's model copied to float64 (jacgraph.testing.to_float64) and run by onnx's
ReferenceEvaluator. Its forward must match the case's expected outputs first. Then for one random
direction v, central differences at h and 10h and one-sided differences at h; the case is
skipped (and counted) only when the oracle itself is unstable: the two central differences
disagree beyond the pass tolerance, the one-sided ones disagree beyond 1e-3 (a kink or tie at the
point, where no derivative exists), or a value is not finite.

Checks per tool (each emitted model is copied to float64 and run by the same evaluator):
  jvp  relative error ‖ẏ - CD_h‖ / ‖CD_h‖ <= 1e-6 over the outputs.
  vjp  dot-product identity Σ⟨ū, CD_h⟩ = Σ⟨x̄, v⟩ for a random ū: |difference| <= 1e-6·max(‖ū‖‖CD_h‖, ‖x̄‖‖v‖),
       the Cauchy-Schwarz bound on what a relative error of the differences can move the inner product by.
  hvp  the JVP of the tool's own VJP graph against central differences of that VJP graph.
Tolerance: float64 central differences at h = 1e-6 carry ~1e-10 round-off and O(h²) truncation,
and agreement with the 10h difference to 1e-6 bounds that truncation at ~1e-8; 1e-6 therefore
leaves two orders of margin while any wrong term (a missing product, a wrong index) shows at O(1).
Emitted graphs are also loaded in onnxruntime (CPU, all optimizations) as emitted; that result is
reported beside the numbers.

onnx-ad (https://pypi.org/project/onnx-ad/, import name onnx_ad) is the comparison; it is installed
by this script if missing (`pip install onnx-ad==0.3.0`) and is never a dependency of jacgraph.
Each case runs in a worker process under a time limit, so one hanging case cannot stall the run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jacgraph.testing import reference_session, to_float64  # noqa: E402

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
TOL = 1e-6          # pass tolerance (see the module docstring)
KINK_TOL = 1e-3     # one-sided differences disagreeing beyond this: no derivative at the point
H = 1e-6
ONNX_AD_VERSION = "0.3.0"
TOOLS = ("jacgraph", "onnx-ad")
CHECKS = ("jvp", "vjp", "hvp")
DOC_PAGE = os.path.join(ROOT, "docs", "benchmarks", "conformance.md")
LATEST_JSON = "/tmp/conformance_latest.json"


# ---- the cases ---------------------------------------------------------------------------------

def _subgraph_names(graph):
    names = set()
    for node in graph.node:
        names |= _node_reads(node)
    return names


def _node_reads(node):
    """Every value a node reads, including the outer-scope names its subgraphs (If/Loop/Scan) use."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
            names |= _subgraph_names(g)
    return names


def _is_float(value_info):
    t = value_info.type
    return t.HasField("tensor_type") and t.tensor_type.elem_type in FLOAT_TYPES


def differentiable_inputs(model):
    """Float graph inputs that some node reads through an input its schema does not mark non-differentiable.

    An input whose schema type is tensor(float) itself, not the op's type variable (Resize/Upsample scales),
    is a parameter of the op, not data: it is not differentiated (nor widened by the float64 copy).
    """
    from onnx.defs import OpSchema

    graph = model.graph
    opsets = {i.domain or "": i.version for i in model.opset_import}
    inits = {t.name for t in graph.initializer}
    chosen = []
    for inp in graph.input:
        if inp.name in inits or not _is_float(inp):
            continue
        for node in graph.node:
            if inp.name not in _node_reads(node):
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain or "", 1), node.domain or "")
            except onnx.defs.SchemaError:
                chosen.append(inp.name)
                break
            slots = [k for k, name in enumerate(node.input) if name == inp.name]
            formals = [schema.inputs[min(k, len(schema.inputs) - 1)] for k in slots if schema.inputs]
            if not slots or any(f.differentiation_category != OpSchema.DifferentiationCategory.NonDifferentiable
                                and f.type_str != "tensor(float)" for f in formals):
                chosen.append(inp.name)
                break
    return chosen


def reached_float_outputs(model, xs):
    active = set(xs)
    for node in model.graph.node:
        if _node_reads(node) & active:
            active.update(o for o in node.output if o)
    return [o.name for o in model.graph.output if _is_float(o) and o.name in active]


def case_op(model):
    """The operator a case tests: its one node, or the node that is not Constant in a small graph."""
    ops = [n.op_type for n in model.graph.node if n.op_type != "Constant"] or [model.graph.node[0].op_type]
    return ops[-1] if len(set(ops)) > 1 else ops[0]


def collect(ops=None, names=None):
    """[(name, op, model, xs, ys, inputs, expected)] for the cases this benchmark differentiates."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        testcases = collect_testcases(None)
    out = []
    for tc in testcases:
        if tc.kind != "node" or tc.model is None or "_expanded" in tc.name or not tc.data_sets:
            continue
        model = tc.model
        if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
            continue
        xs = differentiable_inputs(model)
        ys = reached_float_outputs(model, xs)
        if not xs or not ys:
            continue
        op = case_op(model)
        if (ops and op not in ops) or (names and tc.name not in names):
            continue
        inputs, expected = tc.data_sets[0]
        out.append((tc.name, op, model, xs, ys, list(inputs), list(expected)))
    return out


# ---- the float64 oracle ------------------------------------------------------------------------

class OracleUnstable(Exception):
    """The reference itself gives no usable derivative here; the case is skipped and counted."""


def _float64(value):
    a = np.asarray(value)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16" else a


def _norm(values):
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in values)))


def rel_err(actual: dict, expected: dict, scale: float) -> float:
    """‖a - e‖ / max(‖e‖, 1e-10·(1 + scale)) over every name of `expected` (the floor only guards a zero e)."""
    diff = _norm([np.asarray(actual[k], np.float64) - np.asarray(expected[k], np.float64) for k in expected])
    return diff / max(_norm(expected.values()), 1e-10 * (1.0 + scale))


class Oracle:
    """Central differences of a float64 copy of `model` run by onnx's ReferenceEvaluator."""

    def __init__(self, model):
        self.model = to_float64(model)
        self.sess = reference_session(self.model)
        self.names = [o.name for o in self.model.graph.output]

    def __call__(self, feeds):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return dict(zip(self.names, self.sess.run(None, feeds)))

    def derivative(self, feeds, directions, outputs):
        """CD_h of `outputs` along `directions`, after the stability checks (OracleUnstable otherwise)."""
        def at(step):
            moved = {k: (v + step * directions[k] if k in directions else v) for k, v in feeds.items()}
            out = self(moved)
            return {y: np.asarray(out[y], np.float64) for y in outputs}

        try:
            f0, fp, fm, fp10, fm10 = at(0.0), at(H), at(-H), at(10 * H), at(-10 * H)
        except Exception as e:
            raise OracleUnstable(f"the reference cannot run at a perturbed point: {one_line(e)}") from None
        if not all(np.all(np.isfinite(v)) for f in (f0, fp, fm, fp10, fm10) for v in f.values()):
            raise OracleUnstable("the reference gives a non-finite value at or near the point")
        if any(fp[y].shape != f0[y].shape or fm[y].shape != f0[y].shape for y in outputs):
            raise OracleUnstable("the output shape changes under the perturbation")
        cd = {y: (fp[y] - fm[y]) / (2 * H) for y in outputs}
        cd10 = {y: (fp10[y] - fm10[y]) / (20 * H) for y in outputs}
        scale = _norm(f0.values())
        drift = rel_err(cd10, cd, scale)
        if drift > TOL:
            raise OracleUnstable(f"central differences at h and 10h disagree by {drift:.1e}")
        ahead = {y: (fp[y] - f0[y]) / H for y in outputs}
        behind = {y: (f0[y] - fm[y]) / H for y in outputs}
        kink = rel_err(ahead, behind, scale)
        if kink > KINK_TOL:
            raise OracleUnstable(f"one-sided differences disagree by {kink:.1e} (a kink or tie at the point)")
        return cd, scale


# ---- the tools ---------------------------------------------------------------------------------

def ensure_onnx_ad():
    """Import onnx_ad, installing onnx-ad 0.3.0 with pip first if it is missing."""
    try:
        return importlib.import_module("onnx_ad")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"onnx-ad=={ONNX_AD_VERSION}"], check=True)
        importlib.invalidate_caches()
        return importlib.import_module("onnx_ad")


class Emitted:
    """An emitted derivative model and how to feed it: seed names, result names, seed layout."""

    def __init__(self, model, seeds: dict, results: dict, trailing_axes: int = 0):
        self.model, self.seeds, self.results, self.trailing = model, seeds, results, trailing_axes

    def run(self, primal_feeds: dict, seed_values: dict) -> dict:
        feeds = dict(primal_feeds)
        for name, value in seed_values.items():
            feeds[self.seeds[name]] = value.reshape(value.shape + (1,) * self.trailing)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            sess = reference_session(to_float64(self.model))
            out = dict(zip([o.name for o in self.model.graph.output], sess.run(None, feeds)))
        return {name: np.asarray(out[r], np.float64).reshape(np.shape(out[r])[:np.ndim(out[r]) - self.trailing])
                for name, r in self.results.items()}


def jacgraph_derivative(model, mode, xs, ys):
    import jacgraph

    if mode == "jvp":
        m = jacgraph.compile(model, emit="jvp", inputs=xs)
        props = {p.key: p.value for p in m.metadata_props}
        seeds = dict(json.loads(props["jacgraph.tangent_inputs"]))
        results = {y: d for y, d in json.loads(props["jacgraph.tangent_outputs"]) if y in ys}
        return Emitted(m, seeds, results)
    m = jacgraph.compile(model, emit="vjp", inputs=xs)
    props = {p.key: p.value for p in m.metadata_props}
    seeds = {y: bar for y, bar in json.loads(props["jacgraph.cotangent_inputs"]) if y in ys}
    results = {x: bar for x, bar in json.loads(props["jacgraph.gradient_outputs"]) if x in xs}
    return Emitted(m, seeds, results)


def onnx_ad_derivative(model, mode, xs, ys):
    """onnx-ad's forward/reverse with layout='onnx': one seed as a trailing axis of size 1."""
    onnx_ad = ensure_onnx_ad()
    before = {i.name for i in model.graph.input}
    if mode == "jvp":
        m = onnx_ad.forward(model, inputs=xs, outputs=ys, layout="onnx")
    else:
        m = onnx_ad.reverse(model, inputs=xs, outputs=ys, layout="onnx")
    new_inputs = [i.name for i in m.graph.input if i.name not in before]
    new_outputs = [o.name for o in m.graph.output][len(model.graph.output):]
    seeded, results_for = (xs, ys) if mode == "jvp" else (ys, xs)
    return Emitted(m, dict(zip(seeded, new_inputs)), dict(zip(results_for, new_outputs)), trailing_axes=1)


DERIVATIVE = {"jacgraph": jacgraph_derivative, "onnx-ad": onnx_ad_derivative}


def ort_loads(model):
    """'' when onnxruntime (CPU, all optimizations) builds a session for the model as emitted, else why not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return ""
    except Exception as e:  # report, do not fail the case on it
        return one_line(e)


def one_line(e) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# ---- one case ----------------------------------------------------------------------------------

def seeded_rng(name, salt):
    return np.random.default_rng(zlib.crc32(f"{name}/{salt}".encode()))


def random_like(rng, values: dict, names):
    return {n: rng.standard_normal(np.shape(values[n])) for n in names}


def check_tool(tool, model, xs, ys, feeds, oracle, v, cd, scale, rng, checks):
    """{check: {'ok': bool, 'error': float|None, 'reason': str, 'ort': str}} for one tool on one case."""
    out = {}
    derive = DERIVATIVE[tool]
    for mode in ("jvp", "vjp"):
        if mode not in checks:
            continue
        try:
            emitted = derive(model, mode, xs, ys)
            if mode == "jvp":
                got = emitted.run(feeds, v)
                bad = [y for y in ys if got[y].shape != cd[y].shape]
                if bad:
                    raise ValueError(f"tangent of {bad[0]} has shape {got[bad[0]].shape}, expected {cd[bad[0]].shape}")
                err = rel_err(got, cd, scale)
            else:
                u = random_like(rng, cd, ys)
                got = emitted.run(feeds, u)
                bad = [x for x in xs if got[x].shape != np.shape(v[x])]
                if bad:
                    raise ValueError(f"cotangent of {bad[0]} has shape {got[bad[0]].shape}, expected {np.shape(v[bad[0]])}")
                lhs = sum(float(np.sum(u[y] * cd[y])) for y in ys)
                rhs = sum(float(np.sum(got[x] * v[x])) for x in xs)
                # a central-difference error ε‖CD‖ moves lhs by at most ε‖ū‖‖CD‖ (Cauchy-Schwarz): that is the scale
                bound = max(_norm(u.values()) * _norm(cd.values()), _norm(got.values()) * _norm(v.values()))
                err = abs(lhs - rhs) / max(bound, 1e-10 * (1.0 + scale))
            out[mode] = {"ok": bool(err <= TOL), "error": err, "reason": "" if err <= TOL else f"wrong: error {err:.1e}",
                         "ort": ort_loads(emitted.model)}
        except Exception as e:
            out[mode] = {"ok": False, "error": None, "reason": one_line(e), "ort": ""}
    if "hvp" in checks:
        out["hvp"] = check_hvp(tool, model, xs, ys, feeds, {y: cd[y].shape for y in ys}, rng, out.get("vjp"))
    return out


def check_hvp(tool, model, xs, ys, feeds, y_shapes, rng, vjp_result):
    """The tool's JVP of its own VJP graph against central differences of that VJP graph."""
    if vjp_result is not None and not vjp_result["ok"]:
        return {"ok": False, "error": None, "reason": "n/a: the VJP failed", "ort": ""}
    try:
        reverse = DERIVATIVE[tool](model, "vjp", xs, ys)
        rmodel = reverse.model
        ybar = {y: rng.standard_normal(y_shapes[y]) for y in ys}
        ybar = {y: v.reshape(v.shape + (1,) * reverse.trailing) for y, v in ybar.items()}
        rfeeds = dict(feeds)
        rfeeds.update({reverse.seeds[y]: ybar[y] for y in ys})
        rxs = list(xs) + [reverse.seeds[y] for y in ys]
        rys = [reverse.results[x] for x in xs]
        rmodel_typed = onnx.shape_inference.infer_shapes(rmodel)
        oracle = Oracle(rmodel_typed)
        dirs = random_like(rng, rfeeds, rxs)
        cd, scale = oracle.derivative(rfeeds, dirs, rys)
        forward = DERIVATIVE[tool](rmodel_typed, "jvp", rxs, rys)
        got = forward.run(rfeeds, dirs)
        err = rel_err(got, cd, scale)
        return {"ok": bool(err <= TOL), "error": err, "reason": "" if err <= TOL else f"wrong: error {err:.1e}",
                "ort": ort_loads(forward.model)}
    except OracleUnstable as e:
        return {"ok": False, "error": None, "reason": f"skipped: {e}", "ort": "", "skipped": True}
    except Exception as e:
        return {"ok": False, "error": None, "reason": one_line(e), "ort": ""}


def run_case(case, tools, checks) -> dict:
    name, op, model, xs, ys, inputs, expected = case
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)
    record = {"name": name, "op": op, "opset": opset, "inputs": xs, "outputs": ys, "skipped": "", "tools": {},
              "source_ort": ort_loads(model)}
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = {n: _float64(v) for n, v in zip(graph_inputs, inputs)}
    try:
        oracle = Oracle(model)
        out = oracle(feeds)
    except Exception as e:
        record["skipped"] = f"the float64 reference cannot run the case: {one_line(e)}"
        return record
    for o, want in zip(oracle.names, expected):
        got = out[o]
        want = np.asarray(want)
        if not isinstance(got, np.ndarray) or got.shape != want.shape:
            record["skipped"] = f"float64 reference output {o} has shape {np.shape(got)}, the case expects {want.shape}"
            return record
        loose = want.dtype in (np.float16,) or want.dtype.name == "bfloat16"
        if np.issubdtype(want.dtype, np.floating) or want.dtype.name == "bfloat16":
            ok = np.allclose(got, want.astype(np.float64), rtol=2e-2 if loose else 2e-3, atol=1e-2 if loose else 1e-4,
                             equal_nan=True)
        else:
            ok = np.array_equal(got, want)
        if not ok:
            record["skipped"] = f"float64 reference output {o} disagrees with the case's expected output"
            return record
    rng = seeded_rng(name, "v")
    v = random_like(rng, feeds, xs)
    try:
        cd, scale = oracle.derivative(feeds, v, ys)
    except OracleUnstable as e:
        record["skipped"] = str(e)
        return record
    for tool in tools:
        record["tools"][tool] = check_tool(tool, model, xs, ys, feeds, oracle, v, cd, scale, seeded_rng(name, tool), checks)
    return record


# ---- workers with a per-case time limit --------------------------------------------------------

def _worker(conn, cases, tools, checks):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        index = conn.recv()
        if index is None:
            return
        try:
            result = run_case(cases[index], tools, checks)
        except Exception as e:  # a harness bug must show, not vanish
            result = {"name": cases[index][0], "op": cases[index][1], "skipped": "",
                      "harness_error": one_line(e) + " | " + traceback.format_exc(limit=3).replace("\n", " ")}
        conn.send(result)


class Worker:
    def __init__(self, ctx, cases, tools, checks):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, cases, tools, checks), daemon=True)
        self.proc.start()
        self.index, self.started = None, 0.0

    def give(self, index):
        self.index, self.started = index, time.monotonic()
        self.conn.send(index)

    def stop(self):
        self.proc.kill()
        self.proc.join()


def run_all(cases, tools, checks, timeout, jobs, progress=True):
    import jacgraph.passes.jvp  # noqa: F401  every worker forks from this one snapshot of the code
    import jacgraph.passes.vjp  # noqa: F401  (a checkout edited during the run cannot mix versions)

    ctx = multiprocessing.get_context("fork")
    todo = list(range(len(cases)))[::-1]
    results = [None] * len(cases)
    workers = [Worker(ctx, cases, tools, checks) for _ in range(max(1, min(jobs, len(cases))))]
    done = 0
    while done < len(cases):
        for i, w in enumerate(workers):
            if w.index is None and todo:
                w.give(todo.pop())
            if w.index is None:
                continue
            if w.conn.poll(0.05):
                results[w.index] = w.conn.recv()
            elif time.monotonic() - w.started > timeout:
                name, op = cases[w.index][:2]
                results[w.index] = {"name": name, "op": op, "skipped": "", "timeout": timeout}
                w.stop()
                workers[i] = w = Worker(ctx, cases, tools, checks)
            else:
                continue
            done += 1
            if progress:
                r = results[w.index] if w.index is not None else None
                print(f"[{done}/{len(cases)}] {cases[w.index][0] if w.index is not None else ''} "
                      f"{summary_line(r)}", file=sys.stderr, flush=True)
            w.index = None
    for w in workers:
        w.conn.send(None)
        w.proc.join(timeout=5)
    return results


def summary_line(r):
    if r is None:
        return ""
    if r.get("skipped"):
        return "skip: " + r["skipped"][:80]
    if r.get("timeout"):
        return f"timeout {r['timeout']}s"
    if r.get("harness_error"):
        return "harness error: " + r["harness_error"][:120]
    return " ".join(f"{t}:" + "".join("+" if c["ok"] else "-" for c in checks.values()) for t, checks in r["tools"].items())


# ---- outcome of a check, summaries, the page ---------------------------------------------------

def outcome(record, tool, check):
    """'pass', 'fail' or 'skip' for one check of one tool on one case, and the reason."""
    if record.get("skipped"):
        return "skip", record["skipped"]
    if record.get("timeout"):
        return "fail", f"timeout after {record['timeout']} s"
    if record.get("harness_error"):
        return "fail", "harness error: " + record["harness_error"]
    result = record["tools"].get(tool, {}).get(check)
    if result is None:
        return "skip", "not run"
    if result.get("skipped"):
        return "skip", result["reason"]
    return ("pass", "") if result["ok"] else ("fail", result["reason"])


def summarize(records, tools, checks):
    ops = sorted({r["op"] for r in records})
    summary = {"cases": len(records), "ops": len(ops),
               "oracle_skips": sum(1 for r in records if r.get("skipped")),
               "skip_reasons": Counter(_reason_kind(r["skipped"]) for r in records if r.get("skipped")),
               "tools": {}}
    for tool in tools:
        per_tool = {}
        for check in checks:
            by_op = defaultdict(list)
            for r in records:
                by_op[r["op"]].append(outcome(r, tool, check)[0])
            passed = sum(o.count("pass") for o in by_op.values())
            per_tool[check] = {
                "passed": passed,
                "failed": sum(o.count("fail") for o in by_op.values()),
                "skipped": sum(o.count("skip") for o in by_op.values()),
                "ops_fully_passed": sum(1 for o in by_op.values() if "pass" in o and "fail" not in o),
                # emitted graphs onnxruntime cannot load although it loads the case's own model (an opset newer than
                # it knows, or a kernel it lacks for the case's types, refuses both: not counted)
                "ort_refused": sum(1 for r in records if r.get("tools", {}).get(tool, {}).get(check, {}).get("ort")
                                   and not r.get("source_ort")),
            }
        summary["tools"][tool] = per_tool
    return summary


def _reason_kind(reason):
    for key in ("central differences", "one-sided", "non-finite", "shape changes", "disagrees with",
                "cannot run the case", "perturbed point", "has shape"):
        if key in reason:
            return key
    return reason[:60]


def machine_line():
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()}-core shared CPU VM ({cpu}), no GPU, Python {platform.python_version()}, "
            f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__} (CPU provider), onnx-ad {ONNX_AD_VERSION}")


def git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


# Why jacgraph's failures left happen (written from the run's reasons; the table below gives each op's first one).
NOTES = {
    "AveragePool": "the 3-D default case times out (120 s) in both tools: onnx's reference evaluator pools in Python "
                   "loops, and the oracle runs the model five times, the checks several more.",
    "LpPool": "as AveragePool: the 3-D default case times out in the reference evaluator, for both tools.",
    "Attention": "float16 cases: relative errors 1e-5..1e-4, above the 1e-6 tolerance, and onnx-ad's are the same "
                 "(9.2e-05 on test_attention_4d_fp16 for both), which points at the float16 case's float64 oracle "
                 "rather than the rules; not investigated further.",
    "BatchNormalization": "the cases differentiate scale, bias, mean and var too; the rule takes tangents of x only.",
    "Col2Im": "reverse: the cases feed block_shape as a graph input; the transpose cuts blocks out with a one-hot Conv "
              "whose kernel is the block, so it needs the block shape at compile time (onnx-ad refuses these too).",
    "ConvTranspose": "reverse with output_shape or auto_pad is refused (explicit pads needed).",
    "Det": "no rule yet.",
    "Dropout": "training-mode cases are refused on purpose, with a reason (random masks have no derivative to emit); "
               "inference-mode Dropout is the identity.",
    "OptionalGetElement": "optional types are not supported.",
    "Reshape": "allowzero with a zero-sized input failed in this run; fixed since (both rules reshape with "
               "allowzero=1, tests/test_conformance.py).",
    "Resize": "reverse with keep_aspect_ratio_policy not_larger/not_smaller: the per-axis probe cannot reproduce the "
              "policy's joint scale (onnx-ad refuses these too).",
    "RoiAlign": "no rule yet.",
    "MaxPool": "test_maxpool_3d_default, hvp: skipped for jacgraph (its VJP graph's central differences at h and 10h "
               "disagree along jacgraph's random direction: with 98k inputs an argmax switches within 10h), passed for "
               "onnx-ad along its own direction; it is the one case onnx-ad passes and jacgraph does not.",
    "Slice": "JVP-of-VJP on an empty (out-of-bounds) slice fails in the reference run of the emitted graph.",
    "CausalConvWithState": "JVP-of-VJP with kernel size one fails on an empty tensor, as Slice.",
}


def markdown(records, summary, meta, tools, checks):
    lines = ["# Operator conformance: ONNX's node test cases, differentiated", "",
             "Generated by `examples/onnx_conformance.py` (do not edit by hand; re-run it).", "",
             f"- command: `{meta['command']}`",
             f"- machine: {meta['machine']}",
             f"- date: {meta['date']}, jacgraph commit {meta['commit']}, wall time {meta['seconds']:.0f} s",
             f"- cases: {summary['cases']} over {summary['ops']} ops (default-domain cases of "
             "`collect_testcases()`, not `_expanded`, with a differentiable float input reaching a float output)",
             f"- oracle skips (the float64 reference itself gives no usable derivative): {summary['oracle_skips']}"
             + (" — " + ", ".join(f"{k}: {n}" for k, n in sorted(summary["skip_reasons"].items())) if summary["oracle_skips"] else ""),
             "", "How each check works, and why the tolerance is 1e-6, is in the script's docstring. "
             "`jvp`: tangent vs float64 central differences; `vjp`: dot-product identity against them; "
             "`hvp`: the tool's JVP of its own VJP graph vs central differences of that VJP graph.", "",
             "| tool | check | cases passed | failed | skipped | ops fully passed | emitted graphs onnxruntime refused* |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tool in tools:
        for check in checks:
            s = summary["tools"][tool][check]
            lines.append(f"| {tool} | {check} | {s['passed']} / {summary['cases']} | {s['failed']} | {s['skipped']} | "
                         f"{s['ops_fully_passed']} / {summary['ops']} | {s['ort_refused']} |")
    lines += ["", "\\* counted only where onnxruntime loads the case's own model (it refuses "
              f"{sum(1 for r in records if r.get('source_ort'))} of them: opsets newer than it knows, kernels it lacks "
              "for a type); an emitted graph it refuses is still checked in float64 by onnx's reference evaluator."]
    if "jacgraph" in tools and "onnx-ad" in tools:
        lines += ["", "Cases onnx-ad passes and jacgraph does not:", ""]
        for check in checks:
            behind = [r["name"] for r in records if outcome(r, "onnx-ad", check)[0] == "pass"
                      and outcome(r, "jacgraph", check)[0] != "pass"]
            lines.append(f"- {check}: {len(behind)}" + (f" ({', '.join(behind[:40])}{' ...' if len(behind) > 40 else ''})"
                                                          if behind else ""))
    lines += ["", "## Failures by op", "",
              "One row per op with a failing check; the reason is the first failing case's, with the count of "
              "failing cases.", "", "| op | tool | check | failing / cases | first failing case: reason |",
              "|---|---|---|---:|---|"]
    by_op = defaultdict(list)
    for r in records:
        by_op[r["op"]].append(r)
    for op in sorted(by_op):
        for tool in tools:
            for check in checks:
                fails = [(r["name"], outcome(r, tool, check)[1]) for r in by_op[op] if outcome(r, tool, check)[0] == "fail"]
                if fails:
                    reason = fails[0][1].replace("|", "\\|")[:220]
                    lines.append(f"| {op} | {tool} | {check} | {len(fails)} / {len(by_op[op])} | {fails[0][0]}: {reason} |")
    failing_ops = {r["op"] for r in records if "jacgraph" in tools
                   and any(outcome(r, "jacgraph", c)[0] != "pass" and outcome(r, "onnx-ad", c)[0] == "pass"
                           or outcome(r, "jacgraph", c)[0] == "fail" for c in checks)}
    notes = [f"- **{op}**: {NOTES[op]}" for op in sorted(failing_ops) if op in NOTES]
    if notes:
        lines += ["", "## Why jacgraph's failures left happen", ""] + notes
    lines += ["", "## Oracle skips", "", "| case | op | why the reference gives no derivative |", "|---|---|---|"]
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | {r['op']} | {r['skipped'].replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: jacgraph, onnx-ad")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated: jvp, vjp, hvp")
    p.add_argument("--ops", help="only cases of these ops (comma-separated)")
    p.add_argument("--cases", help="only these case names (comma-separated)")
    p.add_argument("--limit", type=int, help="only the first N cases (a smoke run)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--json", help=f"write the per-case results here (always also {LATEST_JSON})")
    p.add_argument("--markdown", default=DOC_PAGE, help="the docs page to write (default docs/benchmarks/conformance.md)")
    p.add_argument("--no-markdown", action="store_true", help="do not write the docs page")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--from-json", help="re-render the page (and --json) from a saved run instead of running the cases; "
                   f"the file read and {LATEST_JSON} are left as they are")
    args = p.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    checks = [c for c in args.checks.split(",") if c]
    unknown = [t for t in tools if t not in TOOLS] + [c for c in checks if c not in CHECKS]
    if unknown:
        p.error(f"unknown tool/check: {', '.join(unknown)}")
    if "onnx-ad" in tools:
        ensure_onnx_ad()
    if args.from_json:
        if args.json and os.path.realpath(args.json) == os.path.realpath(args.from_json):
            p.error("--json names the file --from-json reads; reading a run never overwrites it: give another --json")
        return rerender(args, tools, checks)
    started = time.monotonic()
    cases = collect(set(args.ops.split(",")) if args.ops else None, set(args.cases.split(",")) if args.cases else None)
    if args.limit:
        cases = cases[:args.limit]
    records = run_all(cases, tools, checks, args.timeout, args.jobs, progress=not args.quiet)
    summary = summarize(records, tools, checks)
    meta = {"command": "python examples/onnx_conformance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_line(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "seconds": time.monotonic() - started, "tolerance": TOL, "h": H}
    report = {"meta": meta, "summary": summary, "cases": records}
    write_report(report, args, tools, checks)
    for tool in tools:
        for check in checks:
            s = summary["tools"][tool][check]
            print(f"{tool:9s} {check}: {s['passed']}/{summary['cases']} cases passed, {s['failed']} failed, "
                  f"{s['skipped']} skipped; {s['ops_fully_passed']}/{summary['ops']} ops fully passed")
    print(f"oracle skips: {summary['oracle_skips']}")
    return report


def rerender(args, tools, checks):
    """The page and JSON of a saved run, re-summarized (records from before source_ort existed get it filled in)."""
    with open(args.from_json) as f:
        report = json.load(f)
    records = report["cases"]
    if any("source_ort" not in r for r in records):
        models = {c[0]: c[2] for c in collect()}
        for r in records:
            r.setdefault("source_ort", ort_loads(models[r["name"]]) if r["name"] in models else "")
    report["summary"] = summarize(records, tools, checks)
    write_report(report, args, tools, checks, latest=False)  # a re-render is not a run: LATEST_JSON stays
    return report


def write_report(report, args, tools, checks, latest=True):
    """The run's JSON (--json, and LATEST_JSON when latest) and, unless --no-markdown, its docs page."""
    text = json.dumps(report, indent=1, default=str)
    for path in filter(None, [args.json, LATEST_JSON if latest else None]):
        write_atomic(path, text)
    if not args.no_markdown:
        write_atomic(args.markdown, markdown(report["cases"], report["summary"], report["meta"], tools, checks))


if __name__ == "__main__":
    main()
