"""`omnicache-export inspect MODEL.onnx [-o FILE.json]`: input roles and the located block stack."""

from __future__ import annotations

import argparse
import json

from omnicache_export.cli import args as common


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("inspect", parents=parents, help="input roles and the located transformer block stack",
                         description="Input roles (latent, timestep, conditioning), the output and the block stack.")
    common.add_model_options(p)
    common.add_output_options(p, "also write the analysis as JSON (default: the summary only)", "FILE.json",
                              required=False, aliases=("--json",))
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from omnicache_export import outputs
    from omnicache_export.graph import modelio
    from omnicache_export.graph.analysis import analyze

    common.input_file(a.model, "an ONNX file")
    if a.output is not None:
        outputs.check_output_file(a.output, force=a.force, inputs=[a.model])  # before any work
    model = modelio.load_user_model(a.model)  # with the known exporter traps repaired, as the main job sees it
    analysis = analyze(model, a.latent, a.timestep, a.region_start, a.region_end, common.parse_dims(a.input_shape))
    print(analysis.summary())
    if a.output is not None:
        with outputs.atomic_output_files(a.output, force=a.force, inputs=[a.model]) as tmp:
            (tmp / a.output.name).write_text(json.dumps(analysis.to_json(), indent=2) + "\n")
    return 0
