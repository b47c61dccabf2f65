"""tools/bench_quality.py: metric helpers, full-step counting of a peer, and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_quality as bq  # noqa: E402


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal((n, 1, 8, 8)), sigma=[0, 0, 1, 1]).astype(np.float32)


def test_ssim_psnr_identical_and_shifted():
    x = _images()
    assert np.allclose(bq.ssim(x, x), 1.0)
    assert np.all(bq.psnr(x, x) > 100)
    shifted = np.roll(x, 1, axis=-1)
    assert np.all(bq.ssim(shifted, x) < 0.95)
    assert np.all(bq.psnr(shifted, x) < 40)
    noisy = x + 0.01 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    assert np.all(bq.ssim(noisy, x) > bq.ssim(shifted, x))
    assert np.all((bq.ssim(noisy, x) < 1.0) & (bq.ssim(noisy, x) > 0.9))


def test_ssim_video_slices():
    x = np.stack([_images(3, s) for s in range(4)], axis=2)  # [3, 1, 4, 8, 8]
    assert x.shape == (3, 1, 4, 8, 8)
    assert np.allclose(bq.ssim(x, x), 1.0)


def test_frechet():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5))
    assert bq.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert bq.frechet(a + 1.0, a) == pytest.approx(5.0, rel=1e-3)  # mean shift of 1 in 5 dims, same covariance
    assert bq.frechet(2 * a, a) > 1.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-weight dit-digits in a temporary weights folder (the trained weights are not needed)."""
    from omnicache_export.zoo.reference import REFERENCES, build_model, save_reference

    folder = tmp_path_factory.mktemp("weights")
    spec = REFERENCES["dit-digits"]
    save_reference(spec, build_model(spec, seed=0).eval(), {"model_config": spec.model_config}, folder)
    return folder


def test_peer_full_step_counting(weights):
    """TaylorSeer (lite) computes a known set of steps: the hook-counted full steps must equal it."""
    import torch
    from peers import taylorseer
    from peers._torch import TorchCase

    from omnicache_export.zoo.reference import load_reference

    torch.set_num_threads(1)
    ref = load_reference("dit-digits", weights)
    spec = ref.sampling_spec(steps=8)
    cond, uncond = ref.conditioning([1, 2])
    for target in (3, 5):
        case = TorchCase(ref.model, ref.input_names, spec, cond, uncond, 2, 0, target)
        run = taylorseer.run(case, lite=True)
        interval, before, after = taylorseer.pick(8, target)
        assert run.n_full == taylorseer._full_steps(8, interval, before, after) == target
        assert np.all(np.isfinite(run.final))


def test_quick_run(weights, tmp_path):
    out = tmp_path / "res.json"
    md = tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\n## Speed: x\n\nkeep me\n")
    rc = bq.main(["--models", "dit-digits", "--steps", "6", "--ratios", "0.5", "--samples-per-class", "1",
                  "--methods", "OmniCache (full),uniform,TeaCache", "--weights-dir", str(weights),
                  "--workdir", str(tmp_path / "work"), "--json", str(out), "--out", str(md), "-q"])
    assert rc == 0
    block = json.loads(out.read_text())["results"][0]
    rows = block["rows"]
    got = {r["method"]: r for r in rows if r["ratio"] is not None}
    assert set(got) == {"OmniCache (full)", "uniform reuse (FORA-style)", "TeaCache-style"}
    target = 6 - 3
    for name, r in got.items():
        assert not r["skipped"], (name, r["skipped"])
        assert np.isfinite(r["psnr"]) and np.isfinite(r["ssim"]) and np.isfinite(r["fid"]) and 0 <= r["acc"] <= 1
        assert r["target_full"] == target
    assert got["OmniCache (full)"]["n_full"] == target
    assert got["uniform reuse (FORA-style)"]["n_full"] == target
    # the calibration ablation: the chosen score is the best of every choice's best
    (ablation,) = block["calibration"]
    parts = [v for k, v in ablation.items() if k not in ("ratio", "chosen") and v is not None]
    assert ablation["chosen"] == pytest.approx(max(parts))
    assert ablation["chosen"] == pytest.approx(max(ablation["last_full"] or -1e9, ablation["last_cached"] or -1e9))
    text = md.read_text()
    assert "## Speed: x\n\nkeep me" in text and "## Quality vs speed" in text
    assert "### Calibration ablations" in text and "| dit-digits | 6 | 0.5 |" in text
    assert (tmp_path / "img" / "quality-dit-digits.png").exists()


def _row(method, ratio, n_full, target, psnr, cost=None, steps=20):
    from omnicache_export.calibration.schedule import speedup_of

    extra = {} if cost is None else {"cost_ratio": cost, "predicted_speedup": speedup_of(steps, steps - n_full, cost)}
    return bq.Row(method, "onnx", ratio, target, n_full, psnr=psnr, **extra).to_json()


