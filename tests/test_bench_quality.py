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
