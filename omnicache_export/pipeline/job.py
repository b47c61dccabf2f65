"""The main job, `omnicache-export MODEL.onnx -o OUT`: inspect, split, calibrate, embed the
correction, verify, write the manifest and the report. Everything is written into a temporary
folder that becomes OUT only when every step succeeded."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omnicache_export.graph import modelio
from omnicache_export.calibration import schedule as sched
from omnicache_export.graph.analysis import ModelAnalysis, analyze
from omnicache_export.calibration.calibrate import CalibrationPlan, calibrate, measure_cost_ratio, psnr
from omnicache_export.engines.onnxruntime import OnnxRuntimeEngine
from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES
from omnicache_export.graph.synthetic import synthesize_conditioning
from omnicache_export.runtime.conditioning import Conditioning, batched_inputs, load_conditioning
from omnicache_export.runtime.manifest import artifact_entries, write_manifest
from omnicache_export.passes.cache_names import cache_name
from omnicache_export.runtime.sampler import SamplingSpec, batched_feeds, scheduler_config
from omnicache_export.graph.split import check_saved, write_graphs

logger = logging.getLogger(__name__)
UNCORRECTED = "cache.uncorrected.onnx"


@dataclasses.dataclass
class ExportOptions:
    scheduler: str = "ddim"
    steps: int = 30
    calib: Path | None = None
    guidance_scale: float = 1.0
    num_calib: int = 4
    seed: int = 0
    latent_shape: list[int] | None = None
    input_dims: dict[str, list[int | None]] | None = None
    timestep_scale: float = 1.0
    prediction_type: str | None = None
    cache_ratio: float | None = None
    speedup: float | None = None
    max_consecutive: int = 2
    allow_last_cached: bool | None = None  # None: calibration tries both, keeps the better
    filters: bool = True
    schedules: tuple[str, ...] | None = None  # restrict schedule candidates (ablations)
    correction: str = "auto"  # none | gamma1 | gamma | auto
    latent: str | None = None
    timestep: str | None = None
    region_start: str | None = None
    region_end: str | None = None
    force: bool = False
    progress: bool = True


def sampling_spec(analysis: ModelAnalysis, opts: ExportOptions) -> SamplingSpec:
    latent = analysis.role("latent")
    if not latent:
        raise UserError("no latent input found: name it with --latent")
    latent = latent[0]
    shape = opts.latent_shape or [d for d in latent.shape[1:]]
    if any(not isinstance(d, int) or d <= 0 for d in shape):
        raise UserError(f"the latent {latent.name!r} has dynamic dimensions {latent.shape}: give --latent-shape C,H,W")
    timestep = analysis.role("timestep")
    if not timestep and any(s.role == "conditioning" and len(s.shape) <= 1 and s.dtype.startswith("FLOAT")
                            for s in analysis.io):
        logger.warning("no timestep input recognised by name: the sampler feeds none (name it with --timestep)")
    output = analysis.role("output")[0]
    out_shape = analysis.shapes_b1.get(output.name)
    learned_sigma = bool(out_shape and len(out_shape) == len(shape) + 1 and out_shape[1] == 2 * shape[0])
    ts_dtype = np.dtype(NUMPY_DTYPES.get(timestep[0].dtype, np.float32)).name if timestep else "float32"
    latent_dtype = np.dtype(NUMPY_DTYPES.get(latent.dtype, np.float32)).name
    static_batch = latent.shape[0] if latent.shape and isinstance(latent.shape[0], int) else None
    if static_batch is not None and opts.guidance_scale != 1.0 and static_batch % 2:
        raise UserError(
            f"the model's batch is fixed to {static_batch}: guidance batches cond and uncond, so it needs an "
            "even batch (export with a dynamic batch axis, or batch 2)"
        )
    return SamplingSpec(
        scheduler=scheduler_config(opts.scheduler, opts.prediction_type),
        static_batch=static_batch,
        n_steps=opts.steps,
        latent=latent.name,
        timestep=timestep[0].name if timestep else None,
        output=output.name,
        latent_shape=[int(d) for d in shape],
        timestep_dtype=ts_dtype,
        timestep_shape=list(timestep[0].shape) if timestep and all(isinstance(d, int) for d in timestep[0].shape) else None,
        latent_dtype=latent_dtype,
        timestep_scale=opts.timestep_scale,
        guidance_scale=opts.guidance_scale,
        learned_sigma=learned_sigma,
    )


def filter_hw(analysis: ModelAnalysis, spec: SamplingSpec) -> tuple[int, int] | None:
    """The output's spatial axes (its last two) where it has them: images [B,C,H,W], video [B,C,F,H,W]."""
    shape = analysis.shapes_b1.get(spec.output)
    if shape is None or len(shape) < 4:
        return None
    return int(shape[-2]), int(shape[-1])


