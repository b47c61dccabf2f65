"""`OmniCacheTransformer` in real diffusers pipelines on CPU: DiTPipeline (a tiny 1000-class DiT, a
tiny AutoencoderKL, DDIM) and PixArtAlphaPipeline given prompt embeddings (no text encoder or
tokenizer). Each model is exported with `export_transformer` (its calibration npz from the same
conditioning) and run through the main job, as a user would.

Equality with the runtime: the pipeline's loop through the drop-in and the runtime's own sampling
(`Generation`, `OmniCache.sample`) feed the same ONNX Runtime graphs the same rows and step the same
diffusers scheduler, so they agree to the bit on CPU; the asserted tolerance, 1e-6 abs on latents of
scale ~1, leaves room only for ORT picking another kernel for another row order (PixArt's pipeline
puts uncond rows first, the runtime cond rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")  # PixArtAlphaPipeline imports it even without a text encoder

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from omnicache_export import OmniCacheTransformer, export_transformer  # noqa: E402
from omnicache_export.errors import UserError  # noqa: E402
from omnicache_export.integrations.calib_npz import calib_path_for  # noqa: E402
from omnicache_export.integrations.dropin import MismatchedPipeline  # noqa: E402
from omnicache_export.pipeline.job import ExportOptions, export  # noqa: E402
from omnicache_export.runtime.generation import Generation  # noqa: E402
from omnicache_export.runtime.omnicache import OmniCache  # noqa: E402
from omnicache_export.runtime.sampler import Denoiser, to_torch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
STEPS = 8
TOL = 1e-6  # see the module docstring: bit-identical expected, 1e-6 for ORT's kernel choice per row order
NULL = 1000  # DiTPipeline's null class (it assumes ImageNet's 1000 classes)
DDIM = dict(DDIMScheduler(clip_sample=False).config)  # unclipped: a clamp would hide differences


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         scaling_factor=1.0)  # the latents reach vae.decode unscaled


def calibrate(model, sample, calib, folder, guidance):
    onnx_path = export_transformer(model, sample, folder / "model.onnx", calib=calib)
    (folder / "scheduler.json").write_text(json.dumps({"_class_name": "DDIMScheduler", **DDIM}))
    out = folder / "out"
    export(onnx_path, out, ExportOptions(scheduler=str(folder / "scheduler.json"), steps=STEPS, num_calib=4,
                                         calib=calib_path_for(onnx_path), guidance_scale=guidance, progress=False))
    return out


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    sample = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10.0, 500.0]),
              "class_labels": torch.tensor([1, 2])}
    calib = {"class_labels": np.array([1, 2, 3, 4]), "uncond/class_labels": np.full(4, NULL)}
    return model, calibrate(model, sample, calib, tmp_path_factory.mktemp("dit"), guidance=4.0)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                     caption_channels=32, use_additional_conditions=False).eval()
    prompts = np.random.default_rng(0).standard_normal((4, 8, 32), dtype=np.float32)
    sample = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.from_numpy(prompts[:2]),
              "timestep": torch.tensor([10.0, 500.0]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    calib = {"encoder_hidden_states": prompts, "uncond/encoder_hidden_states": np.zeros_like(prompts)}
    return model, calibrate(model, sample, calib, tmp_path_factory.mktemp("pixart"), guidance=4.5), prompts


def dit_pipeline(model, out):
    pipe = DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=DDIMScheduler.from_config(DDIM))
    drop = OmniCacheTransformer.from_export(out, pipeline=pipe)
    decoded = []
    decode = pipe.vae.decode  # observe the final latents on their way into the (real) VAE
    pipe.vae.decode = lambda z, *a, **k: (decoded.append(z.clone()), decode(z, *a, **k))[1]
    return pipe, drop, decoded


def count_cache_calls(drop, monkeypatch) -> list[int]:
    calls = [0]
    run_cached = drop.dispatch.run_cached

    def counted(*args, **kwargs):
        calls[0] += 1
        return run_cached(*args, **kwargs)

    monkeypatch.setattr(drop.dispatch, "run_cached", counted)
    return calls


def test_dit_pipeline_matches_the_runtime(dit, monkeypatch):
    model, out = dit
    pipe, drop, decoded = dit_pipeline(model, out)
    assert pipe.transformer is drop
    assert drop.config.sample_size == 8 and drop.config.in_channels == 4 and drop.config.out_channels == 8
    public = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert {k: drop.config[k] for k in public} == json.loads(json.dumps(public))
    assert drop.dtype == torch.float32 and drop.device == torch.device("cpu")
    calls = count_cache_calls(drop, monkeypatch)
    manifest = drop.runtime.manifest
    assert manifest.schedule.n_cached > 0

    rt = drop.runtime
    labels = np.array([1, 2])
    for seed in (0, 3):  # two generations: the state is reset between them
        calls[0] = 0
        pipe(class_labels=labels.tolist(), guidance_scale=4.0, num_inference_steps=STEPS,
             generator=torch.Generator().manual_seed(seed), output_type="np")
        pipeline_calls = calls[0]  # before the runtime's run below, which shares the dispatch
        x0 = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
        gen = Generation(rt.dispatch, rt.spec, rt.full_steps, to_torch({"class_labels": labels}),
                         to_torch({"class_labels": np.full(2, NULL)}), x0)
        try:
            ref = gen.run()
        finally:
            gen.close()
        diff = float((decoded[-1] - ref).abs().max())
        assert diff <= TOL, f"seed {seed}: max abs diff {diff:.3g}"
        assert pipeline_calls == manifest.schedule.n_cached == gen.cached_steps
        assert drop.last_steps == (manifest.schedule.n_full, manifest.schedule.n_cached)
    assert float((decoded[0] - decoded[1]).abs().max()) > 0.1  # the seeds really differ


def test_dit_pipeline_mismatch_is_one_clear_error(dit):
    model, out = dit
    pipe, drop, _ = dit_pipeline(model, out)
    with pytest.raises(MismatchedPipeline, match=f"pipeline samples 10 steps.*belongs to its steps, {STEPS} steps "
                                                 "of DDIMScheduler.*num_inference_steps=8"):
        pipe(class_labels=[1], guidance_scale=4.0, num_inference_steps=10, output_type="np")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(DDIM)
    with pytest.raises(MismatchedPipeline, match="samples with DPMSolverMultistepScheduler"):
        pipe(class_labels=[1], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")
    # without the pipeline known, the timesteps alone tell
    plain = DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=DDIMScheduler.from_config(DDIM))
    plain.transformer = OmniCacheTransformer.from_export(out)
    with pytest.raises(MismatchedPipeline, match="timestep 900 is not the export's step 0"):
        plain(class_labels=[1], guidance_scale=4.0, num_inference_steps=10, output_type="np")
    plain(class_labels=[1], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")  # then a good one runs


def test_pixart_pipeline_with_prompt_embeds_matches_the_runtime(pixart, monkeypatch):
    model, out, prompts = pixart
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=tiny_vae(),
                               scheduler=DDIMScheduler.from_config(DDIM))
    drop = OmniCacheTransformer.from_export(out, pipeline=pipe)
    calls = count_cache_calls(drop, monkeypatch)
    rt = OmniCache.load(out)
    cond, uncond = {"encoder_hidden_states": prompts[:2]}, {"encoder_hidden_states": np.zeros_like(prompts[:2])}
    ref = rt.sample(cond, uncond, seed=0)
    x0 = Denoiser(rt.spec).initial_latents([0, 1], 0)  # the runtime's noise of rows 0, 1 with seed 0
    mask = torch.ones(2, 8, dtype=torch.int64)  # unpadded prompts: a mask that masks nothing
    latents = pipe(prompt_embeds=torch.from_numpy(prompts[:2]), prompt_attention_mask=mask,
                   negative_prompt=None, negative_prompt_embeds=torch.zeros(2, 8, 32),
                   negative_prompt_attention_mask=mask, guidance_scale=4.5, num_inference_steps=STEPS, latents=x0,
                   output_type="latent", use_resolution_binning=False).images
    diff = float((latents - torch.from_numpy(ref)).abs().max())
    assert diff <= TOL, f"max abs diff {diff:.3g}"
    assert calls[0] == rt.manifest.schedule.n_cached > 0
    with pytest.raises(MismatchedPipeline, match=r"latents are \[4, 16, 16\].*belongs to its resolution"):
        pipe(prompt_embeds=torch.from_numpy(prompts[:1]), prompt_attention_mask=mask[:1], negative_prompt=None,
             negative_prompt_embeds=torch.zeros(1, 8, 32), negative_prompt_attention_mask=mask[:1], height=16,
             width=16, num_inference_steps=STEPS, output_type="latent", use_resolution_binning=False)
    rt.close()


def test_call_signature_and_return_types(pixart):
    model, out, prompts = pixart
    drop = OmniCacheTransformer.from_export(out)
    t0 = drop.timesteps[0]
    x = torch.randn(2, 4, 8, 8)
    kwargs = dict(encoder_hidden_states=torch.from_numpy(prompts[:2]), timestep=torch.tensor([t0, t0]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, cross_attention_kwargs=None)
    (first,) = drop(x, return_dict=False, **kwargs)  # step 0: the full graph, the model itself
    with torch.no_grad():
        ref = model(x, **kwargs, return_dict=False)[0]
    assert first.shape == ref.shape and float((first - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    again = drop(hidden_states=x, encoder_attention_mask=torch.ones(2, 8), **kwargs)  # first timestep: a new one
    assert isinstance(again, Transformer2DModelOutput) and torch.equal(again.sample, first)
    padded = torch.ones(2, 8)
    padded[:, -1] = 0
    with pytest.raises(UserError, match="no input 'encoder_attention_mask'"):
        drop(x, encoder_attention_mask=padded, **kwargs)
    with pytest.raises(UserError, match="no input 'class_labels'"):
        drop(x, class_labels=torch.tensor([1, 2]), **kwargs)
    with pytest.raises(UserError, match="attention options"):
        drop(x, **{**kwargs, "cross_attention_kwargs": {"scale": 0.5}})
    with pytest.raises(UserError, match="engines run on cpu"):
        drop.to("meta")
    assert drop.to("cpu") is drop and drop.to(torch.float16) is drop
    drop.close()
