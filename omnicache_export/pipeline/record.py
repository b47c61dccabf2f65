"""The export's manifest, built from what the main job has: the analysis, the sampling spec,
calibration's result and the frozen tables, the graphs' IO, the measured speed and the verification.
Only names and hashes of files go in: the folder's own path and the model's are never written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from omnicache_export.hashing import sha256_file
from omnicache_export.passes.cache_names import cache_name
from omnicache_export.runtime import manifest as mf
from omnicache_export.runtime.graph_io import Feed, GraphIO
from omnicache_export.runtime.sampler import SamplingSpec

if TYPE_CHECKING:  # calibration and graph analysis stay out of this module's imports
    from omnicache_export.calibration.calibrate import Candidate, CalibrationResult
    from omnicache_export.calibration.correction import CorrectionTables
    from omnicache_export.calibration.filters import StageFilter
    from omnicache_export.graph.analysis import ModelAnalysis

# The export's one engine entry: ONNX Runtime runs the fp32 graphs on any of its devices.
ONNXRUNTIME_FP32 = mf.EngineEntry("onnxruntime", mf.ANY_DEVICE, mf.Precision.FP32, "full.onnx", "cache.onnx")


def onnxruntime_entry(precision: str) -> mf.EngineEntry:
    """The ONNX Runtime entry of graphs that hold `precision` (fp16 after `--precision fp16`, or an fp16 model)."""
    return mf.EngineEntry("onnxruntime", mf.ANY_DEVICE, mf.Precision(precision), "full.onnx", "cache.onnx")


def build_manifest(
    folder: Path,
    *,
    model_path: Path,
    analysis: ModelAnalysis,
    spec: SamplingSpec,
    result: CalibrationResult,
    tables: CorrectionTables,
    full_io: GraphIO,
    cache_io: GraphIO,
    max_consecutive: int,
    n_samples: int,
    seed: int,
    synthesized_conditioning: bool,
    seconds: float,
    speed: mf.Speed,
    verification: mf.Verification,
    engines: Sequence[mf.EngineEntry] = (ONNXRUNTIME_FP32,),
    index_ranges: Mapping[str, tuple[int, int]] | None = None,
    tensorrt_readiness: Sequence[mf.TensorRTReadiness] = (),
    uncond: str | None = None,
) -> mf.Manifest:
    """The manifest of the export in `folder` (its graphs written: every engine file and its
    `.data` side file is hashed here).

    model_path: the input model (only its name and sha256 are kept); analysis: inputs, roles,
    block stack; spec: the sampling spec calibrated for; result: calibration's result (`best` is
    the chosen candidate); tables: the chosen correction's tables as frozen into cache.onnx
    (`result.tables()`); full_io / cache_io: `describe_graphs` of the exported graphs;
    max_consecutive: the cached-run limit calibration ran under (auto: the largest it tried); n_samples, seed,
    synthesized_conditioning: the calibration set; seconds: calibration's wall time; speed,
    verification: the measured records; engines: the graph files per backend, device, precision;
    index_ranges: each integer input's [low, high) embedding rows (`graph.synthetic.index_ranges`),
    which the runtime checks its inputs against; tensorrt_readiness: the TensorRT readiness check
    of the input model and both graphs (`graph.tensorrt_check.readiness_records`); uncond: the stored
    unconditional rows' file (`runtime.manifest.UNCOND_FILE`), hashed here too.
    """
    best = result.best
    files = sorted({name for e in engines for name in (e.full, e.cache)} | ({uncond} if uncond else set()))
    return mf.Manifest(
        source=mf.Source(Path(model_path).name, sha256_file(model_path)),
        model_io=model_io(analysis, spec, full_io, index_ranges),
        graphs={"full": full_io, "cache": cache_io},
        sampling=mf.Sampling.from_spec(spec),
        timesteps=tuple(float(t) for t in result.timesteps),
        schedule=mf.Schedule(tuple(bool(f) for f in best.schedule.full), best.schedule.name,
                             best.schedule.family.value, best.schedule.pattern, best.schedule.n_full,
                             best.schedule.n_cached, max_consecutive, result.max_consecutive_auto,
                             best.schedule.max_run),
        correction=correction(result, tables, spec.n_steps),
        calibration=mf.Calibration(n_samples, seed, synthesized_conditioning,
                                   tuple(candidate_score(c, c is best) for c in result.candidates),
                                   quality(result), round(seconds, 2), cost(result)),
        speed=speed,
        verification=verification,
        engines=tuple(engines),
        artifacts=mf.artifact_entries(folder, files),
        tensorrt_readiness=tuple(tensorrt_readiness),
        uncond=uncond,
    )


def model_io(analysis: ModelAnalysis, spec: SamplingSpec, full_io: GraphIO,
             index_ranges: Mapping[str, tuple[int, int]] | None = None) -> mf.ModelIO:
    """Inputs with roles, the output, the cache tensors (the full graph's, with the analysis's
    batch multiples "batch*k" where it found them), the block stack, and the integer inputs'
    embedding ranges."""
    region = analysis.region
    graph_caches = {t.name: t for t in full_io.outputs_of(Feed.CACHE)}
    caches = []
    for i, stream in enumerate(region.streams):
        tensor = graph_caches[cache_name(i)]
        found = list(stream.shape or [])
        shape = tuple(a if a is not None else g for a, g in zip(found, tensor.shape)) \
            if len(found) == len(tensor.shape) else tensor.shape
        caches.append(mf.CacheTensor(tensor.name, tensor.dtype, shape))
    block_region = mf.BlockRegion(
        region.method, tuple(mf.CacheStream(s.entry, s.exit) for s in region.streams), dict(region.block_lists),
        region.n_blocks, region.n_blocks_estimated, round(analysis.node_share, 4),
        None if analysis.flop_share is None else round(analysis.flop_share, 4))
    ranges = {name: (int(low), int(high)) for name, (low, high) in sorted((index_ranges or {}).items())}
    return mf.ModelIO(tuple(s for s in analysis.io if s.role != "output"), spec.output, tuple(caches), block_region,
                      ranges)


def correction(result: CalibrationResult, tables: CorrectionTables, n_steps: int) -> mf.Correction:
    corr = result.best.correction
    return mf.Correction(
        name=corr.name,
        gammas=tuple(None if not np.isfinite(g) else float(g) for g in np.asarray(corr.gammas, float)),
        ratios=_floats(result.ratios),
        coefficients=_floats(tables.coefficients),
        blend=_floats(tables.blend),
        cache_trend=_floats(tables.trend),
        filter=filter_params(corr.filter),
        stages=stages(corr.filter, n_steps),
        filter_hw=None if result.filter_hw is None else tuple(int(d) for d in result.filter_hw),
        cache_trend2=_floats(tables.sigma) if tables.has_trend2 else (),  # absent: the first-order graph
    )


def filter_params(f: StageFilter) -> mf.FilterParams:
    return mf.FilterParams(f.name, f.boundary, f.low_rho, f.low_order, f.high_rho, f.high_order)


def stages(f: StageFilter, n_steps: int) -> tuple[mf.Stage, ...]:
    """Each step's filter: the stage's pass band, or all-pass where that stage has no cut-off."""
    early = mf.Stage.LOW if f.low_rho is not None else mf.Stage.ALL
    late = mf.Stage.HIGH if f.high_rho is not None else mf.Stage.ALL
    return tuple(late if f.stage_of(i) else early for i in range(n_steps))


def candidate_score(c: Candidate, chosen: bool) -> mf.CandidateScore:
    s = c.schedule
    return mf.CandidateScore(s.name, s.family.value, s.pattern, c.correction.name, s.n_full, s.n_cached,
                             c.psnr_db, c.psnr_min_db, c.rmse, chosen, len(c.rows) if c.rows else None)


def quality(result: CalibrationResult) -> mf.Quality:
    """The chosen candidate on the rows that chose it, and on the validation rows (`validation`)."""
    best, v = result.best, result.validation
    if v is None:
        return mf.Quality(best.psnr_db, best.psnr_min_db, best.rmse)
    return mf.Quality(best.psnr_db, best.psnr_min_db, best.rmse, v.psnr_db, v.psnr_min_db, v.mode.value, v.n_samples)


def cost(result: CalibrationResult) -> mf.CalibrationCost | None:
    c = result.cost
    if c is None:
        return None
    return mf.CalibrationCost(c.halving, c.scoring_evaluations, c.exhaustive_evaluations, c.other_evaluations,
                              round(c.scoring_seconds, 2))


def _floats(a) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(a, float).ravel())