class _Engines:
    """Calibration's view of the two graphs: full -> (output, caches); cache -> uncorrected output."""

    def __init__(self, folder: Path, spec: SamplingSpec, n_caches: int):
        self.full = OnnxRuntimeEngine(folder / "full.onnx", spinning=False)  # as the runtime runs them
        self.cache = OnnxRuntimeEngine(folder / UNCORRECTED, spinning=False)
        self.output = spec.output
        self.caches = [cache_name(i) for i in range(n_caches)]
        self.full_in = [s.name for s in self.full.inputs]
        self.cache_in = [s.name for s in self.cache.inputs]

    def full_fn(self, feeds: dict) -> tuple[np.ndarray, dict]:
        out = self.full.run({k: feeds[k] for k in self.full_in})
        return out[self.output], {k: out[k] for k in self.caches}

    def cache_fn(self, feeds: dict, caches: dict) -> np.ndarray:
        return self.cache.run({k: caches[k] if k in caches else feeds[k] for k in self.cache_in})[self.output]

    def close(self) -> None:
        self.full.close()
        self.cache.close()


def conditioning(model: ir.Model, analysis: ModelAnalysis, opts: ExportOptions, spec: SamplingSpec) -> Conditioning:
    if opts.calib is not None:
        cond = load_conditioning(opts.calib, analysis.io, spec.cfg)
        if cond.n_samples < opts.num_calib:
            logger.warning("%s holds %d samples; calibrating on those", opts.calib, cond.n_samples)
        return cond
    logger.warning("no --calib given: calibrating on conditioning synthesized from the input shapes")
    return synthesize_conditioning(model, analysis.io, opts.num_calib, opts.seed, opts.input_dims)


