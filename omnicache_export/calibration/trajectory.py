"""Sampling-trajectory geometry: 3-D PCA projection and Menger curvature (METHOD.md, pass 1).

A trajectory of N sampling steps has N+1 points x_0 .. x_N (x_i is the latent entering step i,
x_N the final latent). Curvature at point i says how much the sampling direction turns at
step i; endpoints have no curvature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CurvatureStats", "project_3d", "menger_curvature", "trajectory_curvature"]


def project_3d(traj: np.ndarray) -> np.ndarray:
    """Project one trajectory [N+1, ...] onto its top-3 principal axes -> [N+1, 3] (float64).

    Points are flattened and centred on the trajectory's own mean; coordinates are U*S of the
    thin SVD. Missing components (N+1 < 3, or rank < 3) are zero columns. Each axis' sign is
    fixed so that its largest-magnitude coordinate is positive (deterministic output).
    """
    x = np.asarray(traj, dtype=np.float64).reshape(len(traj), -1)
    if x.shape[0] == 0:
        raise ValueError("empty trajectory")
    x = x - x.mean(axis=0, keepdims=True)
    # SVD of the small side: [N+1, D] with N+1 << D, thin SVD costs O((N+1)^2 D).
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(3, s.size)
    coords = u[:, :k] * s[:k]
    # Components at rounding level are noise, not geometry: zero them (rank-deficient input).
    tol = max(x.shape) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    coords[:, s[:k] <= tol] = 0.0
    idx = np.argmax(np.abs(coords), axis=0)
    signs = np.sign(coords[idx, np.arange(k)])
    coords *= np.where(signs == 0, 1.0, signs)
    out = np.zeros((x.shape[0], 3))
    out[:, :k] = coords
    return out


def menger_curvature(p: np.ndarray) -> np.ndarray:
    """Menger curvature of a polyline p [M, d] -> [M]; NaN at the endpoints 0 and M-1.

    kappa_i = 4 area(p_{i-1}, p_i, p_{i+1}) / (|a| |b| |c|) = 1 / circumradius. The area comes
    from Kahan's stable Heron formula on the sorted side lengths (valid in any dimension,
    accurate for needle-like triangles, i.e. nearly straight trajectories). A triangle with
    a zero-length side gets 0.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected a polyline [M, d], got shape {p.shape}")
    out = np.full(p.shape[0], np.nan)
    if p.shape[0] < 3:
        return out
    sides = np.stack(
        [
            np.linalg.norm(p[1:-1] - p[:-2], axis=1),
            np.linalg.norm(p[2:] - p[1:-1], axis=1),
            np.linalg.norm(p[2:] - p[:-2], axis=1),
        ],
        axis=1,
    )
    a, b, c = np.sort(sides, axis=1)[:, ::-1].T  # a >= b >= c
    # 16 area^2 (Kahan); rounding can push a flat triangle slightly below zero.
    sixteen_area2 = (a + (b + c)) * (c - (a - b)) * (c + (a - b)) * (a + (b - c))
    denom = a * b * c
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.sqrt(np.clip(sixteen_area2, 0.0, None)) / denom
    out[1:-1] = np.where(denom > 0, kappa, 0.0)
    return out


@dataclass
class CurvatureStats:
    """Curvature over K trajectories of N steps. Index i = point x_i = step i; 0 and N are NaN."""

    mean: np.ndarray  # [N+1]
    std: np.ndarray  # [N+1], population std over the K samples (the spread to report)
    per_sample: np.ndarray  # [K, N+1]
    projections: np.ndarray  # [K, N+1, 3]


def trajectory_curvature(trajs: np.ndarray) -> CurvatureStats:
    """Per-trajectory 3-D projection and curvature of trajs [K, N+1, ...], averaged over K."""
    trajs = np.asarray(trajs)
    if trajs.ndim < 2:
        raise ValueError(f"expected [K, N+1, ...], got shape {trajs.shape}")
    proj = np.stack([project_3d(t) for t in trajs])
    per = np.stack([menger_curvature(p) for p in proj])
    with np.errstate(invalid="ignore"):
        mean = per.mean(axis=0)
        std = per.std(axis=0)
    return CurvatureStats(mean=mean, std=std, per_sample=per, projections=proj)
