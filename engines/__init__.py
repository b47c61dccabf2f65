"""Inference backends behind one small engine interface (`engines.base`).

The runtime picks a backend by name through `load_engine` and never imports a backend module
itself; each backend module is imported only when asked for, so this package stays light (no onnx,
no backend library) until then.
"""

from __future__ import annotations

import importlib
import os

from omnicache_export.engines.base import Engine

# backend name -> "module:EngineLoader subclass", whose constructor takes (path, device=..., **settings)
_BACKENDS = {"onnxruntime": "omnicache_export.engines.onnxruntime:OnnxRuntimeLoader",
             "tensorrt": "omnicache_export.engines.tensorrt:TensorRtLoader"}


def load_engine(backend: str, path: str | os.PathLike, device: str = "cpu", **settings) -> Engine:
    """The engine of `path` on `device` for `backend`; `settings` go to the backend's loader
    (ONNX Runtime: threads, spinning, providers, optimization; TensorRT: plan_info, cuda_graphs)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r} (known: {', '.join(_BACKENDS)})")
    module, _, loader = _BACKENDS[backend].partition(":")
    return getattr(importlib.import_module(module), loader)(path, device=device, **settings)()
