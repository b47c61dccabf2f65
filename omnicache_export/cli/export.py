"""`omnicache-export [export] MODEL.onnx -o OUT`: the main job."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omnicache_export.cli import args as common
from omnicache_export.errors import UserError

logger = logging.getLogger(__name__)
DEFAULT_SCHEDULER = "ddim"


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("export", parents=parents, help="the main job: calibrate, split, embed the correction "
                         "(the default verb)", description="The main job: inspect, split, calibrate (schedule, "
                         "correction, filters), embed the correction, verify, write the manifest and the report.")
    common.add_model_options(p)
    common.add_output_folder(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--scheduler", default=None, metavar="NAME|FILE.json",
                   help=f"ddim | dpmsolver++ | euler | flow-euler | a diffusers scheduler_config.json (default: "
                        f"{DEFAULT_SCHEDULER}, epsilon prediction, with a warning: flow-matching models such as "
                        "SD3, Flux or PixArt-Sigma need flow-euler or their own scheduler_config.json)")
    s.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"],
                   help="for ddim/dpmsolver++/euler (default: the scheduler's own: epsilon for the presets)")
    s.add_argument("--steps", type=int, default=30, metavar="N", help="sampling steps (default: 30)")
    s.add_argument("--guidance-scale", type=float, default=1.0, metavar="G",
                   help="classifier-free guidance, needs uncond/ arrays in --calib (default: 1, no guidance)")
    s.add_argument("--latent-shape", metavar="C,H,W",
                   help="one sample's latent shape where it is dynamic (default: the latent input's own shape)")
    s.add_argument("--timestep-scale", type=float, default=1.0, metavar="S",
                   help="model timestep = scheduler timestep x this, e.g. 0.001 for Flux (default: 1)")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the graphs' compute precision: fp16 / bf16 mixed precision in the graph (timestep path, "
                        "normalizations and softmax kept in fp32), converted before calibration so the schedule "
                        "fits it (default: fp32, the model as it is, fp16 models included)")
    g.add_argument("--io-precision", choices=["model", "fp32", "fp16", "bf16"], default="model",
                   help="float inputs and outputs of the converted graphs (default: model, as the model has them)")
    t = p.add_argument_group("target")
    t.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="what calibration runs on: tensorrt builds both plans first (needs TensorRT and a GPU) and "
                        "records them in the manifest (default: onnxruntime)")
    t.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="calibration's device: cuda is ONNX Runtime's CUDA provider (default: cpu; cuda with "
                        "--backend tensorrt)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", type=Path, metavar="FILE.npz",
                   help="conditioning arrays keyed by input name (default: synthesized from the input shapes, "
                        "with a warning)")
    c.add_argument("--num-calib", type=int, default=None, metavar="K",
                   help="calibration samples (default: 20); with --validation split half of them are held out "
                        "from the choice and report its quality")
    c.add_argument("--validation", choices=["split", "seeds"], default=None,
                   help="where the reported quality is measured: on calibration samples held out from the choice "
                        "(split), or on the K conditions at a fresh seed (seeds) (default: split)")
    c.add_argument("--validation-seeds", type=int, default=None, metavar="N",
                   help="noise seeds each validation sample is drawn at: the reported figure averages over them "
                        "(default: 3)")
    c.add_argument("--no-halving", action="store_true",
                   help="score every candidate on every sample instead of by successive halving (default: halving)")
    c.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed of the calibration samples (default: 0)")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--cache-ratio", type=float, metavar="R",
                        help="share of steps to cache, in [0, 1) (default, without --cache-ratio or --speedup: "
                             "half the steps rounded down, or the most that --max-consecutive and --keep-last-full allow if fewer)")
    target.add_argument("--speedup", type=float, metavar="X",
                        help="target speedup, from the measured cost of the two graphs (default: none; see "
                             "--cache-ratio)")
    c.add_argument("--max-consecutive", default="auto", metavar="N|auto",
                   help="longest run of cached steps (default: auto, runs of up to 4 where the target needs them, "
                        "the limit picked by score)")
    last = c.add_mutually_exclusive_group()
    last.add_argument("--allow-last-cached", dest="last_step", action="store_const", const=True,
                      help="schedules may cache the last step (default: calibration tries both ways)")
    last.add_argument("--keep-last-full", dest="last_step", action="store_const", const=False,
                      help="the last step is always computed in full (default: calibration tries both ways)")
    c.add_argument("--no-filters", action="store_true",
                   help="do not try frequency filters in calibration (default: tried)")
    c.add_argument("--correction", choices=["auto", "none", "gamma1", "gamma"], default="auto",
                   help="correction candidates: all (auto), none, gamma = 1 only, or fitted gammas without filters "
                        "(default: auto)")
    c.add_argument("--schedules", metavar="LIST", help="comma-separated schedule families to try: curvature-dp,staleness-dp,"
                   "alternation,corrected-error-dp (default: all)")
    p.set_defaults(func=run)


def _check(a: argparse.Namespace) -> None:
    from omnicache_export.calibration.schedule import ScheduleFamily
    from omnicache_export.runtime.sampler import SCHEDULER_PRESETS

    if a.num_calib is not None and a.num_calib < 1:
        raise UserError("--num-calib must be at least 1")
    if a.validation_seeds is not None and a.validation_seeds < 1:
        raise UserError(f"--validation-seeds {a.validation_seeds}: must be at least 1")
    if a.cache_ratio is not None and not 0 <= a.cache_ratio < 1:
        raise UserError(f"--cache-ratio {a.cache_ratio}: must be in [0, 1)")
    if a.speedup is not None and a.speedup < 1:
        raise UserError(f"--speedup {a.speedup}: must be at least 1")
    families = [f.value for f in ScheduleFamily if f not in (ScheduleFamily.NO_CACHE, ScheduleFamily.GIVEN)]
    unknown = set(a.schedules.split(",")) - set(families) if a.schedules else set()
    if unknown:
        raise UserError(f"--schedules: unknown {', '.join(sorted(unknown))} (choose from {', '.join(families)})")
    a.max_consecutive = _max_consecutive(a.max_consecutive)
    common.input_file(a.model, "an ONNX file")
    from omnicache_export.pipeline.tensorrt_build import check_calibration_target

    check_calibration_target(a.backend, a.device)  # one line where this machine lacks it, before any work
    common.input_file(a.calib, "an .npz file")
    if a.scheduler is not None and a.scheduler not in SCHEDULER_PRESETS and Path(a.scheduler).is_dir():
        raise UserError(f"--scheduler {a.scheduler}: is a directory, not a scheduler_config.json")


def _max_consecutive(value: str) -> int | None:
    """--max-consecutive: `auto` (None) or a positive integer."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--max-consecutive {value}: an integer >= 1 or auto") from None
    if n < 1:
        raise UserError("--max-consecutive must be at least 1")
    return n


