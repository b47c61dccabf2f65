"""The correction a candidate applies at cached steps, and the per-step tables that carry it into
the cache graph (fed as inputs while calibrating, frozen into constants in the export).

ô_i = b_i + coefficients[i] · F_i(o_j − o_j'), coefficients[i] = gammas[i] · a_i, where the base b_i
is the cache graph's output õ_i or, with `blend` λ, moved towards the last full output,
b_i = õ_i + λ (o_j − õ_i) (λ = 1: output extrapolation). With `cache_trend` s the cache graph is fed
the cache carried forward, R̂ = R_j + s · a_i (R_j − R_j') (TaylorSeer's first-order prediction of the
stack output, the current embedding kept): õ_i = H(E(x_i) + R̂). `mixed(λ)`: cache trend and output
extrapolation averaged, (1 − λ) H(E + R̂) + λ (o_j + a_i Δo).

The cache trend's `trend_fit` says how the caches of the last full steps are carried to step i:
the last two's line (above), or, where three full steps j'' < j' < j exist, the quadratic through
them or the least-squares line fitted to them, evaluated at t_i. Each is an affine combination
w0 R_j + w1 R_j' + w2 R_j'' (Σw = 1), which the cache graph computes as
R̂ = R_j + ρ_i (R_j − R_j') + σ_i (R_j' − R_j''), ρ = s (w0 − 1), σ = −s · damping · w2.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from omnicache_export.calibration import schedule as sched
from omnicache_export.calibration.filters import StageFilter, dft_filter_matrices
from omnicache_export.passes.cache_names import BLEND, COEFFICIENTS, MASKS, TREND, TREND2


class Predictor(str, enum.Enum):
    """The two predictors the correction-aware DP plans for."""

    GAMMA = "gamma=1"  # the seed's: γ on the cache output's trend
    CACHE_TREND = "cache trend, mix 0.5"  # ours: the cache carried forward, mixed with output extrapolation


class CorrectionSearch(str, enum.Enum):
    """Which corrections calibration may choose (ablations restrict it)."""

    NONE = "none"  # no correction
    GAMMA1 = "gamma1"  # γ = 1 only
    GAMMA = "gamma"  # γ fits and the cache trend, no filters
    AUTO = "auto"  # everything


class TrendFit(str, enum.Enum):
    """How the cache trend carries the last full steps' caches to a cached step (its name part)."""

    LAST_TWO = "last two full steps"  # the line through the last two: first order
    QUADRATIC = "second order"  # the quadratic through the last three
    FITTED3 = "fitted over 3 full steps"  # the least-squares line through the last three


def trend_weights(fit: TrendFit, t: float, times: np.ndarray) -> np.ndarray:
    """[w0, w1, w2]: R̂(t) = w0 R_j + w1 R_j' + w2 R_j'' for the full steps' times (t_j, t_j', t_j''),
    newest first (distinct); the weights sum to 1."""
    times = np.asarray(times, float)
    if fit is TrendFit.QUADRATIC:  # Lagrange basis polynomials at t
        return np.array([np.prod([(t - times[m]) / (times[k] - times[m]) for m in range(3) if m != k])
                         for k in range(3)])
    if fit is TrendFit.FITTED3:  # the least-squares line's value at t is linear in the points
        centred = times - times.mean()
        return 1.0 / 3 + (t - times.mean()) * centred / np.sum(centred ** 2)
    raise ValueError(f"{fit} is not a three-point fit")


@dataclasses.dataclass
class Correction:
    name: str  # for display
    gammas: np.ndarray  # [N], NaN where no correction applies
    filter: StageFilter = dataclasses.field(default_factory=StageFilter)
    blend: float = 0.0  # λ: base = õ + λ (o_j − õ), applied where a trend exists
    cache_trend: float | np.ndarray = 0.0  # s (or s_i [N]): R̂ = R_j + s a_i (R_j − R_j'), where a trend exists
    trend_fit: TrendFit = TrendFit.LAST_TWO  # where three full steps exist (else the last two)
    damping: float = 1.0  # scales σ, the three-point fits' term on the older trend

    @classmethod
    def none(cls, n: int) -> Correction:
        return cls("none", np.full(n, np.nan))

    @classmethod
    def gamma(cls, g: np.ndarray | float, n: int, name: str, filt: StageFilter | None = None) -> Correction:
        return cls(name, np.broadcast_to(np.asarray(g, float), (n,)).copy(), filt or StageFilter())

    @classmethod
    def mixed(cls, mix: float, n: int, scale: float | np.ndarray = 1.0, filt: StageFilter | None = None,
              name: str | None = None, fit: TrendFit = TrendFit.LAST_TWO, damping: float = 1.0) -> Correction:
        gammas = np.broadcast_to(np.asarray(scale, float) * mix, (n,)).copy()
        if name is None:
            name = f"cache trend, mix {mix:g}"
            if fit is not TrendFit.LAST_TWO:
                name += f", {fit.value}" + (f" damped {damping:g}" if damping != 1.0 else "")
            if np.any(np.asarray(scale) != 1.0):
                name += f", gamma={scale:g}" if np.ndim(scale) == 0 else ", gamma per step"
        trend = np.broadcast_to(np.asarray(scale, float), (n,)).copy()
        return cls(name, gammas, filt or StageFilter(), blend=mix, cache_trend=trend, trend_fit=fit, damping=damping)

    @property
    def is_none(self) -> bool:
        return bool(np.all(np.isnan(self.gammas))) and not self.blend and not np.any(self.cache_trend)

    @property
    def has_trend(self) -> bool:
        return bool(np.any(self.cache_trend))

    def coefficients(self, ratios: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(self.gammas), 0.0, np.nan_to_num(self.gammas) * ratios).astype(np.float32)

    def blends(self, ratios: np.ndarray) -> np.ndarray:
        return np.where((ratios > 0) & ~np.isnan(self.gammas), self.blend, 0.0).astype(np.float32)

    def trends(self, ratios: np.ndarray, full: np.ndarray | None = None,
               timesteps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ρ, σ) [N] float32: the cache trend's per-step factors on the last and the older trend.
        ρ_i = s · a_i and σ_i = 0 (0 at full steps and before two full steps), except with a
        three-point `trend_fit` where three full steps precede step i (needs `full`, `timesteps`)."""
        scale = np.broadcast_to(np.asarray(self.cache_trend, float), np.shape(ratios))
        rho, sigma = scale * ratios, np.zeros(len(ratios))
        if self.trend_fit is not TrendFit.LAST_TWO and self.has_trend:
            t = np.asarray(timesteps, float)
            done = np.flatnonzero(np.asarray(full, bool))
            for i in np.flatnonzero(~np.asarray(full, bool) & (ratios != 0)):
                last3 = done[done < i][-3:][::-1]
                if len(last3) == 3 and len(set(t[last3])) == 3:
                    w = trend_weights(self.trend_fit, t[i], t[last3])
                    rho[i], sigma[i] = scale[i] * (w[0] - 1), -scale[i] * self.damping * w[2]
        return rho.astype(np.float32), sigma.astype(np.float32)

    def masks(self, n_steps: int, hw: tuple[int, int] | None) -> np.ndarray | None:
        """The filter's mask of every step [N, h, w], or None for no filter."""
        if self.filter.is_all_pass or hw is None:
            return None
        return np.stack([self.filter.mask_for_step(i, *hw) for i in range(n_steps)]).astype(np.float32)


