"""The model `omnicache` on a PyTriton server: the request contract as Triton tensors, and the
inference callables that hand each request to the step batcher and wait for its latent.

Triton checks names, dtypes and shapes against the declared tensors before a request reaches us
(its own one-line errors); `RequestContract.parse` checks the rest (NaN, class labels outside the
embedding table) and the callable's exception becomes that request's error. Each of the model's
instances waits on its own requests while the batcher's one thread steps them all, so concurrent
requests share engine calls whatever instance they came through.
"""

from __future__ import annotations

import os
import sysconfig

MODEL_NAME = "omnicache"


def stub_library_path(environ=os.environ) -> str:
    """LD_LIBRARY_PATH for Triton's Python-backend stub: this interpreter's libpython directory
    first. The stub links libpython3.x from the loader path; under a venv or pyenv Python it would
    otherwise load the system's older libpython and fail with `'_thread.RLock' object has no
    attribute '_recursion_count'`. PyTriton copies os.environ when it starts tritonserver, so this
    is set in-process before `Triton()` starts."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    return ":".join([libdir, *current]) if libdir else ":".join(current)


def bind(triton, batcher, instances: int) -> None:
    """Bind `omnicache` to `triton` (a pytriton.triton.Triton), served by `batcher`'s started thread."""
    from pytriton.model_config import ModelConfig, Tensor

    from omnicache_export.serving.requests import RequestError

    contract = batcher.contract

    def infer(requests):
        futures = []
        for request in requests:  # Triton sends them one by one (batching off): one future each
            try:
                futures.append(batcher.submit(dict(request.data)))
            except RequestError as exc:
                futures.append(exc)
        responses = []
        for future in futures:
            if isinstance(future, Exception):
                raise future
            responses.append(future.result())
        return responses

    triton.bind(
        model_name=MODEL_NAME,
        infer_func=[infer] * instances,
        inputs=[Tensor(name=s.name, dtype=s.dtype.type, shape=s.shape, optional=s.optional) for s in contract.inputs],
        outputs=[Tensor(name=contract.output.name, dtype=contract.output.dtype.type, shape=contract.output.shape)],
        config=ModelConfig(batching=False),
        strict=True,
    )