def sampling_line(scheduler: dict, steps: int, guidance: float, how: str) -> str:
    cls = scheduler.get("_class_name", "?")
    kind = "flow matching" if "FlowMatch" in cls else f"{scheduler.get('prediction_type', 'epsilon')} prediction"
    return f"sampling: {cls} ({how}), {kind}, {steps} steps, guidance scale {guidance:g}"


def _db(v: float | None) -> str:
    return "identical" if v is None else f"{v:.2f} dB"


def quality_line(quality, cost) -> str:
    """The summary's quality line: the held-out figure first (what new conditions get), then the
    figure on the samples that chose (optimistic), and what choosing cost."""
    chose = f"{_db(quality.psnr_db_mean)} on the samples that chose it"
    if quality.validation:
        where = ("held-out calibration samples" if quality.validation == "split"
                 else "the calibration conditions at a fresh seed")
        line = (f"quality vs no cache: {_db(quality.validation_psnr_db)} PSNR on {quality.validation_samples} "
                f"{where} ({chose})")
    else:
        line = f"quality vs no cache on the calibration samples: {_db(quality.psnr_db_mean)} PSNR"
    if cost is not None:
        how = "successive halving" if cost.halving else "every candidate on every sample"
        line += (f"; scoring: {cost.scoring_evaluations} model evaluations ({how}; "
                 f"{cost.exhaustive_evaluations} exhaustive), {cost.scoring_seconds:.1f} s")
    return line


