"""The schedule candidates calibration scores, and the plan that bounds them."""

from __future__ import annotations

import dataclasses

import numpy as np

from omnicache_export.calibration import schedule as sched
from omnicache_export.calibration.correction import CorrectionSearch, Predictor
from omnicache_export.calibration.schedule import ScheduleFamily
from omnicache_export.calibration.schedule_corrected import PairCost, solve_pairwise_schedule, weighted


AUTO_MAX_CONSECUTIVE = 4  # `--max-consecutive auto`: the longest run it builds candidates for


def auto_run_limits(n_steps: int, n_cached: int, allow_last_cached: bool | None) -> list[int]:
    """`--max-consecutive auto`: the smallest run limit (at least 2) the cached count fits in, and the
    next one up (longer runs free the schedule; calibration picks by score), both at most
    AUTO_MAX_CONSECUTIVE. Raises ValueError where even runs of AUTO_MAX_CONSECUTIVE cannot hold it."""
    last = allow_last_cached is not False
    fits = [k for k in range(2, AUTO_MAX_CONSECUTIVE + 1) if n_cached <= sched.max_cached(n_steps, k, last)]
    if not fits:
        raise ValueError(f"{n_cached} cached steps of {n_steps} need runs longer than {AUTO_MAX_CONSECUTIVE} "
                         f"(at most {sched.max_cached(n_steps, AUTO_MAX_CONSECUTIVE, last)} fit)")
    return list(range(fits[0], min(fits[0] + 1, AUTO_MAX_CONSECUTIVE) + 1))


@dataclasses.dataclass
class CalibrationPlan:
    n_cached: int
    max_consecutive: int | None = None  # None: auto (`auto_run_limits`)
    allow_last_cached: bool | None = None  # None: candidates with the last step full and cached
    filters: bool = True
    fit_gamma: bool = True
    schedules: tuple[ScheduleFamily, ...] | None = None  # restrict the schedule families (ablations)
    correction: CorrectionSearch = CorrectionSearch.AUTO
    halving: bool = True  # score by successive halving (False: every candidate on every choosing row)

    def run_limits(self, n_steps: int) -> list[int]:
        """The run limits candidates are built for: the fixed one, or auto's."""
        if self.max_consecutive is not None:
            return [self.max_consecutive]
        return auto_run_limits(n_steps, self.n_cached, self.allow_last_cached)

    def __post_init__(self) -> None:
        self.correction = CorrectionSearch(self.correction)
        if self.schedules is not None:
            self.schedules = tuple(ScheduleFamily(s) for s in self.schedules)


def last_step_policies(plan: CalibrationPlan, n_steps: int) -> list[bool]:
    """allow_last_cached values to build candidates for: both where the plan leaves it open and the
    cached count fits with the last step full."""
    if plan.allow_last_cached is not None:
        return [plan.allow_last_cached]
    fits_full_last = plan.n_cached <= sched.max_cached(n_steps, max(plan.run_limits(n_steps)), False)
    return [False, True] if fits_full_last else [True]


def schedule_candidates(
    kappa: np.ndarray, plan: CalibrationPlan, n_steps: int, pair_errors: dict[Predictor, PairCost] | None = None,
    weights: dict[float, np.ndarray] | None = None,
) -> list[sched.Schedule]:
    """Curvature DP with runs of 1 and of up to each run limit of the plan, staleness-aware DP per
    limit, alternation, and (given each predictor's corrected errors on the reference run) the
    correction-aware DP for each predictor under each step weighting in `weights` (exponent p ->
    weights), named "... [predictor]"; each with the last step full and, where the plan allows, cached."""
    m, limits = plan.n_cached, plan.run_limits(n_steps)
    k, run_sets = max(limits), sorted({1, *limits})
    cost = np.nan_to_num(kappa[:n_steps], nan=0.0)
    out = []
    for last in last_step_policies(plan, n_steps):
        tail = ", last step cacheable" if last and plan.allow_last_cached is None else ""
        for key, errors in (pair_errors or {}).items():
            for runs in run_sets:  # runs of one: the local errors undercount how runs compound
                if m > sched.max_cached(n_steps, runs, last):
                    continue
                for p, w in (weights or {0.0: np.ones(n_steps)}).items():
                    name = f"corrected-error-dp (runs<={runs}, p={p:g}{tail}) [{key.value}]"
                    s = solve_pairwise_schedule(n_steps, m, weighted(errors, w), runs, last, name)
                    s.family, s.predictor = ScheduleFamily.CORRECTED_ERROR_DP, key.value
                    out.append(s)
        for runs in run_sets:
            if m <= sched.max_cached(n_steps, runs, last):
                s = sched.solve_schedule(n_steps, m, cost, runs, last)
                s.name, s.family = f"curvature-dp (runs<={runs}{tail})", ScheduleFamily.CURVATURE_DP
                out.append(s)
        for runs in (r for r in limits if r > 1 and m <= sched.max_cached(n_steps, r, last)):
            s = sched.solve_schedule(n_steps, m, sched.staleness_cost(cost), runs, last)
            s.name, s.family = f"staleness-dp (runs<={runs}{tail})", ScheduleFamily.STALENESS_DP
            out.append(s)
        s = sched.alternating_schedule(n_steps, m, k, last)
        s.name, s.family = "alternation" + (f" ({tail[2:]})" if tail else ""), ScheduleFamily.ALTERNATION
        out.append(s)
    if plan.schedules is not None:
        out = [s for s in out if s.family in plan.schedules]
        if not out:
            names = ", ".join(f.value for f in plan.schedules)
            raise ValueError(f"no schedule candidate of the families {names} fits {m} cached steps")
    unique: dict[tuple[str, str], sched.Schedule] = {}  # a DP's schedule runs with its own predictor only
    for s in out:
        unique.setdefault((s.pattern, s.predictor), s)
    return list(unique.values())
