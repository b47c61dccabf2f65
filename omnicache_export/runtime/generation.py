"""One generation: its latents, scheduler, runners and cache state, stepped through the dispatch.

`sample_rows` is the one sampling loop over rows of conditioning: batches of rows (the export's
static batch where it fixed one, the last batch padded), each row's noise from (seed, row index),
each batch its own generation. The runtime's `OmniCache.sample`, the CLI's `run` and calibration's
reference and candidate runs all sample through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from omnicache_export.errors import UserError
from omnicache_export.runtime.dispatch import CacheState, StepDispatch
from omnicache_export.runtime.sampler import Denoiser, SamplingSpec, batched_feeds, check_seed, to_torch


class StepRecord:
    """What one step fed and produced, for observers (calibration's records and fits). The tensors
    are the generation's buffers: an observer that keeps them must copy them."""

    __slots__ = ("i", "full", "model_feeds", "feeds", "outputs", "state")

    def __init__(self, i: int, full: bool, model_feeds: dict, feeds: dict, outputs: dict, state: CacheState):
        self.i, self.full, self.model_feeds, self.feeds, self.outputs, self.state = i, full, model_feeds, feeds, outputs, state


Observer = Callable[[StepRecord], None]


class Generation:
    """One generation's state. `step()` runs the next timestep on the graph the schedule names."""

    def __init__(self, dispatch: StepDispatch, spec: SamplingSpec, full_steps: np.ndarray,
                 cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor], x0: torch.Tensor, *,
                 no_cache: bool = False, tables: Mapping[str, torch.Tensor] | None = None,
                 observer: Observer | None = None, record: bool = False, uncorrected: bool = False):
        self.dispatch, self.spec, self.no_cache = dispatch, spec, no_cache
        self.schedule = [bool(f) for f in full_steps]
        if len(self.schedule) != spec.n_steps or not self.schedule[0]:
            raise ValueError(f"a schedule of {spec.n_steps} steps whose first step is full is needed, got "
                             f"{''.join('F' if f else 'C' for f in self.schedule)}")
        self.den = Denoiser(spec, dispatch.device)
        self.x = x0
        self.static = batched_feeds(spec, cond, uncond)
        self.full_runner, self.cache_runner = dispatch.runners()
        self.tables, self.observer = tables, observer
        self.steps = dispatch.step_indices(spec.n_steps, len(x0) * (2 if spec.cfg else 1))  # its step, every row
        self.state: CacheState | None = None
        self.cache_out: dict[str, torch.Tensor] | None = None
        self.with_uncorrected = uncorrected and dispatch.uncorrected is not None
        self.trajectory = [x0] if record else None
        self.i = 0
        self.full_steps = self.cached_steps = 0

    @property
    def done(self) -> bool:
        return self.i >= self.spec.n_steps

    def is_full(self, i: int) -> bool:
        return self.no_cache or self.schedule[i]

    def step(self) -> torch.Tensor:
        d, i = self.dispatch, self.i
        feeds = self.den.feeds(i, self.x, self.static)
        if self.state is None:
            self.state = d.new_state(self.full_runner, feeds)
        if self.is_full(i):
            raw = d.run_full(self.full_runner, self.state, feeds)
            self.full_steps += 1
            if self.observer is not None:
                outputs = {name: self.state.last(name) for name in self.state.buffers}
                self.observer(StepRecord(i, True, feeds, feeds, outputs, self.state))
        else:
            graph_feeds = d.cache_feeds(i, feeds, self.state, self.tables, self.steps)
            if self.cache_out is None:
                names = [d.output] + ([d.uncorrected] if self.with_uncorrected else [])
                self.cache_out = {name: torch.empty_like(self.state.prev) for name in names}
            d.run_cached(self.cache_runner, graph_feeds, self.cache_out)
            raw = self.cache_out[d.output]
            self.cached_steps += 1
            if self.observer is not None:
                self.observer(StepRecord(i, False, feeds, graph_feeds, self.cache_out, self.state))
        self.x = self.den.step(i, self.den.guided(raw), self.x)
        if self.trajectory is not None:
            self.trajectory.append(self.x)
        self.i += 1
        return self.x

    def run(self) -> torch.Tensor:
        while not self.done:
            self.step()
        return self.x

    def close(self) -> None:
        self.full_runner.close()
        self.cache_runner.close()


def row_batches(rows: Sequence[int], size: int, static: bool):
    """(positions, padded positions) of each batch of `size` rows; with a static batch the last
    one is padded by repeating its final row."""
    for start in range(0, len(rows), size):
        pos = list(range(start, min(len(rows), start + size)))
        yield pos, (pos + [pos[-1]] * (size - len(pos)) if static else pos)


class NonFiniteSamples(UserError):
    """Sampling ended with NaN or infinite latents: which rows, and the first step whose latents
    went non-finite (its output, at that step, overflowed or was already NaN)."""

    def __init__(self, rows: Sequence[int], n_rows: int, step: int | None, n_steps: int):
        self.rows, self.step = list(rows), step
        shown = ", ".join(map(str, self.rows[:8])) + (f" … ({len(self.rows)} rows)" if len(self.rows) > 8 else "")
        at = f"from step {step} of {n_steps}" if step is not None else "at the end"
        super().__init__(f"sampling went non-finite (NaN or inf) in row{'s' if len(self.rows) > 1 else ''} {shown} "
                         f"of {n_rows}, {at}: the model's output overflowed (check the conditioning's scale)")


