"""Per-row scaling for the cache graph's per-step tables: each row of the batch gathers its own
step's entry (`omnicache_step` is int64 [model batch]), and the gathered [B, *tail] factor scales
its row of a tensor whose axis 0 holds the B rows batch-major (B rows, or B × k rows for a cache in
a temporal layout).

Built from Shape, Concat, Reshape and Mul only (no opset-dependent Unsqueeze), rank-agnostic:

    x [B·k, ..., *tail] -> Reshape [B, -1, *tail] * Reshape(factor, [-1, 1, *tail]) -> Reshape(Shape(x))

Each element is multiplied by exactly the factor the old shared-step graph used for its row, so the
numbers are the same product, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

Op = Callable[..., ir.Value]


def int64_constant(op: Op, values: Sequence[int]) -> ir.Value:
    return op("Constant", value=ir.tensor(np.asarray(values, dtype=np.int64)))


def scale_rows(op: Op, x: ir.Value, factor: ir.Value, step: ir.Value, tail: Sequence[int] = ()) -> ir.Value:
    """x times each row's factor (factor [B, *tail], B = len(step); x's axis 0: B rows or B·k)."""
    tail = [int(d) for d in tail]
    rows = op("Concat", op("Shape", step), int64_constant(op, [-1, *tail]), axis=0)  # [B, -1, *tail]
    per_row = op("Reshape", factor, int64_constant(op, [-1, 1, *tail]))  # [B, 1, *tail]
    scaled = op("Mul", op("Reshape", x, rows), per_row)
    out = op("Reshape", scaled, op("Shape", x))
    # x's annotation carries over (a Reshape to Shape(x) hides it from shape inference): ONNX
    # Runtime's fusions downstream (Add + LayerNorm) then match as they did on the shared-step graph
    out.shape, out.type = x.shape, x.type
    return out
