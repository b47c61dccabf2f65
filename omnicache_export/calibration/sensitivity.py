"""How much an output error at step i moves the final latent: the step weights of the schedule DP.

Two models of it bracket the truth:
- step size |t_i − t_{i+1}|: right for flow models with the later outputs following the perturbed
  latent (what the first correction-aware DP used);
- the frozen-output gain g_i: the change of the final latent per unit change of the (guided)
  prediction at step i, with every later prediction held at its reference value. Measured by
  replaying the scheduler alone on the recorded predictions (no model runs), so it covers any
  diffusers scheduler, multistep solvers included. For ε-prediction DDIM it grows ~40× from the
  last step to the first; the real model damps early perturbations, so g_i² overstates them.

`step_weights(p)` interpolates geometrically, w_i = g_i^{2p} · |Δt_i|^{1−p}; calibration solves the
DP at a few p (`calibrate.SENSITIVITY_EXPONENTS`) and lets the final deviation decide: on the trained
DDIM reference the schedules from p = 0 and from p = 1 both lost several dB to the one from p = 0.25
(docs/method.md).
"""

from __future__ import annotations

import numpy as np

from omnicache_export.runtime.sampler import Denoiser, SamplingSpec

PROBE = 1e-2  # relative to the prediction's RMS: small enough to stay linear, big enough for float32


def frozen_output_gains(spec: SamplingSpec, predictions: list, x0) -> np.ndarray:
    """g_i = RMS(Δ final latent) / δ for a uniform perturbation δ of the prediction at step i.

    `predictions`: the guided prediction of every step for one generation (from the reference run),
    `x0`: its initial latent (torch tensors or arrays)."""
    import torch

    predictions = [torch.as_tensor(p, dtype=torch.float32) for p in predictions]
    x0 = torch.as_tensor(x0, dtype=torch.float32)
    n = spec.n_steps
    scale = max(float(np.sqrt(np.mean([float((p.double() ** 2).mean()) for p in predictions]))), 1e-6)
    delta = float(np.float32(PROBE * scale))

    def replay(at: int) -> np.ndarray:
        den, x = Denoiser(spec), x0
        for k in range(n):
            x = den.step(k, predictions[k] + delta if k == at else predictions[k], x)
        return x.double().numpy()

    base = replay(-1)
    return np.array([np.sqrt(np.mean((replay(i) - base) ** 2)) / delta for i in range(n)])


def step_sizes(timesteps: np.ndarray) -> np.ndarray:
    return np.abs(timesteps - np.append(timesteps[1:], 0.0))


def step_weights(gains: np.ndarray | None, timesteps: np.ndarray, p: float) -> np.ndarray:
    """w_i = g_i^{2p} |Δt_i|^{1−p}, normalised to mean 1 (p = 0, or no gains: step sizes)."""
    w = step_sizes(timesteps)
    if gains is not None and p:
        w = np.power(np.maximum(gains, 1e-12), 2 * p) * np.power(np.maximum(w, 1e-12), 1 - p)
    mean = w.mean()
    return w / mean if mean > 0 else np.ones_like(w)
