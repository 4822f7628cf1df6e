"""Hugging Face transformer exports (tiny configs, random weights; the legacy exporter at opset 17 for all, the
default dynamo exporter for Swin, the export that used to fail): the JVP, VJP and HVP graphs jacgraph emits, run in onnxruntime float32, against torch.func on the same module in float64.

Tolerance: 1e-5 relative (||a - b|| / ||b||). The graphs run in float32 (unit round-off 6e-8) and the reference in
float64, so the error measured is float32 round-off through a few hundred ops: on these models the forward output
alone is 0.6-2.4e-7 off and the JVP/VJP/HVP 0.7-5.0e-7 (docs/benchmarks/transformers.md). 1e-5 is 20x the largest of
those, so anything that moves a derivative by more than 1e-5 of its norm fails. MobileViT's forward alone is 1.0e-6 off
(its derivatives 2.7-4.8e-6): the tolerance is 20x the model's own forward error where that is larger than 1e-5/20.
test_jvp_is_exact_against_central_differences checks each legacy export's JVP graph, as a float64 copy, against
float64 central differences of the export's own float64 copy (no torch, so no float32 constant or cast of torch's
is in the way): truncation h^2 = 1e-10 and round-off 1e-16/h = 1e-11, relative to the derivative's scale; measured
at most 8e-9 (MobileViT), tolerance 1e-6. A wrong term in any rule moves the result by far more.
ConvNeXt's graphs are also run as float64 copies in onnx's reference evaluator: its export has no float32-rounded
constant on the derivative's path and its torch module no float32 cast, so float64 round-off (1.1e-16 per op) is all
that separates the two; measured 1.4-1.7e-15, tolerance 1e-12. (In BERT/GPT-2/ViT/Swin the export's float32
constants leave 5e-11 to 4e-9, and LLaMA's RMSNorm/T5's norm compute in float32 inside torch itself.)
The examples module builds, exports and checks; see examples/transformer_exports.py for the full table.
"""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from examples import transformer_exports  # noqa: E402

TOLERANCE = 1e-5
FORWARD_MULTIPLE = 20  # MobileViT (no residual around its MobileNet blocks) rounds its own forward to 1.0e-6
FLOAT64_TOLERANCE = {"convnext": 1e-12}
CENTRAL_DIFFERENCE_TOLERANCE = 1e-6


CASES = [(name, "legacy") for name in ["bert", "gpt2", "llama", "t5_encoder", "vit", "swin", "convnext", "hf_resnet",
                                       "mobilevit"]]
CASES += [("swin", "dynamo")]


@pytest.mark.parametrize("name, exporter", CASES)
def test_transformer_export_derivatives_match_torch(name, exporter):
    row = transformer_exports.check(name, exporter, float64=name in FLOAT64_TOLERANCE)
    assert row["status"] == "ok", row["status"]
    if name == "swin":  # the export that used to fail: its window padding is a Pad with computed pads
        assert "Pad" in row["ops"]
    for emit in ("jvp", "vjp", "hvp"):
        assert row[emit] < max(TOLERANCE, FORWARD_MULTIPLE * row["forward"]), (emit, row)
        if name in FLOAT64_TOLERANCE:
            assert row[emit + "64"] < FLOAT64_TOLERANCE[name], (emit, row)


@pytest.mark.parametrize("name", list(transformer_exports.MODELS))
def test_jvp_is_exact_against_central_differences(name):
    error = transformer_exports.central_difference_error(name)
    assert error < CENTRAL_DIFFERENCE_TOLERANCE, (name, error)
