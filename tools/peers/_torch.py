"""Shared plumbing for the peers that run on the torch model: the sampling loop (the product's own
`omnicache_export.sampler.sample`, so initial noise, scheduler and guidance are identical to the ONNX
runs), a full-step counter and the threshold search.

A "full step" is counted by a forward hook on a module that only runs when the method computes the
step in full: by default the last transformer block's feed-forward (`ff`), for attention-only methods
the last block's self-attention query projection (`attn1.to_q`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from omnicache_export.runtime.sampler import SamplingSpec, sample


@dataclasses.dataclass
class PeerRun:
    final: np.ndarray  # final latents [n, ...]
    n_full: int  # full steps counted (per generation)
    wall_s: float
    setting: str = ""  # the method's knob as set (threshold, interval, ...)
    note: str = ""


@dataclasses.dataclass
class TorchCase:
    """What a torch peer needs: the model, its input order, the sampling spec and one evaluation batch."""

    model: torch.nn.Module
    input_names: list[str]
    spec: SamplingSpec
    cond: dict
    uncond: dict
    n: int
    seed: int
    target_full: int


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The model's transformer block lists, in execution order where it interleaves (Latte)."""
    names = ("transformer_blocks", "temporal_transformer_blocks", "blocks", "single_transformer_blocks")
    return [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), torch.nn.ModuleList)]


def last_block(model: torch.nn.Module) -> torch.nn.Module:
    """The block that runs last in a step: the last block of the last list (temporal for Latte)."""
    return block_lists(model)[-1][1][-1]


def first_block(model: torch.nn.Module) -> torch.nn.Module:
    return block_lists(model)[0][1][0]


class StepCounter:
    """Counts the sampling steps in which `module` ran at least once."""

    def __init__(self, module: torch.nn.Module):
        self.steps: set[int] = set()
        self.step = 0
        self._handle = module.register_forward_hook(lambda *_: self.steps.add(self.step))

    @property
    def count(self) -> int:
        return len(self.steps)

    def close(self) -> None:
        self._handle.remove()


class Loop:
    """Current step index and timestep, readable by the hooks' callbacks (PAB, FasterCache)."""

    def __init__(self):
        self.i = 0
        self.t = 1000.0


def torch_model_fn(model: torch.nn.Module, input_names: list[str], loop: Loop | None = None,
                   counter: StepCounter | None = None, before: Callable[[int], None] | None = None):
    """`model(i, feeds)` for `sampler.sample`: positional torch forward in `input_names` order."""

    def fn(i: int, feeds: dict) -> np.ndarray:
        if loop is not None:
            loop.i = i
            ts = [v for k, v in feeds.items() if "timestep" in k]
            loop.t = float(np.asarray(ts[0]).reshape(-1)[0]) if ts else 0.0
        if counter is not None:
            counter.step = i
        if before is not None:
            before(i)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names]
        with torch.inference_mode():
            out = model(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "sample"):
            out = out.sample
        return out.float().numpy()

    return fn


def run_torch(case: TorchCase, model: torch.nn.Module, count_module: torch.nn.Module | None = None,
              loop: Loop | None = None, context: Callable[[], contextlib.AbstractContextManager] | None = None,
              before: Callable[[int], None] | None = None) -> tuple[np.ndarray, int, float]:
    """Sample the evaluation batch with `model` (hooks applied); (final latents, full steps, seconds)."""
    counter = StepCounter(count_module) if count_module is not None else None
    fn = torch_model_fn(model, case.input_names, loop, counter, before)
    ctx = context() if context is not None else contextlib.nullcontext()
    try:
        with ctx:
            t0 = time.perf_counter()
            final, _ = sample(case.spec, fn, case.cond, case.uncond, case.n, case.seed)
            wall = time.perf_counter() - t0
    finally:
        if counter is not None:
            counter.close()
    return final, (counter.count if counter is not None else case.spec.n_steps), wall


def fresh(model: torch.nn.Module) -> torch.nn.Module:
    """A copy to hang hooks on (the hooks patch forwards in place; the original stays clean)."""
    return copy.deepcopy(model).eval()


def tune(run: Callable[[float], PeerRun], target: int, lo: float, hi: float, log: bool = True,
         iters: int = 14, increasing: bool = False) -> PeerRun:
    """Bisection on a threshold-like knob so that the full-step count meets `target`.

    By default a larger knob skips more (fewer full steps). Returns the run whose count is closest to
    the target (ties: the one with more full steps, i.e. never cheating towards fewer computations)."""
    best: PeerRun | None = None

    def better(r: PeerRun) -> bool:
        if best is None:
            return True
        d, db = abs(r.n_full - target), abs(best.n_full - target)
        return d < db or (d == db and r.n_full > best.n_full)

    a, b = lo, hi
    for _ in range(iters):
        mid = math.sqrt(a * b) if log else (a + b) / 2
        r = run(mid)
        if better(r):
            best = r
        if r.n_full == target:
            break
        too_many = r.n_full > target
        if too_many != increasing:
            a = mid  # more skipping needed
        else:
            b = mid
    return best


def enable_diffusers_cache(model: torch.nn.Module, config) -> tuple[torch.nn.Module, Callable]:
    """`model.enable_cache(config)` as diffusers ships it. Models whose class lacks diffusers'
    `CacheMixin` (DiT, PixArt in 0.42) get it mixed into a subclass: the same `enable_cache` code path
    (its `apply_*` dispatch), nothing else changed. Returns the model and the per-generation context
    (`model.cache_context("cond")` after resetting the stateful hooks, as the pipelines do)."""
    from diffusers.models.cache_utils import CacheMixin

    model = fresh(model)
    if not isinstance(model, CacheMixin):
        cls = model.__class__
        model.__class__ = type(cls.__name__, (cls, CacheMixin), {})
    model.enable_cache(config)

    @contextlib.contextmanager
    def context():
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        with model.cache_context("cond"):
            yield

    return model, context


@contextlib.contextmanager
def explain_layout_error(model: torch.nn.Module):
    """diffusers' FBC/MagCache take the residual between the first block of the first list and the last
    block of the last list; on Latte these are a spatial and a temporal block with different layouts."""
    try:
        yield
    except RuntimeError as exc:
        if hasattr(model, "temporal_transformer_blocks") and "must match the size" in str(exc):
            raise RuntimeError("the hook subtracts the first spatial block's input ([B·F, H·W, D]) from the last "
                               "temporal block's output ([B·H·W, F, D]): " + str(exc).splitlines()[0]) from None
        raise
