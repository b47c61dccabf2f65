"""diffusers MagCache (`MagCacheConfig`): skip the blocks while the accumulated error of the
magnitude ratios of successive stack residuals stays below `threshold` (max 3 skips in a row, the
first 20 % of steps always computed: the library's defaults). The ratios are model-specific: they
are calibrated with the library's own `calibrate=True` mode on the calibration conditions, then the
threshold is tuned so the full-step count meets the target."""

from __future__ import annotations

import ast
import contextlib
import io
import re

from ._torch import PeerRun, explain_layout_error, TorchCase, enable_diffusers_cache, last_block, run_torch, tune

NAME = "diffusers MagCache"


def calibrate_ratios(case: TorchCase, calib: TorchCase) -> list[float]:
    from diffusers.hooks import MagCacheConfig

    n = case.spec.n_steps
    model, ctx = enable_diffusers_cache(case.model, MagCacheConfig(calibrate=True, num_inference_steps=n))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_torch(calib, model, context=ctx)
    found = re.findall(r"\[[^\[\]]*\]", buf.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    ratios = ast.literal_eval(found[-1])
    if len(ratios) != n:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {n} steps")
    return [float(r) for r in ratios]


def run(case: TorchCase, calib: TorchCase) -> PeerRun:
    from diffusers.hooks import MagCacheConfig

    with explain_layout_error(case.model):
        ratios = calibrate_ratios(case, calib)

    def attempt(threshold: float) -> PeerRun:
        cfg = MagCacheConfig(threshold=threshold, num_inference_steps=case.spec.n_steps, mag_ratios=ratios)
        model, ctx = enable_diffusers_cache(case.model, cfg)
        final, n_full, wall = run_torch(case, model, last_block(model).ff, context=ctx)
        return PeerRun(final, n_full, wall, f"threshold={threshold:.4g}")

    with explain_layout_error(case.model):
        r = tune(attempt, case.target_full, 1e-4, 100.0)
    if r.n_full > case.target_full:
        r.note = "cannot reach the target: the library never skips in the first 20 % of steps or more than 3 in a row"
    return r
