"""Inputs synthesized from the IO specs: feeds for verification, conditioning for calibration without --calib."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES, IOSpec
from omnicache_export.runtime.conditioning import Conditioning, batched_inputs, conditioning_specs



def synthesize(specs: list[IOSpec], shapes: dict[str, list[int]], seed: int = 0, timestep: float = 500.0) -> dict[str, np.ndarray]:
    """Random normal floats, the given timestep, zeros for integer inputs (class 0, position ids 0)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if spec.role == "output":
            continue
        shape = tuple(shapes[spec.name])
        if any(d < 0 for d in shape):
            raise ValueError(f"input {spec.name!r} has dynamic dimensions {list(shape)}: give its shape")
        dtype = NUMPY_DTYPES.get(spec.dtype, np.float32)
        if spec.role == "timestep":
            feeds[spec.name] = np.full(shape, timestep, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def embedding_rows(model: ir.Model, name: str) -> int | None:
    """Rows of the embedding table an integer input indexes (through Cast/Where), if any."""
    value = next((v for v in model.graph.inputs if v.name == name), None)
    frontier = [value] if value is not None else []
    for _ in range(4):
        nxt = []
        for v in frontier:
            for node in v.consumers():
                if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
                    return int(node.inputs[0].const_value.shape[0])
                if node.op_type in ("Cast", "Where", "Unsqueeze", "Reshape"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


def synthesize_conditioning(
    model: ir.Model, io: list[IOSpec], n: int, seed: int, shapes: dict[str, list[int | None]] | None = None
) -> Conditioning:
    """Stand-in conditioning from the input shapes: N(0, 1) floats, random class indices (the last
    embedding row, the usual null class, for uncond), zeros as unconditional embeddings."""
    rng = np.random.default_rng(seed + 7919)
    batched = batched_inputs(io)
    cond, uncond = {}, {}
    for spec in conditioning_specs(io):
        dims = list((shapes or {}).get(spec.name) or spec.shape)
        is_batched = spec.name in batched
        rest = dims[1:] if is_batched else dims
        if any(not isinstance(d, int) or d < 0 for d in rest):
            raise UserError(f"input {spec.name!r} has dynamic dimensions {spec.shape}: give --input-shape or --calib")
        shape = ([n] if is_batched else []) + rest
        dtype = NUMPY_DTYPES.get(spec.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            cond[spec.name] = rng.standard_normal(shape).astype(dtype)
            uncond[spec.name] = np.zeros(shape, dtype)
        else:
            rows = embedding_rows(model, spec.name)
            high = max(1, rows - 1) if rows else 1
            cond[spec.name] = rng.integers(0, high, size=shape).astype(dtype)
            uncond[spec.name] = np.full(shape, rows - 1 if rows else 0, dtype)
        if not is_batched:
            uncond.pop(spec.name)
    return Conditioning(cond, uncond, n, synthesized=True)
