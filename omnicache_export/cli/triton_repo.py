"""`omnicache-export triton-repo OUT -o REPO [--engines E] [--max-batch N] [--name NAME]`: a model
repository for a stock Triton server (serving/repository.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from omnicache_export.cli import args as common


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    from omnicache_export.serving.repository import EngineKind

    p = verbs.add_parser("triton-repo", parents=parents, help="write a Triton model repository for an export",
                         description="Write a Triton model repository: the Python-backend model NAME (the denoising "
                                     "loop, requests stepped together, engines called through BLS) and its two engine "
                                     "models NAME_full and NAME_cache. Start a stock server on it with "
                                     "`tritonserver --model-repository REPO`.")
    p.add_argument("folder", type=Path, help="an export's output folder")
    common.add_output_options(p, "the repository folder: must not exist (written under a temporary name, renamed "
                              "at the end)", "REPO",
                              force_help="replace REPO if it is an empty folder (default: refuse an existing REPO)")
    p.add_argument("--engines", choices=[k.value for k in EngineKind], default=EngineKind.ONNXRUNTIME.value,
                   help="what runs the graphs: tensorrt (tensorrt_plan models on the export's plans), onnxruntime "
                        "(onnxruntime_onnx models), python-onnxruntime (Python-backend models on ONNX Runtime, for a "
                        "Triton with only the Python backend) (default: onnxruntime)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests in flight at once, stepped together; the engine models batch up to that "
                        "many requests' rows (default: 16)")
    p.add_argument("--precision", default=None, metavar="P",
                   help="the graphs' precision where the export holds several (fp32, fp16 ...) (default: its only one)")
    p.add_argument("--name", default="omnicache", help="the loop's model name; the engines get _full and _cache "
                                                       "(default: omnicache)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import logging

    from omnicache_export.serving.repository import triton_repo

    common.input_folder(a.folder, "an export's output folder")
    summary = triton_repo(a.folder, a.output, a.engines, a.max_batch, a.name, a.force, a.precision)
    for note in summary.notes:
        logging.getLogger(__name__).warning(note)
    print(f"{a.output}: models {', '.join(summary.models)} ({summary.engines.value}); serve with "
          f"tritonserver --model-repository {a.output}")
    return 0
