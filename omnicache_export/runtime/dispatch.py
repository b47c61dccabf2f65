"""The one step dispatch: which graph runs a step, and what feeds each of its inputs.

A full step runs the full graph and writes its output and cache tensors into the cache state's
free buffers; a cached step runs the cache graph fed from the state: the step index (one per row of
the model batch: a generation feeds its step to all its rows), the outputs of
the last two full steps, the caches of the last full step (and of the one or two before, for the
cache trend) and, in calibration's graphs only, the correction tables. What feeds each input comes from
the graphs' `GraphIO` (the manifest), never from input names. The runtime, calibration and the speed
benchmark all run steps through `StepDispatch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from omnicache_export.engines.base import Engine, Runner, generation_runners
from omnicache_export.runtime.graph_io import Feed, GraphIO

_TORCH_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "DOUBLE": torch.float64,
                 "INT64": torch.int64, "INT32": torch.int32, "BOOL": torch.bool}


def torch_dtype(onnx_name: str) -> torch.dtype:
    return _TORCH_DTYPES[onnx_name]


class CacheState:
    """What a generation carries from its full steps to its cached steps, in buffers allocated once:
    two for the model output and `cache_depth` for each cache tensor (2; 3 where the cache graph
    takes a cache two full steps back, `Feed.CACHE_PREV2`), each a ring the full steps write in
    turn (the buffer holding the oldest value receives the new one). Before two full steps the
    older output buffer holds zeros (the coefficients there are 0, so any finite value will do);
    a cache's buffers not yet written are never fed (`StepDispatch.cache_feeds` feeds the last
    cache instead: the trend tables are 0 there)."""

    def __init__(self, output: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                 device: torch.device, cache_depth: int = 2):
        self.output = output
        # Only the output pair is read before it is written (prev2 before the second full step);
        # a cache's older buffers are fed only once written, so they need no fill.
        self.buffers = {name: [(torch.zeros if name == output else torch.empty)(shapes[name], dtype=dtypes[name],
                                                                               device=device)
                               for _ in range(2 if name == output else cache_depth)]
                        for name in shapes}
        self.n_full = 0

    @classmethod
    def holding(cls, output: str, history: Mapping[str, list[torch.Tensor]], n_full: int) -> CacheState:
        """A state whose buffers are `history`'s tensors (by name, newest first, one per buffer), as if
        `n_full` full steps (>= 1) had written them: calibration's pair estimates, from recorded steps."""
        st = cls.__new__(cls)
        st.output, st.n_full = output, n_full
        st.buffers = {}
        for name, newest_first in history.items():
            ring: list = [None] * len(newest_first)
            for k, tensor in enumerate(newest_first):
                ring[(n_full - 1 - k) % len(ring)] = tensor
            st.buffers[name] = ring
        return st

    def targets(self) -> dict[str, torch.Tensor]:
        """The buffers the next full step writes (those holding the oldest values)."""
        return {name: ring[self.n_full % len(ring)] for name, ring in self.buffers.items()}

    def advance(self) -> None:
        """The full step wrote `targets()`: they are now the newest."""
        self.n_full += 1

    def ago(self, name: str, k: int) -> torch.Tensor:
        """The value `k` full steps before the last one's (0: the last)."""
        ring = self.buffers[name]
        return ring[(self.n_full - 1 - k) % len(ring)]

    def last(self, name: str) -> torch.Tensor:
        return self.ago(name, 0)

    def before_last(self, name: str) -> torch.Tensor:
        return self.ago(name, 1)

    @property
    def prev(self) -> torch.Tensor:
        return self.last(self.output)

    @property
    def prev2(self) -> torch.Tensor:
        return self.before_last(self.output)


