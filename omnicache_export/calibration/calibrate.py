"""Calibration: the schedule and the correction, chosen by the final deviation each actually causes.

The stages, in order:
1. `reference_run`: sampling without cache (the reference), its trajectories projected to 3-D and
   their curvature measured, and each step's feeds, output and caches recorded;
2. `schedule_candidates` (in `candidates`): schedules from curvature, staleness, alternation and
   the correction-aware DP on errors measured on those records (`pair_errors`);
3. `score`: each (schedule, correction) candidate sampled exactly as the runtime will (the same
   dispatch, the real cache graph with the candidate's tables fed as inputs), scored by the PSNR
   of the final latents against the reference on the same seeds and conditions, in rounds of
   successive halving (`halving`) on the choosing rows;
4. `refine`: on the best candidate's schedule, the mix, γ line search, per-stage and per-run-position
   γ, the cache trend through the last three full steps (second order, fitted line), filters;
5. `validate`: the chosen candidate on samples that played no part in the choice (`validation`):
   the figure the export reports.
Every candidate's score is kept for the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from omnicache_export.calibration import schedule as sched
from omnicache_export.calibration.candidates import CalibrationPlan, schedule_candidates
from omnicache_export.calibration.correction import (
    Correction,
    CorrectionSearch,
    CorrectionTables,
    Predictor,
    TrendFit,
    extrapolation_ratios,
    run_position_scale,
)
from omnicache_export.calibration.filters import candidate_grid
from omnicache_export.calibration.halving import DEFAULT_POLICY, HalvingPolicy, ScoringCost, play_rounds
from omnicache_export.calibration.validation import (
    DEFAULT_SEEDS,
    DEFAULT_SHARE,
    DEFAULT_VALIDATION,
    RowSplit,
    Validation,
    split_rows,
)
from omnicache_export.calibration.schedule_corrected import PairCost, corrected_errors
from omnicache_export.calibration.sensitivity import frozen_output_gains, step_weights
from omnicache_export.calibration.trajectory import CurvatureStats, trajectory_curvature
from omnicache_export.runtime.dispatch import CacheState, StepDispatch
from omnicache_export.runtime.generation import StepRecord, sample_rows
from omnicache_export.runtime.sampler import Denoiser, SamplingSpec, timesteps_of

logger = logging.getLogger(__name__)

GAMMA_SCALES = (0.8, 0.9, 1.1, 1.2)  # line search around gamma = 1 on the final deviation
SENSITIVITY_EXPONENTS = (0.0, 0.25, 0.5)  # step weights of the correction-aware DP (`sensitivity`)
RECORD_BUDGET_BYTES = 2 << 30  # the reference run's per-step records for the correction-aware schedule
MIXES = (0.0, 0.25, 0.75, 1.0)
POSITION_DECAYS = (0.8, 0.9, 1.1)  # γ per position p in a run of cached steps: decay^(p − 1)
# The cache trend through the last three full steps, for runs of cached steps: (fit, σ damping)
LONG_RUN_FITS = ((TrendFit.QUADRATIC, 1.0), (TrendFit.QUADRATIC, 0.5), (TrendFit.FITTED3, 1.0))


@dataclasses.dataclass
class CalibrationGraphs:
    """Calibration's engines behind the one dispatch: the full graph with the parametric cache graph
    (correction tables as inputs), and the one that also filters, built on first use."""

    plain: StepDispatch
    make_filtered: Callable[[], StepDispatch] | None = None
    _filtered: StepDispatch | None = None

    def dispatch_for(self, tables: CorrectionTables) -> StepDispatch:
        if not tables.has_filter:
            return self.plain
        if self.make_filtered is None:
            raise ValueError("a filter candidate needs the filtering cache graph")
        if self._filtered is None:
            self._filtered = self.make_filtered()
        return self._filtered

    def close(self) -> None:
        self.plain.close()
        if self._filtered is not None:
            self._filtered.close()


@dataclasses.dataclass
class CalibrationSet:
    """The conditions and seed calibration samples: rows of `cond` (sample axis first for `batched`),
    `batch_size` rows per generation (None: all at once; the job picks it from a memory estimate,
    `pipeline.memory`), the bytes the reference run may keep as records, and how the rows split into
    the ones that choose and the ones that validate (`validation`)."""

    spec: SamplingSpec
    cond: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    seed: int
    batched: set[str]
    n_samples: int
    batch_size: int | None = None
    record_budget: int = RECORD_BUDGET_BYTES
    validation: Validation = DEFAULT_VALIDATION
    validation_share: float = DEFAULT_SHARE
    validation_seeds: int = DEFAULT_SEEDS

    @property
    def split(self) -> RowSplit:
        return split_rows(self.n_samples, self.seed, self.validation, self.validation_share, self.validation_seeds)

    def sample(self, dispatch: StepDispatch, full: np.ndarray, tables: CorrectionTables | None = None,
               rows=None, seed: int | None = None, **kwargs):
        """The samples of `rows` (default: every row) at `seed` (default: the set's), in batches of
        `batch_size`. Candidates may go non-finite (they score as such): only callers that pass
        `check_finite=True` (the reference run) fail on it."""
        fed = dispatch.tables_as_fed(tables.inputs()) if tables is not None and dispatch.table_names else None
        kwargs.setdefault("check_finite", False)
        rows = list(range(self.n_samples)) if rows is None else list(rows)
        cond, uncond = ({k: (v[rows] if k in self.batched else v) for k, v in d.items()} for d in (self.cond, self.uncond))
        return sample_rows(dispatch, self.spec, full, cond, uncond, self.seed if seed is None else seed,
                           batched=self.batched, rows=rows, tables=fed, batch_size=self.batch_size, **kwargs)


def psnr(result: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample PSNR in dB, the peak being each reference sample's value range."""
    axes = tuple(range(1, reference.ndim))
    mse = np.mean((result - reference) ** 2, axis=axes)
    peak = reference.max(axis=axes) - reference.min(axis=axes)
    return 10 * np.log10(np.maximum(peak, 1e-12) ** 2 / np.maximum(mse, 1e-20))


@dataclasses.dataclass
class Candidate:
    schedule: sched.Schedule
    correction: Correction
    psnr_db: float = float("nan")
    psnr_min_db: float = float("nan")
    rmse: float = float("nan")
    final: np.ndarray | None = None  # [rows scored, ...], kept while it may win
    rows: tuple[int, ...] = ()  # the calibration rows it was scored on (successive halving stops losers early)
    scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # PSNR per row scored
    sq_err: float = 0.0  # summed squared error over the rows scored
    size: int = 0  # elements per row
    batch: int = -1  # which of the scorer's tournaments it was scored in

    @property
    def rank(self) -> float:
        """What candidates are chosen by: the mean PSNR, a non-finite run (NaN) last."""
        return self.psnr_db if np.isfinite(self.psnr_db) or self.psnr_db == np.inf else -np.inf

    def to_json(self) -> dict:
        return {
            "schedule": self.schedule.name,
            "family": self.schedule.family.value,
            "pattern": self.schedule.pattern,
            "correction": self.correction.name,
            "n_full": self.schedule.n_full,
            "n_cached": self.schedule.n_cached,
            "psnr_db": round(float(self.psnr_db), 3),
            "psnr_min_db": round(float(self.psnr_min_db), 3),
            "rmse": float(self.rmse),
            "n_samples": len(self.rows),
        }


@dataclasses.dataclass
class ValidationScore:
    """The chosen candidate on the validation rows at each validation seed (`validation`): PSNR
    mean and min (dB) over those samples, and each sample's [seed, row]."""

    mode: Validation
    rows: tuple[int, ...]
    seeds: tuple[int, ...]
    psnr_db: float
    psnr_min_db: float
    scores: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return len(self.rows) * len(self.seeds)


@dataclasses.dataclass
class CalibrationResult:
    timesteps: np.ndarray
    curvature: CurvatureStats
    best: Candidate
    candidates: list[Candidate]
    ratios: np.ndarray
    reference: np.ndarray  # final latents without cache of the choosing rows [rows, ...] (`best.final`'s)
    filter_hw: tuple[int, int] | None
    split: RowSplit | None = None
    validation: ValidationScore | None = None
    cost: ScoringCost | None = None
    seconds: float = 0.0
    max_consecutive: int = 2  # the largest run limit calibration built candidates for
    max_consecutive_auto: bool = False

    def tables(self) -> CorrectionTables:
        """The chosen correction's tables, as the export freezes them."""
        return CorrectionTables.build(self.best.correction, self.best.schedule.full, self.timesteps, self.filter_hw)


# ------------------------------------------------------------------ stage 1: the reference run


@dataclasses.dataclass
class ReferenceRun:
    final: np.ndarray
    curvature: CurvatureStats
    records: list[tuple[dict, torch.Tensor, dict]]  # per step: model feeds, output, caches (one batch)
    x0: np.ndarray  # the first sample's initial latent


def reference_run(graphs: CalibrationGraphs, data: CalibrationSet, progress: bool, rows=None) -> ReferenceRun:
    """Sampling without cache, batch by batch: the final latents of every sample, the curvature of
    every trajectory (each batch's trajectories are reduced to curvature and dropped; the 3-D
    projections of the first batch are kept for the report), and the first batch's per-step records
    within `data.record_budget`. Fails (UserError) where the reference itself goes non-finite."""
    d, n = graphs.plain, data.spec.n_steps
    records: list = []
    keep = {"on": True}
    per_sample: list[np.ndarray] = []
    first: dict = {}

    def on_trajectory(batch: int, traj: np.ndarray) -> None:
        stats = trajectory_curvature(traj)
        per_sample.append(stats.per_sample)
        if batch == 0:
            first["projections"], first["x0"] = stats.projections, traj[:1, 0].copy()

    def observer(batch: int):
        if batch > 0:  # the correction-aware schedule is measured on the first batch alone: keep its records
            return None

        def record(r: StepRecord) -> None:
            if not keep["on"]:
                return
            step_bytes = sum(t.nbytes for t in [*r.model_feeds.values(), *r.outputs.values()])
            if step_bytes * n > data.record_budget:  # big models: skip that candidate, keep memory
                keep["on"] = False
                records.clear()
                logger.info("correction-aware schedule skipped: %d MB of records needed", step_bytes * n >> 20)
                return
            out = r.outputs[d.output].clone()
            records.append(({k: v.clone() for k, v in r.model_feeds.items()}, out,
                            {k: r.outputs[k].clone() for k in d.cache_names}))

        return record

    logger.info("pass 1: reference samples, %d steps", n)
    run = data.sample(d, np.ones(n, bool), rows=rows, no_cache=True, record=True, observer=observer,
                      on_trajectory=on_trajectory, check_finite=True)
    per = np.concatenate(per_sample)
    with np.errstate(invalid="ignore"):
        curvature = CurvatureStats(mean=per.mean(axis=0), std=per.std(axis=0), per_sample=per,
                                   projections=first["projections"])
    return ReferenceRun(run.final, curvature, records, first["x0"])


# ------------------------------------------------------------------ stage 2: the DP's measured errors


def pair_estimate(corr: Correction, records: list, dispatch: StepDispatch, timesteps: np.ndarray):
    """estimate(i, j, j2): step i's output as the cache graph predicts it, with `corr` (at the scalar
    parameters of its first corrected step), from the reference run's records of steps j (the last
    full step) and j2 (the full step before; -1: none): what the runtime computes at a cached step i
    on the reference trajectory. The real cache graph runs it, fed from a cache state built from
    the records."""
    g = np.nan_to_num(corr.gammas)
    gamma_, s = (float(g[0]) if g.size else 0.0), float(np.ravel(corr.cache_trend)[0])
    n = len(timesteps)
    runner = dispatch.cache.runner()
    steps = dispatch.step_indices(n)
    names = [dispatch.output, *dispatch.cache_names]

    def state(j: int, j2: int) -> CacheState:
        newer = {dispatch.output: records[j][1], **records[j][2]}
        older = {dispatch.output: records[j2][1], **records[j2][2]} if j2 >= 0 else \
            {k: torch.zeros_like(v) for k, v in newer.items()}
        depth = {k: 2 if k == dispatch.output else dispatch.cache_depth for k in names}
        # a third cache buffer (a second-order graph) is fed only after three full steps: never here
        return CacheState.holding(dispatch.output, {k: [newer[k], *[older[k]] * (depth[k] - 1)] for k in names},
                                  2 if j2 >= 0 else 1)

    def estimate(i: int, j: int, j2: int) -> np.ndarray:
        a = 0.0
        if j2 >= 0 and timesteps[j] != timesteps[j2]:
            a = (timesteps[i] - timesteps[j]) / (timesteps[j] - timesteps[j2])
        tables = CorrectionTables.single_step(n, i, gamma_ * a, corr.blend if a else 0.0, s * a)
        feeds = dispatch.cache_feeds(i, records[i][0], state(j, j2), dispatch.tables_as_fed(tables.inputs()), steps)
        return runner.infer(feeds, names=[dispatch.output])[dispatch.output].numpy()

    return estimate


def pair_errors(graphs: CalibrationGraphs, ref: ReferenceRun, predictors: dict[Predictor, Correction],
                timesteps: np.ndarray) -> dict[Predictor, PairCost]:
    outputs = [r[1].numpy() for r in ref.records]
    return {key: corrected_errors(outputs, pair_estimate(corr, ref.records, graphs.plain, timesteps))
            for key, corr in predictors.items()}


def dp_weights(spec: SamplingSpec, ref: ReferenceRun, timesteps: np.ndarray) -> dict[float, np.ndarray]:
    """The DP's step weights from how much a frozen output at each step moves the final latent."""
    den = Denoiser(spec)
    gains = frozen_output_gains(spec, [den.guided(r[1])[:1] for r in ref.records], torch.from_numpy(ref.x0[None]))
    return {p: step_weights(gains, timesteps, p) for p in SENSITIVITY_EXPONENTS}


# ------------------------------------------------------------------ stage 3: scoring


class Scorer:
    """Scores candidates on the choosing rows against the reference, in rounds of successive halving
    (`halving`; or every candidate on every row, `halving=False`); keeps every one, and counts the
    model evaluations."""

    def __init__(self, graphs: CalibrationGraphs, data: CalibrationSet, reference: np.ndarray, timesteps: np.ndarray,
                 hw: tuple[int, int] | None, halving: bool = True, policy: HalvingPolicy = DEFAULT_POLICY):
        self.graphs, self.data, self.timesteps, self.hw = graphs, data, timesteps, hw
        self.rows = data.split.choose
        self.reference = reference[list(self.rows)]  # reference: every calibration row, in row order
        self.candidates: list[Candidate] = []
        self.batches = 0  # tournaments run
        self.cost = ScoringCost(halving=halving)
        self.policy = policy
        self.rounds = policy.rounds(len(self.rows)) if halving else [len(self.rows)]

    @property
    def complete(self) -> list[Candidate]:
        """The candidates scored on every choosing row: the ones that may be chosen."""
        return [c for c in self.candidates if len(c.rows) == len(self.rows)]

    def best(self) -> Candidate:
        return max(self.complete, key=lambda c: c.rank)  # `max` keeps the first of equals

    def _extend(self, cand: Candidate, n_rows: int) -> None:
        """Score `cand` on the choosing rows it has not seen, up to the first `n_rows`."""
        new = self.rows[len(cand.rows):n_rows]
        if not new:
            return
        t0 = time.perf_counter()
        s, corr = cand.schedule, cand.correction
        tables = CorrectionTables.build(corr, s.full, self.timesteps, self.hw)
        final = self.data.sample(self.graphs.dispatch_for(tables), s.full, tables, rows=new).final
        ref = self.reference[len(cand.rows):n_rows]
        cand.scores = np.concatenate([cand.scores, psnr(final, ref)])
        cand.sq_err += float(np.sum((final.astype(np.float64) - ref) ** 2))
        cand.size = final[0].size
        cand.final = final if cand.final is None or not len(cand.rows) else np.concatenate([cand.final, final])
        cand.rows = (*cand.rows, *new)
        cand.psnr_db, cand.psnr_min_db = float(cand.scores.mean()), float(cand.scores.min())
        cand.rmse = float(np.sqrt(cand.sq_err / (cand.size * len(cand.rows))))
        self.cost.scored(len(new), s.n_steps)
        self.cost.scoring_seconds += time.perf_counter() - t0

    def tournament(self, runs: list[tuple[sched.Schedule, Correction]], progress: bool = False,
                   desc: str = "calibration") -> list[Candidate]:
        """Score a batch of candidates by successive halving: every one on the first round's rows,
        the ones `policy` keeps on twice as many, …, the last survivors on every choosing row."""
        batch = [Candidate(s, corr, batch=self.batches) for s, corr in runs]
        self.batches += 1
        self.candidates += batch
        for c in batch:
            self.cost.candidate(len(self.rows), c.schedule.n_steps)
        bar = tqdm(total=len(batch), desc=desc, disable=not progress)
        first = self.rounds[0]

        def extend(i: int, size: int) -> None:
            self._extend(batch[i], size)
            bar.update(1 if size == first else 0)

        def dropped(i: int) -> None:  # a loser's latents are not kept
            batch[i].final = None

        play_rounds(self.policy, self.rounds, len(batch), extend, lambda i: batch[i].rank, dropped)
        bar.close()
        self._keep_best_final()
        return batch

    def score(self, s: sched.Schedule, corr: Correction) -> Candidate:
        return self.tournament([(s, corr)])[0]

    def _keep_best_final(self) -> None:
        """Only the best complete candidate keeps its final latents (verification needs the chosen
        one's): K samples' latents per candidate would grow with --num-calib times the candidate count."""
        complete = self.complete
        best = max(complete, key=lambda c: c.rank) if complete else None
        for c in self.candidates:
            if c is not best:
                c.final = None

    def has(self, s: sched.Schedule, name: str) -> bool:
        return any(c.schedule is s and c.correction.name == name for c in self.complete)

    def local_least_squares_gamma(self, s: sched.Schedule) -> np.ndarray:
        """γ_i fitted at each cached step on the γ = 1 run: n_i = õ_i − o_i against q_i = −a_i (o_j − o_j'),
        the full graph run beside the cache graph at cached steps (its output only)."""
        n = len(s.full)
        ones = Correction.gamma(1.0, n, "gamma=1")
        tables = CorrectionTables.build(ones, s.full, self.timesteps, None)
        d = self.graphs.plain
        sums = np.zeros((2, n))
        truth_runner = d.full.runner()

        def observer(batch: int):
            def fit(r: StepRecord) -> None:
                if r.full or not tables.coefficients[r.i]:
                    return
                truth = truth_runner.infer(d.full_feeds(r.model_feeds), names=[d.output])[d.output]
                q = -float(tables.coefficients[r.i]) * (r.state.prev - r.state.prev2).double()
                sums[0, r.i] += float((q * (r.outputs[d.uncorrected].double() - truth.double())).sum())
                sums[1, r.i] += float((q * q).sum())

            return fit

        try:
            self.data.sample(d, s.full, tables, rows=self.rows, observer=observer, uncorrected=True)
        finally:
            truth_runner.close()
        self.cost.other(len(self.rows), n + s.n_cached)  # the full graph beside each cached step
        with np.errstate(invalid="ignore", divide="ignore"):
            local = np.where(sums[1] > 0, sums[0] / sums[1], np.nan)
        return np.where(np.isnan(local), 1.0, local)


# ------------------------------------------------------------------ stage 4: refinement


def refinements(scorer: Scorer, top: Candidate, plan: CalibrationPlan, n: int, progress: bool) -> list[Correction]:
    """On the top candidate's schedule: for the mixed predictor the mix λ (1: output extrapolation,
    0: the cache trend alone), then a γ line search, per-stage γ, a γ per position in the run of
    cached steps (where runs are longer than one), the cache trend through the last three full
    steps (`long_run_trends`) and stage-aware filters; for the seed's predictor also the local
    least-squares γ."""
    s, hw = top.schedule, scorer.hw
    half = n // 2
    stage = [np.where(np.arange(n) < half, early, late).astype(float) for early, late in ((0.9, 1.1), (1.1, 0.9))]
    stage_names = [f"{early:g} before step {half}, {late:g} after" for early, late in ((0.9, 1.1), (1.1, 0.9))]
    positions = [(d, run_position_scale(s.full, d)) for d in POSITION_DECAYS] if s.max_run > 1 else []
    filters = plan.correction == CorrectionSearch.AUTO and plan.filters and hw is not None
    if top.correction.has_trend:
        scorer.tournament([(s, Correction.mixed(m, n)) for m in MIXES if m != top.correction.blend], progress,
                          "calibration: mix")
        best_mix = max((c for c in scorer.complete if c.schedule is s and c.correction.has_trend),
                       key=lambda c: c.rank).correction.blend
        refine = [Correction.mixed(best_mix, n, g) for g in GAMMA_SCALES]
        refine += [Correction.mixed(best_mix, n, g, name=f"cache trend, mix {best_mix:g}, gamma={label}")
                   for g, label in zip(stage, stage_names)]
        refine += [Correction.mixed(best_mix, n, g, name=f"cache trend, mix {best_mix:g}, gamma={d:g}^(run position-1)")
                   for d, g in positions]
        refine += long_run_trends(s, best_mix, 1.0, scorer.timesteps)
        if filters and best_mix:
            refine += [Correction.mixed(best_mix, n, 1.0, f, f"cache trend, mix {best_mix:g} + filter {f.name}")
                       for f in candidate_grid(n)[1:]]
        return refine
    refine = [Correction("local least-squares gamma", scorer.local_least_squares_gamma(s))]
    refine += [Correction.gamma(g, n, f"gamma={g:g}") for g in GAMMA_SCALES]
    refine += [Correction.gamma(g, n, f"gamma={label}") for g, label in zip(stage, stage_names)]
    refine += [Correction.gamma(g, n, f"gamma={d:g}^(run position-1)") for d, g in positions]
    if filters:
        refine += [Correction.gamma(1.0, n, f"gamma=1 + filter {f.name}", f) for f in candidate_grid(n)[1:]]
    return refine


def long_run_trends(s: sched.Schedule, mix: float, gamma: float, timesteps: np.ndarray) -> list[Correction]:
    """The cache trend through the last three full steps (LONG_RUN_FITS) at mix λ and global γ, on a
    schedule with runs of two or more cached steps where three full steps precede some cached step
    (elsewhere they are the first-order trend: not worth scoring again)."""
    if s.max_run < 2:
        return []
    n = s.n_steps
    out = [Correction.mixed(mix, n, gamma, fit=fit, damping=damping) for fit, damping in LONG_RUN_FITS]
    return [c for c in out if CorrectionTables.build(c, s.full, timesteps, None).has_trend2]


def long_run_at_best_gamma(scorer: Scorer, s: sched.Schedule) -> list[Correction]:
    """Where the best so far is the first-order cache trend at a global γ ≠ 1 on `s`: the three-point
    fits at that γ too (γ scales their whole trend, as it does the first order's)."""
    best = scorer.best()
    corr = best.correction
    scale = np.unique(np.asarray(corr.cache_trend, float))
    if (best.schedule is not s or not corr.has_trend or corr.trend_fit is not TrendFit.LAST_TWO or len(scale) != 1
            or scale[0] == 1.0 or not corr.filter.is_all_pass):
        return []
    return [c for c in long_run_trends(s, corr.blend, float(scale[0]), scorer.timesteps)
            if not scorer.has(s, c.name)]


def validate(graphs: CalibrationGraphs, data: CalibrationSet, best: Candidate, timesteps: np.ndarray,
             hw: tuple[int, int] | None, cost: ScoringCost) -> ValidationScore:
    """The chosen candidate against sampling without cache on the validation rows, which played no
    part in the choice (`validation`)."""
    split, n = data.split, len(timesteps)
    tables = CorrectionTables.build(best.correction, best.schedule.full, timesteps, hw)
    scores = []
    for seed in split.validation_seeds:
        reference = data.sample(graphs.plain, np.ones(n, bool), rows=split.validate, seed=seed,
                                no_cache=True, check_finite=True).final
        final = data.sample(graphs.dispatch_for(tables), best.schedule.full, tables, rows=split.validate,
                            seed=seed).final
        cost.other(2 * len(split.validate), n)
        scores.append(psnr(final, reference))
    scores = np.stack(scores)
    return ValidationScore(split.mode, split.validate, split.validation_seeds, float(scores.mean()), float(scores.min()),
                           scores)


# ------------------------------------------------------------------ the calibration


def predictors_for(plan: CalibrationPlan, n: int) -> dict[Predictor, Correction]:
    """The predictors the correction-aware DP plans for: the seed's (γ = 1 on the cache output) and
    ours (cache trend averaged with output extrapolation)."""
    out = {Predictor.GAMMA: Correction.gamma(1.0, n, Predictor.GAMMA.value)}
    if plan.correction in (CorrectionSearch.GAMMA, CorrectionSearch.AUTO):
        out[Predictor.CACHE_TREND] = Correction.mixed(0.5, n)
    return out


def calibrate(graphs: CalibrationGraphs, data: CalibrationSet, plan: CalibrationPlan,
              filter_hw: tuple[int, int] | None, progress: bool = True) -> CalibrationResult:
    t0 = time.perf_counter()
    spec = data.spec
    n = spec.n_steps
    timesteps = timesteps_of(spec)
    split = data.split
    ref = reference_run(graphs, data, progress, rows=split.choose)  # the validation rows stay unseen
    reference = np.zeros((data.n_samples, *ref.final.shape[1:]), ref.final.dtype)
    reference[list(split.choose)] = ref.final
    predictors = predictors_for(plan, n)

    errors: dict[Predictor, PairCost] = {}
    weights = None
    if (plan.n_cached and ref.records and plan.correction != CorrectionSearch.NONE
            and (plan.schedules is None or sched.ScheduleFamily.CORRECTED_ERROR_DP in plan.schedules)):
        errors = pair_errors(graphs, ref, predictors, timesteps)
        weights = dp_weights(spec, ref, timesteps)
    schedules = (schedule_candidates(ref.curvature.mean, plan, n, errors, weights) if plan.n_cached
                 else [sched.Schedule(np.ones(n, bool), name="no cache", family=sched.ScheduleFamily.NO_CACHE)])
    ref.records.clear()

    # Every schedule uncorrected and with each predictor at γ = 1: which steps are cached matters with
    # a correction. (The DP's schedules are built for one predictor: only that one runs on them.)
    runs: list[tuple[sched.Schedule, Correction]] = []
    for s in schedules:
        if s.predictor:
            runs.append((s, predictors[Predictor(s.predictor)]))
            continue
        if plan.correction != CorrectionSearch.GAMMA1:
            runs.append((s, Correction.none(n)))
        if plan.correction != CorrectionSearch.NONE:
            runs += [(s, corr) for corr in predictors.values()]
    scorer = Scorer(graphs, data, reference, timesteps, filter_hw, halving=plan.halving)
    scorer.cost.other(len(split.choose), n)  # the reference run
    scorer.tournament(runs, progress, "calibration: schedules")

    corrected = [c for c in scorer.complete if not c.correction.is_none]
    top = max(corrected, key=lambda c: c.rank) if corrected else None
    if (top is not None and plan.correction in (CorrectionSearch.GAMMA, CorrectionSearch.AUTO) and plan.fit_gamma
            and top.schedule.n_cached):
        # every predictor on the top schedule: the ablation is in the report
        scorer.tournament([(top.schedule, corr) for corr in predictors.values()
                           if not scorer.has(top.schedule, corr.name)])
        scorer.tournament([(top.schedule, corr) for corr in refinements(scorer, top, plan, n, progress)], progress,
                          "calibration: corrections")
        again = long_run_at_best_gamma(scorer, top.schedule)
        if again:
            scorer.tournament([(top.schedule, corr) for corr in again], progress, "calibration: long-run trends")
    best = scorer.best()
    validation = validate(graphs, data, best, timesteps, filter_hw, scorer.cost)
    limits = plan.run_limits(n)
    return CalibrationResult(timesteps, ref.curvature, best, scorer.candidates,
                             extrapolation_ratios(best.schedule.full, timesteps), scorer.reference, filter_hw,
                             split, validation, scorer.cost, time.perf_counter() - t0, max(limits),
                             plan.max_consecutive is None)


def measure_cost_ratio(dispatch: StepDispatch, data: CalibrationSet, repeats: int = 5) -> tuple[float, float, float]:
    """(cost ratio c = cache/full, full ms, cache ms): medians over `repeats` runs after a warm-up,
    of one sample's (or the static batch's) full and cache graph steps, as the dispatch feeds them."""
    from omnicache_export.runtime.generation import Generation
    from omnicache_export.runtime.sampler import to_torch

    spec = data.spec
    size = spec.chunk or 1
    pick = lambda d: {k: (np.repeat(v[:1], size, axis=0) if k in data.batched else v) for k, v in d.items()}  # noqa: E731
    den = Denoiser(spec, dispatch.device)
    gen = Generation(dispatch, spec, np.ones(spec.n_steps, bool), to_torch(pick(data.cond)), to_torch(pick(data.uncond)),
                     den.initial_latents([0] * size, data.seed))
    try:
        gen.step()
        gen.step()
        feeds = gen.den.feeds(gen.i, gen.x, gen.static)
        n = spec.n_steps
        tables = CorrectionTables.single_step(n, gen.i, 0.0, 0.0, 0.0)
        fed = dispatch.tables_as_fed(tables.inputs()) if dispatch.table_names else None
        cache_feeds = dispatch.cache_feeds(gen.i, feeds, gen.state, fed, gen.steps)
        out = {dispatch.output: torch.empty_like(gen.state.prev)}
        full_feeds = dispatch.full_feeds(feeds)
        targets = gen.state.targets()

        def timed(fn) -> float:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return float(np.median(times)) * 1e3

        full_ms = timed(lambda: gen.full_runner.infer(full_feeds, outputs=targets))
        cache_ms = timed(lambda: dispatch.run_cached(gen.cache_runner, cache_feeds, out))
    finally:
        gen.close()
    return cache_ms / full_ms, full_ms, cache_ms
