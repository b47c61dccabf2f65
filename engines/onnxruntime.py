"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when installed.

Inputs and outputs go through IO binding, so on a GPU provider the outputs are allocated on the
device once per call and only copied back on request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from omnicache_export.engines.base import Engine, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_devices() -> list[str]:
    have = set(ort.get_available_providers())
    return [d for d, providers in _PROVIDERS.items() if providers[0] in have]


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None, spinning: bool | None = None
    ):
        """`spinning=False` stops the intra-op threads spin-waiting after a run: where two sessions
        alternate (full and cache steps), a spinning idle session steals the cores from the other
        one (measured: +14 % on the full step after each cached step, `tools/bench_speed.py`)."""
        if device not in _PROVIDERS:
            raise ValueError(f"unknown device {device!r} (choose from {', '.join(_PROVIDERS)})")
        if _PROVIDERS[device][0] not in ort.get_available_providers():
            raise ValueError(f"ONNX Runtime here has no {_PROVIDERS[device][0]} (available: {ort.get_available_providers()})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.device = device
        self.session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=_PROVIDERS[device])
        self._inputs = [self._spec(a) for a in self.session.get_inputs()]
        self._outputs = [self._spec(a) for a in self.session.get_outputs()]
        self._ort_device = "cuda" if device in ("cuda", "tensorrt") else "cpu"

    @staticmethod
    def _spec(arg) -> TensorSpec:
        return TensorSpec(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), tuple(arg.shape))

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for spec in self._inputs:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name]))
        names = list(output_names) if output_names is not None else [o.name for o in self._outputs]
        for name in names:
            binding.bind_output(name, self._ort_device)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None
