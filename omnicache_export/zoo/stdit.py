"""A tiny STDiT (OpenSora v1) video DiT: spatial and temporal blocks alternate, adaLN-single modulation.

diffusers has no STDiT, so it is written here with plain torch ops (no rms_norm) so that both torch
ONNX exporters take it. Layout follows OpenSora: latent [B, C, F, H, W] -> tokens [B, F*S, D]; spatial
blocks attend within a frame, temporal blocks across frames at one spatial position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a [B] timestep (float or int), as in DiT/OpenSora (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, gy), sincos_1d(dim // 2, gx)], dim=1)  # [h*w, dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention; kv from `context` when given (cross-attention)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class STDiTBlock(nn.Module):
    """One spatial or temporal block on tokens [B, F*S, D]; `temporal` picks the attention axis."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # adaLN-single: the shared t_block output is offset per block by this learned table.
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t6: torch.Tensor, frames: int) -> torch.Tensor:
        b, n, d = x.shape
        s = n // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(b, 6, d)
        ).chunk(6, dim=1)

        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # attend over frames at each spatial position
            h = h.reshape(b, frames, s, d).transpose(1, 2).reshape(b * s, frames, d)
            h = self.attn(h).reshape(b, s, frames, d).transpose(1, 2).reshape(b, n, d)
        else:  # attend over positions within each frame
            h = self.attn(h.reshape(b * frames, s, d)).reshape(b, n, d)
        x = x + gate_msa * h

        x = x + self.cross_attn(x, y)  # OpenSora: cross-attention is not modulated
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class STDiT(nn.Module):
    """forward(hidden_states [B,C,F,H,W], timestep [B], encoder_hidden_states [B,L,caption_channels])."""

    def __init__(
        self,
        in_channels: int = 4,
        num_frames: int = 4,
        sample_size: int = 8,
        patch_size: int = 2,
        hidden_size: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        caption_channels: int = 32,
        freq_dim: int = 64,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.freq_dim = freq_dim
        d = hidden_size
        grid = sample_size // patch_size

        self.x_embedder = nn.Conv3d(in_channels, d, kernel_size=(1, patch_size, patch_size), stride=(1, patch_size, patch_size))
        self.register_buffer("pos_embed", sincos_2d(d, grid, grid)[None], persistent=False)  # [1, S, D]
        self.register_buffer("pos_embed_temporal", sincos_1d(d, torch.arange(num_frames))[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # one modulation vector for all blocks
        self.y_embedder = nn.Sequential(nn.Linear(caption_channels, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))

        self.spatial_blocks = nn.ModuleList(STDiTBlock(d, num_heads, mlp_ratio, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiTBlock(d, num_heads, mlp_ratio, temporal=True) for _ in range(depth))

        self.norm_out = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, patch_size * patch_size * self.out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, _, frames, height, width = hidden_states.shape
        p, d = self.patch_size, self.hidden_size
        gh, gw = height // p, width // p

        x = self.x_embedder(hidden_states)  # [B, D, F, gh, gw]
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, F, S, D]
        x = (x + self.pos_embed[:, None]).reshape(b, frames * gh * gw, d)

        t = self.t_embedder(timestep_embedding(timestep, self.freq_dim))  # [B, D]
        t6 = self.t_block(t)  # [B, 6D]
        y = self.y_embedder(encoder_hidden_states)

        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            x = spatial(x, y, t6, frames)
            if i == 0:  # temporal position is added once, before the first temporal block (OpenSora)
                x = (x.reshape(b, frames, gh * gw, d) + self.pos_embed_temporal[:, :frames, None]).reshape(b, -1, d)
            x = temporal(x, y, t6, frames)

        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # [B, F*S, p*p*C_out]

        # unpatchify -> [B, C_out, F, H, W]
        x = x.reshape(b, frames, gh, gw, p, p, self.out_channels)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(b, self.out_channels, frames, gh * p, gw * p)
