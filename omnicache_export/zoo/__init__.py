"""Tiny diffusers DiTs and their ONNX exports, for examples, tests and benchmarks."""
