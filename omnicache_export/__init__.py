"""omnicache-export: OmniCache cache reuse for Diffusion Transformers, compiled into ONNX graphs."""
__version__ = "0.1.0"
