"""An engine (engines/base.py) that runs a graph as another model of the same Triton server, through
Business Logic Scripting: the Triton model `omnicache` steps its requests with the runtime's one
dispatch over two of these, one per engine model (`omnicache_full`, `omnicache_cache`).

Each `infer` is one `pb_utils.InferenceRequest(model_name, requested_output_names, inputs)`; the feeds
go in and the outputs come back through DLPack (`pb_utils.Tensor.from_dlpack` / `to_dlpack`), so a
torch tensor on the GPU reaches a `tensorrt_plan` engine model without a host copy and its outputs
come back as torch tensors viewing the response's memory. An output the engine model placed on
another device than this engine's (an ONNX Runtime model Triton put on the GPU while `omnicache`
runs on the CPU) is moved once, here.

`pb_utils` (the `triton_python_backend_utils` module, which exists only inside Triton's Python
stub) is passed in, so this module imports outside Triton too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.utils.dlpack

from omnicache_export.engines.base import Engine, Runner, TensorSpec
from omnicache_export.runtime.dispatch import torch_dtype
from omnicache_export.runtime.graph_io import GraphIO


class BlsError(RuntimeError):
    """The engine model answered a BLS request with an error."""


class BlsEngine(Engine):
    """A graph served by the Triton model `model_name`; its IO as the manifest's GraphIO states it."""

    backend = "triton-bls"

    def __init__(self, pb_utils, model_name: str, io: GraphIO, device: torch.device):
        self.pb, self.model_name, self.device = pb_utils, model_name, torch.device(device)
        self._inputs = [TensorSpec(t.name, torch_dtype(t.dtype), tuple(t.shape)) for t in io.inputs]
        self._outputs = [TensorSpec(t.name, torch_dtype(t.dtype), tuple(t.shape)) for t in io.outputs]
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # output shapes per input shapes

    def runner(self) -> BlsRunner:
        return BlsRunner(self)


class BlsRunner(Runner):
    """Stateless (Triton keeps the engine model's contexts): any number may run at once."""

    engine: BlsEngine

    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """The shapes of one probe request on zeros of these shapes, kept per input shapes."""
        engine = self.engine
        key = tuple(tuple(input_shapes[s.name]) for s in engine.inputs)
        if key not in engine._shapes:
            zeros = {s.name: torch.zeros(shape, dtype=s.dtype, device=engine.device)
                     for s, shape in zip(engine.inputs, key)}
            engine._shapes[key] = {k: tuple(v.shape) for k, v in self.infer(zeros).items()}
        return engine._shapes[key]

    def infer(
        self,
        feeds: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        engine, pb = self.engine, self.engine.pb
        outputs = outputs or {}
        known = [s.name for s in engine.outputs]
        names = list(names) if names is not None else known
        for name in [*names, *outputs]:
            if name not in known:
                raise ValueError(f"unknown output {name!r} of {engine.model_name} (outputs: {', '.join(known)})")
        tensors = []
        for spec in engine.inputs:
            if spec.name not in feeds:
                raise ValueError(f"missing input {spec.name!r} of {engine.model_name}")
            tensors.append(pb.Tensor.from_dlpack(spec.name, torch.utils.dlpack.to_dlpack(feeds[spec.name])))
        request = pb.InferenceRequest(model_name=engine.model_name, requested_output_names=names, inputs=tensors)
        response = request.exec()
        if response.has_error():
            raise BlsError(f"engine model {engine.model_name!r}: {response.error().message()}")
        result = {}
        for name in names:
            value = torch.utils.dlpack.from_dlpack(pb.get_output_tensor_by_name(response, name).to_dlpack())
            if value.device != engine.device:
                value = value.to(engine.device)
            if name in outputs:
                outputs[name].copy_(value)
                value = outputs[name]
            result[name] = value
        return result
