"""The request contract of the served model `omnicache`, read from the manifest alone.

A request holds, per conditioning input of the model (named as in the manifest), one row: the
input's shape with a batch axis of 1 (`[1, L, D]`, `[1]` for class labels); inputs without a batch
axis (Flux's `img_ids`) as the model takes them. Under guidance, `uncond/<name>` arrays of the same
shape are optional: where absent, the export's stored unconditional row (`uncond.npz`, hashed and
listed in the manifest) is used. `seed`: int64 [1], >= 0; the row's noise is that of (seed, 0), as
`omnicache-export run` gives row 0 of a one-row `--inputs` file. The response is `latent`
(float32, [1, *latent_shape]).

`RequestContract.parse` checks a request (names, dtypes, shapes, finite floats, integer inputs in
their embedding table) and raises `RequestError`, one line naming the input, for anything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from omnicache_export.errors import UserError
from omnicache_export.io_spec import numpy_dtype
from omnicache_export.runtime.conditioning import UNCOND, batched_inputs, check_indices, conditioning_specs

SEED = "seed"
LATENT = "latent"


class RequestError(UserError):
    """A request the contract refuses: the one line its client gets back (the server keeps serving)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input of the served model: its name, numpy dtype and shape (the request's, batch axis 1)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1: a dynamic dim
    optional: bool = False


@dataclasses.dataclass
class ServeRequest:
    """A checked request: the conditioning (one row each, numpy), the uncond rows, the seed."""

    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    seed: int


class RequestContract:
    """What the model `omnicache` takes (`inputs`) and returns (`output`)."""

    def __init__(self, manifest, default_uncond: Mapping[str, np.ndarray] | None = None):
        io = manifest.model_io.inputs
        self.guidance = manifest.sampling.guidance_scale != 1.0
        self.batched = batched_inputs(io)
        self.index_ranges = dict(manifest.model_io.index_ranges)
        self.default_uncond = dict(default_uncond or {})
        self.specs = {s.name: s for s in conditioning_specs(io)}
        self.inputs: list[InputSpec] = []
        for s in self.specs.values():
            shape = tuple(d if isinstance(d, int) else -1 for d in s.shape)
            if s.name in self.batched:
                shape = (1, *shape[1:])
            self.inputs.append(InputSpec(s.name, numpy_dtype(s.dtype), shape))
            if self.guidance and s.name in self.batched:
                self.inputs.append(InputSpec(UNCOND + s.name, numpy_dtype(s.dtype), shape,
                                             optional=s.name in self.default_uncond))
        self.inputs.append(InputSpec(SEED, np.dtype(np.int64), (1,)))
        self.output = InputSpec(LATENT, np.dtype(np.float32), (1, *manifest.sampling.latent_shape))
        missing = [k for k in self.specs if self.guidance and k in self.batched and k not in self.default_uncond]
        self.needs_uncond = missing  # inputs whose uncond row every request must bring

    def parse(self, arrays: Mapping[str, np.ndarray]) -> ServeRequest:
        """Check one request's arrays (RequestError naming the problem) and split cond / uncond / seed."""
        known = {s.name: s for s in self.inputs}
        unknown = sorted(set(arrays) - set(known))
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r} (the model takes: {', '.join(known)})")
        for spec in self.inputs:
            if spec.name not in arrays and not spec.optional:
                raise RequestError(f"missing input {spec.name!r}")
        cond, uncond = {}, {}
        for spec in self.inputs:
            if spec.name not in arrays:
                continue
            array = np.asarray(arrays[spec.name])
            if array.dtype != spec.dtype:
                raise RequestError(f"input {spec.name!r} has dtype {array.dtype}, the model takes {spec.dtype}")
            if array.ndim != len(spec.shape) or any(d != -1 and d != g for d, g in zip(spec.shape, array.shape)):
                want = [d if d != -1 else "?" for d in spec.shape]
                raise RequestError(f"input {spec.name!r} has shape {list(array.shape)}, the model takes {want}")
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise RequestError(f"input {spec.name!r} holds NaN or infinite values")
            if spec.name == SEED:
                continue
            if spec.name.startswith(UNCOND):
                uncond[spec.name[len(UNCOND):]] = array
            else:
                cond[spec.name] = array
        seed = int(np.asarray(arrays[SEED]).reshape(-1)[0])
        if seed < 0:
            raise RequestError(f"input 'seed' is {seed}: must be >= 0")
        if self.guidance:
            for name in cond:
                if name in self.batched and name not in uncond:
                    uncond[name] = self.default_uncond[name]
        try:
            check_indices(None, cond, uncond, self.index_ranges)
        except UserError as exc:
            raise RequestError(str(exc)) from None
        return ServeRequest(cond, uncond, seed)