def test_speedup_goal_check():
    """The 3× check from synthetic rows: OmniCache's predicted speedup against the goal, its PSNR against the best
    block-skipping peer at r = 0.5 that reached its count (attention-only peers, misses and other cells left out)."""
    c = 0.1
    block = {"model": "m", "steps": 20, "rows": [
        _row("OmniCache (full)", 0.6, 8, 8, 50.0, c),  # r ≤ 2/3: never 3×, not checked
        _row("OmniCache (full)", 0.7, 6, 6, 40.0, c),
        _row("OmniCache (full)", 0.8, 4, 4, 30.0, c),
        _row("TeaCache-style", 0.8, 4, 4, 99.0),  # not the reference ratio
    ]}
    reference = [
        {"model": "m", "steps": 20, "rows": [
            _row("AB-Cache (residual extrapolation)", 0.5, 10, 10, 35.0),
            _row("diffusers TaylorSeer", 0.5, 10, 10, 60.0),  # attention only
            _row("diffusers MagCache", 0.5, 12, 10, 45.0),  # more full steps than 2×
            bq.Row("diffusers FirstBlockCache", "torch", 0.5, 10, skipped="x").to_json()]},
        {"model": "m", "steps": 50, "rows": [_row("TeaCache-style", 0.5, 25, 25, 70.0)]},  # another cell
    ]
    g07, g08 = bq.speedup_goal(block, reference)
    assert (g07["ratio"], g08["ratio"]) == (0.7, 0.8)
    assert g07["best"]["method"] == g08["best"]["method"] == "AB-Cache (residual extrapolation)"
    # 20 / (6 + 14 c) < 3 ≤ 20 / (4 + 16 c); 3× needs 20 - M (1 - c) ≤ 20/3: M = 15
    assert g07["predicted"] == pytest.approx(20 / (6 + 14 * c)) and not g07["fast"] and g07["better"] and g07["holds"] is False
    assert g07["reach"] == (15, 0.75)
    assert g08["fast"] and not g08["better"] and g08["holds"] is False
    assert bq.ratio_for_speedup(30, 0.0) == (20, 20 / 30)
    assert bq.ratio_for_speedup(10, 0.5) is None  # 10 / (1 + 9·0.5) < 3
    assert "holds in 0 of 1 model/step cells" in bq.goal_summary([block], reference)
    block["rows"][2]["psnr"] = 36.0  # now above the best 2× peer, at 3.57×
    assert bq.speedup_goal(block, reference)[1]["holds"] is True
    summary = bq.goal_summary([block], reference)
    assert "holds in 1 of 1 model/step cells (at r = 0.7 in 0, at r = 0.8 in 1)" in summary
    assert "m N=20 r=0.7 (2.70×)" in summary and "r ≥ 0.75" in summary
    assert bq.speedup_goal(block, [])[0]["holds"] is None  # no peer ran at r = 0.5
    md = bq.render([dict(block, n_eval=1, scheduler="S", guidance=1.0)], {"command": "x", "date": "d", "machine": "m",
                                                                     "seconds": 1.0, "samples_per_class": 1}, "", {}, reference)
    assert "### 3× at a quality no peer reaches at 2×" in md and "**goal holds**" in md and "**goal missed**" in md


def test_cachedit_worker(weights, tmp_path):
    """cache-dit's DBCache in its own environment (skipped without one): the worker imports the project's
    sampler from the folders this interpreter resolves (engines/ is laid out by package-dir) and counts
    the full steps it ran."""
    import torch
    from peers import cachedit
    from peers._torch import TorchCase

    from omnicache_export.zoo.reference import load_reference

    why = cachedit.available()
    if why:
        pytest.skip(why)
    dirs = cachedit.package_dirs()
    assert (Path(dirs["omnicache_export.engines"][0]) / "base.py").exists()
    torch.set_num_threads(1)
    ref = load_reference("dit-digits", weights)
    spec = ref.sampling_spec(steps=8)
    cond, uncond = ref.conditioning([1, 2])
    case = TorchCase(ref.model, ref.input_names, spec, cond, uncond, 2, 0, 4)
    plain, with_ts = cachedit.run_many(case, [(False, 4), (True, 4)], workdir=tmp_path)
    for run in (plain, with_ts):  # the threshold bisection reaches the target count: 4 of 8 steps skipped
        assert run.n_full == 4 and np.all(np.isfinite(run.final)) and run.final.shape[0] == 2
    assert "TaylorSeer" in with_ts.setting and "TaylorSeer" not in plain.setting
    assert not np.allclose(plain.final, with_ts.final)  # the calibrator changes what the skipped steps return
