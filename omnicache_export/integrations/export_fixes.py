"""The fixes a diffusers DiT needs to export to ONNX with either torch exporter, active only while exporting.

- Equivalent rewrites of a few Tensor methods (`export_friendly_tensor_ops`), so diffusers code traces
  cleanly: each returns exactly what the original returns; it only changes which ops the exporters see.
  Batch (axis 0) is the only dynamic axis, so other sizes are plain ints at trace time.
- A TorchScript symbolic for aten::rms_norm (`rms_norm_symbolic`).
- CogVideoX's positional table for the sample's own frame count (`sample_sized_patch_embeds`).
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


@contextlib.contextmanager
def rms_norm_symbolic(opset: int):
    """TorchScript has no symbolic for aten::rms_norm (torch.nn.RMSNorm in Flux, Wan, LTX...).

    Decompose it as x / sqrt(mean(x^2) + eps) * weight, with ops valid at `opset`.
    """
    from torch.onnx import symbolic_helper as sh

    def rms_norm(g, x, normalized_shape, weight, eps):
        ndim = len(sh._get_const(normalized_shape, "is", "normalized_shape"))
        axes = list(range(-ndim, 0))
        eps = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        sq = g.op("Mul", x, x)
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            mean = g.op("ReduceMean", sq, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", sq, axes_i=axes, keepdims_i=1)
        rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        out = g.op("Div", x, rms)
        return out if sh._is_none(weight) else g.op("Mul", out, weight)

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)


@contextlib.contextmanager
def sample_sized_patch_embeds(model: torch.nn.Module, latent: torch.Tensor):
    """CogVideoX's patch embed keeps a sincos table for `sample_frames` (pixel frames) x height x width and
    recomputes it inside forward when the sample differs; traced, that recompute is baked in wrong (the
    output silently differs). Give it the sample's own table up front, computed eagerly, for the export.
    `latent`: [B, F, C, H, W] latent frames."""
    saved = []
    for module in model.modules():
        if not (hasattr(module, "_get_positional_embeddings") and hasattr(module, "sample_frames")
                and getattr(module, "use_positional_embeddings", False) and latent.dim() == 5):
            continue
        frames = (latent.shape[1] - 1) * module.temporal_compression_ratio + 1
        height, width = latent.shape[-2:]
        if (module.sample_frames, module.sample_height, module.sample_width) == (frames, height, width):
            continue
        saved.append((module, module.sample_frames, module.sample_height, module.sample_width, module.pos_embedding))
        table = module._get_positional_embeddings(height, width, frames, device=latent.device)
        module.sample_frames, module.sample_height, module.sample_width = frames, height, width
        module.pos_embedding = table.to(module.pos_embedding.dtype)
    try:
        yield
    finally:
        for module, frames, height, width, table in saved:
            module.sample_frames, module.sample_height, module.sample_width = frames, height, width
            module.pos_embedding = table
