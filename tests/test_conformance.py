"""The conformance benchmark (examples/onnx_conformance.py) on a handful of cases, so it cannot rot.

Only jacgraph is run here: onnx-ad is the benchmark's comparison, never a dependency of jacgraph.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from examples import onnx_conformance as conf

GOOD = ["test_relu", "test_tanh", "test_softmax_axis_1", "test_reshape_allowzero_reordered"]  # the last: an empty axis (allowzero)
OTHERS = ["test_gather_elements_0", "test_scatternd_max"]
DEQUANTIZE = ["test_dequantizelinear_axis", "test_dequantizelinear_blocked"]  # no float64 form: checked here


@pytest.fixture(scope="module")
def cases():
    return conf.collect(names=set(GOOD + OTHERS + DEQUANTIZE))


def test_selection_reads_differentiable_inputs(cases):
    by_name = {c[0]: c for c in cases}
    assert set(by_name) == set(GOOD + OTHERS + DEQUANTIZE)
    name, op, model, xs, ys, inputs, expected = by_name["test_gather_elements_0"]
    assert op == "GatherElements" and xs == ["data"] and ys == ["y"]  # the int64 indices are not differentiated


def test_jacgraph_passes_every_check_on_smooth_cases(cases):
    """Also the DequantizeLinear rules (per-axis and blocked scales), which the float64 rule tables cannot hold."""
    for case in [c for c in cases if c[0] in GOOD + DEQUANTIZE]:
        record = conf.run_case(case, ["jacgraph"], conf.CHECKS)
        for check in conf.CHECKS:
            assert conf.outcome(record, "jacgraph", check) == ("pass", ""), (case[0], check, record)


def test_a_wrong_derivative_fails(cases, monkeypatch):
    """A tool whose tangents and gradients are 1% off must fail both checks (the harness can fail)."""
    class OnePercentOff(conf.Emitted):
        def run(self, primal_feeds, seed_values):
            return {k: 1.01 * v for k, v in super().run(primal_feeds, seed_values).items()}

    def wrong(model, mode, xs, ys):
        right = conf.jacgraph_derivative(model, mode, xs, ys)
        return OnePercentOff(right.model, right.seeds, right.results)

    monkeypatch.setitem(conf.DERIVATIVE, "wrong", wrong)
    case = next(c for c in cases if c[0] == "test_tanh")
    record = conf.run_case(case, ["wrong"], ["jvp", "vjp"])
    assert conf.outcome(record, "wrong", "jvp")[0] == "fail"
    assert conf.outcome(record, "wrong", "vjp")[0] == "fail"


def test_oracle_refuses_a_kink():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    oracle = conf.Oracle(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(conf.OracleUnstable, match="one-sided"):
        oracle.derivative({"x": np.array([0.0, 1.0])}, {"x": np.array([1.0, 1.0])}, ["y"])
    cd, _ = oracle.derivative({"x": np.array([-1.0, 1.0])}, {"x": np.array([1.0, 1.0])}, ["y"])
    np.testing.assert_allclose(cd["y"], [0.0, 1.0], atol=1e-9)


def test_case_with_a_tie_is_counted_as_an_oracle_skip(cases):
    record = conf.run_case(next(c for c in cases if c[0] == "test_scatternd_max"), ["jacgraph"], ["jvp"])
    assert conf.outcome(record, "jacgraph", "jvp")[0] == "skip" and "one-sided" in record["skipped"]


def test_a_case_over_its_time_limit_is_a_failure_not_a_stall(cases, monkeypatch):
    def hangs(model, mode, xs, ys):
        time.sleep(60)

    monkeypatch.setitem(conf.DERIVATIVE, "hangs", hangs)  # the forked worker inherits it
    started = time.monotonic()
    records = conf.run_all(cases[:1], ["hangs"], ["jvp"], timeout=1.0, jobs=1, progress=False)
    assert time.monotonic() - started < 30
    assert conf.outcome(records[0], "hangs", "jvp") == ("fail", "timeout after 1.0 s")


def test_summary_and_page(cases):
    records = [conf.run_case(c, ["jacgraph"], ["jvp"]) for c in cases if c[0] not in DEQUANTIZE]
    summary = conf.summarize(records, ["jacgraph"], ["jvp"])
    assert summary["cases"] == len(records) and summary["oracle_skips"] == 1
    assert summary["tools"]["jacgraph"]["jvp"]["passed"] == len(records) - 1  # gather_elements' JVP included
    meta = {"command": "x", "machine": "m", "date": "d", "commit": "c", "seconds": 1.0}
    page = conf.markdown(records, summary, meta, ["jacgraph"], ["jvp"])
    assert f"| jacgraph | jvp | {len(records) - 1} / {len(records)} |" in page


def test_from_json_reads_without_overwriting(cases, tmp_path, monkeypatch):
    """--from-json re-renders the page from a saved run: the file it reads and the latest-run file stay as they
    were (byte for byte); --json naming the file it reads is refused."""
    latest = tmp_path / "latest.json"
    monkeypatch.setattr(conf, "LATEST_JSON", str(latest))
    records = [conf.run_case(c, ["jacgraph"], ["jvp"]) for c in cases if c[0] in GOOD[:2]]
    meta = {"command": "x", "machine": "m", "date": "d", "commit": "c", "seconds": 1.0}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"meta": meta, "summary": {}, "cases": records}))
    latest.write_text("the latest run")
    before = saved.read_bytes()
    page, out = tmp_path / "page.md", tmp_path / "out.json"
    for source in (saved, latest):
        if source == latest:
            latest.write_text(before.decode())
        conf.main(["--tools", "jacgraph", "--checks", "jvp", "--from-json", str(source), "--markdown", str(page),
                   "--json", str(out)])
        assert source.read_bytes() == before and "| jacgraph | jvp | 2 / 2 |" in page.read_text()
        assert json.loads(out.read_text())["summary"]["cases"] == 2
    assert latest.read_bytes() == before  # the re-render of the latest run did not rewrite it
    with pytest.raises(SystemExit):
        conf.main(["--tools", "jacgraph", "--checks", "jvp", "--from-json", str(saved), "--json", str(saved),
                   "--no-markdown"])
    assert saved.read_bytes() == before
