"""`omnicache-export split MODEL.onnx -o OUT`: only the graph split."""

from __future__ import annotations

import argparse
import json

from omnicache_export.cli import args as common


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("split", parents=parents, help="write OUT/full.onnx (+ cache output) and OUT/cache.onnx "
                         "(blocks cut)", description="Only the graph split: OUT/full.onnx, OUT/cache.onnx "
                         "(uncorrected) and OUT/split.json.")
    common.add_model_options(p)
    common.add_output_folder(p)
    p.add_argument("--no-verify", action="store_true",
                   help="skip the numeric check on a synthesized input (default: checked where the weights "
                        "are at most 1 GiB)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from omnicache_export import outputs
    from omnicache_export.graph.split import split

    common.input_file(a.model, "an ONNX file")
    outputs.check_output_dir(a.output, force=a.force, inputs=[a.model])  # before any work
    result = split(
        a.model,
        a.output,
        latent=a.latent,
        timestep=a.timestep,
        region_start=a.region_start,
        region_end=a.region_end,
        input_dims=common.parse_dims(a.input_shape),
        force=a.force,
        numeric_check=False if a.no_verify else None,
    )
    print(result.analysis.summary())
    print(f"wrote {result.out_dir}/full.onnx, {result.out_dir}/cache.onnx, {result.out_dir}/split.json")
    print("verification: " + json.dumps({k: v for k, v in result.verification.items() if k != "inputs"}))
    return 0
