"""The main job, `omnicache-export MODEL.onnx -o OUT`: inspect, split, calibrate, embed the
correction, verify, write the manifest and the report. Everything is written into a temporary
folder that becomes OUT only when every step succeeded."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from omnicache_export import outputs
from omnicache_export.graph import modelio
from omnicache_export.calibration import schedule as sched
from omnicache_export.graph.analysis import ModelAnalysis, analyze
from omnicache_export.calibration.calibrate import CalibrationGraphs, CalibrationSet, calibrate, measure_cost_ratio, psnr
from omnicache_export.calibration.candidates import AUTO_MAX_CONSECUTIVE, CalibrationPlan
from omnicache_export.calibration.validation import DEFAULT_SEEDS, DEFAULT_VALIDATION
from omnicache_export.engines import load_engine
from omnicache_export.graph.describe import describe_graphs
from omnicache_export.graph.embed import build_cache_graph, freeze_cache_graph
from omnicache_export.errors import UserError
from omnicache_export.io_spec import IOSpec
from omnicache_export.io_spec import NUMPY_DTYPES
from omnicache_export.graph.synthetic import index_ranges, synthesize_conditioning
from omnicache_export.pipeline import tensorrt_build
from omnicache_export.pipeline.memory import plan_calibration
from omnicache_export.runtime.conditioning import Conditioning, batched_inputs, load_conditioning
from omnicache_export.pipeline.record import build_manifest, onnxruntime_entry
from omnicache_export.graph.precision import convert_model, graph_precision
from omnicache_export.runtime.graph_check import embedded_metadata
from omnicache_export.runtime.manifest import UNCOND_FILE, Manifest, Sampling, Speed, Verification, write_manifest
from omnicache_export.passes.cache_names import cache_name
from omnicache_export.runtime.dispatch import StepDispatch
from omnicache_export.runtime.sampler import SamplingSpec, check_steps, scheduler_config
from omnicache_export.graph.split import check_saved, write_graphs

logger = logging.getLogger(__name__)
UNCORRECTED = "cache.uncorrected.onnx"
CONVERTED = "source.converted.onnx"  # --precision fp16/bf16: the converted model the split starts from
DEFAULT_NUM_CALIB = 20  # K, half of it held out for the reported figure (docs/benchmarks.md, "Calibration: reported vs new conditions")


@dataclasses.dataclass
class ExportOptions:
    scheduler: str = "ddim"
    steps: int = 30
    calib: Path | None = None
    guidance_scale: float = 1.0
    num_calib: int = DEFAULT_NUM_CALIB
    seed: int = 0
    latent_shape: list[int] | None = None
    input_dims: dict[str, list[int | None]] | None = None
    timestep_scale: float = 1.0
    prediction_type: str | None = None
    cache_ratio: float | None = None
    speedup: float | None = None
    max_consecutive: int | None = None  # None: auto (runs up to AUTO_MAX_CONSECUTIVE where the target needs them)
    validation: str = DEFAULT_VALIDATION.value  # split | seeds: which samples the reported quality is measured on
    validation_seeds: int = DEFAULT_SEEDS  # noise seeds per validation row
    halving: bool = True  # score candidates by successive halving (False: every one on every sample)
    allow_last_cached: bool | None = None  # None: calibration tries both, keeps the better
    filters: bool = True
    schedules: tuple[str, ...] | None = None  # restrict schedule candidates (ablations)
    correction: str = "auto"  # none | gamma1 | gamma | auto
    latent: str | None = None
    timestep: str | None = None
    region_start: str | None = None
    region_end: str | None = None
    precision: str = "fp32"  # fp32 (the model as it is) | fp16 | bf16: graph/precision.convert_model
    io_precision: str = "model"  # model | fp32 | fp16 | bf16: the converted graphs' float inputs and outputs
    backend: str = "onnxruntime"  # what calibration runs on: onnxruntime | tensorrt (builds the plans first)
    device: str | None = None  # cpu | cuda (None: cpu for onnxruntime, cuda for tensorrt)
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


def conditioning(model: ir.Model, analysis: ModelAnalysis, opts: ExportOptions, spec: SamplingSpec) -> Conditioning:
    if opts.calib is not None:
        cond = load_conditioning(opts.calib, analysis.io, spec.cfg, index_ranges(model, analysis.io))
        if cond.n_samples < opts.num_calib:
            logger.warning("%s holds %d samples; calibrating on those", opts.calib, cond.n_samples)
        return cond
    logger.warning("no --calib given: calibrating on conditioning synthesized from the input shapes")
    return synthesize_conditioning(model, analysis.io, opts.num_calib, opts.seed, opts.input_dims)


def export(model_path: str | Path, out_dir: str | Path, opts: ExportOptions) -> Path:
    model_path, out_dir = Path(model_path), Path(out_dir)
    if opts.steps < 3:
        raise UserError(f"--steps {opts.steps}: a cache schedule needs at least 3 steps")
    check_steps(scheduler_config(opts.scheduler, opts.prediction_type), opts.steps)  # its timesteps, its cap
    if opts.cache_ratio is not None and opts.speedup is not None:
        raise UserError("give --cache-ratio or --speedup, not both")
    device = tensorrt_build.check_calibration_target(opts.backend, opts.device)  # this machine has it
    inputs = input_paths(model_path, opts)
    outputs.check_output_dir(out_dir, force=opts.force, inputs=inputs)  # before any work
    source = modelio.load_user_model(model_path)
    # Converted once, before analysis: both graphs derive from it, calibration fits the deployed precision.
    source = convert_model(source, opts.precision, opts.io_precision, opts.latent, opts.timestep)
    dims = dict(opts.input_dims or {})
    analysis = analyze(source, opts.latent, opts.timestep, opts.region_start, opts.region_end, dims)
    if opts.latent_shape:
        latent = analysis.role("latent")[0].name
        dims[latent] = [None, *opts.latent_shape]
        analysis = analyze(source, opts.latent, opts.timestep, opts.region_start, opts.region_end, dims)
    readiness = tensorrt_readiness("source", model_path.name, source, analysis.shapes_b1)  # a warning, not a refusal
    spec = sampling_spec(analysis, opts)
    cond = conditioning(source, analysis, opts, spec)
    k = min(opts.num_calib, cond.n_samples)
    batched = batched_inputs(analysis.io)
    calib_cond, calib_uncond = cond.take(0, k, batched)
    memory = plan_calibration(analysis, spec, k, modelio.weight_bytes(source))  # refuses what cannot fit

    with outputs.atomic_output_dir(out_dir, force=opts.force, inputs=inputs) as tmp:
        t0 = time.perf_counter()
        split_from = model_path
        if opts.precision != "fp32":  # the split reloads its source: the converted model, saved
            split_from = tmp / CONVERTED
            _save(source, split_from)
        write_graphs(split_from, source, analysis, tmp, cache_name=UNCORRECTED)
        names = [cache_name(i) for i in range(len(analysis.region.streams))]
        hw = filter_hw(analysis, spec)
        data = CalibrationSet(spec, calib_cond, calib_uncond, opts.seed, batched, k, batch_size=memory.batch_size,
                              record_budget=memory.record_budget, validation=opts.validation,
                              validation_seeds=opts.validation_seeds)
        load = tensorrt_build.calibration_loader(opts.backend, device, spec, memory.batch_size, calib_cond, tmp)
        with _input_model_errors(model_path):
            graphs = calibration_graphs(tmp, analysis.io, spec, names, hw, load)
        try:
            with _input_model_errors(model_path):  # the first ONNX Runtime load and run of full.onnx
                cost_ratio, full_ms, cache_ms = measure_cost_ratio(graphs.plain, data)
            try:
                n_cached = sched.n_cached_for(
                    opts.steps, cache_ratio=opts.cache_ratio if opts.speedup is None else None,
                    speedup=opts.speedup, cost_ratio=cost_ratio, max_consecutive=_run_cap(opts),
                    allow_last_cached=opts.allow_last_cached is not False,
                ) if (opts.cache_ratio is not None or opts.speedup is not None) else _default_cached(opts)
                plan = CalibrationPlan(n_cached, opts.max_consecutive, opts.allow_last_cached, opts.filters,
                                       schedules=opts.schedules, correction=opts.correction, halving=opts.halving)
                result = calibrate(graphs, data, plan, hw, progress=opts.progress)
            except ValueError as exc:  # e.g. no schedule of the requested family fits the constraints
                raise UserError(str(exc)) from None
        finally:
            graphs.close()
        best = result.best
        tables = result.tables()
        full_io, cache_io = _write_cache_graph(tmp, analysis, spec, names, tables, hw, best.schedule.full)
        for name in (CALIB_PLAIN, CALIB_FILTERED, UNCORRECTED, CONVERTED):
            for path in (tmp / name, tmp / f"{name}.data"):
                path.unlink(missing_ok=True)
        shutil.rmtree(tmp / tensorrt_build.CALIBRATION_PLANS, ignore_errors=True)
        for graph in ("full", "cache"):  # the graphs as written, before the folder is renamed into place
            readiness += tensorrt_readiness(graph, f"{graph}.onnx", modelio.load_model(tmp / f"{graph}.onnx"),
                                            analysis.shapes_b1)  # a value keeps its source name and shape
        verification = verify_runtime(tmp, full_io, cache_io, spec, data, result, graph_precision(source))
        predicted = sched.speedup_of(spec.n_steps, best.schedule.n_cached, cost_ratio)
        uncond = _write_uncond(tmp, cond, batched) if spec.cfg else None
        manifest = build_manifest(
            tmp, model_path=model_path, analysis=analysis, spec=spec, result=result, tables=tables,
            full_io=full_io, cache_io=cache_io, max_consecutive=result.max_consecutive, n_samples=k, seed=opts.seed,
            synthesized_conditioning=cond.synthesized, seconds=time.perf_counter() - t0,
            speed=Speed(cost_ratio, full_ms, cache_ms, predicted, verification.pop("measured_speedup")),
            verification=Verification(**verification), index_ranges=index_ranges(source, analysis.io),
            engines=(onnxruntime_entry(graph_precision(source)),),
            tensorrt_readiness=readiness,
            uncond=uncond,
        )
        # reference IO, build_engines.sh (and with --backend tensorrt the plans), listed as artifacts
        manifest = tensorrt_build.export_files(tmp, manifest, calib_cond, calib_uncond, batched, opts.seed,
                                               build_engines=opts.backend == "tensorrt")
        write_manifest(tmp, manifest)
        _write_report(tmp, manifest, result, tables.masks, cond.synthesized)
    return out_dir


def tensorrt_readiness(graph: str, what: str, model: ir.Model, shapes: dict | None = None) -> list:
    """The TensorRT readiness check of one graph (every supported TensorRT line): one warning line
    naming the first finding where a line is not ready (users may deploy on ONNX Runtime only), and
    the manifest's records."""
    from omnicache_export.graph.tensorrt_check import check_model, readiness_records, warning_line
    from omnicache_export.passes.static_shapes import infer_elem_types

    results = check_model(model, shapes=shapes, types=infer_elem_types(model))
    line = warning_line(what, results)
    if line is not None:
        logger.warning("%s", line)
    return readiness_records(graph, results)


