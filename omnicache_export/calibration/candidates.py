"""The schedule candidates calibration scores, and the plan that bounds them."""

from __future__ import annotations

import dataclasses

import numpy as np

from omnicache_export.calibration import schedule as sched
from omnicache_export.calibration.correction import CorrectionSearch, Predictor
from omnicache_export.calibration.schedule import ScheduleFamily
from omnicache_export.calibration.schedule_corrected import PairCost, solve_pairwise_schedule, weighted


@dataclasses.dataclass
class CalibrationPlan:
    n_cached: int
    max_consecutive: int = 2
    allow_last_cached: bool | None = None  # None: candidates with the last step full and cached
    filters: bool = True
    fit_gamma: bool = True
    schedules: tuple[ScheduleFamily, ...] | None = None  # restrict the schedule families (ablations)
    correction: CorrectionSearch = CorrectionSearch.AUTO

    def __post_init__(self) -> None:
        self.correction = CorrectionSearch(self.correction)
        if self.schedules is not None:
            self.schedules = tuple(ScheduleFamily(s) for s in self.schedules)


def last_step_policies(plan: CalibrationPlan, n_steps: int) -> list[bool]:
    """allow_last_cached values to build candidates for: both where the plan leaves it open and the
    cached count fits with the last step full."""
    if plan.allow_last_cached is not None:
        return [plan.allow_last_cached]
    fits_full_last = plan.n_cached <= sched.max_cached(n_steps, plan.max_consecutive, False)
    return [False, True] if fits_full_last else [True]


def schedule_candidates(
    kappa: np.ndarray, plan: CalibrationPlan, n_steps: int, pair_errors: dict[Predictor, PairCost] | None = None,
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
                    name = f"corrected-error-dp (runs<={runs}, p={p:g}{tail}) [{key.value}]"
                    s = solve_pairwise_schedule(n_steps, m, weighted(errors, w), runs, last, name)
                    s.family, s.predictor = ScheduleFamily.CORRECTED_ERROR_DP, key.value
                    out.append(s)
        for runs in sorted({1, k}):
            if m <= sched.max_cached(n_steps, runs, last):
                s = sched.solve_schedule(n_steps, m, cost, runs, last)
                s.name, s.family = f"curvature-dp (runs<={runs}{tail})", ScheduleFamily.CURVATURE_DP
                out.append(s)
        if k > 1:
            s = sched.solve_schedule(n_steps, m, sched.staleness_cost(cost), k, last)
            s.name, s.family = f"staleness-dp (runs<={k}{tail})", ScheduleFamily.STALENESS_DP
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
