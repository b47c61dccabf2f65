"""diffusers Pyramid Attention Broadcast (`PyramidAttentionBroadcastConfig`): self-attention outputs
reused for `spatial_attention_block_skip_range − 1` steps inside a timestep window (temporal attention
likewise for Latte); everything else, feed-forwards included, runs every step (attention-only). The skip range is searched, with the
timestep window covering every step, for the attention-step count closest to the target."""

from __future__ import annotations

from ._torch import Loop, PeerRun, TorchCase, enable_diffusers_cache, last_block, run_torch

NAME = "diffusers PAB"


def run(case: TorchCase) -> PeerRun:
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    best = None
    for k in range(1, case.spec.n_steps + 1):
        loop = Loop()
        temporal = hasattr(case.model, "temporal_transformer_blocks")
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=k,
            temporal_attention_block_skip_range=k if temporal else None,
            spatial_attention_timestep_skip_range=(-1, 1e9),
            temporal_attention_timestep_skip_range=(-1, 1e9),
            current_timestep_callback=lambda: loop.t,
        )
        model, ctx = enable_diffusers_cache(case.model, cfg)
        final, n_full, wall = run_torch(case, model, last_block(model).attn1.to_q, loop=loop, context=ctx)
        r = PeerRun(final, n_full, wall, f"skip_range={k}", "attention only: feed-forwards run every step")
        if best is None or abs(r.n_full - case.target_full) < abs(best.n_full - case.target_full):
            best = r
        if r.n_full <= case.target_full:
            break
    return best
