"""ONNX Runtime backend on torch tensors: CPU by default; CUDA and TensorRT execution providers
where this ONNX Runtime has them.

Every input and output is bound to ONNX Runtime by pointer (`IOBinding.bind_input/bind_output` with
`buffer_ptr=tensor.data_ptr()`), so a run reads the caller's tensors and writes into the caller's
buffers in place: nothing is copied to or from the host and no data goes through numpy. The element
types are passed as ONNX `TensorProto` codes rather than numpy dtypes, which is what lets bfloat16
(absent from numpy) bind like every other type.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import onnxruntime as ort
import torch

from omnicache_export.engines.base import Engine, EngineLoader, Runner, TensorSpec

# ONNX Runtime's type string -> (torch dtype, ONNX TensorProto element type, as bind_* takes it).
_TYPES = {
    "tensor(float)": (torch.float32, 1),
    "tensor(uint8)": (torch.uint8, 2),
    "tensor(int8)": (torch.int8, 3),
    "tensor(int32)": (torch.int32, 6),
    "tensor(int64)": (torch.int64, 7),
    "tensor(bool)": (torch.bool, 9),
    "tensor(float16)": (torch.float16, 10),
    "tensor(double)": (torch.float64, 11),
    "tensor(bfloat16)": (torch.bfloat16, 16),
}
_ELEMENT_TYPE = dict(_TYPES.values())
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_devices() -> list[str]:
    """The devices whose first execution provider this ONNX Runtime has."""
    have = set(ort.get_available_providers())
    return [device for device, providers in _PROVIDERS.items() if providers[0] in have]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class OnnxRuntimeLoader(EngineLoader):
    """All of ONNX Runtime's settings; builds the `InferenceSession` on the first call.

    `threads`: intra-op threads (None: ONNX Runtime's default, one per physical core).
    `spinning=False` stops the intra-op threads spin-waiting for work after a run: where two
    sessions alternate (full and cache steps), a spinning idle session steals the cores of the other
    one (measured: +14 % on the full step after each cached step, `tools/bench_speed.py`).
    `providers` replaces the device's execution providers (names or `(name, options)` pairs, e.g.
    TensorRT's fp16 or engine-cache options); tensors still bind on `device`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        spinning: bool = False,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        super().__init__()
        if device not in _PROVIDERS:
            raise ValueError(f"unknown device {device!r} (choose from {', '.join(_PROVIDERS)})")
        self.providers = list(providers) if providers is not None else _PROVIDERS[device]
        available = ort.get_available_providers()
        for provider in self.providers:
            name = provider if isinstance(provider, str) else provider[0]
            if name not in available:
                raise ValueError(f"device {device!r} needs {name}, which this ONNX Runtime lacks "
                                 f"(available: {', '.join(available)})")
        self.path, self.device, self.threads = path, device, threads
        self.spinning, self.optimization = spinning, optimization

    def load(self) -> OnnxRuntimeEngine:
        options = ort.SessionOptions()
        options.graph_optimization_level = self.optimization
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        session = ort.InferenceSession(os.fspath(self.path), sess_options=options, providers=self.providers)
        return OnnxRuntimeEngine(session, torch.device("cpu") if self.device == "cpu" else torch.device("cuda", 0))


class OnnxRuntimeEngine(Engine):
    """One `InferenceSession`, shared by its runners (ONNX Runtime runs one session from several
    threads at once, each with its own IO binding)."""

    backend = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, device: torch.device):
        self.session = session
        self.device = device
        self._inputs = [self._spec(arg, "input") for arg in session.get_inputs()]
        self._outputs = [self._spec(arg, "output") for arg in session.get_outputs()]
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # output shapes per input shapes

    @staticmethod
    def _spec(arg, kind: str) -> TensorSpec:
        if arg.type not in _TYPES:
            raise ValueError(f"{kind} {arg.name!r} has type {arg.type}, which this backend cannot bind "
                             f"(supported: {', '.join(_TYPES)})")
        return TensorSpec(arg.name, _TYPES[arg.type][0], tuple(arg.shape))

    def runner(self) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(self)

    def close(self) -> None:
        self.session = None


