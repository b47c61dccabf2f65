"""The graph side of the correction: the parametric cache graph calibration runs, and the frozen one
the export writes. Both work on a copy (onnx_ir clone: weights shared, never copied), so the caller's
model stays the uncorrected / parametric graph it was."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.cache_names import STEP
from omnicache_export.passes.correction_pipeline import cache_graph_passes, freeze


def build_cache_graph(
    uncorrected: ir.Model, output_name: str, cache_names: list[str], n_steps: int, *, trend: bool, blend: bool,
    filter_hw: tuple[int, int] | None, expose_uncorrected: bool = False, trend2: bool = False,
) -> ir.Model:
    """The uncorrected cache graph with the correction's chosen parts, its tables as graph inputs
    (see passes.cache_names.TABLES); with `expose_uncorrected`, õ is an output too; with `trend2`,
    the cache trend's second-order term (inputs `<cache>_prev2`, table σ)."""
    passes = cache_graph_passes(output_name, cache_names, n_steps, trend=trend, blend=blend,
                                filter_hw=filter_hw, expose_uncorrected=expose_uncorrected, trend2=trend2)
    model = ir.passes.functionalize(passes)(uncorrected).model
    _name_step_batch(model.graph)
    return model


def _name_step_batch(graph: ir.Graph) -> None:
    """The exported graphs' step index takes the output's batch symbol, so every batch axis reads as
    one dim to shape tools (Polygraphy's default data loader, TensorRT's profiles); the runtime then
    feeds a step per row (`StepDispatch.step_per_row`)."""
    step = next((v for v in graph.inputs if v.name == STEP), None)
    out = graph.outputs[0].shape if graph.outputs else None
    first = out[0] if out is not None and len(out) else None
    if step is None or first is None:
        return
    if isinstance(first, ir.SymbolicDim):
        if first.value is not None:
            step.shape = ir.Shape([first])
    elif len(out) > 2:  # a static batch (rank-2 [h, w] outputs have no batch axis)
        step.shape = ir.Shape([int(first)])


def freeze_cache_graph(model: ir.Model, tables: dict[str, np.ndarray]) -> ir.Model:
    """The parametric graph with `tables` (one per table input, masks scaled) frozen into constants."""
    return ir.passes.functionalize(freeze(tables))(model).model