def first_non_finite_step(gen: Generation, rows: torch.Tensor) -> int | None:
    """Replay `gen` (a fresh generation of the failed batch, same feeds and noise) to find the first
    step after which the latents of `rows` (a bool mask over its first rows) are not all finite.

    Only run once a batch has ended non-finite: the sampling loop itself checks the final latents
    alone, on the host copy it makes anyway, so a finite run pays no device->host sync per step
    (a per-step `isfinite(x).all()` would be one sync per step; a device-side flag, a reduction per
    step). The replay is deterministic: the same dispatch, feeds and initial noise."""
    mask = torch.zeros(len(gen.x), dtype=torch.bool)
    mask[: len(rows)] = rows
    mask = mask.to(gen.x.device)
    try:
        while not gen.done:
            i = gen.i
            x = gen.step()
            if not bool(torch.isfinite(x[mask]).all()):
                return i
    finally:
        gen.close()
    return None


class Sampled:
    """The result of `sample_rows`: final latents (numpy), step counts, and trajectories if recorded."""

    def __init__(self, final: np.ndarray, full_steps: int, cached_steps: int, trajectory: np.ndarray | None):
        self.final, self.full_steps, self.cached_steps, self.trajectory = final, full_steps, cached_steps, trajectory


def sample_rows(
    dispatch: StepDispatch, spec: SamplingSpec, full_steps: np.ndarray,
    cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray], seed: int, *,
    rows: Sequence[int] | None = None, batched: set[str] | None = None, batch_size: int | None = None,
    no_cache: bool = False, tables: Mapping[str, torch.Tensor] | None = None,
    observer: Callable[[int], Observer | None] | None = None, record: bool = False, uncorrected: bool = False,
    on_batch: Callable[[Generation], None] | None = None,
    on_trajectory: Callable[[int, np.ndarray], None] | None = None, check_finite: bool = True,
) -> Sampled:
    """Sample every row of `cond` (arrays with the sample axis first for the inputs in `batched`,
    default all; the others whole). Row r (r = `rows[k]`, default k) starts from the noise of
    (seed, r): the same sample whatever the batching. `batch_size`: rows per generation (default:
    all; the export's static batch, where it fixed one, overrides it). `observer(b)`: the observer of
    batch b's generation. With `record`, `on_trajectory(b, trajectories)` takes each batch's
    trajectories [rows, N+1, ...] instead of their being kept (memory stays one batch's).
    `check_finite`: a batch whose final latents are not all finite raises `NonFiniteSamples`
    (a UserError naming the rows and the first step that went non-finite)."""
    check_seed(seed)
    batched = set(cond) if batched is None else batched
    counts = {len(v) for k, v in cond.items() if k in batched}
    if len(counts) > 1:
        raise ValueError(f"the conditioning inputs disagree on the number of rows: {sorted(counts)}")
    n = counts.pop() if counts else (len(rows) if rows is not None else 1)
    rows = list(range(n)) if rows is None else list(rows)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} row indices for {n} rows of conditioning")
    static = spec.chunk is not None
    size = spec.chunk if static else (batch_size or n)
    den = Denoiser(spec, dispatch.device)
    finals, trajs = [], []
    full = cached = 0
    for b, (pos, padded) in enumerate(row_batches(rows, size, static)):
        pick = lambda d: {k: (v[padded] if k in batched else v) for k, v in d.items()}  # noqa: E731
        feeds = to_torch(pick(cond), dispatch.device), to_torch(pick(uncond), dispatch.device)
        x0 = den.initial_latents([rows[p] for p in padded], seed)
        gen = Generation(dispatch, spec, full_steps, *feeds, x0, no_cache=no_cache, tables=tables,
                         observer=observer(b) if observer else None, record=record, uncorrected=uncorrected)
        try:
            gen.run()
            final = gen.x[: len(pos)].cpu().numpy()  # the one device->host copy of the batch
            finite = not check_finite or bool(np.isfinite(final).all())
            if finite and on_batch is not None:
                on_batch(gen)
        finally:
            gen.close()
        if not finite:
            bad = ~np.isfinite(final).reshape(len(pos), -1).all(axis=1)
            replay = Generation(dispatch, spec, full_steps, *feeds, x0, no_cache=no_cache, tables=tables)
            raise NonFiniteSamples([rows[p] for p, flag in zip(pos, bad) if flag], len(rows),
                                   first_non_finite_step(replay, torch.from_numpy(bad)), spec.n_steps)
        finals.append(final)
        if record:
            traj = torch.stack(gen.trajectory, dim=1)[: len(pos)].cpu().numpy()
            if on_trajectory is not None:
                on_trajectory(b, traj)
            else:
                trajs.append(traj)
            del traj
            gen.trajectory = None
        full += gen.full_steps
        cached += gen.cached_steps
    return Sampled(np.concatenate(finals), full, cached, np.concatenate(trajs) if record and trajs else None)