class OnnxRuntimeRunner(Runner):
    """One IO binding on the engine's session: one per concurrent generation.

    Feeds must be contiguous torch tensors on the engine's device in the input's dtype; anything
    else is refused rather than converted, since a silent `.contiguous()` or `.to()` would copy on
    every step. Inputs the graph does not declare are ignored (one dict can feed several graphs).

    The binding is kept from one call to the next and redone only when a tensor's pointer or shape
    changed, as it does not when the caller reuses its buffers: rebinding cost 12 of the 25 µs a
    call spent outside `run_with_iobinding` (two inputs, two outputs, CPU).

    On CUDA, ONNX Runtime runs on its own stream and does not wait for torch's, so `infer` first
    waits for the caller's current torch stream; ONNX Runtime synchronizes its own stream at the
    end of the run, so the outputs are complete when `infer` returns.
    """

    engine: OnnxRuntimeEngine

    def __init__(self, engine: OnnxRuntimeEngine):
        super().__init__(engine)
        self._binding = engine.session.io_binding()
        self._bound: tuple[dict, dict] = ({}, {})  # name -> (pointer, shape) the binding holds: inputs, outputs

    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """ONNX Runtime has no shape query: the graph's declared output shapes where they are all
        static, else the shapes of one probe run on zero inputs of these shapes (integer inputs
        zeros too, which some graphs reject: indices into an empty table, a Reshape's target shape),
        cached on the engine per input shapes, so each new input shape costs one extra run. A
        declared rank-0 output counts as dynamic, since ONNX Runtime reports an unknown shape as ()
        too; a declared static shape the graph does not keep fails the run in ONNX Runtime."""
        for spec in self.engine.inputs:
            if spec.name not in input_shapes:
                raise ValueError(f"missing input {spec.name!r}")
            self._check_shape("input", spec, tuple(input_shapes[spec.name]))
        return self._output_shapes(input_shapes)

    def _output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        engine = self.engine
        key = tuple(tuple(input_shapes[spec.name]) for spec in engine.inputs)
        if key not in engine._shapes:
            declared = {spec.name: spec.shape for spec in engine.outputs}
            static = all(shape and all(isinstance(d, int) for d in shape) for shape in declared.values())
            engine._shapes[key] = declared if static else self._probe(key)
        return engine._shapes[key]

    def _probe(self, input_shapes: tuple[tuple[int, ...], ...]) -> dict[str, tuple[int, ...]]:
        """Output shapes of one run on zeros, with ONNX Runtime allocating the outputs on the device."""
        engine = self.engine
        binding = engine.session.io_binding()  # not the runner's: its kept binding stays valid
        zeros = [torch.zeros(shape, dtype=spec.dtype, device=engine.device)
                 for spec, shape in zip(engine.inputs, input_shapes)]
        for spec, tensor in zip(engine.inputs, zeros):
            self._bind(binding.bind_input, spec.name, tensor)
        for spec in engine.outputs:
            binding.bind_output(spec.name, engine.device.type, engine.device.index or 0)
        self._run(binding)
        return {spec.name: tuple(value.shape()) for spec, value in zip(engine.outputs, binding.get_outputs())}

    def infer(
        self,
        feeds: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """See `Runner.infer`; buffers in `outputs` for outputs not in `names` are left alone."""
        engine, binding = self.engine, self._binding
        outputs = outputs or {}
        known = [spec.name for spec in engine.outputs]
        names = list(names) if names is not None else known
        for name in [*names, *outputs]:
            if name not in known:
                raise ValueError(f"unknown output {name!r} (outputs: {', '.join(known)})")
        for spec in engine.inputs:
            self._check("input", spec, feeds.get(spec.name))
        shapes = self._output_shapes({spec.name: feeds[spec.name].shape for spec in engine.inputs})
        specs = {spec.name: spec for spec in engine.outputs}
        result = {}
        for name in names:
            if name in outputs:
                self._check("output", specs[name], outputs[name], shapes[name])
                result[name] = outputs[name]
            else:
                result[name] = torch.empty(shapes[name], dtype=specs[name].dtype, device=engine.device)
        ins = {spec.name: feeds[spec.name] for spec in engine.inputs}
        want_in = {name: (t.data_ptr(), tuple(t.shape)) for name, t in ins.items()}
        want_out = {name: (t.data_ptr(), tuple(t.shape)) for name, t in result.items()}
        old_in, old_out = self._bound
        if set(want_out) != set(old_out):  # other outputs asked for: start over
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            old_in, old_out = {}, {}
        # Rebind only what moved (in a sampling loop: the latent, the timestep, the rotated
        # buffers): binding a name again replaces it.
        for name, key in want_in.items():
            if old_in.get(name) != key:
                self._bind(binding.bind_input, name, ins[name])
        for name, key in want_out.items():
            if old_out.get(name) != key:
                self._bind(binding.bind_output, name, result[name])
        self._bound = (want_in, want_out)
        self._run(binding)
        return result

    def _run(self, binding: ort.IOBinding) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.current_stream(self.engine.device).synchronize()
        self.engine.session.run_with_iobinding(binding)

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        device = self.engine.device
        bind(name, device.type, device.index or 0, _ELEMENT_TYPE[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())

    def _check(self, kind: str, spec: TensorSpec, tensor, shape: tuple[int, ...] | None = None) -> None:
        """One ValueError naming the tensor, for anything the binding would misread."""
        device = self.engine.device
        if tensor is None:
            raise ValueError(f"missing {kind} {spec.name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{kind} {spec.name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"{kind} {spec.name!r} has dtype {_dtype_name(tensor.dtype)}, "
                             f"expected {_dtype_name(spec.dtype)}")
        if tensor.device != device:
            raise ValueError(f"{kind} {spec.name!r} is on {tensor.device}, expected {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{kind} {spec.name!r} is not contiguous (pass tensor.contiguous())")
        if shape is None:
            self._check_shape(kind, spec, tuple(tensor.shape))
        elif tuple(tensor.shape) != shape:
            raise ValueError(f"{kind} {spec.name!r} has shape {tuple(tensor.shape)}, expected {shape}")

    @staticmethod
    def _check_shape(kind: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        """Rank and fixed dims. A declared () is left to ONNX Runtime: it reports scalars and
        unknown shapes alike."""
        if not spec.shape:
            return
        if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, shape)):
            raise ValueError(f"{kind} {spec.name!r} has shape {shape}, expected {spec.shape}")

    def close(self) -> None:
        self._binding = None