def export(model_path: str | Path, out_dir: str | Path, opts: ExportOptions) -> Path:
    model_path, out_dir = Path(model_path), Path(out_dir)
    if opts.steps < 3:
        raise UserError(f"--steps {opts.steps}: a cache schedule needs at least 3 steps")
    if opts.cache_ratio is not None and opts.speedup is not None:
        raise UserError("give --cache-ratio or --speedup, not both")
    if out_dir.exists() and not opts.force:
        raise UserError(f"{out_dir} already exists (pass --force to replace it)")
    source = modelio.load_model(model_path)
    dims = dict(opts.input_dims or {})
    analysis = analyze(source, opts.latent, opts.timestep, opts.region_start, opts.region_end, dims)
    if opts.latent_shape:
        latent = analysis.role("latent")[0].name
        dims[latent] = [None, *opts.latent_shape]
        analysis = analyze(source, opts.latent, opts.timestep, opts.region_start, opts.region_end, dims)
    spec = sampling_spec(analysis, opts)
    cond = conditioning(source, analysis, opts, spec)
    k = min(opts.num_calib, cond.n_samples)
    batched = batched_inputs(analysis.io)
    calib_cond, calib_uncond = cond.take(0, k, batched)

    with modelio.atomic_output_dir(out_dir, force=opts.force) as tmp:
        t0 = time.perf_counter()
        write_graphs(model_path, source, analysis, tmp, cache_name=UNCORRECTED)
        engines = _Engines(tmp, spec, len(analysis.region.streams))
        try:
            one_cond, one_uncond = cond.take(0, 1, batched)
            probe = _step_feeds(spec, one_cond, one_uncond, batched)
            cost_ratio, full_ms, cache_ms = measure_cost_ratio(engines.full_fn, engines.cache_fn, probe)
            try:
                n_cached = sched.n_cached_for(
                    opts.steps, cache_ratio=opts.cache_ratio if opts.speedup is None else None,
                    speedup=opts.speedup, cost_ratio=cost_ratio, max_consecutive=opts.max_consecutive,
                    allow_last_cached=opts.allow_last_cached is not False,
                ) if (opts.cache_ratio is not None or opts.speedup is not None) else _default_cached(opts)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            plan = CalibrationPlan(n_cached, opts.max_consecutive, opts.allow_last_cached, opts.filters,
                                   schedules=opts.schedules, correction=opts.correction)
            hw = filter_hw(analysis, spec)
            try:
                result = calibrate(spec, engines.full_fn, engines.cache_fn, calib_cond, calib_uncond, k, opts.seed,
                                   plan, hw, progress=opts.progress, batched=batched)
            except ValueError as exc:  # e.g. no schedule of the requested family fits the constraints
                raise UserError(str(exc)) from None
        finally:
            engines.close()
        best = result.best
        coefficients = best.correction.coefficients(result.ratios)
        masks = best.correction.masks(spec.n_steps, hw)
        blends = best.correction.blends(result.ratios)
        trends = best.correction.trends(result.ratios)
        _embed(tmp, spec.output, coefficients, masks, blends, trends, len(analysis.region.streams))
        verification = _verify(tmp, spec, analysis, calib_cond, calib_uncond, k, opts.seed, result, batched)
        predicted = sched.speedup_of(spec.n_steps, best.schedule.n_cached, cost_ratio)
        body = {
            "source": {"path": str(model_path), "sha256": modelio.sha256_file(model_path)},
            "io": {
                "inputs": [s.to_json() for s in analysis.io if s.role != "output"],
                "outputs": [s.to_json() for s in analysis.role("output")],
                "cache_tensors": [cache_name(i) for i in range(len(analysis.region.streams))],
                "block_region": analysis.to_json()["block_region"],
            },
            "sampling": spec.to_json(),
            "timesteps": result.timesteps.tolist(),
            "schedule": {
                "name": best.schedule.name, "pattern": best.schedule.pattern, "full": best.schedule.full.tolist(),
                "n_full": best.schedule.n_full, "n_cached": best.schedule.n_cached,
                "max_consecutive": opts.max_consecutive,
            },
            "correction": {
                "name": best.correction.name,
                "gammas": _nan_list(best.correction.gammas),
                "ratios": result.ratios.tolist(),
                "coefficients": coefficients.tolist(),
                "blend": blends.tolist(),
                "cache_trend": trends.tolist(),
                "filter": dataclasses.asdict(best.correction.filter) | {"name": best.correction.filter.name},
                "stages": _stages(best.correction.filter, spec.n_steps),
                "filter_hw": list(hw) if hw else None,
            },
            "curvature": {"mean": _nan_list(result.curvature.mean), "std": _nan_list(result.curvature.std)},
            "calibration": {
                "n_samples": k, "seed": opts.seed, "synthesized_conditioning": cond.synthesized,
                "candidates": [c.to_json() | {"chosen": c is best} for c in result.candidates],
                "quality": {"psnr_db_mean": best.psnr_db, "psnr_db_min": best.psnr_min_db, "rmse": best.rmse},
                "seconds": round(time.perf_counter() - t0, 2),
            },
            "speed": {
                "cost_ratio": cost_ratio, "full_ms": full_ms, "cache_ms": cache_ms,
                "predicted_speedup": predicted, "measured_speedup": verification.pop("measured_speedup"),
            },
            "verification": verification,
            "engines": {"onnxruntime": {"full": "full.onnx", "cache": "cache.onnx"}},
        }
        body["artifacts"] = artifact_entries(tmp, ["full.onnx", "cache.onnx"])
        write_manifest(tmp, body)
        _write_report(tmp, body, result, best, masks, hw, cond.synthesized, model_path.name)
    return out_dir


