"""omnicache-export: OmniCache cache reuse for Diffusion Transformers, compiled into ONNX graphs."""
__version__ = "0.1.0"

_LAZY = {  # imported on first use: they need torch, onnx and diffusers, which the runtime does not load
    "export_transformer": "omnicache_export.integrations.export_transformer",
    "write_calib_npz": "omnicache_export.integrations.calib_npz",
    "OmniCacheTransformer": "omnicache_export.integrations.dropin",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omnicache_export' has no attribute {name!r}")
