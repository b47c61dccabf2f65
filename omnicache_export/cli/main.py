"""`omnicache-export`: one verb per job (Polygraphy style).

  omnicache-export MODEL.onnx -o OUT                     the main job (same as `export`)
  omnicache-export run OUT --inputs FILE.npz --out RESULT.npz
  omnicache-export inspect MODEL.onnx [--json FILE]      input roles and the located block stack
  omnicache-export split MODEL.onnx -o OUT               full.onnx + cache.onnx
  omnicache-export example FAMILY -o MODEL.onnx          a tiny random-weight DiT export to try it on

Bad input exits with status 2 and one line on stderr; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omnicache_export.errors import UserError


def _parse_dims(items: list[str] | None) -> dict[str, list[int | None]]:
    """`--input-shape NAME=2,4,32,32` (a `?` keeps a dimension dynamic)."""
    dims: dict[str, list[int | None]] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep:
            raise UserError(f"--input-shape {item!r}: expected NAME=D0,D1,...")
        try:
            dims[name] = [None if d.strip() in ("?", "") else int(d) for d in spec.split(",")]
        except ValueError:
            raise UserError(f"--input-shape {item!r}: dimensions must be integers or ?") from None
    return dims


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the DiT's ONNX file")
    p.add_argument("--latent", help="name of the latent input (default: guessed from names and shapes)")
    p.add_argument("--timestep", help="name of the timestep input (default: guessed)")
    p.add_argument("--region-start", metavar="TENSOR", help="tensor entering the block stack (manual override)")
    p.add_argument("--region-end", metavar="TENSOR", help="tensor leaving the block stack (manual override)")
    p.add_argument(
        "--input-shape", action="append", metavar="NAME=D0,D1,...", help="concrete shape of a dynamic input (repeatable)"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    from omnicache_export.graph import modelio
    from omnicache_export.graph.analysis import analyze

    model = modelio.load_model(args.model)
    analysis = analyze(model, args.latent, args.timestep, args.region_start, args.region_end, _parse_dims(args.input_shape))
    print(analysis.summary())
    if args.json:
        args.json.write_text(json.dumps(analysis.to_json(), indent=2) + "\n")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from omnicache_export.graph.split import split

    result = split(
        args.model,
        args.output,
        latent=args.latent,
        timestep=args.timestep,
        region_start=args.region_start,
        region_end=args.region_end,
        input_dims=_parse_dims(args.input_shape),
        force=args.force,
        numeric_check=False if args.no_verify else None,
    )
    print(result.analysis.summary())
    print(f"wrote {result.out_dir}/full.onnx, {result.out_dir}/cache.onnx, {result.out_dir}/split.json")
    print("verification: " + json.dumps({k: v for k, v in result.verification.items() if k != "inputs"}))
    return 0


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers like 4,32,32") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from omnicache_export.pipeline.job import ExportOptions, export

    if args.num_calib < 1:
        raise UserError("--num-calib must be at least 1")
    if args.cache_ratio is not None and not 0 <= args.cache_ratio < 1:
        raise UserError(f"--cache-ratio {args.cache_ratio}: must be in [0, 1)")
    if args.speedup is not None and args.speedup < 1:
        raise UserError(f"--speedup {args.speedup}: must be at least 1")
    from omnicache_export.calibration.schedule import ScheduleFamily

    families = [f.value for f in ScheduleFamily if f not in (ScheduleFamily.NO_CACHE, ScheduleFamily.GIVEN)]
    unknown = set(args.schedules.split(",")) - set(families) if args.schedules else set()
    if unknown:
        raise UserError(f"--schedules: unknown {', '.join(sorted(unknown))} (choose from {', '.join(families)})")
    if args.max_consecutive < 1:
        raise UserError("--max-consecutive must be at least 1")
    opts = ExportOptions(
        scheduler=args.scheduler,
        steps=args.steps,
        calib=args.calib,
        guidance_scale=args.guidance_scale,
        num_calib=args.num_calib,
        seed=args.seed,
        latent_shape=_ints(args.latent_shape, "--latent-shape"),
        input_dims=_parse_dims(args.input_shape),
        timestep_scale=args.timestep_scale,
        prediction_type=args.prediction_type,
        cache_ratio=args.cache_ratio,
        speedup=args.speedup,
        max_consecutive=args.max_consecutive,
        allow_last_cached=args.last_step,
        filters=not args.no_filters,
        correction=args.correction,
        schedules=tuple(args.schedules.split(",")) if args.schedules else None,
        latent=args.latent,
        timestep=args.timestep,
        region_start=args.region_start,
        region_end=args.region_end,
        force=args.force,
        progress=not args.quiet,
    )
    out = export(args.model, args.output, opts)
    from omnicache_export.runtime.manifest import read_manifest

    manifest = read_manifest(out)
    sched, speed, quality = manifest.schedule, manifest.speed, manifest.calibration.quality
    print(f"schedule {sched.name}: {sched.pattern} ({sched.n_cached} of {len(sched.full)} steps cached)")
    print(f"correction: {manifest.correction.name}")
    print(f"quality vs no cache on the calibration samples: {quality.psnr_db_mean:.2f} dB PSNR")
    measured = speed.measured_speedup
    print(f"speedup: predicted {speed.predicted_speedup:.2f}x, measured {measured:.2f}x (ONNX Runtime, CPU)" if measured else "")
    print(f"wrote {out}/full.onnx, {out}/cache.onnx, {out}/omnicache.json, {out}/report.html")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from omnicache_export.runtime.conditioning import batched_inputs, load_conditioning
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.runtime.sampler import Denoiser

    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} already exists (pass --force to replace it)")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    rt = OmniCache.load(args.folder)
    try:
        io = rt.manifest.model_io.inputs
        cond = load_conditioning(args.inputs, io, rt.spec.cfg)
        Denoiser(rt.spec)  # imports diffusers and builds the scheduler once: wall_s is the loop alone
        t0 = time.perf_counter()
        run = rt.run(cond.cond, cond.uncond, args.seed, batched=batched_inputs(io), batch_size=args.batch_size,
                     no_cache=args.no_cache)
        wall = time.perf_counter() - t0
    finally:
        rt.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
    np.savez(tmp, latent=run.final)
    tmp.replace(args.out)
    print(json.dumps({"wall_s": round(wall, 4), "full_steps": run.full_steps, "cached_steps": run.cached_steps}))
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    import warnings

    try:
        from omnicache_export.zoo import reference
        from omnicache_export.zoo.export import export_family, write_inputs_npz
        from omnicache_export.zoo.families import FAMILIES
    except ImportError as exc:
        raise UserError(f"the example models need torch, diffusers and onnxscript ({exc}); pip install 'omnicache-export[export]'")
    names = sorted(FAMILIES) + sorted(reference.REFERENCES)
    if args.family not in names:
        raise UserError(f"unknown example {args.family!r} (choose from {', '.join(names)})")
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} already exists (pass --force to replace it)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    inputs = args.output.with_suffix(".inputs.npz")
    with warnings.catch_warnings():  # the exporters' tracer chatter is not the user's concern
        warnings.simplefilter("ignore")
        if args.family in reference.REFERENCES:  # trained on digits: one condition per class
            path = reference.export_reference(args.family, args.output, exporter=args.exporter)
            reference.write_calib_npz(args.family, list(range(10)), inputs)
            sched = reference.scheduler_json(args.family, args.output.with_suffix(".scheduler.json"))
            spec = reference.REFERENCES[args.family]
            print(f"wrote {path} ({args.family}: trained on scikit-learn's digits), {inputs} (10 class conditions) "
                  f"and {sched}\ntry: omnicache-export {path} -o OUT --calib {inputs} --scheduler {sched} "
                  f"--guidance-scale {spec.guidance_scale:g} --steps {spec.steps}")
            return 0
        path = export_family(args.family, args.output, exporter=args.exporter, external_data=args.external_data)
    write_inputs_npz(args.family, inputs, batch=2, seed=0)
    print(f"wrote {path} ({args.family}, {args.exporter} exporter, random weights) and {inputs} (example conditioning)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnicache-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("export", help="the main job: calibrate, split, embed the correction (default verb)")
    _add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--scheduler", default="ddim", help="ddim | dpmsolver++ | euler | flow-euler | a scheduler_config.json")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], help="for ddim/dpmsolver++/euler")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--calib", type=Path, metavar="FILE.npz", help="conditioning arrays keyed by input name")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (needs uncond/ arrays)")
    p.add_argument("--num-calib", type=int, default=4, help="calibration samples (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-shape", metavar="C,H,W", help="one sample's latent shape where it is dynamic")
    p.add_argument("--timestep-scale", type=float, default=1.0, help="model timestep = scheduler timestep x this")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--cache-ratio", type=float, help="share of steps to cache (default 0.5)")
    target.add_argument("--speedup", type=float, help="target speedup, from the measured cost of the two graphs")
    p.add_argument("--max-consecutive", type=int, default=2, help="longest run of cached steps (default 2)")
    last = p.add_mutually_exclusive_group()
    last.add_argument("--allow-last-cached", dest="last_step", action="store_const", const=True,
                      help="schedules may cache the last step (default: calibration tries both ways)")
    last.add_argument("--keep-last-full", dest="last_step", action="store_const", const=False,
                      help="the last step is always computed in full")
    p.add_argument("--no-filters", action="store_true", help="do not try frequency filters in calibration")
    p.add_argument("--correction", choices=["auto", "none", "gamma1", "gamma"], default="auto",
                   help="correction candidates: all (auto), none, gamma = 1 only, or fitted gammas without filters")
    p.add_argument("--schedules", help="comma-separated schedule families to try: curvature-dp,staleness-dp,alternation,corrected-error-dp")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = verbs.add_parser("run", help="sample with the exported graphs and the runtime")
    p.add_argument("folder", type=Path, help="an export's output folder")
    p.add_argument("--inputs", type=Path, required=True, metavar="FILE.npz", help="conditioning, as for --calib")
    p.add_argument("--out", type=Path, required=True, metavar="RESULT.npz", help="final latents under key 'latent'")
    p.add_argument("--seed", type=int, default=0, help="noise seed (>= 0): row r starts from the noise of (seed, r)")
    p.add_argument("--no-cache", action="store_true", help="full model at every step (the reference)")
    p.add_argument("--force", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per generation (default: all rows; the export's static batch where it fixed one). "
                        "Row r's noise comes from (seed, r) whatever the batching")
    p.set_defaults(func=_cmd_run)

    p = verbs.add_parser("inspect", help="input roles and the located transformer block stack")
    _add_model_options(p)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the analysis as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = verbs.add_parser("split", help="write OUT/full.onnx (+ cache output) and OUT/cache.onnx (blocks cut)")
    _add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric check on a synthesized input")
    p.set_defaults(func=_cmd_split)

    p = verbs.add_parser("example", help="export a tiny random-weight diffusers DiT to try the tool on")
    p.add_argument("family", help="a trained reference (dit-digits, pixart-digits, latte-digits) or a random-weight "
                   "family (dit, pixart, latte, stdit, sd3, flux, cogvideox, ...)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--external-data", action="store_true", help="save the weights in a side file")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_example)
    return parser


VERBS = ("export", "run", "inspect", "split", "example")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in VERBS and not {"-h", "--help"} & set(argv[: argv.index(first)]):
        argv.insert(argv.index(first), "export")  # `omnicache-export MODEL.onnx ...` is the main job
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"omnicache-export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
