"""The main job, `omnicache-export MODEL.onnx -o OUT`: graph side, calibration, embedding, verify, manifest, report."""

from omnicache_export.pipeline.job import ExportOptions, export

__all__ = ["ExportOptions", "export"]
