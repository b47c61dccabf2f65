"""`omnicache-export example NAME -o MODEL.onnx`: a reference or zoo DiT, exported, with example inputs."""

from __future__ import annotations

import argparse

from omnicache_export.errors import UserError
from omnicache_export.cli import args as common


def register(verbs, parents: list[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("example", parents=parents, help="export a trained reference DiT or a tiny random-weight "
                         "diffusers DiT to try the tool on",
                         description="Export a trained reference DiT or a tiny random-weight diffusers DiT, with "
                                     "example conditioning beside it (MODEL.inputs.npz; the references also write "
                                     "MODEL.scheduler.json).")
    p.add_argument("family", help="a trained reference (dit-digits, pixart-digits, latte-digits) or a random-weight "
                   "family (dit, pixart, latte, stdit, sd3, flux, cogvideox, ...)")
    common.add_output_options(p, "the ONNX file to write, its example inputs beside it (written under a temporary "
                              "name, renamed at the end)", "MODEL.onnx",
                              force_help="replace MODEL.onnx and the files beside it (default: refuse existing ones)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch's ONNX exporter (default: torchscript)")
    p.add_argument("--external-data", action="store_true",
                   help="save the weights in a side file, MODEL.onnx.data (default: inside the model)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import warnings

    from omnicache_export import outputs

    try:
        from omnicache_export.zoo import reference
        from omnicache_export.zoo.export import export_family, write_inputs_npz
        from omnicache_export.zoo.families import FAMILIES
    except ImportError as exc:
        raise UserError(f"the example models need torch, diffusers and onnxscript ({exc}); "
                        "pip install 'omnicache-export[export]'") from None
    names = sorted(FAMILIES) + sorted(reference.REFERENCES)
    if a.family not in names:
        raise UserError(f"unknown example {a.family!r} (choose from {', '.join(names)})")
    model = a.output
    inputs = model.with_suffix(".inputs.npz")
    sched = model.with_suffix(".scheduler.json")
    is_reference = a.family in reference.REFERENCES
    targets = [model, inputs, *([sched] if is_reference else []), *([model.with_name(model.name + ".data")]
                                                                     if a.external_data else [])]
    for path in targets:  # before any work
        outputs.check_output_file(path, force=a.force)
    with outputs.atomic_output_files(*targets, force=a.force) as tmp:
        with warnings.catch_warnings():  # the exporters' tracer chatter is not the user's concern
            warnings.simplefilter("ignore")
            if is_reference:  # trained on digits: one condition per class
                reference.export_reference(a.family, tmp / model.name, exporter=a.exporter,
                                           external_data=a.external_data)
                reference.write_calib_npz(a.family, list(range(10)), tmp / inputs.name)
                reference.scheduler_json(a.family, tmp / sched.name)
            else:
                export_family(a.family, tmp / model.name, exporter=a.exporter, external_data=a.external_data)
                write_inputs_npz(a.family, tmp / inputs.name, batch=2, seed=0)
    if is_reference:
        spec = reference.REFERENCES[a.family]
        print(f"wrote {model} ({a.family}: trained on scikit-learn's digits), {inputs} (10 class conditions) "
              f"and {sched}\ntry: omnicache-export {model} -o OUT --calib {inputs} --scheduler {sched} "
              f"--guidance-scale {spec.guidance_scale:g} --steps {spec.steps}")
    else:
        print(f"wrote {model} ({a.family}, {a.exporter} exporter, random weights) and {inputs} (example conditioning)")
    return 0
