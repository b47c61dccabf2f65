"""Pass: the per-step table inputs become constants, for export.

Calibration scores candidates on the parametric cache graph, feeding each one's tables
(`omnicache_cache_trend`, `omnicache_coefficients`, `omnicache_blend`, `omnicache_filter_masks`);
the chosen ones are frozen into the graph the runtime gets, so it feeds only the step, the last
full outputs and the caches.

Invariant: the frozen graph computes exactly what the parametric graph computes fed the same tables
(the same nodes read the same values; only where the values come from changes), and no table input
is left. Every table input must be given, so the graph the runtime gets never asks for one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.cache_names import MASKS, TABLES
from omnicache_export.passes.hartley import dft_filter_matrices


def table_inputs(graph: ir.Graph) -> dict[str, ir.Value]:
    """The graph's table inputs by name (ExtrapolateCachePass and EmbedCorrectionPass add them)."""
    return {v.name: v for v in graph.inputs if v.name in TABLES}


class FreezeTablesPass(ir.passes.InPlacePass):
    def __init__(self, tables: dict[str, np.ndarray]):
        """tables: by table input name, [N, ...] as the graph declares them (masks already scaled by 1/(h w))."""
        super().__init__()
        self.tables = {name: np.asarray(array) for name, array in tables.items()}

    def __repr__(self) -> str:
        return f"FreezeTablesPass({sorted(self.tables)})"

    def _values(self, value: ir.Value) -> np.ndarray:
        return self.tables[value.name].astype(value.dtype.numpy())

    def requires(self, model: ir.Model) -> None:
        fail = ir.passes.PreconditionError
        unknown = sorted(set(self.tables) - set(TABLES))
        if unknown:
            raise fail(f"{unknown} are no table names; the tables are {list(TABLES)}")
        inputs = table_inputs(model.graph)
        if not inputs:
            raise fail("the graph has no table inputs: FreezeTablesPass runs last, after ExtrapolateCachePass "
                       "and EmbedCorrectionPass have added them")
        absent = sorted(set(self.tables) - set(inputs))
        if absent:
            raise fail(f"the graph has no table inputs {absent} (its table inputs are {sorted(inputs)}): frozen "
                       "already, or the pass that adds them did not run first")
        unfed = sorted(set(inputs) - set(self.tables))
        if unfed:
            raise fail(f"no values given for the table inputs {unfed}: the exported graph must take none")
        for name, value in inputs.items():
            array = self.tables[name]
            if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.floating):
                raise fail(f"table {name!r} has dtype {array.dtype}; real numbers are needed")
            declared = tuple(value.shape)
            if array.ndim != len(declared) or any(isinstance(d, int) and d != s for d, s in zip(declared, array.shape)):
                raise fail(f"table {name!r} has shape {list(array.shape)}, the graph declares {list(declared)}")
            if not np.all(np.isfinite(array)):
                raise fail(f"table {name!r} has entries that are not finite")
            if array.size and np.abs(array).max() > np.finfo(value.dtype.numpy()).max:
                raise fail(f"table {name!r} has entries beyond the range of its dtype {value.dtype}")
        if MASKS in inputs:
            masks = self.tables[MASKS].astype(np.float64)
            h, w = masks.shape[1:]
            for i, scaled in enumerate(masks):
                try:
                    dft_filter_matrices(h, w, scaled * (h * w))  # real, even along each axis (radial masks are)
                except ValueError as exc:
                    raise fail(f"{MASKS!r}, mask of step {i}: {exc}") from exc

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for name, value in table_inputs(graph).items():
            graph.inputs.remove(value)  # the same Value: every Gather keeps reading it
            value.const_value = ir.tensor(self._values(value), name=name)
            graph.register_initializer(value)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        left = sorted(table_inputs(model.graph))
        if left:
            raise ir.passes.PostconditionError(f"table inputs {left} left")
        missing = sorted(set(self.tables) - set(model.graph.initializers))
        if missing:
            raise ir.passes.PostconditionError(f"tables {missing} not frozen")
