"""`omnicache-export`: one verb per job (Polygraphy style).

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
    from omnicache_export import modelio
    from omnicache_export.analysis import analyze

    model = modelio.load_model(args.model)
    analysis = analyze(model, args.latent, args.timestep, args.region_start, args.region_end, _parse_dims(args.input_shape))
    print(analysis.summary())
    if args.json:
        args.json.write_text(json.dumps(analysis.to_json(), indent=2) + "\n")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from omnicache_export.split import split

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


def _cmd_example(args: argparse.Namespace) -> int:
    try:
        from omnicache_export.zoo.export import export_family
        from omnicache_export.zoo.families import FAMILIES
    except ImportError as exc:
        raise UserError(f"the example models need torch and diffusers ({exc}); pip install 'omnicache-export[export]'")
    if args.family not in FAMILIES:
        raise UserError(f"unknown family {args.family!r} (choose from {', '.join(sorted(FAMILIES))})")
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} already exists (pass --force to replace it)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    path = export_family(args.family, args.output, exporter=args.exporter, external_data=args.external_data)
    print(f"wrote {path} ({args.family}, {args.exporter} exporter, random weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnicache-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)

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
    p.add_argument("family", help="dit, pixart, latte, stdit, sd3, flux, cogvideox, ...")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--external-data", action="store_true", help="save the weights in a side file")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"omnicache-export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
