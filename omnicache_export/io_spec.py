"""The records both sides share: a model input or output with its role, and the dtype names.

Graph analysis writes them, the manifest stores them, the runtime reads them; this module needs
nothing but numpy, so the runtime can import it without loading any graph tooling.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class Role(str, enum.Enum):
    """What an input (or the output) is to the sampler."""

    LATENT = "latent"
    TIMESTEP = "timestep"
    CONDITIONING = "conditioning"
    OUTPUT = "output"


# ONNX element type names (as onnx_ir spells them) -> numpy dtypes. bfloat16 has no numpy dtype:
# its inputs are fed float32 and cast by the engine.
NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "FLOAT16": np.float16,
    "DOUBLE": np.float64,
    "BFLOAT16": np.float32,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
}


def numpy_dtype(onnx_name: str) -> np.dtype:
    return np.dtype(NUMPY_DTYPES.get(onnx_name, np.float32))


@dataclasses.dataclass
class IOSpec:
    name: str
    dtype: str  # ONNX element type name: FLOAT, FLOAT16, INT64 ...
    shape: list[int | str | None]  # str: a named symbolic dim, None: unnamed
    role: str  # a Role value

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
