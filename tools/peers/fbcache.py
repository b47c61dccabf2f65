"""diffusers First Block Cache (`FirstBlockCacheConfig`, ParaAttention's FBCache): skip the remaining
blocks while the first block's residual changed by less than `threshold` (relative absmean); the
threshold is tuned so the full-step count meets the target."""

from __future__ import annotations

from ._torch import PeerRun, explain_layout_error, TorchCase, enable_diffusers_cache, last_block, run_torch, tune

NAME = "diffusers FirstBlockCache"


def run(case: TorchCase) -> PeerRun:
    from diffusers.hooks import FirstBlockCacheConfig

    def attempt(threshold: float) -> PeerRun:
        model, ctx = enable_diffusers_cache(case.model, FirstBlockCacheConfig(threshold=threshold))
        final, n_full, wall = run_torch(case, model, last_block(model).ff, context=ctx)
        return PeerRun(final, n_full, wall, f"threshold={threshold:.4g}")

    with explain_layout_error(case.model):
        return tune(attempt, case.target_full, 1e-4, 10.0)
