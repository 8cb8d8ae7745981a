"""Checkpoint -> ONNX -> int8 ONNX model directory, with parity checks and a manifest."""
