"""The runtime: two engines and the manifest's static schedule, dispatched per timestep.

`OmniCache.load(out_dir)` reads and checks the manifest (schema, version, hashes of every file it
opens) and loads both engines once. Each generation has its own runners and cache state
(`runtime.generation`), so concurrent generations never share state. The schedule is static:
nothing comes back to the host to decide a step, and every tensor of the loop stays on the
engines' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from omnicache_export.engines import load_engine
from omnicache_export.runtime.dispatch import StepDispatch
from omnicache_export.runtime.generation import Generation, Sampled, sample_rows
from omnicache_export.runtime.graph_io import GraphIO
from omnicache_export.runtime.sampler import SamplingSpec, to_torch


class OmniCache:
    """Both engines, their feeds and the static schedule. `OmniCache.load(out_dir)` is the usual way in."""

    def __init__(self, dispatch: StepDispatch, spec: SamplingSpec, full_steps: np.ndarray, manifest=None):
        self.dispatch = dispatch
        self.spec = spec
        self.full_steps = np.asarray(full_steps, dtype=bool)
        self.manifest = manifest

    @classmethod
    def from_files(cls, full: str | Path, cache: str | Path, full_io: GraphIO, cache_io: GraphIO, spec: SamplingSpec,
                   full_steps: np.ndarray, backend: str = "onnxruntime", device: str = "cpu", **settings) -> OmniCache:
        """From graph files and their IO (the export's verify step, before the manifest exists)."""
        dispatch = StepDispatch(load_engine(backend, full, device, **settings),
                                load_engine(backend, cache, device, **settings), full_io, cache_io)
        return cls(dispatch, spec, full_steps)

    @classmethod
    def load(cls, out_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
             precision: str | None = None, **settings) -> OmniCache:
        """Read the manifest (refusing unknown versions, bad schemas and changed files), check what
        it says against the graphs (`runtime.graph_check`: IO, schedule, sampling, correction tables)
        and load the engines of `backend` for `device` (and `precision`, where it holds several)."""
        from omnicache_export.runtime.graph_check import check_graphs
        from omnicache_export.runtime.manifest import read_manifest
        from omnicache_export.runtime.sampler import timesteps_of

        manifest = read_manifest(out_dir)
        full, cache = manifest.engine_paths(backend, device, precision)
        if full.suffix == cache.suffix == ".onnx":  # graphs it can read (a compiled engine file is opaque here)
            check_graphs(manifest, full, cache, timesteps_of(manifest.sampling_spec()))
        entry = manifest.engine(backend, device, precision)
        if entry.plans:  # TensorRT plans run only where they were built: refused before deserialization
            check_plans(out_dir, entry)
            device = "cuda"  # the entry's device key names the GPU kind; the loader takes the device
        rt = cls.from_files(full, cache, manifest.graphs["full"], manifest.graphs["cache"],
                            manifest.sampling_spec(), np.array(manifest.schedule.full, dtype=bool),
                            backend, device, **settings)
        rt.manifest = manifest
        return rt

    @property
    def device(self) -> torch.device:
        return self.dispatch.device

    def generation(self, cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray], rows: Sequence[int],
                   seed: int, no_cache: bool = False) -> Generation:
        """A generation of one batch (cond/uncond arrays with one row per sample), to step yourself;
        row r's noise from (seed, r). Close it when done."""
        from omnicache_export.runtime.sampler import Denoiser

        self.check_inputs(cond, uncond)
        x0 = Denoiser(self.spec, self.device).initial_latents(list(rows), seed)
        return Generation(self.dispatch, self.spec, self.full_steps, to_torch(cond, self.device),
                          to_torch(uncond, self.device), x0, no_cache=no_cache)

    def sample(self, cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray], seed: int = 0, *,
               rows: Sequence[int] | None = None, no_cache: bool = False, batched: set[str] | None = None,
               batch_size: int | None = None) -> np.ndarray:
        """Final latents of every row of `cond` (see `sample_rows`: row r's noise from (seed, r))."""
        return self.run(cond, uncond, seed, rows=rows, no_cache=no_cache, batched=batched, batch_size=batch_size).final

    def run(self, cond, uncond, seed: int = 0, **kwargs) -> Sampled:
        """`sample`, with the step counts. Refuses (UserError) integer inputs outside the embedding
        table the manifest records for them, and a result that went non-finite (naming the rows and
        the step)."""
        self.check_inputs(cond, uncond)
        return sample_rows(self.dispatch, self.spec, self.full_steps, cond, uncond, seed, **kwargs)

    @property
    def index_ranges(self) -> dict[str, tuple[int, int]]:
        """The manifest's [low, high) per integer input (the rows of the table it indexes); {} without one."""
        return dict(self.manifest.model_io.index_ranges) if self.manifest is not None else {}

    def check_inputs(self, cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray]) -> None:
        """Integer conditioning within its embedding table (`conditioning.check_indices`), else UserError."""
        from omnicache_export.runtime.conditioning import check_indices

        check_indices(None, cond, uncond, self.index_ranges)

    def close(self) -> None:
        self.dispatch.close()


def check_plans(out_dir, entry) -> None:
    """Each plan of a TensorRT entry against this machine's TensorRT and GPU (one line, UserError)."""
    from omnicache_export.engines.tensorrt import check_plan_compatible
    from omnicache_export.errors import UserError

    for graph, plan in entry.plans.items():
        try:
            check_plan_compatible(plan)
        except UserError as exc:
            raise UserError(f"{out_dir}: {getattr(entry, graph)}: {exc}") from None


__all__ = ["OmniCache", "Generation"]
