"""examples/compare_onnx_ad_graphs.py: jacgraph's and onnx-ad's JVP graphs op by op, one timed round."""
from __future__ import annotations

import json
import math


def test_compare_onnx_ad_graphs_one_round(tmp_path, capsys):
    """On the mlp: every ratio positive and finite, both graphs compute the same J v, and the op counts are those of
    the graphs onnxruntime runs (the forward's Gemm+Relu fused, so fewer nodes than the source's)."""
    from examples import compare_onnx_ad_graphs

    out = tmp_path / "rows.json"
    compare_onnx_ad_graphs.main(["--only", "mlp", "--runs", "1", "--json", str(out), "--save", str(tmp_path)])
    assert "| mlp |" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    for key in ("forward_ms", "jacgraph_ratio", "onnx_ad_ratio", "two_forwards_ratio", "onnx_ad_over_jacgraph",
                "onnx_ad_over_two_forwards"):
        assert row[key] > 0 and math.isfinite(row[key]), key
    assert row["tangent_difference"] < 1e-3  # the same J v
    assert row["ops"]["forward"].get("FusedGemm", 0) >= 1 and "Relu" not in row["ops"]["forward"]
    assert sum(row["ops"]["onnx_ad"].values()) > sum(row["ops"]["jacgraph"].values()) > sum(row["ops"]["forward"].values())
    assert (tmp_path / "mlp.jacgraph.optimized.onnx").exists()
