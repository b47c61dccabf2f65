"""Step weights of the correction-aware DP: the frozen-output gain, replayed through the scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from omnicache_export.runtime.sampler import Denoiser, SamplingSpec, scheduler_config, timesteps_of
from omnicache_export.calibration.sensitivity import frozen_output_gains, step_sizes, step_weights


def _spec(name: str, n: int) -> SamplingSpec:
    return SamplingSpec(scheduler_config(name), n, "x", "t", "o", [2, 4, 4])


def _predictions(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, 4, 4)).astype(np.float32) for _ in range(n)]


def test_flow_euler_gain_is_the_sigma_step():
    # x_{i+1} = x_i + (σ_{i+1} − σ_i) v_i: a change δ of v_i moves the final latent by |Δσ_i| δ exactly
    spec = _spec("flow-euler", 8)
    den = Denoiser(spec)
    sigmas = den.scheduler.sigmas.numpy().astype(np.float64)
    gains = frozen_output_gains(spec, _predictions(8), den.initial_latents(1, 0))
    np.testing.assert_allclose(gains, np.abs(np.diff(sigmas)), rtol=2e-3)


def test_ddim_gain_falls_towards_the_end():
    # ε-prediction: an ε error early is multiplied by ~sqrt(1−ᾱ)/sqrt(ᾱ) of a noisy step; late, it barely counts
    spec = _spec("ddim", 10)
    gains = frozen_output_gains(spec, _predictions(10), Denoiser(spec).initial_latents(1, 0))
    assert np.all(np.diff(gains) < 0) and gains[0] > 10 * gains[-1]


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_step_weights_interpolate_between_step_size_and_gain(p):
    t = timesteps_of(_spec("ddim", 10))
    gains = np.linspace(5.0, 0.1, 10)
    w = step_weights(gains, t, p)
    assert w.mean() == pytest.approx(1.0)
    expect = gains ** (2 * p) * step_sizes(t) ** (1 - p)
    np.testing.assert_allclose(w, expect / expect.mean(), rtol=1e-9)
    np.testing.assert_allclose(step_weights(None, t, p), step_sizes(t) / step_sizes(t).mean())
