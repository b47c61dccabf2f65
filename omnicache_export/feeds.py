"""Input feeds synthesized from the IO specs, for verification (and for calibration without --calib)."""

from __future__ import annotations

import numpy as np

from omnicache_export.roles import IOSpec

NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "FLOAT16": np.float16,
    "DOUBLE": np.float64,
    "BFLOAT16": np.float32,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
}


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
