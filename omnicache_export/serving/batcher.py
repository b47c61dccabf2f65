"""Step-level continuous batching: requests of one row each, stepped together through one dispatch.

Each request in flight keeps its own state (`InFlight`: its Denoiser, i.e. its scheduler state, its
latents, its `CacheState` and its step index) on the engines' device. Each `tick()`:

1. admits waiting requests (up to `max_batch` in flight): a request submitted mid-flight joins the
   next tick;
2. groups the requests by the graph their own step runs (the schedule, per request), and by their
   inputs without a batch axis (which a call takes once): all full-step rows in one full-graph call,
   all cached-step rows in one cache-graph call, fed their per-row step index (`omnicache_step`,
   int64 [model batch]). Where the timestep input is shared by the batch (shape [] or [1]), or the
   cache graph takes one step for all rows (an export from before per-row steps: int64 [1]), a group
   also shares its step; where the export fixed its batch a group holds that many requests (the last
   padded by repeating a request, whose extra outputs are dropped);
3. concatenates each group's rows along axis 0, request after request (under guidance each
   request brings its cond row then its uncond row, as its own `Generation` would), runs one engine
   call per group, and splits the outputs back: a full step's output and caches go into the
   request's own CacheState buffers, a cached step's output is the request's raw prediction;
4. advances each request's scheduler by its own step; a request past its last step resolves its
   future with `latent` (numpy float32 [1, *latent_shape], the one device->host copy).

Bit identity: a request's arithmetic is its one-row `Generation`'s (same feeds, same scheduler
calls on the same rows), so its latent equals `omnicache-export run` on that row and seed bit for
bit wherever the engines compute each row independently of the others in the batch (ONNX Runtime's
CPU kernels do; tests/test_serve.py checks it on every request).

The dispatch is the runtime's `StepDispatch` (two engines behind engines/base.py): the server
process's ONNX Runtime engines, or the Triton repository's BLS engines. Use it from one thread
(`tick()` / `run_until_idle()`), or `start()` a ticking thread and `submit()` from any thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from omnicache_export.runtime.dispatch import CacheState, StepDispatch
from omnicache_export.runtime.graph_io import Feed
from omnicache_export.runtime.sampler import Denoiser, SamplingSpec, batched_feeds, to_torch
from omnicache_export.serving.requests import LATENT, RequestContract, RequestError, ServeRequest


@dataclasses.dataclass(eq=False)
class InFlight:
    """One request's own state, on the device."""

    request: ServeRequest
    future: concurrent.futures.Future
    den: Denoiser
    x: torch.Tensor  # latents [1, *latent_shape]
    static: dict[str, torch.Tensor]  # conditioning as its model feeds take it (cond then uncond rows)
    steps: torch.Tensor  # int64 [N, rows]: the step index fed per model row
    shared_key: bytes = b""  # the inputs without a batch axis (Flux's img_ids): rows share a call only if equal
    state: CacheState | None = None
    i: int = 0