def _write_uncond(folder: Path, cond: Conditioning, batched: set[str]) -> str | None:
    """The calibration set's first unconditional row of each input (`uncond/<name>` of --calib, row 0;
    inputs without a batch axis whole) as `uncond.npz`: what a served request without its own
    `uncond/<name>` takes. Returns its name (None: no uncond arrays)."""
    if not cond.uncond:
        return None
    with open(folder / UNCOND_FILE, "wb") as f:  # a file object: numpy appends no .npz to the name
        np.savez(f, **{k: (v[:1] if k in batched else v) for k, v in cond.uncond.items()})
    return UNCOND_FILE


def input_paths(model_path: Path, opts: ExportOptions) -> list[Path]:
    """The files the job reads: the output folder must neither be nor hold one of them."""
    paths = [model_path, opts.calib]
    if opts.scheduler and Path(opts.scheduler).is_file():
        paths.append(Path(opts.scheduler))
    return [Path(p) for p in paths if p is not None]


_ORT_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"


@contextlib.contextmanager
def _input_model_errors(model_path: Path):
    """ONNX Runtime failing on full.onnx (the input model plus one output) is usually the input
    model's own failure: if ONNX Runtime cannot load the input model either, say so, naming it."""
    try:
        yield
    except Exception as exc:
        if type(exc).__module__ != _ORT_ERRORS:
            raise
        import onnxruntime as ort

        try:
            ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as own:  # noqa: BLE001 - any failure to load is the model's
            text = " ".join(str(own).split())
            raise UserError(f"{model_path}: ONNX Runtime cannot load the input model: {text}") from None
        raise


