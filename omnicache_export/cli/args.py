"""Argument groups the verbs share (Polygraphy style), and the checks on what they name."""

from __future__ import annotations

import argparse
from pathlib import Path

from omnicache_export.errors import UserError


def add_logging_options(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q, accepted before the verb (top) and after it: the verb's copy leaves the top one alone
    unless given (default SUPPRESS)."""
    group = p.add_argument_group("logging")
    default = False if top else argparse.SUPPRESS
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also show notes, and the traceback of a failure (default: off)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress bars, notes or warnings; errors only (default: off)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the DiT's ONNX file")
    group = p.add_argument_group("model")
    group.add_argument("--latent", metavar="NAME", help="name of the latent input (default: guessed from names and shapes)")
    group.add_argument("--timestep", metavar="NAME", help="name of the timestep input (default: guessed from names and shapes)")
    group.add_argument("--region-start", metavar="TENSOR",
                       help="tensor entering the block stack (default: found from module scopes, else the structure)")
    group.add_argument("--region-end", metavar="TENSOR",
                       help="tensor leaving the block stack (default: found with --region-start's method)")
    group.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                       help="concrete shape of a dynamic input, repeatable; ? keeps a dimension dynamic "
                            "(default: none; needed for dynamic dimensions other than the batch)")


def add_output_options(p: argparse.ArgumentParser, help: str, metavar: str, required: bool = True,
                       aliases: tuple[str, ...] = (), force_help: str | None = None) -> None:
    group = p.add_argument_group("output")
    group.add_argument("-o", "--output", *aliases, dest="output", type=Path, required=required, metavar=metavar,
                       help=help)
    group.add_argument("--force", action="store_true",
                       help=force_help or f"replace an existing {metavar} (default: refuse)")


def add_output_folder(p: argparse.ArgumentParser) -> None:
    """`-o OUT` and `--force` of the verbs that write an export folder (the main job, `split`)."""
    add_output_options(p, "output folder: must not exist (written under a temporary name, renamed at the end)",
                       "OUT", force_help="replace OUT if it is an earlier export or an empty folder "
                       "(default: refuse an existing OUT)")


def parse_dims(items: list[str] | None) -> dict[str, list[int | None]]:
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


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers like 4,32,32") from None


def input_file(path: Path | None, what: str) -> None:
    """A file the verb reads: 'no such file' or 'is a directory' in one line."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not {what}")
    if not path.exists():
        raise UserError(f"{path}: no such file")


def input_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: is a file, not {what}")
