"""Compiler passes: each walks a source graph and returns a new ONNX model (the input is never changed)."""
