"""TensorRT backend on torch CUDA tensors: plans built by `build_engine`, run behind the engine
interface of `engines.base`.

- `TensorRtLoader(path, device="cuda", ...)` deserializes the plan once, on its first call (after
  `check_plan_compatible` where the plan's record is given: a plan from another TensorRT version
  or GPU is refused in one line before deserialization).
- `TensorRtEngine` holds the deserialized engine; its IO specs come from the engine's IO tensors.
- `TensorRtRunner` is one execution context on one CUDA stream. Tensor addresses are the torch
  tensors' own (`set_tensor_address`), shapes are set only when they change, and each `infer` is
  one `execute_async_v3` on the runner's stream, ordered after the caller's current torch stream
  and before its later work by stream waits: no host synchronisation.
- Activation memory is USER_MANAGED: `SharedActivations` is one buffer (and one stream) for the
  contexts of one generation, sized to the largest engine; the full and the cache graph's runners
  of a generation take the same one (`Engine.generation_runners`), since their steps never overlap on
  one stream. `Engine.runner()` without it allocates a buffer of its own.
- `cuda_graphs=True` captures one CUDA graph per input shapes and tensor addresses (a sampling
  loop reuses a few), replayed instead of the enqueue; capture costs one device synchronisation,
  once per key. Off by default.

This module imports without TensorRT; using it without TensorRT raises UserError
("TensorRT is not installed: ...").
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omnicache_export.engines.base import Engine, EngineLoader, Runner, TensorSpec
from omnicache_export.engines.tensorrt_build import build_engine
from omnicache_export.engines.tensorrt_compat import (
    PlanInfo,
    check_plan_compatible,
    dims_tuple,
    engine_device_memory_bytes,
    plan_info_of_this_machine,
    require_cuda,
    require_tensorrt,
    set_context_memory,
    trt_logger,
)
from omnicache_export.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["build_engine", "PlanInfo", "check_plan_compatible", "plan_info_of_this_machine", "TensorRtLoader",
           "TensorRtEngine", "TensorRtRunner", "SharedActivations"]

MAX_GRAPHS = 8  # CUDA graphs kept per runner (least recently used dropped)


def _torch_dtypes() -> dict[Any, torch.dtype]:
    require_tensorrt()
    import tensorrt as trt

    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT8: torch.int8, trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8, trt.DataType.FP8: torch.float8_e4m3fn}


def _cuda_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device {str(device)!r}: TensorRT runs on a CUDA device (\"cuda\" or \"cuda:N\")")
    return torch.device("cuda", dev.index if dev.index is not None else 0)


class TensorRtLoader(EngineLoader):
    """Deserializes the plan at `path` once, on the first call.

    `plan_info`: the plan's record (a PlanInfo, or the manifest's TensorRtPlan), checked against
    this machine's TensorRT and GPU before deserialization. `cuda_graphs`: the engine's runners
    capture and replay CUDA graphs (see the module's doc)."""

    def __init__(self, path: str | os.PathLike, device: str = "cuda", *, plan_info: Any = None,
                 cuda_graphs: bool = False):
        super().__init__()
        self.path, self.device = Path(path), _cuda_device(device)
        self.plan_info, self.cuda_graphs = plan_info, cuda_graphs

    def load(self) -> TensorRtEngine:
        require_tensorrt()
        import tensorrt as trt

        require_cuda()
        if self.plan_info is not None:
            try:
                check_plan_compatible(self.plan_info, self.device.index)
            except UserError as exc:
                raise UserError(f"{self.path}: {exc}") from None
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such TensorRT plan")
        with torch.cuda.device(self.device):
            runtime: trt.Runtime = trt.Runtime(trt_logger())
            engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise UserError(f"{self.path}: TensorRT could not deserialize this plan (see its log above; "
                            "a plan loads only in the TensorRT version and on the GPU kind that built it)")
        return TensorRtEngine(engine, runtime, self.device, cuda_graphs=self.cuda_graphs)


class TensorRtEngine(Engine):
    """One deserialized plan, shared by its runners."""

    backend = "tensorrt"

    def __init__(self, engine: trt.ICudaEngine, runtime: trt.Runtime, device: torch.device,
                 cuda_graphs: bool = False):
        require_tensorrt()
        import tensorrt as trt

        self.plan: trt.ICudaEngine = engine
        self._runtime: trt.Runtime = runtime  # kept alive as long as the engine
        self.device = device
        self.cuda_graphs = cuda_graphs
        dtypes = _torch_dtypes()
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            if dtype not in dtypes:
                raise UserError(f"tensor {name!r} has TensorRT type {dtype}, which this backend cannot bind")
            shape = tuple(None if d < 0 else d for d in dims_tuple(engine.get_tensor_shape(name)))
            spec = TensorSpec(name, dtypes[dtype], shape)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(spec)
        # per profile: input -> (min, opt, max) shapes, to pick the profile that fits a call
        self.profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = [
            {spec.name: tuple(dims_tuple(s) for s in engine.get_tensor_profile_shape(spec.name, p))
             for spec in self._inputs}
            for p in range(engine.num_optimization_profiles)]

    @property
    def device_memory_bytes(self) -> int:
        """Activation memory one context needs (the largest over the profiles)."""
        return engine_device_memory_bytes(self.plan)

    def runner(self, activations: SharedActivations | None = None) -> TensorRtRunner:
        """A new execution context; with `activations`, on its buffer and stream (shared with the
        other runners of one generation), else on a buffer and a stream of its own."""
        return TensorRtRunner(self, activations)

    @classmethod
    def generation_runners(cls, engines: Sequence[Engine]) -> list[Runner]:
        """One generation's runners on one SharedActivations: its steps never overlap on its stream."""
        trt_engines = [e for e in engines if isinstance(e, TensorRtEngine)]
        shared = SharedActivations(trt_engines)
        return [e.runner(shared) for e in trt_engines]

    def close(self) -> None:
        self.plan = None  # type: ignore[assignment]
        self._runtime = None  # type: ignore[assignment]


class SharedActivations:
    """One activation buffer and one CUDA stream for the execution contexts of one generation.

    Its runners run one after the other on the one stream, so one buffer, sized to the largest of
    their engines' needs, serves them all. Make one per concurrent generation."""

    def __init__(self, engines: Sequence[TensorRtEngine]):
        if not engines:
            raise ValueError("SharedActivations needs at least one engine")
        devices = {e.device for e in engines}
        if len(devices) != 1:
            raise ValueError(f"the engines are on different devices: {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.size = max(e.device_memory_bytes for e in engines)
        self.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self.stream):  # allocated on the stream that uses it (the caching allocator's rule)
            self.buffer = torch.empty(max(self.size, 1), dtype=torch.uint8, device=self.device)

    def fits(self, engine: TensorRtEngine) -> bool:
        return engine.device == self.device and engine.device_memory_bytes <= self.size


class TensorRtRunner(Runner):
    """One execution context of the engine (USER_MANAGED activation memory) on one stream.

    Feeds must be contiguous torch tensors on the engine's device in the input's dtype; anything
    else is refused rather than converted (a silent copy on every step)."""

    engine: TensorRtEngine

    def __init__(self, engine: TensorRtEngine, activations: SharedActivations | None = None):
        super().__init__(engine)
        require_tensorrt()
        import tensorrt as trt

        if activations is None:
            activations = SharedActivations([engine])
        elif not activations.fits(engine):
            raise ValueError(f"the shared activation buffer ({activations.size} bytes on {activations.device}) is "
                             f"smaller than this engine needs ({engine.device_memory_bytes} bytes on {engine.device})")
        self.activations = activations
        self.stream = activations.stream
        plan: trt.ICudaEngine = engine.plan
        with torch.cuda.device(engine.device):
            context: trt.IExecutionContext | None = plan.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (see its log above)")
        self.context: trt.IExecutionContext = context
        set_context_memory(self.context, activations.buffer.data_ptr(), activations.size)
        self._profile = 0
        self._shapes: dict[str, tuple[int, ...]] = {}  # input shapes the context holds
        self._addresses: dict[str, int] = {}  # tensor addresses the context holds
        self._scratch: dict[str, torch.Tensor] = {}  # outputs TensorRT writes that no caller reads
        self._graphs: OrderedDict[tuple, torch.cuda.CUDAGraph | None] = OrderedDict()  # None: not capturable

    # -- shapes

    def _profile_for(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.engine.profiles):
            if all(all(lo <= n <= hi for lo, n, hi in zip(r[0], shapes[name], r[2])) for name, r in profile.items()):
                return index
        ranges = "; ".join(", ".join(f"{name} {r[0]}..{r[2]}" for name, r in p.items()) for p in self.engine.profiles)
        raise ValueError(f"input shapes {dict(shapes)} fit none of the plan's optimization profiles ({ranges}); "
                         "rebuild with a wider --batch")

    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if all(self._shapes.get(name) == shape for name, shape in shapes.items()):
            return
        context: trt.IExecutionContext = self.context
        profile = self._profile_for(shapes)
        if profile != self._profile:
            if not context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT could not switch to optimization profile {profile}")
            self._profile, self._addresses, self._shapes = profile, {}, {}
        for name, shape in shapes.items():
            if self._shapes.get(name) != shape and not context.set_input_shape(name, shape):
                raise ValueError(f"input {name!r}: TensorRT refused shape {shape}")
        self._shapes = dict(shapes)

    def _check_inputs(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        out = {}
        for spec in self.engine.inputs:
            if spec.name not in shapes:
                raise ValueError(f"missing input {spec.name!r}")
            shape = tuple(int(d) for d in shapes[spec.name])
            if len(shape) != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, shape)):
                raise ValueError(f"input {spec.name!r} has shape {shape}, expected {spec.shape}")
            out[spec.name] = shape
        return out

    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """From the context, once these input shapes are set (TensorRT infers them; no run)."""
        self._set_shapes(self._check_inputs(input_shapes))
        return self._output_shapes()

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        context: trt.IExecutionContext = self.context
        shapes = {spec.name: dims_tuple(context.get_tensor_shape(spec.name)) for spec in self.engine.outputs}
        for name, shape in shapes.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"output {name!r} has a data-dependent shape {shape}, which this runner cannot preallocate")
        return shapes

    # -- running

    def infer(
        self,
        feeds: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """See `Runner.infer`. TensorRT writes every output: those neither in `names` nor in
        `outputs` go to buffers the runner keeps."""
        engine = self.engine
        outputs = outputs or {}
        specs = {spec.name: spec for spec in engine.outputs}
        names = list(names) if names is not None else list(specs)
        for name in [*names, *outputs]:
            if name not in specs:
                raise ValueError(f"unknown output {name!r} (outputs: {', '.join(specs)})")
        for spec in engine.inputs:
            self._check_tensor("input", spec, feeds.get(spec.name))
        self._set_shapes(self._check_inputs({spec.name: feeds[spec.name].shape for spec in engine.inputs}))
        shapes = self._output_shapes()
        tensors: dict[str, torch.Tensor] = {spec.name: feeds[spec.name] for spec in engine.inputs}
        result: dict[str, torch.Tensor] = {}
        for name, spec in specs.items():
            if name in outputs:
                self._check_tensor("output", spec, outputs[name], shapes[name])
                tensors[name] = outputs[name]
            elif name in names:  # handed to the caller: a new tensor
                tensors[name] = torch.empty(shapes[name], dtype=spec.dtype, device=engine.device)
            else:  # written but unread: the runner's own buffer, kept (stable addresses, so graphs replay)
                tensors[name] = self._scratch_buffer(name, shapes[name], spec.dtype)
            if name in names:
                result[name] = tensors[name]
        self._set_addresses(tensors)
        caller = torch.cuda.current_stream(engine.device)
        self.stream.wait_stream(caller)  # the feeds are written on the caller's stream
        if engine.cuda_graphs:
            self._replay_or_capture(tensors)
        else:
            self._enqueue()
        caller.wait_stream(self.stream)  # the caller's later work reads the outputs
        return result

    def _scratch_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._scratch.get(name)
        if buffer is None or tuple(buffer.shape) != shape:
            with torch.cuda.stream(self.stream):  # only the runner's stream uses it
                buffer = torch.empty(shape, dtype=dtype, device=self.engine.device)
            self._scratch[name] = buffer
        return buffer

    def _set_addresses(self, tensors: Mapping[str, torch.Tensor]) -> None:
        context: trt.IExecutionContext = self.context
        for name, tensor in tensors.items():
            address = tensor.data_ptr()
            if self._addresses.get(name) != address:
                if not context.set_tensor_address(name, address):
                    raise RuntimeError(f"TensorRT refused the address of {name!r}")
                self._addresses[name] = address

    def _enqueue(self) -> None:
        context: trt.IExecutionContext = self.context
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed (see its log above)")

    def _replay_or_capture(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """A graph per (profile, input shapes, every tensor's address): a captured graph holds them."""
        key = (self._profile, tuple(sorted(self._shapes.items())), tuple(sorted(self._addresses.items())))
        if key in self._graphs:
            self._graphs.move_to_end(key)
            graph = self._graphs[key]
            if graph is None:
                self._enqueue()
            else:
                with torch.cuda.stream(self.stream):
                    graph.replay()
            return
        # TensorRT does its shape-dependent setup in the first enqueue after a change: run once
        # plainly, then capture the next enqueue (what it records is what replays).
        self._enqueue()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._enqueue()
        except RuntimeError:
            graph = None  # an engine with layers that cannot be captured runs plainly
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)

    def _check_tensor(self, kind: str, spec: TensorSpec, tensor: object, shape: tuple[int, ...] | None = None) -> None:
        device = self.engine.device
        if tensor is None:
            raise ValueError(f"missing {kind} {spec.name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{kind} {spec.name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"{kind} {spec.name!r} has dtype {tensor.dtype}, expected {spec.dtype}")
        if tensor.device != device:
            raise ValueError(f"{kind} {spec.name!r} is on {tensor.device}, expected {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{kind} {spec.name!r} is not contiguous (pass tensor.contiguous())")
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{kind} {spec.name!r} has shape {tuple(tensor.shape)}, expected {shape}")

    def close(self) -> None:
        self._graphs.clear()
        self._scratch.clear()
        self.context = None  # type: ignore[assignment]
