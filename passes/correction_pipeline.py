"""The cache graph's correction passes, in the one order they work in.

    ExtrapolateCachePass (with trend) -> EmbedCorrectionPass -> FreezeTablesPass (export only)

The trend pass creates `omnicache_step`, which the correction shares; the correction must see the
head's output as computed from the extrapolated caches; freezing needs every table input to exist.
Each pass's `requires` checks its place, so a wrong order fails with a PreconditionError naming what
is missing (wrapped in onnx_ir's PassError when run inside a Sequential).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.embed_correction import EmbedCorrectionPass
from omnicache_export.passes.extrapolate_cache import ExtrapolateCachePass
from omnicache_export.passes.freeze_tables import FreezeTablesPass


def cache_graph_passes(
    output_name: str, cache_names: list[str], n_steps: int, *, trend: bool, blend: bool,
    filter_hw: tuple[int, int] | None, expose_uncorrected: bool = False, trend2: bool = False,
) -> ir.passes.Sequential:
    """Uncorrected cache graph -> parametric cache graph: the chosen parts of the correction, their
    per-step tables as graph inputs (calibration feeds them; `freeze` makes them constants).
    `trend2`: the cache trend's second-order term too (needs `trend`)."""
    if trend2 and not trend:
        raise ValueError("the second-order cache trend extends the cache trend: trend2 needs trend")
    passes: list[ir.passes.PassBase] = [ExtrapolateCachePass(cache_names, n_steps, trend2)] if trend else []
    passes.append(EmbedCorrectionPass(output_name, n_steps, blend=blend, filter_hw=filter_hw,
                                      expose_uncorrected=expose_uncorrected))
    return ir.passes.Sequential(*passes)


def freeze(tables: dict[str, np.ndarray]) -> FreezeTablesPass:
    """Parametric cache graph -> the exported one: the last step, the table inputs become constants."""
    return FreezeTablesPass(tables)
