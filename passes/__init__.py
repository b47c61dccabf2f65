"""Graph passes: each one ONNX model -> ONNX model (or an analysis result), built on onnx_ir."""
