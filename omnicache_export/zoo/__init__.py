"""Tiny diffusers DiTs and their ONNX exports, for examples, tests and benchmarks.

    from omnicache_export.zoo import FAMILIES, export_family
    export_family("pixart", "pixart.onnx", exporter="dynamo")
    feeds = FAMILIES["pixart"].example_inputs(batch=2, seed=0)
"""

from .export import export_family, write_inputs_npz
from .families import FAMILIES, OUTPUT_NAME, Family

__all__ = ["FAMILIES", "OUTPUT_NAME", "Family", "export_family", "write_inputs_npz"]
