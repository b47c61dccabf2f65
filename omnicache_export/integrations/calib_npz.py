"""The user's own conditioning as a calibration npz, in the format `--calib` and `--inputs` take
(`runtime.conditioning`): one array per conditioning input keyed by its ONNX input name, the sample
axis first; `uncond/<name>` arrays for classifier-free guidance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnicache_export.errors import UserError
from omnicache_export.runtime.conditioning import UNCOND


def calib_path_for(model_path: str | Path) -> Path:
    """`model.onnx` -> `model.calib.npz`, beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".calib.npz")


def _array(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == np.float64:  # the ONNX inputs take float32 (fp16 exports: the tool casts)
        array = array.astype(np.float32)
    if array.dtype == np.int32 or array.dtype == np.bool_:  # class labels, masks: the exporters' int64
        array = array.astype(np.int64)
    if array.dtype.kind not in "fiu":
        raise UserError(f"calib {key!r}: {array.dtype} is not a numeric array")
    return np.ascontiguousarray(array)


def calib_arrays(conditioning: Mapping[str, Any], input_names: Sequence[str] | Mapping[str, str]) -> dict[str, np.ndarray]:
    """Arrays keyed as `--calib` takes them. `conditioning`: forward-argument name (or `uncond/<name>`)
    -> tensor or array, sample axis first. `input_names`: the graph inputs (forward-argument names,
    which name the ONNX inputs alike), or a mapping forward-argument name -> ONNX input name."""
    mapping = dict(input_names) if isinstance(input_names, Mapping) else {n: n for n in input_names}
    out: dict[str, np.ndarray] = {}
    for key, value in conditioning.items():
        prefix, name = (UNCOND, key[len(UNCOND):]) if key.startswith(UNCOND) else ("", key)
        if name not in mapping:
            raise UserError(f"calib {key!r}: not a graph input (the inputs are: {', '.join(mapping)})")
        out[prefix + mapping[name]] = _array(value, key)
    missing = sorted(k[len(UNCOND):] for k in out if k.startswith(UNCOND) and k[len(UNCOND):] not in out)
    if missing:
        raise UserError(f"calib: {UNCOND}{missing[0]} is given without {missing[0]!r}")
    if not out:
        raise UserError("calib holds no arrays")
    return out  # shapes and sample counts are checked against the graph by `load_conditioning`


def write_calib_npz(path: str | Path, conditioning: Mapping[str, Any],
                    input_names: Sequence[str] | Mapping[str, str]) -> Path:
    """Write `calib_arrays(conditioning, input_names)` to `path` (an .npz); returns it."""
    path = Path(path)
    np.savez(path, **calib_arrays(conditioning, input_names))
    return path
