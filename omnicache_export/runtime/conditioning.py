"""Conditioning inputs for calibration (`--calib`) and for `run` (`--inputs`): loading and checking.

The npz format: one array per conditioning input of the ONNX model, keyed by its name, with the
sample axis in place of the input's batch axis (a `[B, L, D]` input takes a `[K, L, D]` array, a
`[B]` class-label input a `[K]` array); inputs without a batch axis (Flux's `img_ids`) are given as
they are. `uncond/<name>` arrays are the unconditional inputs for classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES, IOSpec

UNCOND = "uncond/"


@dataclasses.dataclass
class Conditioning:
    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    n_samples: int
    synthesized: bool = False

    def take(self, start: int, stop: int, batched: set[str]) -> tuple[dict, dict]:
        """Samples [start, stop) of every batched input; unbatched ones whole."""
        pick = lambda d: {k: (v[start:stop] if k in batched else v) for k, v in d.items()}  # noqa: E731
        return pick(self.cond), pick(self.uncond)

    def save(self, path: Path) -> None:
        np.savez(path, **self.cond, **{UNCOND + k: v for k, v in self.uncond.items()})


def batched_inputs(io: list[IOSpec]) -> set[str]:
    """Inputs whose axis 0 is the batch: symbolic, or equal to the latent's axis 0."""
    latent = next((s for s in io if s.role == "latent"), None)
    batch_dim = latent.shape[0] if latent and latent.shape else None
    names = set()
    for s in io:
        if s.role == "output" or not s.shape:
            continue
        if not isinstance(s.shape[0], int) or s.shape[0] == batch_dim:
            names.add(s.name)
    return names


def conditioning_specs(io: list[IOSpec]) -> list[IOSpec]:
    return [s for s in io if s.role == "conditioning"]


def _check_array(source: str, key: str, spec: IOSpec, array: np.ndarray, batched: bool) -> None:
    expected = NUMPY_DTYPES.get(spec.dtype, np.float32)
    if array.dtype != expected:
        raise UserError(f"{source}: {key!r} has dtype {array.dtype}, the model's input takes {np.dtype(expected)}")
    dims = spec.shape[1:] if batched else spec.shape
    got = array.shape[1:] if batched else array.shape
    if batched and array.ndim == 0:
        raise UserError(f"{source}: {key!r} needs a leading sample axis")
    if len(got) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims, got)):
        want = ["K", *dims] if batched else list(dims)
        raise UserError(f"{source}: {key!r} has shape {list(array.shape)}, expected {want}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{source}: {key!r} holds NaN or infinite values")


def load_conditioning(path: str | Path, io: list[IOSpec], guidance: bool) -> Conditioning:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    batched = batched_inputs(io)
    cond, uncond, counts = {}, {}, set()
    for spec in conditioning_specs(io):
        if spec.name not in arrays:
            raise UserError(f"{path}: missing input {spec.name!r} (has: {', '.join(sorted(arrays)) or 'nothing'})")
        for key, target in ((spec.name, cond), (UNCOND + spec.name, uncond)):
            if key not in arrays:
                continue
            array = arrays[key]
            _check_array(str(path), key, spec, array, spec.name in batched)
            target[spec.name] = array
            if spec.name in batched:
                counts.add(array.shape[0])
        if guidance and spec.name in batched and spec.name not in uncond:
            raise UserError(f"{path}: guidance needs {UNCOND + spec.name!r} (the unconditional input)")
    if len(counts) > 1:
        raise UserError(f"{path}: inputs disagree on the number of samples ({sorted(counts)})")
    n = counts.pop() if counts else 1
    if n < 1:
        raise UserError(f"{path}: holds no samples")
    return Conditioning(cond, uncond, n)