def _default_cached(opts: ExportOptions) -> int:
    """Without a target: half the steps, within what the consecutive limit allows."""
    return min(sched.max_cached(opts.steps, opts.max_consecutive, opts.allow_last_cached is not False),
               opts.steps // 2)


def _step_feeds(spec: SamplingSpec, cond: dict, uncond: dict, batched: set[str]) -> dict:
    """Feeds of one step for one sample (the static batch's worth where the export fixed it)."""
    from omnicache_export.runtime.sampler import Denoiser

    den = Denoiser(spec)
    size = spec.chunk or 1
    cond = {k: np.repeat(v, size, axis=0) if k in batched else v for k, v in cond.items()}
    uncond = {k: np.repeat(v, size, axis=0) if k in batched else v for k, v in uncond.items()}
    return den.feeds(0, den.initial_latents(size, 0), batched_feeds(spec, cond, uncond))


def _embed(folder: Path, output: str, coefficients: np.ndarray, masks: np.ndarray | None, blends: np.ndarray,
           trends: np.ndarray, n_caches: int) -> None:
    from omnicache_export.passes.embed_correction import EmbedCorrectionPass
    from omnicache_export.passes.extrapolate_cache import ExtrapolateCachePass

    model = modelio.load_model(folder / UNCORRECTED)
    if np.any(trends):  # only then does the cache graph take the previous caches
        ExtrapolateCachePass([cache_name(i) for i in range(n_caches)], trends)(model)
    EmbedCorrectionPass(output, coefficients, masks, blends)(model)
    modelio.save_model(model, folder / "cache.onnx", external=modelio.uses_external_data(model) or None)
    check_saved(folder / "cache.onnx")
    del model
    for path in (folder / UNCORRECTED, folder / f"{UNCORRECTED}.data"):
        path.unlink(missing_ok=True)


def _verify(folder: Path, spec, analysis, cond, uncond, k, seed, result, batched) -> dict:
    """The runtime, with the correction inside the graph, against calibration's numpy correction
    (same schedule, seeds, conditions) and against sampling without cache; and its speed."""
    from omnicache_export.runtime.omnicache import OmniCache

    # Artifacts are hashed after this check, so the runtime is built from the parts, not the manifest.
    names = [cache_name(i) for i in range(len(analysis.region.streams))]
    rt = OmniCache(folder, spec, result.best.schedule.full, names, {"full": "full.onnx", "cache": "cache.onnx"})
    try:
        cached = rt.sample(cond, uncond, k, seed, batched=batched)
        t0 = time.perf_counter()
        rt.sample(cond, uncond, k, seed + 1, batched=batched)
        t_cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        rt.sample(cond, uncond, k, seed + 1, no_cache=True, batched=batched)
        t_full = time.perf_counter() - t0
    finally:
        rt.close()
    scale = float(np.abs(result.best.final).max()) or 1.0
    return {
        "runtime_vs_calibration_max_rel_err": float(np.abs(cached - result.best.final).max() / scale),
        "runtime_psnr_db_vs_no_cache": float(psnr(cached, result.reference).mean()),
        "measured_speedup": t_full / t_cached if t_cached > 0 else None,
    }


def _nan_list(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, float)]


def _stages(filt, n: int) -> list[str]:
    if filt.is_all_pass:
        return ["all"] * n
    return [("low" if filt.low_rho is not None else "all") if filt.stage_of(i) == 0
            else ("high" if filt.high_rho is not None else "all") for i in range(n)]


def _write_report(folder: Path, body: dict, result, best, masks, hw, synthesized: bool, model_name: str) -> None:
    from omnicache_export.report.page import ReportData, write_report

    notes = []
    if synthesized:
        notes.append("conditioning synthesized from the input shapes (no --calib given): give real conditioning for a schedule that fits your prompts")
    filter_masks = {}
    if masks is not None and hw is not None:
        early, late = best.correction.filter.stage_masks(*hw)
        filter_masks = {"early stage": early, "late stage": late}
    data = ReportData(
        model_name=model_name,
        n_steps=len(result.timesteps),
        timesteps=result.timesteps,
        schedule_full=best.schedule.full,
        schedule_name=best.schedule.name,
        correction_name=best.correction.name,
        projections=result.curvature.projections,
        curvature_mean=result.curvature.mean,
        curvature_std=result.curvature.std,
        coefficients=np.array(body["correction"]["coefficients"]),
        gammas=np.array([np.nan if g is None else g for g in body["correction"]["gammas"]]),
        stages=np.array(body["correction"]["stages"]),
        filter_params={} if best.correction.filter.is_all_pass else dataclasses.asdict(best.correction.filter),
        filter_masks=filter_masks,
        candidates=body["calibration"]["candidates"],
        speed=body["speed"],
        quality=body["calibration"]["quality"] | {"n_samples": body["calibration"]["n_samples"]},
        notes=notes,
    )
    write_report(folder / "report.html", data)
