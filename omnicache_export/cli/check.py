"""`omnicache-export check MODEL.onnx|OUT [--tensorrt 10.3,10.16,11] [--json]`: TensorRT readiness.

Checks a graph (or an export folder's full.onnx and cache.onnx) against the ONNX parser's operator
matrix and restrictions of each TensorRT line. Prints one line per line and graph; a graph that is
not ready for some line exits 2 with one line naming the node and the rule (every finding with -v).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnicache_export.cli import args as common
from omnicache_export.cli import failures

EXPORT_GRAPHS = ("full.onnx", "cache.onnx")
EXPORT_MARKERS = ("omnicache.json", "split.json")  # an export folder of the main job or of `split`


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("check", parents=parents, help="TensorRT readiness of a graph or an export's two graphs",
                         description="Check every node against TensorRT's ONNX parser operator matrix and "
                                     "restrictions, per TensorRT line (tables of onnx-tensorrt's operators.md).")
    p.add_argument("target", type=Path, metavar="MODEL.onnx|OUT", help="an ONNX file, or an export folder")
    p.add_argument("--tensorrt", metavar="LINES", default=None,
                   help="TensorRT lines to check, comma-separated (default: 10.3,10.16,11)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON (default: one line per line)")
    p.set_defaults(func=run)


def graphs_of(target: Path) -> list[Path]:
    """The graphs `target` names: itself, or an export folder's full.onnx and cache.onnx."""
    from omnicache_export.errors import UserError

    if target.is_dir():
        if not any((target / m).is_file() for m in EXPORT_MARKERS):
            raise UserError(f"{target}: not an export folder (no {' or '.join(EXPORT_MARKERS)})")
        missing = [g for g in EXPORT_GRAPHS if not (target / g).is_file()]
        if missing:
            raise UserError(f"{target}: the export has no {missing[0]}")
        return [target / g for g in EXPORT_GRAPHS]
    common.input_file(target, "an ONNX file or an export folder")
    return [target]


def run(a: argparse.Namespace) -> int:
    from omnicache_export.graph.tensorrt_check import check_path, parse_lines

    lines = parse_lines(a.tensorrt)
    results = {path: check_path(path, lines) for path in graphs_of(a.target)}
    if a.json:
        print(json.dumps({str(p): [r.to_json() for r in rs] for p, rs in results.items()}, indent=2))
    else:
        for path, rs in results.items():
            for r in rs:
                print(f"{path.name}: {r.summary()}")
                if getattr(a, "verbose", False):
                    for f in r.findings[1:]:
                        print(f"  {f.text()}")
    failed = [(p, r) for p, rs in results.items() for r in rs if not r.ready]
    if failed:
        path, first = failed[0]
        failures.error(f"{path}: not TensorRT-ready: {first.findings[0].text()}")
        return 2
    return 0
