"""The runtime: two engines and the manifest's static schedule, dispatched per timestep.

`OmniCache.load(out_dir)` reads the manifest (refusing unknown versions and changed files) and both
engines once. Each generation has its own state (`Generation`: step counter, cache tensors, the
outputs of the last two full steps, its scheduler), so concurrent generations never share cache
state. The schedule is static: nothing has to come back to the host to decide a step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omnicache_export.engines.base import Engine
from omnicache_export.runtime.manifest import read_manifest
from omnicache_export.passes.cache_names import CACHE, FULL_PREV, FULL_PREV2, STEP, prev_cache_name
from omnicache_export.runtime.sampler import Denoiser, SamplingSpec, batched_feeds, chunks

PREV, PREV2 = FULL_PREV, FULL_PREV2


def load_engine(path: Path, backend: str, device: str, threads: int | None = None) -> Engine:
    if backend == "onnxruntime":
        from omnicache_export.engines.onnxruntime import OnnxRuntimeEngine

        # The two sessions alternate: neither may spin-wait on the cores the other needs.
        return OnnxRuntimeEngine(path, device=device, threads=threads, spinning=False)
    raise ValueError(f"unknown backend {backend!r} (this version ships the onnxruntime backend)")


class OmniCache:
    """Both engines and the static schedule. `OmniCache.load(out_dir)` is the usual way in."""

    def __init__(
        self,
        folder: str | Path,
        spec: SamplingSpec,
        full_steps: np.ndarray,
        cache_names: list[str],
        graphs: dict[str, str],
        backend: str = "onnxruntime",
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.dir = Path(folder)
        self.spec = spec
        self.full_steps = np.asarray(full_steps, dtype=bool)
        self.cache_names = list(cache_names)
        self.full = load_engine(self.dir / graphs["full"], backend, device, threads)
        self.cache = load_engine(self.dir / graphs["cache"], backend, device, threads)
        self._cache_inputs = [s.name for s in self.cache.inputs]
        # With a cache trend in the graph it also takes the caches of the full step before the last.
        self.prev_cache_names = {prev_cache_name(k): k for k in self.cache_names if prev_cache_name(k) in self._cache_inputs}

    @classmethod
    def load(
        cls, out_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None
    ) -> OmniCache:
        """Read the manifest (refusing unknown versions and changed artifacts) and load both engines."""
        manifest = read_manifest(out_dir)
        if backend not in manifest["engines"]:
            raise ValueError(f"{out_dir} holds no {backend} engines (has: {', '.join(manifest['engines'])})")
        rt = cls(
            out_dir,
            SamplingSpec.from_json(manifest["sampling"]),
            np.array(manifest["schedule"]["full"], dtype=bool),
            manifest["io"]["cache_tensors"],
            manifest["engines"][backend],
            backend,
            device,
            threads,
        )
        rt.manifest = manifest
        return rt

    def generation(
        self, cond: dict, uncond: dict, n: int, seed: int, no_cache: bool = False, x0: np.ndarray | None = None
    ) -> Generation:
        """A new generation of n samples (noise from `seed`, or `x0`); its own cache state."""
        return Generation(self, cond, uncond, n, seed, no_cache, x0)

    def sample(
        self, cond: dict, uncond: dict, n: int, seed: int, no_cache: bool = False, batched: set[str] | None = None
    ) -> np.ndarray:
        """n samples to the end; in chunks of the model's static batch where the export fixed it
        (the last chunk padded), the noise drawn for all n at once. `batched`: the conditioning
        inputs with a sample axis (default: all)."""
        batched = set(cond) if batched is None else batched

        size = self.spec.chunk or n
        x0 = Denoiser(self.spec).initial_latents(n, seed)
        out = []
        for rows, padded in chunks(n, size):
            pick = lambda d: {k: (v[padded] if k in batched else v) for k, v in d.items()}  # noqa: E731
            gen = self.generation(pick(cond), pick(uncond), size, seed, no_cache, x0[padded])
            while not gen.done:
                gen.step()
            out.append(gen.x[: len(rows)])
        return np.concatenate(out)

    def close(self) -> None:
        self.full.close()
        self.cache.close()


class Generation:
    """One generation's state. `step()` runs the next timestep on the engine the schedule names."""

    def __init__(self, rt: OmniCache, cond: dict, uncond: dict, n: int, seed: int, no_cache: bool,
                 x0: np.ndarray | None = None):
        self.rt, self.no_cache = rt, no_cache
        self.den = Denoiser(rt.spec)
        self.x = self.den.initial_latents(n, seed) if x0 is None else x0
        self.n = n
        self.static = batched_feeds(rt.spec, cond, uncond)
        self.i = 0
        self.caches: dict[str, np.ndarray] = {}
        self.caches_prev: dict[str, np.ndarray] = {}
        self.prev: np.ndarray | None = None
        self.prev2: np.ndarray | None = None
        self._zeros: np.ndarray | None = None
        self.full_steps = self.cached_steps = 0

    @property
    def done(self) -> bool:
        return self.i >= self.rt.spec.n_steps

    def cache_extras(self) -> dict[str, np.ndarray]:
        """The cache graph's inputs besides the model's own at the current step: step index, the last
        two full outputs, the caches and (with a cache trend) the caches of the full step before."""
        # Before two full steps the coefficients are 0: any finite prev2 and previous caches will do.
        if self.prev2 is None and self._zeros is None:
            self._zeros = np.zeros_like(self.prev)
        prev2 = self.prev2 if self.prev2 is not None else self._zeros
        extra = {STEP: np.array([self.i], np.int64), PREV: self.prev, PREV2: prev2, **self.caches}
        for name, cache in self.rt.prev_cache_names.items():
            extra[name] = self.caches_prev.get(cache, self.caches[cache])
        return extra

    def _feeds(self) -> dict[str, np.ndarray]:
        return self.den.feeds(self.i, self.x, self.static)

    def step(self) -> np.ndarray:
        spec, rt = self.rt.spec, self.rt
        feeds = self._feeds()
        if self.no_cache or rt.full_steps[self.i]:
            out = rt.full.run({s.name: feeds[s.name] for s in rt.full.inputs})
            raw = out[spec.output]
            self.caches_prev, self.caches = self.caches, {k: out[k] for k in rt.cache_names}
            self.prev2, self.prev = self.prev, raw
            self.full_steps += 1
        else:
            extra = self.cache_extras()
            raw = rt.cache.run({name: extra[name] if name in extra else feeds[name] for name in rt._cache_inputs})[spec.output]
            self.cached_steps += 1
        self.x = self.den.step(self.i, self.den.guided(raw), self.x)
        self.i += 1
        return self.x


__all__ = ["OmniCache", "Generation", "CACHE"]
