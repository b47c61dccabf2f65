"""The Python-backend models of the Triton repository `omnicache-export triton-repo` writes.

Each model's `model.py` in the repository is two lines that import a class from here, so the
Triton Python environment needs omnicache-export installed (with torch, numpy and diffusers; ONNX
Runtime too for `--engines python-onnxruntime`) for the Python version of Triton's stub. The files a
model reads are in its version folder and checked at `initialize` against hashes in its
`config.pbtxt` parameters (and the manifest's, for what the manifest lists).

- `OmniCacheModel`, the model `omnicache`: the denoising loop. `execute` checks each request
  against the export's request contract (`serving.requests`), submits it to the step batcher
  (`serving.batcher`, over a `StepDispatch` of two `BlsEngine`s) and returns at once; the batcher's
  thread steps every request in flight, calling the engine models through BLS, and each request's
  response goes back through its own response sender when its latent is ready (Triton >= 24.06
  allows this in the default, non-decoupled mode, so a plain `infer` call gets it). Requests that
  arrive while others are mid-loop join them at the next tick. Each request's state (scheduler,
  latents, caches) lives with it in the batcher, on the model instance's device.
- `OnnxRuntimeGraphModel`, the engine models of `--engines python-onnxruntime`: one graph on ONNX
  Runtime (engines/onnxruntime.py), for a Triton that has only the Python backend (PyTriton's
  bundled `tritonserver`). Inputs and outputs cross through DLPack.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

EXPORT_DIR = "export"  # in the version folder of `omnicache`: the manifest and what it lists that the loop reads
GRAPH_FILE = "graph_file"  # config parameter names
SHA256 = "sha256"  # parameter prefix: "sha256:<file>" -> hex digest
MANIFEST_SHA256 = "manifest_sha256"
FULL_MODEL, CACHE_MODEL, MAX_BATCH = "full_model", "cache_model", "max_batch"


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def check_files(folder: Path, parameters: dict[str, str]) -> None:
    """Every `sha256:<file>` parameter against the file in `folder` (UserError naming it)."""
    from omnicache_export.errors import UserError
    from omnicache_export.hashing import sha256_file

    for key, digest in parameters.items():
        if not key.startswith(SHA256 + ":"):
            continue
        name = key.partition(":")[2]
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: missing (the repository was written with it)")
        if sha256_file(path) != digest:
            raise UserError(f"{path}: changed since the repository was written (sha256 mismatch)")


def _device(args: dict):
    import torch

    if args.get("model_instance_kind") == "GPU":
        return torch.device("cuda", int(args.get("model_instance_device_id") or 0))
    return torch.device("cpu")


class OmniCacheModel:
    """The model `omnicache`: requests of one row in, `latent` out, stepped together."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from omnicache_export.runtime.dispatch import StepDispatch
        from omnicache_export.runtime.manifest import load_uncond, read_manifest
        from omnicache_export.serving.batcher import StepBatcher
        from omnicache_export.serving.bls_engine import BlsEngine
        from omnicache_export.serving.requests import RequestContract

        self.pb = pb_utils
        params = _parameters(args)
        folder = _version_dir(args) / EXPORT_DIR
        check_files(folder, params)  # the manifest itself, by the hash the repository recorded
        manifest = read_manifest(folder, check_files=False)  # the graphs are the engine models' files
        uncond = load_uncond(manifest)  # checked against the manifest's hash
        device = _device(args)
        full, cache = manifest.graphs["full"], manifest.graphs["cache"]
        dispatch = StepDispatch(BlsEngine(pb_utils, params[FULL_MODEL], full, device),
                                BlsEngine(pb_utils, params[CACHE_MODEL], cache, device), full, cache)
        self.contract = RequestContract(manifest, uncond)
        self.batcher = StepBatcher(dispatch, manifest.sampling_spec(), manifest.schedule.full, self.contract,
                                   max_batch=int(params[MAX_BATCH]))
        self.batcher.start()

    def execute(self, requests):
        from omnicache_export.serving.requests import RequestError

        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            arrays = {}
            for spec in self.contract.inputs:  # Triton refused unknown, missing and mistyped inputs already
                tensor = pb.get_input_tensor_by_name(request, spec.name)
                if tensor is not None:  # a copy: the request's memory is released when execute returns
                    arrays[spec.name] = np.array(tensor.as_numpy(), copy=True)
            try:
                future = self.batcher.submit(arrays)
            except RequestError as exc:
                self._send(sender, error=exc)
                continue
            future.add_done_callback(functools.partial(self._respond, sender))
        return None  # each response goes through its sender

    def _respond(self, sender, future) -> None:
        from omnicache_export.serving.requests import LATENT, RequestError

        try:
            latent = future.result()[LATENT]
        except RequestError as exc:
            self._send(sender, error=exc)
        except Exception as exc:  # noqa: BLE001 - a failed request, not a failed server
            self._send(sender, error=exc, internal=True)
        else:
            self._send(sender, self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(LATENT, latent)]))

    def _send(self, sender, response=None, error: Exception | None = None, internal: bool = False) -> None:
        pb = self.pb
        if error is not None:
            code = pb.TritonError.INTERNAL if internal else pb.TritonError.INVALID_ARG
            response = pb.InferenceResponse(error=pb.TritonError(str(error).splitlines()[0], code))
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.batcher.stop()  # requests still in flight get "the server is shutting down"


class OnnxRuntimeGraphModel:
    """One exported graph on ONNX Runtime inside Triton's Python stub."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from omnicache_export.engines import load_engine

        self.pb = pb_utils
        params = _parameters(args)
        folder = _version_dir(args)
        check_files(folder, params)
        self.engine = load_engine("onnxruntime", folder / params[GRAPH_FILE], "cpu")
        self.runner = self.engine.runner()  # one IO binding: execute runs on one thread per instance
        self.names = [s.name for s in self.engine.outputs]

    def execute(self, requests):
        import torch.utils.dlpack as dlpack

        pb = self.pb
        responses = []
        for request in requests:
            try:
                feeds = {s.name: dlpack.from_dlpack(pb.get_input_tensor_by_name(request, s.name).to_dlpack())
                         for s in self.engine.inputs}
                names = list(request.requested_output_names()) or self.names
                out = self.runner.infer(feeds, names=names)
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor.from_dlpack(n, dlpack.to_dlpack(out[n])) for n in names]))
            except Exception as exc:  # noqa: BLE001 - this request fails, the model keeps serving
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(exc).splitlines()[0])))
        return responses

    def finalize(self) -> None:
        self.runner.close()
        self.engine.close()


# What each repository model's model.py imports as TritonPythonModel.
TritonPythonModel = OmniCacheModel
