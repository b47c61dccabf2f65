"""Conditioning inputs for calibration (`--calib`) and for `run` (`--inputs`): loading and checking.

The npz format: one array per conditioning input of the ONNX model, keyed by its name, with the
sample axis in place of the input's batch axis (a `[B, L, D]` input takes a `[K, L, D]` array, a
`[B]` class-label input a `[K]` array); inputs without a batch axis (Flux's `img_ids`) are given as
they are. `uncond/<name>` arrays are the unconditional inputs for classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Mapping, Sequence
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


def check_indices(source: str | None, cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray],
                  ranges: Mapping[str, Sequence[int]] | None) -> None:
    """Integer inputs against the embedding table each indexes (`ranges`: name -> [low, high), as
    the manifest's `model_io.index_ranges` holds them): every value in range, else UserError naming
    the input, the first bad value, its sample and the range. A negative class label is refused
    (ONNX Gather would wrap it to the table's last rows: DiT's -1 is its null class)."""
    for name, (low, high) in (ranges or {}).items():
        for key, arrays in ((name, cond), (UNCOND + name, uncond)):
            array = arrays.get(name)
            if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
                continue  # synthesized rows are drawn inside the table
            bad = (array < low) | (array >= high)
            if bad.any():
                at = np.argwhere(bad)[0] if array.ndim else ()
                where = f"{source}: {key!r}" if source else f"input {key!r}"
                sample = f" at sample {int(at[0])}" if array.ndim else ""
                raise UserError(f"{where} holds {int(array[tuple(at)])}{sample}: outside the embedding table's "
                                f"valid range [{low}, {high})")


def load_conditioning(path: str | Path, io: list[IOSpec], guidance: bool,
                      index_ranges: Mapping[str, Sequence[int]] | None = None) -> Conditioning:
    """The npz at `path`, checked against the model's inputs (names, dtypes, shapes, finite floats,
    one sample count) and, with `index_ranges`, its integer inputs against their embedding tables."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array: no input names
            raise UserError(f"{path}: a single .npy array, not an .npz of arrays keyed by input name "
                            "(write it with numpy.savez(path, NAME=array, ...))")
        with data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
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
    check_indices(str(path), cond, uncond, index_ranges)
    return Conditioning(cond, uncond, n)
