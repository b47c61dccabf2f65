"""Shared plumbing for the peers that run through OmniCache's own ONNX graphs: the full graph (with
the stack residual output) and the cache graph of an export calibrated with `correction="none"`,
whose embedded coefficients are all zero, so it computes the uncorrected cache step. Only the
method (schedule, what is fed as the cache) differs from OmniCache."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from omnicache_export.calibration.correction import extrapolation_ratios
from omnicache_export.engines import load_engine
from omnicache_export.engines.base import infer_numpy
from omnicache_export.passes.cache_names import FULL_PREV, FULL_PREV2, STEP
from omnicache_export.runtime.sampler import SamplingSpec, sample, timesteps_of

from ._torch import PeerRun


@dataclasses.dataclass
class OnnxCase:
    folder: Path  # an export with correction "none"
    spec: SamplingSpec
    cond: dict
    uncond: dict
    n: int
    seed: int
    target_full: int


class Graphs:
    def __init__(self, folder: Path):
        manifest = json.loads((folder / "omnicache.json").read_text())
        if any(c != 0.0 for c in manifest["correction"]["coefficients"]):
            raise ValueError(f"{folder}: the cache graph embeds a correction; the peers need an uncorrected one")
        self.full = load_engine("onnxruntime", folder / "full.onnx")
        self.cache = load_engine("onnxruntime", folder / "cache.onnx")
        self.output = manifest["sampling"]["output"]
        self.names = [t["name"] for t in manifest["graphs"]["full"]["outputs"] if t["feed"] == "cache"]

    def run_full(self, feeds: dict) -> tuple[np.ndarray, dict]:
        out = infer_numpy(self.full, feeds)
        return out[self.output], {k: out[k] for k in self.names}

    def run_cache(self, i: int, feeds: dict, caches: dict, like: np.ndarray) -> np.ndarray:
        zeros = np.zeros_like(like)
        extra = {STEP: np.array([i], np.int64), FULL_PREV: zeros, FULL_PREV2: zeros, **caches}
        return infer_numpy(self.cache, {**feeds, **extra}, names=[self.output])[self.output]

    def close(self) -> None:
        self.full.close()
        self.cache.close()


def carried_caches(caches: dict, caches_prev: dict | None, rho: float) -> dict:
    """The peers' own cache extrapolation: R + ρ (R − R_prev) for every cache tensor."""
    if not rho or caches_prev is None:
        return caches
    return {k: v + np.float32(rho) * (v - caches_prev[k]) for k, v in caches.items()}


def run_schedule(case: OnnxCase, full: np.ndarray, extrapolate: bool) -> PeerRun:
    """Sample with a static schedule; at cached steps feed the last full step's residual R_j, or with
    `extrapolate` R_j + a_i (R_j − R_j') (a_i: the time ratio of `calibrate.extrapolation_ratios`)."""
    g = Graphs(case.folder)
    ratios = extrapolation_ratios(full, timesteps_of(case.spec))
    state: dict = {"r": None, "r2": None, "out": None}

    def model(i: int, feeds: dict) -> np.ndarray:
        if full[i]:
            out, caches = g.run_full(feeds)
            state["r2"], state["r"], state["out"] = state["r"], caches, out
            return out
        caches = carried_caches(state["r"], state["r2"], float(ratios[i]) if extrapolate else 0.0)
        return g.run_cache(i, feeds, caches, state["out"])

    try:
        t0 = time.perf_counter()
        final, _ = sample(case.spec, model, case.cond, case.uncond, case.n, case.seed)
        wall = time.perf_counter() - t0
    finally:
        g.close()
    return PeerRun(final, int(np.sum(full)), wall)