class StepBatcher:
    """The serving core: `submit()` requests, `tick()` them forward (or `start()` a thread that does)."""

    def __init__(self, dispatch: StepDispatch, spec: SamplingSpec, full_steps: Sequence[bool],
                 contract: RequestContract, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        self.dispatch, self.spec, self.contract = dispatch, spec, contract
        self.schedule = [bool(f) for f in full_steps]
        self.chunk = spec.chunk  # requests per call where the export fixed the batch
        self.max_batch = max_batch if self.chunk is None else max(self.chunk, max_batch - max_batch % self.chunk)
        self.copies = 2 if spec.cfg else 1
        shape = spec.timestep_shape
        self.shared_timestep = spec.timestep is not None and shape is not None and (len(shape) == 0 or shape == [1])
        # rows at different steps share a cache-graph call only where it takes a step per row
        self.shared_step = self.shared_timestep or not dispatch.step_per_row
        self.batched = set(contract.batched) | {spec.latent}
        if spec.timestep and not self.shared_timestep:
            self.batched.add(spec.timestep)
        self.full_runner, self.cache_runner = dispatch.runners()
        self.waiting: deque[InFlight] = deque()
        self.active: list[InFlight] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.calls = {"full": 0, "cache": 0}  # engine calls made, per graph
        self.rows = {"full": 0, "cache": 0}  # request-steps they ran

    @classmethod
    def load(cls, out_dir, backend: str = "onnxruntime", device: str = "cpu", max_batch: int = 16,
             **settings) -> StepBatcher:
        """The core over an export folder: `OmniCache.load` (manifest, hashes, graph checks, engines)
        and the stored unconditional rows (`manifest.load_uncond`). `close()` releases the engines."""
        from omnicache_export.runtime.manifest import load_uncond
        from omnicache_export.runtime.omnicache import OmniCache

        rt = OmniCache.load(out_dir, backend, device, **settings)
        try:
            contract = RequestContract(rt.manifest, load_uncond(rt.manifest))
            batcher = cls(rt.dispatch, rt.spec, rt.full_steps, contract, max_batch)
        except BaseException:
            rt.close()
            raise
        batcher._owned = rt
        return batcher

    def close(self) -> None:
        """`stop()`, and release the engines where `load` made them."""
        self.stop()
        owned = getattr(self, "_owned", None)
        if owned is not None:
            owned.close()
            self._owned = None

    # ------------------------------------------------------------------ requests

    def submit(self, arrays: Mapping[str, np.ndarray]) -> concurrent.futures.Future:
        """Queue one request (arrays by input name, see `serving.requests`); thread-safe. Raises
        RequestError at once for a request the contract refuses; the future's result is
        {"latent": array}, or it raises RequestError (e.g. a result that went non-finite)."""
        request = self.contract.parse(arrays)
        future: concurrent.futures.Future = concurrent.futures.Future()
        den = Denoiser(self.spec, self.dispatch.device)
        device = self.dispatch.device
        static = batched_feeds(self.spec, to_torch(request.cond, device), to_torch(request.uncond, device))
        rows = self.copies
        steps = self.dispatch.step_indices(self.spec.n_steps, rows)
        shared = b"".join(np.ascontiguousarray(v).tobytes() for k, v in sorted(request.cond.items())
                          if k not in self.batched)
        item = InFlight(request, future, den, den.initial_latents([0], request.seed), static, steps, shared)
        with self._lock:
            self.waiting.append(item)
            self._lock.notify_all()
        return future

    def infer(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Submit and wait (needs a started thread, or another thread ticking)."""
        return self.submit(arrays).result()

    # ------------------------------------------------------------------ ticking

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def tick(self) -> int:
        """Admit, group, run one engine call per group, advance; returns the requests stepped."""
        with self._lock:
            while self.waiting and len(self.active) < self.max_batch:
                self.active.append(self.waiting.popleft())
        if not self.active:
            return 0
        stepped = list(self.active)
        for graph, group in self._groups(stepped):
            try:
                self._run_group(graph, group)
            except Exception as exc:  # noqa: BLE001 - an engine failure fails these requests, not the server
                for item in group:
                    self._finish(item, error=RequestError(f"inference failed: {exc}".splitlines()[0]))
        for item in stepped:
            if item.future.done():
                continue
            if item.i >= self.spec.n_steps:
                self._resolve(item)
        return len(stepped)

    def run_until_idle(self) -> None:
        while not self.idle:
            self.tick()

    def start(self) -> None:
        """A daemon thread ticking while requests are in flight or waiting."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="omnicache-batcher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
            self.tick()

    def stop(self) -> None:
        """Stop the thread (requests still in flight fail with RequestError) and release the runners."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for item in [*self.active, *self.waiting]:
            self._finish(item, error=RequestError("the server is shutting down"))
        self.active.clear()
        self.waiting.clear()
        self.full_runner.close()
        self.cache_runner.close()

    # ------------------------------------------------------------------ groups

    def _groups(self, items: list[InFlight]):
        """(graph, requests) per engine call of this tick."""
        by_graph: dict[str, dict[tuple, list[InFlight]]] = {"full": {}, "cache": {}}
        for item in items:
            graph = "full" if self.schedule[item.i] else "cache"
            key = (item.i if (self.shared_step if graph == "cache" else self.shared_timestep) else 0, item.shared_key)
            by_graph[graph].setdefault(key, []).append(item)
        size = self.chunk or self.max_batch
        for graph, keyed in by_graph.items():
            for group in keyed.values():
                for start in range(0, len(group), size):
                    yield graph, group[start:start + size]

    def _model_feeds(self, group: list[InFlight]) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Each request's model feeds at its step, and the group's (rows concatenated; padded to
        the export's static batch)."""
        own = [item.den.feeds(item.i, item.x, item.static) for item in group]
        padded = own + [own[-1]] * ((self.chunk - len(own)) if self.chunk else 0)
        return own, {name: self._cat(name, [f[name] for f in padded]) for name in own[0]}

    def _cat(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if name not in self.batched or len(tensors) == 1:
            return tensors[0].contiguous()
        return torch.cat(tensors, dim=0)

    def _run_group(self, graph: str, group: list[InFlight]) -> None:
        d = self.dispatch
        own, feeds = self._model_feeds(group)
        n_calls = self.chunk or len(group)
        if graph == "full":
            out = self.full_runner.infer(d.full_feeds(feeds))
            for k, item in enumerate(group):
                if item.state is None:
                    item.state = self._new_state(out, n_calls)
                for name, target in item.state.targets().items():
                    target.copy_(self._rows(out[name], k, n_calls))
                item.state.advance()
            raws = [item.state.prev for item in group]
        else:
            per_request = [d.cache_feeds(item.i, own[k], item.state, None, item.steps) for k, item in enumerate(group)]
            per_request += [per_request[-1]] * (n_calls - len(group))
            cache_inputs = {t.name: t for t in d.cache_io.inputs}
            fed = {}
            for name in per_request[0]:
                t = cache_inputs[name]
                unbatched = (t.feed is Feed.MODEL and t.source not in self.batched) or (
                    t.feed is Feed.STEP and not d.step_per_row)
                fed[name] = per_request[0][name] if unbatched else torch.cat([f[name] for f in per_request], dim=0)
            out = self.cache_runner.infer(fed, names=[d.output])[d.output]
            raws = [self._rows(out, k, n_calls) for k in range(len(group))]
        self.calls[graph] += 1
        self.rows[graph] += len(group)
        for item, raw in zip(group, raws):
            item.x = item.den.step(item.i, item.den.guided(raw), item.x)
            item.i += 1

    @staticmethod
    def _rows(tensor: torch.Tensor, k: int, n: int) -> torch.Tensor:
        """Request k's block of a group output (axis 0 holds n equal blocks: rows, or rows × frames)."""
        size = tensor.shape[0] // n
        return tensor[k * size:(k + 1) * size]

    def _new_state(self, out: Mapping[str, torch.Tensor], n: int) -> CacheState:
        d = self.dispatch
        names = [d.output, *d.cache_names]
        shapes = {name: tuple(self._rows(out[name], 0, n).shape) for name in names}
        return CacheState(d.output, shapes, {name: out[name].dtype for name in names}, d.device, d.cache_depth)

    # ------------------------------------------------------------------ results

    def _resolve(self, item: InFlight) -> None:
        latent = item.x.cpu().numpy()
        if not np.isfinite(latent).all():
            self._finish(item, error=RequestError("sampling went non-finite (NaN or inf): the model's output "
                                                  "overflowed (check the conditioning's scale)"))
        else:
            self._finish(item, result={LATENT: latent})

    def _finish(self, item: InFlight, result=None, error: Exception | None = None) -> None:
        with self._lock:
            if item in self.active:
                self.active.remove(item)
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
