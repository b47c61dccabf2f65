"""Calibration's choices on a denoiser whose cache error is known exactly.

The test denoiser's output is smooth in t and independent of x, and its cache step returns the
output of the last full step: the γ = 1 linear extrapolation then removes most of the cache error,
so calibration must pick a correction, refine it (fitted γ, filters) and keep the best score.
"""

from __future__ import annotations

import numpy as np

from omnicache_export.calibration.calibrate import CalibrationPlan, calibrate, extrapolation_ratios, psnr
from omnicache_export.runtime.sampler import SamplingSpec, scheduler_config

H = W = 8


def smooth_denoiser():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 4, H, W)).astype(np.float32)

    def out(feeds):
        t = feeds["t"].astype(np.float32)[:, None, None, None] / 1000.0
        n = feeds["x"].shape[0]
        return np.broadcast_to(a + b * t + 0.05 * t**2, (n, 4, H, W)).astype(np.float32)

    def full_fn(feeds):
        o = out(feeds)
        return o, {"omnicache_cache": o}

    def cache_fn(feeds, caches):
        return caches["omnicache_cache"]

    return full_fn, cache_fn


def test_calibration_picks_and_refines_correction():
    spec = SamplingSpec(scheduler_config("ddim"), 12, "x", "t", "o", [4, H, W], timestep_dtype="float32")
    full_fn, cache_fn = smooth_denoiser()
    plan = CalibrationPlan(n_cached=6)
    result = calibrate(spec, full_fn, cache_fn, {}, {}, 2, 0, plan, (H, W), progress=False)
    names = [c.correction.name for c in result.candidates]
    assert "none" in names and "gamma=1" in names and "cache trend, mix 0.5" in names
    dp = [c.schedule.name for c in result.candidates if c.schedule.name.startswith("corrected-error-dp")]
    assert any(n.endswith("[gamma=1]") for n in dp) and any(n.endswith("[cache trend, mix 0.5]") for n in dp)
    # the best predictor at γ = 1 is refined on its schedule: γ line search and filters
    assert any("gamma=1.1" in n for n in names) and any("+ filter" in n for n in names)
    best = result.best
    assert best.psnr_db == max(c.psnr_db for c in result.candidates)
    none = max((c for c in result.candidates if c.correction.name == "none"), key=lambda c: c.psnr_db)
    assert best.correction.name != "none" and best.psnr_db > none.psnr_db + 10
    # the locally fitted gammas are close to 1 where the trend is linear
    local = next((c for c in result.candidates if c.correction.name == "local least-squares gamma"), None)
    if local is not None:
        fitted = local.correction.gammas[~local.schedule.full & (extrapolation_ratios(local.schedule.full, result.timesteps) > 0)]
        assert np.all(np.abs(fitted - 1) < 0.2)
    # every schedule candidate honours the constraints; the last step is cached only where allowed
    for c in result.candidates:
        assert c.schedule.full[0] and c.schedule.max_run <= 2 and c.schedule.n_cached == 6
        assert c.schedule.full[-1] or "last step cacheable" in c.schedule.name
    assert {c.schedule.full[-1] for c in result.candidates} == {True, False}  # both policies were tried
    dp = {c.schedule.name for c in result.candidates if c.schedule.name.startswith("corrected-error-dp")}
    assert dp and all("p=" in name for name in dp)
    assert np.all(psnr(result.reference, result.reference) > 150)  # identical: capped, finite


def test_extrapolation_ratios_follow_time():
    full = np.array([True, True, False, True, False, False, True])
    t = np.array([900.0, 800.0, 700.0, 500.0, 400.0, 200.0, 100.0])
    r = extrapolation_ratios(full, t)
    np.testing.assert_allclose(r, [0, 0, 1.0, 0, (400 - 500) / (500 - 800), (200 - 500) / (500 - 800), 0])
    # before two full steps exist there is no trend
    assert extrapolation_ratios(np.array([True, False, True]), np.array([3.0, 2.0, 1.0]))[1] == 0


def test_candidates_can_be_restricted_for_ablations():
    spec = SamplingSpec(scheduler_config("ddim"), 9, "x", "t", "o", [4, H, W], timestep_dtype="float32")
    full_fn, cache_fn = smooth_denoiser()
    only_none = calibrate(spec, full_fn, cache_fn, {}, {}, 1, 0, CalibrationPlan(4, correction="none"), (H, W), False)
    assert {c.correction.name for c in only_none.candidates} == {"none"}
    gammas = calibrate(spec, full_fn, cache_fn, {}, {}, 1, 0,
                       CalibrationPlan(4, correction="gamma", schedules=("alternation",)), (H, W), False)
    assert {c.schedule.name for c in gammas.candidates} <= {"alternation", "alternation (last step cacheable)"}
    names = {c.correction.name for c in gammas.candidates}
    assert "gamma=1" in names and "gamma=0.9" in names and not any("filter" in n for n in names)


def test_last_step_policy_can_be_forced():
    spec = SamplingSpec(scheduler_config("ddim"), 9, "x", "t", "o", [4, H, W], timestep_dtype="float32")
    full_fn, cache_fn = smooth_denoiser()
    for last in (False, True):
        plan = CalibrationPlan(4, allow_last_cached=last, correction="gamma1")
        result = calibrate(spec, full_fn, cache_fn, {}, {}, 1, 0, plan, (H, W), False)
        last_full = {bool(c.schedule.full[-1]) for c in result.candidates}
        assert last_full == ({True, False} if last else {True})
        assert not any("last step cacheable" in c.schedule.name for c in result.candidates)
    # 6 of 9 cached only fits with the last step cached: auto builds those candidates alone
    result = calibrate(spec, full_fn, cache_fn, {}, {}, 1, 0, CalibrationPlan(6, correction="gamma1"), (H, W), False)
    assert all(not c.schedule.full[-1] for c in result.candidates)
