"""Export a zoo family to ONNX with either torch exporter, plus example inputs as .npz.

The export itself, with the fixes diffusers models need, is `integrations.export_transformer`'s:
the zoo only builds the model and its example inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnicache_export.errors import UserError
from omnicache_export.integrations.export_transformer import (
    DEFAULT_OPSET,
    MAX_IR_VERSION,
    check_exporter,
    export_proto,
    write_model,
)

from .families import FAMILIES, Family

__all__ = ["DEFAULT_OPSET", "MAX_IR_VERSION", "export_family", "export_zoo_model", "write_inputs_npz"]


def export_family(
    name: str,
    path: str | Path,
    exporter: str = "torchscript",
    opset: int | None = None,
    external_data: bool = False,
    seed: int = 0,
) -> Path:
    """Build family `name` with random weights (seed) and export it to `path`; returns the path."""
    family = FAMILIES[name]
    if exporter in DEFAULT_OPSET and exporter not in family.exporters:
        raise ValueError(f"family {name!r} does not export with {exporter!r}: {family.notes}")
    return export_zoo_model(family, family.build(seed).eval(), family.example_inputs(batch=2, seed=seed), path,
                            exporter, opset, external_data)


def export_zoo_model(family: Family, model: torch.nn.Module, feeds: dict[str, np.ndarray], path: str | Path,
                     exporter: str = "torchscript", opset: int | None = None, external_data: bool = False) -> Path:
    """Export `model` (a zoo-style module of `family`) on `feeds` through the export helper; returns the path."""
    try:
        opset = check_exporter(exporter, opset)
    except UserError as exc:  # the zoo's callers (tests, tools) take a ValueError
        raise ValueError(str(exc)) from None
    tensors = {n: torch.from_numpy(feeds[n]) for n in family.input_names}
    batched = {n for n in family.input_names if family.inputs[n].batched} if family.dynamic_batch else set()
    proto = export_proto(model, tensors, {}, batched, exporter, opset, family.output_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_model(proto, path, external_data, force=True)


def write_inputs_npz(name: str, path: str | Path, batch: int = 2, seed: int = 0) -> Path:
    """Save `FAMILIES[name].example_inputs(batch, seed)` to an .npz keyed by input name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **FAMILIES[name].example_inputs(batch, seed))
    return path
