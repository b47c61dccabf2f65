"""`omnicache-export build OUT [--batch MIN,OPT,MAX] ...`: both TensorRT plans of an export, built
on this machine (TensorRT and a GPU) and recorded in its manifest (`pipeline.tensorrt_build`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from omnicache_export.cli import args as common
from omnicache_export.errors import UserError


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("build", parents=parents, help="build both TensorRT engines of an export (TensorRT + GPU)",
                         description="Build the full and the cache TensorRT plan of an export (strongly typed, "
                                     "profiles from the manifest, one timing cache) and record them in omnicache.json "
                                     "atomically. Without TensorRT: one line, exit 2, nothing written.")
    p.add_argument("folder", type=Path, metavar="OUT", help="an export's output folder")
    p.add_argument("--batch", default="1,1,8", metavar="MIN,OPT,MAX",
                   help="sample batches of the optimization profiles (model batches twice that under guidance; a "
                        "static batch stays) (default: 1,1,8)")
    p.add_argument("--opt-level", type=int, default=3, metavar="N",
                   help="builder optimization level, 0-5 (default: 3, TensorRT's own)")
    p.add_argument("--workspace", type=int, default=None, metavar="MIB",
                   help="workspace limit in MiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--refittable", action="store_true",
                   help="refittable plans: weights (LoRA) can be swapped without a rebuild (default: off)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                   help="timing cache shared by both builds, read and updated (default: OUT/tensorrt/timing.cache)")
    p.add_argument("--dims", nargs="+", action="extend", metavar="NAME=SIZE",
                   help="sizes of symbolic dims the manifest leaves open, e.g. a text length (default: the sizes "
                        "of the reference inputs saved at export)")
    p.set_defaults(func=run)


def parse_batches(text: str) -> tuple[int, int, int]:
    values = common.parse_ints(text, "--batch") or []
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise UserError(f"--batch {text!r}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX")
    return values[0], values[1], values[2]


def parse_sizes(items: list[str] | None) -> dict[str, int]:
    sizes = {}
    for item in items or []:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise UserError(f"--dims {item!r}: expected NAME=SIZE with a positive integer size")
        sizes[name] = int(size)
    return sizes


def run(a: argparse.Namespace) -> int:
    from omnicache_export.pipeline.tensorrt_build import BuildSettings, build

    common.input_folder(a.folder, "an export's output folder")
    if not 0 <= a.opt_level <= 5:
        raise UserError(f"--opt-level {a.opt_level}: must be 0 to 5")
    if a.workspace is not None and a.workspace < 1:
        raise UserError(f"--workspace {a.workspace}: must be at least 1 MiB")
    if a.timing_cache is not None and a.timing_cache.is_dir():
        raise UserError(f"--timing-cache {a.timing_cache}: is a directory, not a file")
    settings = BuildSettings(parse_batches(a.batch), a.opt_level, a.workspace, a.refittable, a.timing_cache,
                             parse_sizes(a.dims))
    entry = build(a.folder, settings)
    plan = entry.plans["full"]
    print(f"built {a.folder}/{entry.full} and {a.folder}/{entry.cache} ({entry.key}: TensorRT {plan.tensorrt_version}, "
          f"{plan.gpu_name}); omnicache.json records them")
    return 0