class StepDispatch:
    """Both engines and what feeds them. Shared by every generation; each generation has its own
    runners (`runners()`) and cache state (`new_state`)."""

    def __init__(self, full: Engine, cache: Engine, full_io: GraphIO, cache_io: GraphIO):
        self.full, self.cache = full, cache
        self.full_io, self.cache_io = full_io, cache_io
        outputs = full_io.outputs_of(Feed.OUTPUT)
        if len(outputs) != 1:
            raise ValueError(f"the full graph needs one model output, the manifest names {len(outputs)}")
        self.output = outputs[0].name
        self.cache_names = [t.name for t in full_io.outputs_of(Feed.CACHE)]
        # a third buffer per cache only for a cache graph that reads the cache two full steps back
        self.cache_depth = 3 if cache_io.inputs_fed_by(Feed.CACHE_PREV2) else 2
        self.table_names = [t.source for t in cache_io.inputs_fed_by(Feed.TABLE)]
        self.uncorrected = next((t.name for t in cache_io.outputs_of(Feed.UNCORRECTED)), None)
        # One step per row (int64 [batch]); an export from before per-row steps takes int64 [1].
        step = next(iter(cache_io.inputs_fed_by(Feed.STEP)), None)
        self.step_per_row = step is not None and tuple(step.shape) != (1,)
        # A static batch (an export at a fixed batch) fixes the rows fed, whatever the caller's count.
        self.step_rows = step.shape[0] if step is not None and isinstance(step.shape[0], int) else None
        self.device = full.device

    def runners(self) -> tuple[Runner, Runner]:
        full, cache = generation_runners(self.full, self.cache)  # TensorRT: one shared activation buffer
        return full, cache

    def new_state(self, full_runner: Runner, model_feeds: Mapping[str, torch.Tensor]) -> CacheState:
        shapes = full_runner.output_shapes({t.name: tuple(model_feeds[t.source].shape) for t in self.full_io.inputs})
        names = [self.output, *self.cache_names]
        dtypes = {t.name: torch_dtype(t.dtype) for t in self.full_io.outputs}
        return CacheState(self.output, {k: shapes[k] for k in names}, dtypes, self.device, self.cache_depth)

    def full_feeds(self, model_feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t.name: model_feeds[t.source] for t in self.full_io.inputs}

    def run_full(self, runner: Runner, state: CacheState, model_feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A full step: the output and caches into the state's free buffers; returns the output."""
        runner.infer(self.full_feeds(model_feeds), outputs=state.targets())
        state.advance()
        return state.prev

    def cache_feeds(self, i: int, model_feeds: Mapping[str, torch.Tensor], state: CacheState,
                    tables: Mapping[str, torch.Tensor] | None, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache graph's feeds at step i. `steps`: int64 [N, rows] of step indices on the device
        (`step_indices`; rows: the model batch, or 1, which the graph broadcasts to every row)."""
        if self.table_names and tables is None:
            raise ValueError(f"this cache graph takes its correction tables as inputs: {self.table_names}")
        feeds = {}
        for t in self.cache_io.inputs:  # runs every cached step: a plain branch per input, no closures
            if t.feed is Feed.MODEL:
                feeds[t.name] = model_feeds[t.source]
            elif t.feed is Feed.CACHE:
                feeds[t.name] = state.last(t.source)
            elif t.feed is Feed.CACHE_PREV:  # before two full steps ρ = 0: the last cache will do
                feeds[t.name] = state.before_last(t.source) if state.n_full > 1 else state.last(t.source)
            elif t.feed is Feed.CACHE_PREV2:  # before three full steps σ = 0: likewise
                feeds[t.name] = state.ago(t.source, 2) if state.n_full > 2 else state.last(t.source)
            elif t.feed is Feed.FULL_PREV:
                feeds[t.name] = state.prev
            elif t.feed is Feed.FULL_PREV2:
                feeds[t.name] = state.prev2
            elif t.feed is Feed.STEP:
                feeds[t.name] = steps[i]
            else:
                feeds[t.name] = tables[t.source]
        return feeds

    def run_cached(self, runner: Runner, feeds: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]) -> None:
        runner.infer(feeds, outputs=out, names=list(out))

    def step_indices(self, n_steps: int, rows: int = 1) -> torch.Tensor:
        """int64 [n_steps, rows]: row i holds step i for each of `rows` model rows (made once per generation)."""
        steps = torch.arange(n_steps, dtype=torch.int64, device=self.device).reshape(n_steps, 1)
        rows = self.step_rows or rows
        return steps.repeat(1, rows) if rows > 1 and self.step_per_row else steps

    def close(self) -> None:
        self.full.close()
        self.cache.close()

    def tables_as_fed(self, tables: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Correction tables (arrays by table name) as the cache graph's table inputs take them."""
        import numpy as np

        dtypes = {t.source: torch_dtype(t.dtype) for t in self.cache_io.inputs_fed_by(Feed.TABLE)}
        missing = sorted(set(dtypes) - set(tables))
        if missing:
            raise ValueError(f"correction tables missing: {missing}")
        return {k: torch.from_numpy(np.ascontiguousarray(tables[k])).to(device=self.device, dtype=dtypes[k])
                for k in dtypes}
