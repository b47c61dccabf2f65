"""Registry of tiny random-weight DiT families (diffusers models plus the custom STDiT).

Every family gives a module whose forward takes its inputs positionally, in `input_names` order, and
returns the sample tensor alone. For diffusers models that module is a subclass of the diffusers class
(not a wrapper around it) so exported scopes and weight names are exactly diffusers' own
(`/transformer_blocks.0/attn1/to_q/MatMul`, `transformer_blocks.0.attn1.to_q.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (
    AllegroTransformer3DModel,
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    LatteTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from torch import nn

from .stdit import STDiT

OUTPUT_NAME = "out_sample"
EXPORTERS = ("torchscript", "dynamo")
BATCH = "batch"

# Shared tiny sizes: 2 heads x 16 = 32 hidden, 4-channel 8x8 latents, 8 text tokens of width 32.
HEADS, HEAD_DIM, TEXT_LEN, TEXT_DIM = 2, 16, 8, 32


@dataclass(frozen=True)
class Input:
    """How to make one example input. `shape` excludes the batch axis when `batched`."""

    shape: tuple[int, ...]
    kind: str = "randn"  # randn | timestep | labels | mask | fixed
    high: float = 1000.0  # timestep range / number of classes
    value: np.ndarray | None = None  # for kind="fixed"
    batched: bool = True

    def make(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        shape = ((batch,) if self.batched else ()) + self.shape
        if self.kind == "randn":
            return rng.standard_normal(shape, dtype=np.float32)
        if self.kind == "timestep":  # distinct per sample, so a batch mix-up shows in the output
            return rng.uniform(0, self.high, shape).astype(np.float32)
        if self.kind == "labels":
            return rng.integers(0, int(self.high), shape, dtype=np.int64)
        if self.kind == "mask":  # tokenizer-style int64 mask; last token padded to exercise masking
            mask = np.ones(shape, dtype=np.int64)
            mask[..., -1] = 0
            return mask
        if self.kind == "fixed":
            return np.broadcast_to(self.value, shape).astype(self.value.dtype).copy()
        raise ValueError(self.kind)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[int], nn.Module]  # seed -> eval-mode module, forward(*inputs) -> sample
    input_names: list[str]
    inputs: dict[str, Input]
    output_name: str = OUTPUT_NAME
    exporters: tuple[str, ...] = EXPORTERS
    notes: str = ""
    dynamic_batch: bool = True

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """TorchScript-style dynamic axes: axis 0 of every batched input and of the output."""
        if not self.dynamic_batch:
            return {}
        names = [n for n in self.input_names if self.inputs[n].batched] + [self.output_name]
        return {n: {0: BATCH} for n in names}

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {n: self.inputs[n].make(batch, rng) for n in self.input_names}


def positional(
    cls: type[nn.Module],
    input_names: list[str],
    extra: Callable[[nn.Module], dict[str, Any]] | None = None,
    **fixed: Any,
) -> type[nn.Module]:
    """Subclass a diffusers model so forward(*tensors) maps to its keyword API and returns the sample.

    `fixed` are constant keyword arguments; `extra(self)` computes keyword arguments from the module
    (e.g. rotary tables kept as buffers), for arguments that are not graph inputs.
    """

    class Positional(cls):
        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(input_names, args), **fixed, **(extra(self) if extra else {}))
            return super().forward(**kwargs, return_dict=False)[0]

    Positional.__name__ = Positional.__qualname__ = cls.__name__
    Positional.positional_inputs = tuple(input_names)  # export_transformer exports it as it is
    Positional.keyword_api = (cls, fixed, extra)  # the diffusers class and the keywords forward adds
    return Positional


def _builder(cls: type[nn.Module], config: dict[str, Any], setup: Callable[[nn.Module], None] | None = None):
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = cls(**config)
        if setup is not None:
            setup(model)
        return model.eval()

    return build


def _family(name, base, config, inputs: dict[str, Input], fixed=None, extra=None, setup=None, **kw) -> Family:
    names = list(inputs)
    cls = positional(base, names, extra, **(fixed or {}))
    return Family(name=name, build=_builder(cls, config, setup), input_names=names, inputs=inputs, **kw)


def _text(dim: int = TEXT_DIM) -> Input:
    return Input((TEXT_LEN, dim))


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


# --- families ---------------------------------------------------------------------------------
_T = Input((), kind="timestep")
_IMG = Input((4, 8, 8))  # [C, H, W]
_VID = Input((4, 4, 8, 8))  # [C, F, H, W]
_ATTN = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)

register(_family(
    "dit", DiTTransformer2DModel,
    dict(**_ATTN, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    {"hidden_states": _IMG, "timestep": _T, "class_labels": Input((), kind="labels", high=10)},
    notes="class-conditional, learned sigma: out has 2*C channels.",
))

register(_family(
    "pixart", PixArtTransformer2DModel,
    dict(**_ATTN, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
         caption_channels=TEXT_DIM, use_additional_conditions=False),
    {"hidden_states": _IMG, "encoder_hidden_states": _text(), "timestep": _T},
    notes="PixArt-alpha without resolution/aspect_ratio conditions; learned sigma. Its no-op "
          "proj_out(x).squeeze(1) is dropped at export (integrations/export_fixes.py).",
))

register(_family(
    "latte", LatteTransformer3DModel,
    dict(**_ATTN, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
         norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
         caption_channels=TEXT_DIM, video_length=4),
    {"hidden_states": _VID, "timestep": _T, "encoder_hidden_states": _text()},
    notes="video [B,C,F,H,W]; spatial and temporal blocks alternate; video_length must equal F.",
))

register(Family(
    name="stdit",
    build=_builder(STDiT, dict(in_channels=4, num_frames=4, sample_size=8, hidden_size=32, depth=2, num_heads=HEADS,
                                caption_channels=TEXT_DIM)),
    input_names=["hidden_states", "timestep", "encoder_hidden_states"],
    inputs={"hidden_states": _VID, "timestep": _T, "encoder_hidden_states": _text()},
    notes="custom OpenSora-style STDiT (zoo/stdit.py); learned sigma.",
))

register(_family(
    "sd3", SD3Transformer2DModel,
    dict(**_ATTN, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
         joint_attention_dim=TEXT_DIM, caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=32,
         pos_embed_max_size=16),
    {"hidden_states": _IMG, "encoder_hidden_states": _text(), "pooled_projections": Input((32,)), "timestep": _T},
    notes="MMDiT: joint attention over image and text streams.",
))


def _flux_img_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h, w, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


register(_family(
    "flux", FluxTransformer2DModel,
    dict(**_ATTN, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=TEXT_DIM,
         pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
    {
        "hidden_states": Input((16, 16)),  # packed latents: 4ch 8x8 -> 2x2 patches -> 16 tokens x 16
        "encoder_hidden_states": _text(),
        "pooled_projections": Input((32,)),
        "timestep": Input((), kind="timestep", high=1.0),  # Flux takes sigma in [0, 1]; x1000 inside
        # diffusers' current ids are unbatched [S, 3] (the batched 3-D form is deprecated).
        "img_ids": Input((16, 3), kind="fixed", value=_flux_img_ids(4, 4), batched=False),
        "txt_ids": Input((TEXT_LEN, 3), kind="fixed", value=np.zeros((TEXT_LEN, 3), np.float32), batched=False),
    },
    notes="double- then single-stream blocks on packed latents; img_ids/txt_ids have no batch axis.",
))

register(_family(
    "cogvideox", CogVideoXTransformer3DModel,
    # (latent_frames - 1) * 4 + 1 == sample_frames, else the patch embed recomputes its sincos table
    # at trace time and TorchScript bakes in a wrong one (silently).
    dict(**_ATTN, in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=TEXT_DIM, num_layers=2,
         sample_width=8, sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=TEXT_LEN),
    {"hidden_states": Input((3, 4, 8, 8)), "encoder_hidden_states": _text(), "timestep": _T},
    notes="video [B,F,C,H,W] (3 latent frames); text tokens are concatenated into the stream.",
))


# --- more diffusers DiTs ------------------------------------------------------------------------


def _hunyuan_rope(model: nn.Module) -> None:
    # The pipeline computes the 2-D rotary table outside the model; keep it as buffers so it is not an input.
    grid = model.config.sample_size // model.config.patch_size
    cos, sin = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (grid, grid)), (grid, grid), use_real=True)
    model.register_buffer("rope_cos", cos.float(), persistent=False)
    model.register_buffer("rope_sin", sin.float(), persistent=False)


register(_family(
    "hunyuandit", HunyuanDiT2DModel,
    dict(**_ATTN, in_channels=4, patch_size=2, sample_size=8, hidden_size=HEADS * HEAD_DIM, num_layers=4,
         cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=TEXT_DIM, pooled_projection_dim=32, text_len=TEXT_LEN,
         text_len_t5=TEXT_LEN, use_style_cond_and_image_meta_size=False),
    {
        "hidden_states": _IMG, "timestep": _T,
        "encoder_hidden_states": _text(), "text_embedding_mask": Input((TEXT_LEN,), kind="mask"),
        "encoder_hidden_states_t5": _text(), "text_embedding_mask_t5": Input((TEXT_LEN,), kind="mask"),
    },
    extra=lambda m: {"image_rotary_emb": (m.rope_cos, m.rope_sin)},
    setup=_hunyuan_rope,
    notes="HunyuanDiT 1.2 (no style/image_meta_size); long skips need an even num_layers; learned sigma; "
          "rotary table stored as buffers.",
))

register(_family(
    "wan", WanTransformer3DModel,
    dict(**_ATTN, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64,
         num_layers=2, rope_max_seq_len=32),
    {"hidden_states": _VID, "timestep": _T, "encoder_hidden_states": _text()},
    notes="Wan 2.1 T2V; RMSNorm q/k (TorchScript via the rms_norm symbolic).",
))

register(_family(
    "ltx", LTXVideoTransformer3DModel,
    dict(**_ATTN, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, cross_attention_dim=32,
         num_layers=2, caption_channels=TEXT_DIM),
    {"hidden_states": Input((2 * 4 * 4, 8)), "encoder_hidden_states": _text(), "timestep": _T},
    # No text mask: with one, prepare_attention_mask compares batch sizes and dynamo cannot keep batch dynamic.
    fixed=dict(num_frames=2, height=4, width=4, encoder_attention_mask=None),
    notes="LTX-Video on packed tokens [B, F*H*W, C] (2x4x4); RMSNorm q/k.",
))

register(_family(
    "allegro", AllegroTransformer3DModel,
    dict(**_ATTN, patch_size=2, patch_size_t=1, in_channels=4, out_channels=4, num_layers=2,
         cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=4, caption_channels=TEXT_DIM),
    {"hidden_states": _VID, "encoder_hidden_states": _text(), "timestep": _T},
    notes="Allegro without the (optional) 3-D rotary embedding.",
))

register(_family(
    "sana", SanaTransformer2DModel,
    dict(**_ATTN, in_channels=4, out_channels=4, num_layers=2, num_cross_attention_heads=HEADS,
         cross_attention_head_dim=HEAD_DIM, cross_attention_dim=32, caption_channels=TEXT_DIM, sample_size=8,
         patch_size=2),
    {"hidden_states": _IMG, "encoder_hidden_states": _text(), "timestep": _T},
    notes="Sana: linear (ReLU-kernel) self-attention and a conv Mix-FFN.",
))

register(_family(
    "mochi", MochiTransformer3DModel,
    dict(**_ATTN, patch_size=2, num_layers=2, pooled_projection_dim=32, in_channels=4, text_embed_dim=TEXT_DIM,
         time_embed_dim=32, max_sequence_length=TEXT_LEN),
    {"hidden_states": Input((4, 2, 8, 8)), "encoder_hidden_states": _text(), "timestep": _T,
     "encoder_attention_mask": Input((TEXT_LEN,), kind="mask")},
    # The attention processor loops over the batch in Python (per-sample text-mask gather with nonzero),
    # so both exporters unroll it: the graph only runs at the exported batch (2).
    dynamic_batch=False,
    notes="Mochi asymmetric joint attention; static batch 2 (per-sample Python loop in attention).",
))

# Tried and left out (diffusers 0.42.1, torch 2.13):
# * lumina2 (Lumina2Transformer2DModel): TorchScript fails on its complex RoPE ("ScalarType ComplexDouble is
#   an unexpected tensor scalar type"); dynamo fails on `len(set(seq_lengths))` over mask-derived sizes
#   ("unhashable type: non-nested SymInt"), even at a static batch. LuminaNextDiT2D shares the complex RoPE.