def run(a: argparse.Namespace) -> int:
    _check(a)
    from omnicache_export import outputs
    from omnicache_export.pipeline.job import ExportOptions, export, input_paths

    opts = ExportOptions(
        scheduler=a.scheduler or DEFAULT_SCHEDULER,
        steps=a.steps,
        calib=a.calib,
        guidance_scale=a.guidance_scale,
        **({} if a.num_calib is None else {"num_calib": a.num_calib}),
        **({} if a.validation is None else {"validation": a.validation}),
        **({} if a.validation_seeds is None else {"validation_seeds": a.validation_seeds}),
        halving=not a.no_halving,
        seed=a.seed,
        latent_shape=common.parse_ints(a.latent_shape, "--latent-shape"),
        input_dims=common.parse_dims(a.input_shape),
        timestep_scale=a.timestep_scale,
        prediction_type=a.prediction_type,
        cache_ratio=a.cache_ratio,
        speedup=a.speedup,
        max_consecutive=a.max_consecutive,
        allow_last_cached=a.last_step,
        filters=not a.no_filters,
        correction=a.correction,
        schedules=tuple(a.schedules.split(",")) if a.schedules else None,
        latent=a.latent,
        timestep=a.timestep,
        region_start=a.region_start,
        region_end=a.region_end,
        precision=a.precision,
        io_precision=a.io_precision,
        backend=a.backend,
        device=a.device,
        force=a.force,
        progress=not a.quiet,
    )
    outputs.check_output_dir(a.output, force=a.force, inputs=input_paths(a.model, opts))  # before any note
    if a.scheduler is None:
        logger.warning("no --scheduler given: sampling with DDIM, epsilon prediction (right for DiT, PixArt-alpha); "
                       "flow-matching models (SD3, Flux, PixArt-Sigma, ...) need --scheduler flow-euler or their "
                       "scheduler_config.json")
    out = export(a.model, a.output, opts)
    from omnicache_export.runtime.manifest import read_manifest

    manifest = read_manifest(out)
    sched, speed, quality = manifest.schedule, manifest.speed, manifest.calibration.quality
    how = "default, no --scheduler given" if a.scheduler is None else f"--scheduler {a.scheduler}"
    print(sampling_line(manifest.sampling.scheduler, len(sched.full), manifest.sampling.guidance_scale, how))
    limit = f"runs <= {sched.max_consecutive}" + (", auto" if sched.max_consecutive_auto else "")
    print(f"schedule {sched.name}: {sched.pattern} ({sched.n_cached} of {len(sched.full)} steps cached, {limit})")
    print(f"correction: {manifest.correction.name}")
    if a.precision != "fp32" or manifest.engines[0].precision.value != "fp32":
        print(f"precision: {manifest.engines[0].precision.value} in the graphs (--precision {a.precision}, "
              f"--io-precision {a.io_precision})")
    print(quality_line(quality, manifest.calibration.cost))
    measured = speed.measured_speedup
    if measured:
        print(f"speedup: predicted {speed.predicted_speedup:.2f}x, measured {measured:.2f}x (ONNX Runtime, CPU)")
    print(f"wrote {out}/full.onnx, {out}/cache.onnx, {out}/omnicache.json, {out}/report.html")
    if not any(e.backend == "tensorrt" for e in manifest.engines):
        from omnicache_export.pipeline.tensorrt_build import not_built_line

        print(not_built_line(out, a.backend))
    return 0