def _run_cap(opts: ExportOptions) -> int:
    """The longest run of cached steps a target may need: the fixed limit, or auto's cap."""
    return AUTO_MAX_CONSECUTIVE if opts.max_consecutive is None else opts.max_consecutive


def _default_cached(opts: ExportOptions) -> int:
    """Without a target: half the steps, within what the consecutive limit allows."""
    return min(sched.max_cached(opts.steps, _run_cap(opts), opts.allow_last_cached is not False), opts.steps // 2)


CALIB_PLAIN = "calibration.cache.onnx"  # tables as inputs, the uncorrected output exposed
CALIB_FILTERED = "calibration.cache.filtered.onnx"  # ... with the frequency filter
VERIFY_TOLERANCE = 1e-3  # max |runtime − calibration| / max |calibration| of the final latents
# ... times this for graphs in 16-bit floats: frozen and fed tables round differently there (an fp16
# ulp is 9.8e-4 relative; an all-fp16 dit-digits export measured 1.7e-3 after 6 steps).
HALF_TOLERANCE_FACTOR = 10
SPEED_ROUNDS = 3  # measured speedup: median of this many interleaved cached / uncached sampling runs
SPEED_METHOD = (f"median of {SPEED_ROUNDS} interleaved sampling runs with and without cache, after a warm-up, "
                "same seeds and conditions")


def _save(model: ir.Model, path: Path) -> None:
    modelio.save_model(model, path, external=modelio.uses_external_data(model) or None)
    check_saved(path)


def _describe(folder: Path, full: str, cache: str, io: list[IOSpec], names: list[str], spec: SamplingSpec):
    return describe_graphs(modelio.load_model(folder / full), modelio.load_model(folder / cache), io, names,
                           spec.output)


def calibration_graphs(folder: Path, io: list[IOSpec], spec: SamplingSpec, names: list[str],
                       hw: tuple[int, int] | None, load=None) -> CalibrationGraphs:
    """From `folder`'s full.onnx and uncorrected cache graph: the full graph and the parametric cache
    graphs (tables as inputs) behind the runtime's dispatch, the engines loaded as the runtime loads them
    (`load(path, graph, full_io, cache_io)`, `tensorrt_build.calibration_loader`; default ONNX Runtime, CPU)."""
    load = load or (lambda path, graph, full_io, cache_io: load_engine("onnxruntime", path))

    def dispatch(cache_file: str, filter_hw) -> StepDispatch:
        model = build_cache_graph(modelio.load_model(folder / UNCORRECTED), spec.output, names, spec.n_steps,
                                  trend=True, blend=True, filter_hw=filter_hw, expose_uncorrected=True, trend2=True)
        _save(model, folder / cache_file)
        del model
        full_io, cache_io = _describe(folder, "full.onnx", cache_file, io, names, spec)
        return StepDispatch(load(folder / "full.onnx", "full", full_io, cache_io),
                            load(folder / cache_file, "cache", full_io, cache_io), full_io, cache_io)

    return CalibrationGraphs(dispatch(CALIB_PLAIN, None),
                             (lambda: dispatch(CALIB_FILTERED, hw)) if hw is not None else None)


def _write_cache_graph(folder: Path, analysis: ModelAnalysis, spec: SamplingSpec, names: list[str], tables,
                       hw: tuple[int, int] | None, schedule_full: np.ndarray):
    """cache.onnx: the uncorrected cache graph with only the parts the chosen correction uses, its
    tables frozen into constants, and the schedule and sampling record in its metadata (the runtime
    checks the manifest against them: `runtime.graph_check`). Returns both graphs' GraphIO."""
    model = build_cache_graph(modelio.load_model(folder / UNCORRECTED), spec.output, names, spec.n_steps,
                              trend=bool(np.any(tables.trend)) or tables.has_trend2, blend=bool(np.any(tables.blend)),
                              filter_hw=hw if tables.has_filter else None, trend2=tables.has_trend2)
    wanted = {k: v for k, v in tables.inputs().items() if k in {val.name for val in model.graph.inputs}}
    model = freeze_cache_graph(model, wanted)
    model.metadata_props.update(embedded_metadata(schedule_full, Sampling.from_spec(spec).to_json()))
    _save(model, folder / "cache.onnx")
    del model
    return _describe(folder, "full.onnx", "cache.onnx", analysis.io, names, spec)


def verify_runtime(folder: Path, full_io, cache_io, spec: SamplingSpec, data: CalibrationSet, result,
                   precision: str = "fp32") -> dict:
    """The runtime on the exported graphs (tables frozen) against calibration's run of the chosen
    candidate (same dispatch, same seeds and conditions, tables fed): they must agree within
    VERIFY_TOLERANCE, else the export fails. Also its PSNR against sampling without cache, and the
    measured speedup (SPEED_METHOD)."""
    from omnicache_export.runtime.omnicache import OmniCache

    # Artifacts are hashed after this check, so the runtime is built from the parts, not the manifest.
    rt = OmniCache.from_files(folder / "full.onnx", folder / "cache.onnx", full_io, cache_io, spec,
                              result.best.schedule.full)
    try:
        rows = list(result.best.rows)  # the rows calibration scored the chosen one on (`best.final`'s)
        cond, uncond = ({k: (v[rows] if k in data.batched else v) for k, v in d.items()} for d in (data.cond, data.uncond))
        kw = {"batched": data.batched, "batch_size": data.batch_size,  # calibration's batches: same numbers, memory
              "rows": rows}  # its rows too (a model without conditioning has no row count)
        cached = rt.sample(cond, uncond, data.seed, **kw)  # also the warm-up: both graphs ran
        times: dict[bool, list[float]] = {False: [], True: []}  # no_cache -> seconds per run
        for r in range(SPEED_ROUNDS):  # interleaved, the order alternating (AB BA AB): drift hits both
            for no_cache in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                rt.sample(cond, uncond, data.seed + 1, no_cache=no_cache, **kw)
                times[no_cache].append(time.perf_counter() - t0)
        t_cached, t_full = float(np.median(times[False])), float(np.median(times[True]))
    finally:
        rt.close()
    scale = float(np.abs(result.best.final).max()) or 1.0
    err = float(np.abs(cached - result.best.final).max() / scale)
    tolerance = VERIFY_TOLERANCE * (1 if precision == "fp32" else HALF_TOLERANCE_FACTOR)
    if not np.isfinite(err) or err > tolerance:
        raise UserError(f"verification failed: the exported graphs' samples differ from calibration's by {err:.3g} "
                        f"(relative, tolerance {tolerance:g}); please report this with the model")
    return {
        "runtime_vs_calibration_max_rel_err": err,
        "tolerance": tolerance,
        "runtime_psnr_db_vs_no_cache": float(psnr(cached, result.reference).mean()),
        "measured_speedup": t_full / t_cached if t_cached > 0 else None,
    }


def _write_report(folder: Path, manifest: Manifest, result, masks, synthesized: bool) -> None:
    from omnicache_export.report.page import ReportData, write_report

    best, hw = result.best, result.filter_hw
    notes = []
    if synthesized:
        notes.append("conditioning synthesized from the input shapes (no --calib given): give real conditioning for a schedule that fits your prompts")
    filter_masks = {}
    if masks is not None and hw is not None:
        early, late = best.correction.filter.stage_masks(*hw)
        filter_masks = {"early stage": early, "late stage": late}
    corr = manifest.correction
    data = ReportData(
        model_name=manifest.source.name,
        n_steps=len(result.timesteps),
        timesteps=result.timesteps,
        schedule_full=best.schedule.full,
        schedule_name=best.schedule.name,
        correction_name=best.correction.name,
        projections=result.curvature.projections,
        curvature_mean=result.curvature.mean,
        curvature_std=result.curvature.std,
        coefficients=np.array(corr.coefficients),
        gammas=np.array([np.nan if g is None else g for g in corr.gammas]),
        stages=np.array([s.value for s in corr.stages]),
        filter_params={} if best.correction.filter.is_all_pass else dataclasses.asdict(best.correction.filter),
        filter_masks=filter_masks,
        candidates=[c.to_json() for c in manifest.calibration.candidates],
        speed=manifest.speed.to_json(),
        quality=manifest.calibration.quality,
        n_samples=manifest.calibration.n_samples,
        notes=notes,
        sampling=manifest.sampling.to_json(),
        engines=[e.key for e in manifest.engines],
        cut={"method": manifest.model_io.block_region.method, "n_blocks": manifest.model_io.block_region.n_blocks,
             "streams": [{"cache": t.name, "dtype": t.dtype, "shape": list(t.shape), "entry": st.entry, "exit": st.exit}
                         for t, st in zip(manifest.model_io.cache_tensors, manifest.model_io.block_region.streams)]},
        speed_method=SPEED_METHOD if manifest.speed.measured_speedup is not None else None,
        cost=None if manifest.calibration.cost is None else manifest.calibration.cost.to_json(),
        max_consecutive=f"{manifest.schedule.max_consecutive}" + (" (auto)" if manifest.schedule.max_consecutive_auto else ""),
    )
    write_report(folder / "report.html", data)
