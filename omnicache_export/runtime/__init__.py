"""The runtime: the manifest, the one step dispatch and its cache state, the sampler, OmniCache.

It imports no graph tooling (onnx, onnx_ir, the passes) and nothing from calibration; a test
checks that in a fresh interpreter.
"""

from omnicache_export.runtime.omnicache import Generation, OmniCache

__all__ = ["OmniCache", "Generation"]
