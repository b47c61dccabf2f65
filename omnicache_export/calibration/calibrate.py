"""Calibration: the schedule and the correction, chosen by the final deviation each actually causes.

Pass 1 samples without cache (the reference), projects each trajectory to 3-D, measures its
curvature and builds the candidate schedules. Pass 2 re-runs the sampler with each candidate applied,
sequentially, exactly as the runtime will (cache graph at cached steps, the correction on the outputs
of the last two full steps), and scores it by the PSNR of the final latents against the reference on
the same seeds and conditions. Every candidate's score is kept for the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from omnicache_export.calibration import schedule as sched
from omnicache_export.calibration.filters import StageFilter, apply_filter_numpy, candidate_grid, dft_filter_matrices
from omnicache_export.runtime.sampler import SamplingSpec, sample_chunked
from omnicache_export.calibration.schedule_corrected import PairCost, corrected_errors, solve_pairwise_schedule, weighted
from omnicache_export.calibration.sensitivity import frozen_output_gains, step_weights
from omnicache_export.calibration.trajectory import CurvatureStats, trajectory_curvature

logger = logging.getLogger(__name__)

FullFn = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, dict[str, np.ndarray]]]
CacheFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], np.ndarray]
GAMMA_SCALES = (0.8, 0.9, 1.1, 1.2)  # line search around gamma = 1 on the final deviation
SENSITIVITY_EXPONENTS = (0.0, 0.25, 0.5)  # step weights of the correction-aware DP (`sensitivity`)
RECORD_BUDGET_BYTES = 2 << 30  # the reference run's per-step records for the correction-aware schedule


# ------------------------------------------------------------------ correction


@dataclasses.dataclass
class Correction:
    """ô_i = b_i + coefficients[i] · F_i(o_j − o_j'), coefficients[i] = gammas[i] · a_i, where the
    base b_i is the cache graph's output õ_i, or with `blend` λ moved towards the last full output,
    b_i = õ_i + λ (o_j − õ_i) (λ = 1: output extrapolation; õ_i already moves with x_i and t_i, so
    adding the whole trend to it counts part of the change twice). With `cache_trend` s the cache
    graph itself is fed the cache carried forward, R̂ = R_j + s · a_i (R_j − R_j') (TaylorSeer's
    first-order prediction of the stack output, the current embedding kept): õ_i = H(E(x_i) + R̂).
    `mixed(λ)`: cache trend and output extrapolation averaged, (1 − λ) H(E + R̂) + λ (o_j + a_i Δo)."""

    name: str
    gammas: np.ndarray  # [N], NaN where no correction applies
    filter: StageFilter = dataclasses.field(default_factory=StageFilter)
    blend: float = 0.0  # λ: base = õ + λ (o_j − õ), applied where a trend exists
    cache_trend: float | np.ndarray = 0.0  # s (or s_i [N]): R̂ = R_j + s a_i (R_j − R_j'), where a trend exists

    @classmethod
    def mixed(cls, mix: float, n: int, scale: float | np.ndarray = 1.0, filt: StageFilter | None = None,
              name: str | None = None) -> Correction:
        gammas = np.broadcast_to(np.asarray(scale, float) * mix, (n,)).copy()
        if name is None:
            name = f"cache trend, mix {mix:g}"
            if np.any(np.asarray(scale) != 1.0):
                name += f", gamma={scale:g}" if np.ndim(scale) == 0 else ", gamma per step"
        trend = np.broadcast_to(np.asarray(scale, float), (n,)).copy()
        return cls(name, gammas, filt or StageFilter(), blend=mix, cache_trend=trend)

    def coefficients(self, ratios: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(self.gammas), 0.0, np.nan_to_num(self.gammas) * ratios).astype(np.float32)

    def blends(self, ratios: np.ndarray) -> np.ndarray:
        return np.where((ratios > 0) & ~np.isnan(self.gammas), self.blend, 0.0).astype(np.float32)

    def trends(self, ratios: np.ndarray) -> np.ndarray:
        """ρ_i = s · a_i: the cache trend's per-step factor (0 at full steps and before two full steps)."""
        return (np.asarray(self.cache_trend, float) * ratios).astype(np.float32)

    def masks(self, n_steps: int, hw: tuple[int, int] | None) -> np.ndarray | None:
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


def carried_caches(caches: dict, caches_prev: dict | None, rho: float) -> dict:
    """R̂ = R + ρ (R − R_prev) for every cache tensor (the graph's ExtrapolateCachePass, in numpy)."""
    if not rho or caches_prev is None:
        return caches
    return {k: v + np.float32(rho) * (v - caches_prev[k]) for k, v in caches.items()}


def apply_correction(
    out: np.ndarray, diff: np.ndarray, coef: float, mask: np.ndarray | None, prev: np.ndarray | None = None,
    blend: float = 0.0,
) -> np.ndarray:
    if blend:
        out = out + np.float32(blend) * (prev - out)
    if coef == 0.0:
        return out
    if mask is not None:
        diff = apply_filter_numpy(diff, dft_filter_matrices(mask.shape[0], mask.shape[1], mask))
    return out + np.float32(coef) * diff


def pair_estimate(corr: Correction, records: list, cache_fn: CacheFn, timesteps: np.ndarray):
    """estimate(i, j, j2): the prediction of step i's output by `corr` (at the scalar parameters of
    its first corrected step) from the reference run's records (feeds, output, caches) of steps i,
    j (last full) and j2 (the full step before; -1: none): what the runtime would compute at a
    cached step i on the reference trajectory."""
    g = np.nan_to_num(corr.gammas)
    gamma_, s = float(g[0]) if g.size else 0.0, float(np.ravel(corr.cache_trend)[0])

    stale: dict[tuple[int, int], np.ndarray] = {}  # õ_i(j) without a cache trend: shared by every j2

    def cached(i: int, j: int, j2: int, rho: float) -> np.ndarray:
        if rho:
            return cache_fn(records[i][0], carried_caches(records[j][2], records[j2][2], rho))
        if (i, j) not in stale:
            stale[(i, j)] = cache_fn(records[i][0], records[j][2])
        return stale[(i, j)]

    def estimate(i: int, j: int, j2: int) -> np.ndarray:
        if j2 < 0 or timesteps[j] == timesteps[j2]:
            return cached(i, j, j2, 0.0)
        a = (timesteps[i] - timesteps[j]) / (timesteps[j] - timesteps[j2])
        out_j, out_j2 = records[j][1], records[j2][1]
        return apply_correction(cached(i, j, j2, s * a), out_j - out_j2, gamma_ * a, None, out_j, corr.blend)

    return estimate


# ------------------------------------------------------------------ cached sampling


@dataclasses.dataclass
class CachedRun:
    final: np.ndarray
    local_fit: tuple[np.ndarray, np.ndarray] | None = None  # per step Σ<q,n>, Σ|q|²


def run_cached(
    spec: SamplingSpec,
    full_fn: FullFn,
    cache_fn: CacheFn,
    cond: dict,
    uncond: dict,
    n: int,
    seed: int,
    full: np.ndarray,
    coefficients: np.ndarray,
    masks: np.ndarray | None,
    fit_local: bool = False,
    batched: set[str] | None = None,
    blends: np.ndarray | None = None,
    trends: np.ndarray | None = None,
) -> CachedRun:
    """Sample with a schedule and a correction, the runtime's dispatch with the correction in numpy.
    With `fit_local`, also run the full model at cached steps to accumulate the local least-squares
    fit of γ (n_i = õ_i − o_i against q_i = −a_i (o_j − o_j'))."""
    sums = (np.zeros(len(full)), np.zeros(len(full))) if fit_local else None

    def make_model():  # fresh cache state for every chunk of samples
        state: dict = {"caches": None, "caches_prev": None, "prev": None, "prev2": None}
        return lambda i, feeds: model(state, i, feeds)

    def model(state: dict, i: int, feeds: dict) -> np.ndarray:
        if full[i]:
            out, caches = full_fn(feeds)
            state["caches_prev"], state["caches"] = state["caches"], caches
            state["prev2"], state["prev"] = state["prev"], out
            return out
        rho = 0.0 if trends is None else float(trends[i])
        out = cache_fn(feeds, carried_caches(state["caches"], state["caches_prev"], rho))
        diff = state["prev"] - state["prev2"] if state["prev2"] is not None else None
        if fit_local and diff is not None and coefficients[i] != 0.0:
            truth, _ = full_fn(feeds)
            q = -coefficients[i] * diff  # γ = 1 coefficients: q = −a_i (o_j − o_j')
            sums[0][i] += float(np.sum(q * (out - truth)))
            sums[1][i] += float(np.sum(q * q))
        if diff is None:
            return out
        blend = 0.0 if blends is None else float(blends[i])
        return apply_correction(out, diff, float(coefficients[i]), None if masks is None else masks[i],
                                state["prev"], blend)

    final, _ = sample_chunked(spec, make_model, cond, uncond, n, seed, _batched(batched, cond))
    return CachedRun(final, sums)


def _batched(batched: set[str] | None, cond: dict) -> set[str]:
    return set(cond) if batched is None else batched


def psnr(result: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample PSNR in dB, the peak being each reference sample's value range."""
    axes = tuple(range(1, reference.ndim))
    mse = np.mean((result - reference) ** 2, axis=axes)
    peak = reference.max(axis=axes) - reference.min(axis=axes)
    return 10 * np.log10(np.maximum(peak, 1e-12) ** 2 / np.maximum(mse, 1e-20))


# ------------------------------------------------------------------ the calibration


@dataclasses.dataclass
class Candidate:
    schedule: sched.Schedule
    correction: Correction
    psnr_db: float = float("nan")
    psnr_min_db: float = float("nan")
    rmse: float = float("nan")
    final: np.ndarray | None = None

    def to_json(self) -> dict:
        return {
            "schedule": self.schedule.name,
            "pattern": self.schedule.pattern,
            "correction": self.correction.name,
            "n_full": self.schedule.n_full,
            "n_cached": self.schedule.n_cached,
            "psnr_db": round(float(self.psnr_db), 3),
            "psnr_min_db": round(float(self.psnr_min_db), 3),
            "rmse": float(self.rmse),
        }


@dataclasses.dataclass
class CalibrationResult:
    timesteps: np.ndarray
    curvature: CurvatureStats
    best: Candidate
    candidates: list[Candidate]
    ratios: np.ndarray
    reference: np.ndarray  # final latents without cache [K, ...]
    filter_hw: tuple[int, int] | None


@dataclasses.dataclass
class CalibrationPlan:
    n_cached: int
    max_consecutive: int = 2
    allow_last_cached: bool | None = None  # None: candidates with the last step full and cached
    filters: bool = True
    fit_gamma: bool = True
    # Restrict the candidates (ablations): schedule families by name prefix, and the correction:
    # "none", "gamma1" (γ = 1 only), "gamma" (γ fits, no filters) or "auto" (everything).
    schedules: tuple[str, ...] | None = None
    correction: str = "auto"


def last_step_policies(plan: CalibrationPlan, n_steps: int) -> list[bool]:
    """allow_last_cached values to build candidates for: both where the plan leaves it open and the
    cached count fits with the last step full."""
    if plan.allow_last_cached is not None:
        return [plan.allow_last_cached]
    fits_full_last = plan.n_cached <= sched.max_cached(n_steps, plan.max_consecutive, False)
    return [False, True] if fits_full_last else [True]


def schedule_candidates(
    kappa: np.ndarray, plan: CalibrationPlan, n_steps: int, pair_errors: dict[str, PairCost] | None = None,
    weights: dict[float, np.ndarray] | None = None,
) -> list[sched.Schedule]:
    """Curvature DP with runs of 1 and of up to max_consecutive, staleness-aware DP, alternation,
    and (given each predictor's corrected errors on the reference run) the correction-aware DP for
    each predictor under each step weighting in `weights` (exponent p -> weights), named
    "... [predictor]"; each with the last step full and, where the plan allows, cached."""
    m, k = plan.n_cached, plan.max_consecutive
    cost = np.nan_to_num(kappa[:n_steps], nan=0.0)
    out = []
    for last in last_step_policies(plan, n_steps):
        tail = ", last step cacheable" if last and plan.allow_last_cached is None else ""
        for key, errors in (pair_errors or {}).items():
            for runs in sorted({1, k}):  # runs of one: the local errors undercount how runs compound
                if m > sched.max_cached(n_steps, runs, last):
                    continue
                for p, w in (weights or {0.0: np.ones(n_steps)}).items():
                    name = f"corrected-error-dp (runs<={runs}, p={p:g}{tail}) [{key}]"
                    s = solve_pairwise_schedule(n_steps, m, weighted(errors, w), runs, last, name)
                    s.predictor = key
                    out.append(s)
        for runs in sorted({1, k}):
            if m <= sched.max_cached(n_steps, runs, last):
                s = sched.solve_schedule(n_steps, m, cost, runs, last)
                s.name = f"curvature-dp (runs<={runs}{tail})"
                out.append(s)
        if k > 1:
            s = sched.solve_schedule(n_steps, m, sched.staleness_cost(cost), k, last)
            s.name = f"staleness-dp (runs<={k}{tail})"
            out.append(s)
        s = sched.alternating_schedule(n_steps, m, k, last)
        s.name = "alternation" + (f" ({tail[2:]})" if tail else "")
        out.append(s)
    if plan.schedules is not None:
        out = [s for s in out if s.name.startswith(plan.schedules)]
        if not out:
            raise ValueError(f"no schedule candidate matches {plan.schedules} for {m} cached steps")
    unique: dict[tuple[str, str], sched.Schedule] = {}  # a DP's schedule runs with its own predictor only
    for s in out:
        unique.setdefault((s.pattern, s.predictor), s)
    return list(unique.values())


def calibrate(
    spec: SamplingSpec,
    full_fn: FullFn,
    cache_fn: CacheFn,
    cond: dict,
    uncond: dict,
    n_samples: int,
    seed: int,
    plan: CalibrationPlan,
    filter_hw: tuple[int, int] | None,
    progress: bool = True,
    batched: set[str] | None = None,
) -> CalibrationResult:
    """`batched`: the conditioning inputs that carry a sample axis (default: all of them)."""
    n = spec.n_steps
    from omnicache_export.runtime.sampler import Denoiser, timesteps_of

    timesteps = timesteps_of(spec)
    logger.info("pass 1: %d reference samples, %d steps", n_samples, n)
    # The reference run also records each step's feeds, outputs and caches (one chunk of samples:
    # the correction-aware schedule's costs are measured on them).
    records: list[tuple[dict, np.ndarray, dict]] = []
    recording = {"on": spec.chunk is None or spec.chunk >= n_samples}

    def reference_model():
        def model(i: int, feeds: dict) -> np.ndarray:
            out, caches = full_fn(feeds)
            if recording["on"]:
                step_bytes = out.nbytes + sum(v.nbytes for v in [*feeds.values(), *caches.values()])
                if step_bytes * n > RECORD_BUDGET_BYTES:  # big models: skip that candidate, keep memory
                    recording["on"] = False
                    records.clear()
                    logger.info("correction-aware schedule skipped: %d MB of records needed", step_bytes * n >> 20)
                else:
                    records.append((feeds, out, caches))
            return out

        return model

    reference, traj = sample_chunked(
        spec, reference_model, cond, uncond, n_samples, seed, _batched(batched, cond),
        record=True, progress="calibration: reference trajectories" if progress else None,
    )
    curvature = trajectory_curvature(traj)

    def none_correction() -> Correction:
        return Correction("none", np.full(n, np.nan))

    def gamma(g: np.ndarray | float, name: str, filt: StageFilter | None = None) -> Correction:
        return Correction(name, np.broadcast_to(np.asarray(g, float), (n,)).copy(), filt or StageFilter())

    # The two predictors the correction-aware DP plans for: the seed's (γ = 1 on the cache output)
    # and ours (cache trend averaged with output extrapolation).
    predictors = {"gamma=1": gamma(1.0, "gamma=1")}
    if plan.correction in ("gamma", "auto"):
        predictors["cache trend, mix 0.5"] = Correction.mixed(0.5, n)
    pair_errors: dict[str, PairCost] = {}
    weights = None
    if (plan.n_cached and records and plan.correction != "none"
            and (plan.schedules is None or "corrected-error-dp".startswith(plan.schedules))):
        outputs = [r[1] for r in records]
        for key, corr in predictors.items():
            pair_errors[key] = corrected_errors(outputs, pair_estimate(corr, records, cache_fn, timesteps))
        den = Denoiser(spec)
        gains = frozen_output_gains(spec, [den.guided(o)[:1] for o in outputs], traj[:1, 0])
        weights = {p: step_weights(gains, timesteps, p) for p in SENSITIVITY_EXPONENTS}
    schedules = (schedule_candidates(curvature.mean, plan, n, pair_errors, weights) if plan.n_cached
                 else [sched.Schedule(np.ones(n, bool), name="no cache")])
    records.clear()

    # Every schedule uncorrected and with each predictor at γ = 1: which steps are cached matters with
    # a correction. (The DP's schedules are built for one predictor: only that one runs on them.)
    runs: list[tuple[sched.Schedule, Correction]] = []
    for s in schedules:
        if s.predictor:
            runs.append((s, predictors[s.predictor]))
            continue
        if plan.correction != "gamma1":
            runs.append((s, none_correction()))
        if plan.correction != "none":
            runs += [(s, corr) for corr in predictors.values()]
    candidates: list[Candidate] = []
    bar = tqdm(total=len(runs), desc="calibration: schedules", disable=not progress)

    def evaluate(s: sched.Schedule, corr: Correction) -> Candidate:
        ratios = extrapolation_ratios(s.full, timesteps)
        run = run_cached(
            spec, full_fn, cache_fn, cond, uncond, n_samples, seed, s.full,
            corr.coefficients(ratios), corr.masks(n, filter_hw), False, batched, corr.blends(ratios),
            corr.trends(ratios),
        )
        scores = psnr(run.final, reference)
        cand = Candidate(s, corr, float(scores.mean()), float(scores.min()),
                         float(np.sqrt(np.mean((run.final - reference) ** 2))), run.final)
        candidates.append(cand)
        bar.update(1)
        return cand

    for s, corr in runs:
        evaluate(s, corr)
    bar.close()

    # Refine the best corrected candidate on its schedule: for the mixed predictor, the mix λ (λ = 1 is
    # output extrapolation, 0 the cache trend alone); then a γ line search, per-stage γ and stage-aware
    # filters on the output trend; for the seed's predictor, also the local least-squares γ.
    corrected = [c for c in candidates if c.correction.name != "none"]
    top = max(corrected, key=lambda c: c.psnr_db) if corrected else None
    if top is not None and plan.correction in ("gamma", "auto") and plan.fit_gamma and top.schedule.n_cached:
        s = top.schedule
        for corr in predictors.values():  # every predictor on the top schedule: the ablation is in the report
            if not any(c.schedule is s and c.correction.name == corr.name for c in candidates):
                evaluate(s, corr)
        half = n // 2
        stage = [np.where(np.arange(n) < half, early, late).astype(float) for early, late in ((0.9, 1.1), (1.1, 0.9))]
        stage_names = [f"{early:g} before step {half}, {late:g} after" for early, late in ((0.9, 1.1), (1.1, 0.9))]
        if np.any(top.correction.cache_trend):
            mixes = [m for m in (0.0, 0.25, 0.75, 1.0) if m != top.correction.blend]
            for m in tqdm(mixes, desc="calibration: mix", disable=not progress):
                evaluate(s, Correction.mixed(m, n))
            best_mix = max((c for c in candidates if c.schedule is s and np.any(c.correction.cache_trend)),
                           key=lambda c: c.psnr_db).correction.blend
            refine = [Correction.mixed(best_mix, n, g) for g in GAMMA_SCALES]
            refine += [Correction.mixed(best_mix, n, g, name=f"cache trend, mix {best_mix:g}, gamma={label}")
                       for g, label in zip(stage, stage_names)]
            if plan.correction == "auto" and plan.filters and filter_hw is not None and best_mix:
                refine += [Correction.mixed(best_mix, n, 1.0, f, f"cache trend, mix {best_mix:g} + filter {f.name}")
                           for f in candidate_grid(n)[1:]]
        else:
            # One more γ = 1 run that also runs the full graph at cached steps: the fit's sums only
            # (its score is the γ = 1 candidate's, already kept).
            ones = gamma(1.0, "gamma=1")
            ratios = extrapolation_ratios(s.full, timesteps)
            sums = run_cached(spec, full_fn, cache_fn, cond, uncond, n_samples, seed, s.full, ones.coefficients(ratios),
                              None, True, batched).local_fit
            with np.errstate(invalid="ignore", divide="ignore"):
                local = np.where(sums[1] > 0, sums[0] / sums[1], np.nan)
            refine = [Correction("local least-squares gamma", np.where(np.isnan(local), 1.0, local))]
            refine += [gamma(g, f"gamma={g:g}") for g in GAMMA_SCALES]
            refine += [gamma(g, f"gamma={label}") for g, label in zip(stage, stage_names)]
            if plan.correction == "auto" and plan.filters and filter_hw is not None:
                refine += [gamma(1.0, f"gamma=1 + filter {f.name}", f) for f in candidate_grid(n)[1:]]
        for corr in tqdm(refine, desc="calibration: corrections", disable=not progress):
            evaluate(s, corr)
    best = max(candidates, key=lambda c: c.psnr_db)
    return CalibrationResult(
        timesteps=timesteps,
        curvature=curvature,
        best=best,
        candidates=candidates,
        ratios=extrapolation_ratios(best.schedule.full, timesteps),
        reference=reference,
        filter_hw=filter_hw,
    )


def measure_cost_ratio(full_fn: FullFn, cache_fn: CacheFn, feeds: dict, repeats: int = 5) -> tuple[float, float, float]:
    """(cost ratio c = cache/full, full ms, cache ms): medians over `repeats` runs after a warm-up."""
    out, caches = full_fn(feeds)
    cache_fn(feeds, caches)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3

    full_ms = timed(lambda: full_fn(feeds))
    cache_ms = timed(lambda: cache_fn(feeds, caches))
    return cache_ms / full_ms, full_ms, cache_ms
