"""diffusers TaylorSeer (`TaylorSeerCacheConfig`): full computation every `cache_interval` steps
after `disable_cache_before_step` warm-up steps; in between, outputs are predicted by a Taylor
expansion (order `max_order`) of the cached features. Two library modes:
- default: every attention module is hooked (the feed-forwards still run every step); the default
  patterns match no module of BasicTransformerBlock models (attn1/attn2), so they are given explicitly;
- lite (`use_lite_mode=True`): the blocks return zeros and the library predicts `proj_out`; models
  without a `proj_out` module (DiT: `proj_out_1`/`proj_out_2`) get the same split through
  `skip_predict_identifiers` (the blocks) and `cache_identifiers` (the stack's last block), i.e. the
  block stack output is predicted.
There is no threshold: (interval, warm-up, cool-down) are searched for the full-step count closest
to the target, fewest warm-up steps first."""

from __future__ import annotations

import torch

from ._torch import PeerRun, TorchCase, block_lists, enable_diffusers_cache, last_block, run_torch

NAME = "diffusers TaylorSeer"


def _full_steps(n: int, interval: int, before: int, after: int | None) -> int:
    return sum(1 for i in range(n) if i < before or (i - before - 1) % interval == 0 or (after is not None and i >= after))


def pick(n: int, target: int) -> tuple[int, int, int | None]:
    best = None
    for before in (1, 2, 3):
        for interval in range(1, n + 1):
            for after in [None, *range(n - 1, before, -1)]:
                k = _full_steps(n, interval, before, after)
                key = (abs(k - target), -k, after is not None, abs(before - 3))
                if best is None or key < best[0]:
                    best = (key, (interval, before, after))
    return best[1]


def run(case: TorchCase, lite: bool = False, order: int = 1) -> PeerRun:
    from diffusers.hooks import TaylorSeerCacheConfig

    interval, before, after = pick(case.spec.n_steps, case.target_full)
    kw = dict(cache_interval=interval, disable_cache_before_step=before, disable_cache_after_step=after,
              max_order=order, taylor_factors_dtype=torch.float32)
    note = "attention only: feed-forwards run every step"
    if not lite:
        import re

        from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

        names = [n for n, _ in case.model.named_modules()]
        if not any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS for n in names):
            # The library's default patterns end in "attn"; diffusers' BasicTransformerBlock names them attn1/attn2.
            kw["cache_identifiers"] = [r"(temporal_)?transformer_blocks\.\d+\.attn\d+"]
            note += "; the library's default patterns (`...blocks.*attn`) match no module here (attn1/attn2): given explicitly"
    if lite:
        if hasattr(case.model, "proj_out") and isinstance(case.model.proj_out, torch.nn.Module):
            kw["use_lite_mode"] = True
            note = "lite mode: blocks skipped, proj_out predicted"
        else:
            lists = block_lists(case.model)
            last_name = f"{lists[-1][0]}.{len(lists[-1][1]) - 1}"
            skip = [f"{name}\\.{i}" for name, blocks in lists for i in range(len(blocks)) if f"{name}.{i}" != last_name]
            kw.update(skip_predict_identifiers=skip, cache_identifiers=[last_name.replace(".", "\\.")])
            note = "lite split by identifiers (no proj_out module): blocks skipped, last block's output predicted"
    cfg = TaylorSeerCacheConfig(**kw)
    model, ctx = enable_diffusers_cache(case.model, cfg)
    count = last_block(model).ff if lite else last_block(model).attn1.to_q
    final, n_full, wall = run_torch(case, model, count, context=ctx)
    return PeerRun(final, n_full, wall, f"interval={interval}, before={before}, after={after}, order={order}", note)
