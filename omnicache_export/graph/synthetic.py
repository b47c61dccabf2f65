"""Inputs synthesized from the IO specs: feeds for verification, conditioning for calibration without --calib."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES, IOSpec
from omnicache_export.runtime.conditioning import Conditioning, batched_inputs, conditioning_specs



def synthesize(specs: list[IOSpec], shapes: dict[str, list[int]], seed: int = 0, timestep: float = 500.0) -> dict[str, np.ndarray]:
    """Random normal floats, the given timestep, zeros for integer inputs (class 0, position ids 0)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if spec.role == "output":
            continue
        shape = tuple(shapes[spec.name])
        if any(d < 0 for d in shape):
            raise ValueError(f"input {spec.name!r} has dynamic dimensions {list(shape)}: give its shape")
        dtype = NUMPY_DTYPES.get(spec.dtype, np.float32)
        if spec.role == "timestep":
            feeds[spec.name] = np.full(shape, timestep, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def embedding_rows(model: ir.Model, name: str) -> int | None:
    """Rows of the embedding table an integer input indexes (through Cast/Where), if any."""
    value = next((v for v in model.graph.inputs if v.name == name), None)
    frontier = [value] if value is not None else []
    for _ in range(4):
        nxt = []
        for v in frontier:
            for node in v.consumers():
                if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
                    return int(node.inputs[0].const_value.shape[0])
                if node.op_type in ("Cast", "Where", "Unsqueeze", "Reshape"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return None


def index_ranges(model: ir.Model, io: list[IOSpec]) -> dict[str, tuple[int, int]]:
    """[low, high) of each integer input that indexes an embedding table (`embedding_rows`): the
    values the graph can look up. Negative indices are outside it (Gather would wrap them)."""
    ranges = {}
    for spec in io:
        if spec.role == "output" or np.issubdtype(NUMPY_DTYPES.get(spec.dtype, np.float32), np.floating):
            continue
        rows = embedding_rows(model, spec.name)
        if rows:
            ranges[spec.name] = (0, rows)
    return ranges


class SynthesizedRows:
    """A synthesized batched input whose rows are made when indexed: row r comes from `make(r)`
    alone, so K samples cost nothing until a batch of them is fed (`--num-calib 100000` holds one
    batch of conditioning at a time, never all of it). Indexes like an array along axis 0: an int,
    a slice (another lazy view), a list or an integer array (those rows, as an ndarray)."""

    def __init__(self, n: int, rest: list[int], dtype, make, start: int = 0):
        self.n, self.rest, self.dtype, self.make, self.start = n, tuple(rest), np.dtype(dtype), make, start

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.rest)

    @property
    def ndim(self) -> int:
        return 1 + len(self.rest)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            if step == 1:
                return SynthesizedRows(max(0, stop - start), list(self.rest), self.dtype, self.make, self.start + start)
            index = list(range(start, stop, step))
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.size and (not np.issubdtype(rows.dtype, np.integer) or rows.min() < -self.n or rows.max() >= self.n):
            raise IndexError(f"rows {index!r} out of range for {self.n} synthesized samples")
        rows = np.where(rows < 0, rows + self.n, rows).ravel()
        out = np.empty((len(rows), *self.rest), self.dtype)
        for k, r in enumerate(rows):
            out[k] = self.make(self.start + int(r))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(self.n)]
        return out if dtype is None else out.astype(dtype)


def synthesize_conditioning(
    model: ir.Model, io: list[IOSpec], n: int, seed: int, shapes: dict[str, list[int | None]] | None = None
) -> Conditioning:
    """Stand-in conditioning from the input shapes: N(0, 1) floats, random class indices (the last
    embedding row, the usual null class, for uncond), zeros as unconditional embeddings. Batched
    inputs are `SynthesizedRows`: row r of input j drawn from (seed, j, r) alone, made per batch."""
    batched = batched_inputs(io)
    cond, uncond = {}, {}
    for j, spec in enumerate(conditioning_specs(io)):
        dims = list((shapes or {}).get(spec.name) or spec.shape)
        is_batched = spec.name in batched
        rest = dims[1:] if is_batched else dims
        if any(not isinstance(d, int) or d < 0 for d in rest):
            raise UserError(f"input {spec.name!r} has dynamic dimensions {spec.shape}: give --input-shape or --calib")
        dtype = np.dtype(NUMPY_DTYPES.get(spec.dtype, np.float32))
        rows = None if np.issubdtype(dtype, np.floating) else embedding_rows(model, spec.name)
        null = rows - 1 if rows else 0

        def draw(r, rest=rest, dtype=dtype, rows=rows, j=j):
            rng = np.random.default_rng([seed, 7919, j] + ([] if r is None else [r]))
            if np.issubdtype(dtype, np.floating):
                return rng.standard_normal(rest, dtype=np.float32).astype(dtype)
            return rng.integers(0, max(1, rows - 1) if rows else 1, size=rest).astype(dtype)

        if not is_batched:
            cond[spec.name] = draw(None)
            continue
        cond[spec.name] = SynthesizedRows(n, rest, dtype, draw)
        blank = np.full(rest, 0 if np.issubdtype(dtype, np.floating) else null, dtype)
        uncond[spec.name] = SynthesizedRows(n, rest, dtype, lambda r, blank=blank: blank)
    return Conditioning(cond, uncond, n, synthesized=True)
