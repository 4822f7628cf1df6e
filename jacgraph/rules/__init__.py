"""Rule tables, one per transformation, keyed by ONNX op_type."""
