"""Equivalent rewrites of a few Tensor methods, active only while exporting, so diffusers code traces cleanly.

Each rewrite returns exactly what the original returns for the shapes the zoo uses; it only changes which
ops the exporters see. Batch (axis 0) is the only dynamic axis, so other sizes are plain ints at trace time.
"""

from __future__ import annotations

import contextlib

import torch

_ORIGINAL = {name: getattr(torch.Tensor, name) for name in ("unflatten", "squeeze", "flatten", "repeat_interleave")}


def _unflatten(x: torch.Tensor, dim: int, sizes) -> torch.Tensor:
    # TorchScript's unflatten symbolic lets shape inference pin the batch of cat([unflatten(a), unflatten(b)])
    # to the traced value; diffusers' apply_rotary_emb then reshapes to `*x.shape[:-1]` and the graph only
    # runs at the traced batch (Flux, Wan, Allegro). A reshape of traced sizes keeps batch symbolic.
    dim = dim % x.dim()
    return x.reshape(*x.shape[:dim], *sizes, *x.shape[dim + 1 :])


def _squeeze(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # `x.squeeze(1)` on a non-1 dim is a no-op in torch, but both exporters emit a real Squeeze (TorchScript
    # inside an If) that ORT rejects ("Dimension of input 1 must be 1"): PixArt, Allegro. Drop it there.
    dim = args[0] if args else kwargs.get("dim")
    if isinstance(dim, int) and dim % max(x.dim(), 1) != 0 and x.shape[dim] != 1:
        return x
    return _ORIGINAL["squeeze"](x, *args, **kwargs)


def _flatten(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # TorchScript exports flatten() of a dynamic 1-D tensor as a 2-D Flatten (LTX's timestep.flatten()).
    if x.dim() == 1:
        return x
    return _ORIGINAL["flatten"](x, *args, **kwargs)


def _repeat_interleave(x: torch.Tensor, repeats, dim: int | None = None, **kwargs) -> torch.Tensor:
    # torch.export turns an int repeat_interleave into an unbacked size that loses its link to the batch
    # symbol (LTX rotary tables); expand + flatten keeps sizes derived from the input.
    if isinstance(repeats, int) and dim is not None and not kwargs:
        dim = dim % x.dim()
        shape = list(x.shape)
        return x.unsqueeze(dim + 1).expand(*shape[: dim + 1], repeats, *shape[dim + 1 :]).reshape(
            *shape[:dim], shape[dim] * repeats, *shape[dim + 1 :]
        )
    return _ORIGINAL["repeat_interleave"](x, repeats, dim, **kwargs)


_REWRITES = {"unflatten": _unflatten, "squeeze": _squeeze, "flatten": _flatten, "repeat_interleave": _repeat_interleave}


@contextlib.contextmanager
def export_friendly_tensor_ops():
    """Install the rewrites on torch.Tensor for the duration of an export (not thread-safe)."""
    for name, fn in _REWRITES.items():
        setattr(torch.Tensor, name, fn)
    try:
        yield
    finally:
        for name, fn in _ORIGINAL.items():
            setattr(torch.Tensor, name, fn)