def extrapolation_ratios(full: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """a_i = (t_i − t_j)/(t_j − t_j'): the trend of the last two full steps j' < j carried to step i by
    the time variable (non-uniform timesteps included); 0 at full steps and before two full steps."""
    s = sched.Schedule(full)
    ratios = np.zeros(len(full))
    for i in np.flatnonzero(~s.full):
        j, j2 = s.reuse_from[i], s.prev_full2[i]
        if j2 >= 0 and timesteps[j] != timesteps[j2]:
            ratios[i] = (timesteps[i] - timesteps[j]) / (timesteps[j] - timesteps[j2])
    return ratios


def run_position_scale(full: np.ndarray, decay: float) -> np.ndarray:
    """[N] γ scale by position p in the run of cached steps (p = 1 right after a full step):
    decay^(p − 1), 1 at full steps. Longer runs extrapolate further from the last full pair, where
    the linear trend over- (decay < 1) or under-shoots (decay > 1); the tables carry it per step."""
    return np.where(np.asarray(full, bool), 1.0, float(decay) ** np.maximum(sched.Schedule(full).staleness - 1, 0))


@dataclasses.dataclass(frozen=True)
class CorrectionTables:
    """The per-step tables of one correction on one schedule: what the cache graph gathers by step.
    Built once, here; fed to calibration's graphs and frozen into the exported one."""

    coefficients: np.ndarray  # [N] float32
    blend: np.ndarray  # [N]
    trend: np.ndarray  # [N] ρ
    masks: np.ndarray | None  # [N, h, w] unscaled, or None for no filter
    trend2: np.ndarray | None = None  # [N] σ, the older trend's factor (None: zeros)

    @classmethod
    def build(cls, corr: Correction, full: np.ndarray, timesteps: np.ndarray,
              hw: tuple[int, int] | None) -> CorrectionTables:
        ratios = extrapolation_ratios(full, timesteps)
        rho, sigma = corr.trends(ratios, full, timesteps)
        return cls(corr.coefficients(ratios), corr.blends(ratios), rho, corr.masks(len(full), hw), sigma)

    @classmethod
    def single_step(cls, n_steps: int, i: int, coefficient: float, blend: float, trend: float) -> CorrectionTables:
        """Zero everywhere but step i (calibration's pair estimates of one cached step)."""
        tables = [np.zeros(n_steps, np.float32) for _ in range(3)]
        for table, value in zip(tables, (coefficient, blend, trend)):
            table[i] = value
        return cls(*tables, None)

    @property
    def sigma(self) -> np.ndarray:
        """σ [N] float32 (zeros where the correction has no second-order term)."""
        return np.zeros(len(self.trend), np.float32) if self.trend2 is None else self.trend2

    @property
    def has_trend2(self) -> bool:
        """Whether the cache graph needs the second-order term (`<cache>_prev2` inputs, σ)."""
        return bool(np.any(self.sigma))

    @property
    def has_filter(self) -> bool:
        return self.masks is not None and not np.all(self.masks == 1.0)

    def inputs(self) -> dict[str, np.ndarray]:
        """By table input name, as the cache graph takes them (masks scaled by 1/(h w) per step)."""
        out = {COEFFICIENTS: self.coefficients, BLEND: self.blend, TREND: self.trend, TREND2: self.sigma}
        if self.has_filter:
            h, w = self.masks.shape[1:]
            out[MASKS] = np.stack([dft_filter_matrices(h, w, m).scaled_mask for m in self.masks]).astype(np.float32)
        return out
