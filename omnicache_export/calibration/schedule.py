"""Static cache schedules (METHOD.md, pass 1, step 4) and named baseline schedules.

Step i = 0 .. N-1 is either full (runs the whole model, refreshes the cache) or cached
(reuses the last full step's cache). Constraints shared by every schedule here: step 0 is
full; no run of more than `max_consecutive` cached steps; step N-1 is full unless
`allow_last_cached`. (`uniform_schedule` is the FORA baseline and ignores the run limit.)

The exact schedule minimises sum_{i in C} cost(i, r_i) over cached sets C of size M, where
r_i = 1 for the first cached step after a full step, 2 for the second, ... (the staleness of
the reused cache, in steps). Dynamic programming over (step, run length, count) is exact.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np

__all__ = [
    "ScheduleFamily",
    "CostFn",
    "Schedule",
    "per_step_cost",
    "staleness_cost",
    "solve_schedule",
    "alternating_schedule",
    "uniform_schedule",
    "max_cached",
    "n_cached_for",
    "speedup_of",
    "schedule_cost",
]

class ScheduleFamily(str, enum.Enum):
    """How a schedule was made (its `name` is for display only)."""

    CURVATURE_DP = "curvature-dp"  # the seed's DP on trajectory curvature
    STALENESS_DP = "staleness-dp"  # the DP with the curvature accumulated since the last full step
    ALTERNATION = "alternation"
    CORRECTED_ERROR_DP = "corrected-error-dp"  # the DP on measured corrected errors (ours)
    NO_CACHE = "no-cache"
    GIVEN = "given"  # from a pattern or elsewhere


CostFn = Callable[[int, int], float]
"""cost(i, run): cost of caching step i as the run-th consecutive cached step (run >= 1)."""
CostLike = Union[CostFn, Sequence[float], np.ndarray]


def per_step_cost(kappa: Sequence[float] | np.ndarray) -> CostFn:
    """cost(i, run) = kappa[i], independent of staleness (the objective as the seed states it)."""
    k = np.asarray(kappa, dtype=np.float64)
    return lambda i, run: float(k[i])


def staleness_cost(kappa: Sequence[float] | np.ndarray) -> CostFn:
    """cost(i, run) = sum_{k=i-run+1..i} kappa[k]: all the turning since the last full step.

    Back-to-back cached steps then pay for the accumulated drift, which per-step costs ignore
    (METHOD.md measured +1.4 dB from this alone). Never touches kappa[0] (step 0 is full).
    """
    k = np.asarray(kappa, dtype=np.float64)
    return lambda i, run: float(k[i - run + 1 : i + 1].sum())


def _as_cost_fn(cost: CostLike, n_steps: int) -> CostFn:
    if callable(cost):
        return cost
    arr = np.asarray(cost, dtype=np.float64)
    if arr.ndim != 1 or arr.size < n_steps:
        raise ValueError(f"a cost array needs at least {n_steps} entries (one per step), got shape {arr.shape}")
    return per_step_cost(arr)


def _check_n_steps(n_steps: int) -> None:
    if n_steps < 3:
        raise ValueError(f"a cache schedule needs at least 3 steps, got {n_steps}")


@dataclass(eq=False)
class Schedule:
    """A static schedule. full[i] is True where step i runs the full model."""

    full: np.ndarray  # bool [N]
    total_cost: float = float("nan")  # objective value; NaN when no cost was given
    name: str = ""
    family: ScheduleFamily = ScheduleFamily.GIVEN
    predictor: str = ""  # the correction a correction-aware DP planned it for ("": any)
    _reuse: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.full = np.asarray(self.full, dtype=bool).copy()
        if self.full.ndim != 1 or self.full.size == 0 or not self.full[0]:
            raise ValueError("a schedule is a non-empty 1-D bool array with step 0 full")
        last = np.where(self.full, np.arange(self.full.size), -1)
        self._reuse = np.maximum.accumulate(last)

    @classmethod
    def from_pattern(cls, pattern: str, cost: CostLike | None = None, name: str = "") -> "Schedule":
        """From a string like 'FCFCCF' (F = full, C = cached)."""
        if set(pattern) - {"F", "C"}:
            raise ValueError(f"pattern must contain only 'F' and 'C', got {pattern!r}")
        s = cls(np.array([ch == "F" for ch in pattern]), name=name)
        if cost is not None:
            s.total_cost = schedule_cost(s.full, cost)
        return s

    @property
    def n_steps(self) -> int:
        return int(self.full.size)

    @property
    def n_full(self) -> int:
        return int(self.full.sum())

    @property
    def n_cached(self) -> int:
        return self.n_steps - self.n_full

    @property
    def cached(self) -> np.ndarray:
        """Indices of the cached steps."""
        return np.flatnonzero(~self.full)

    @property
    def pattern(self) -> str:
        return "".join("F" if f else "C" for f in self.full)

    @property
    def reuse_from(self) -> np.ndarray:
        """[N] int: for a cached step i, the last full step j < i; -1 at full steps."""
        return np.where(self.full, -1, self._reuse)

    @property
    def prev_full2(self) -> np.ndarray:
        """[N] int: for a cached step i, the full step before reuse_from[i] (-1 if none or full)."""
        before = np.concatenate([[-1], self._reuse[:-1]])  # last full step < i
        j = self.reuse_from
        out = np.where(j > 0, before[np.maximum(j, 0)], -1)
        return np.where(self.full, -1, out)

    @property
    def staleness(self) -> np.ndarray:
        """[N] int: i - reuse_from[i] at cached steps (1 = reusing the previous step), 0 at full."""
        return np.where(self.full, 0, np.arange(self.n_steps) - self._reuse)

    @property
    def max_run(self) -> int:
        return int(self.staleness.max(initial=0))

    def validate(self, max_consecutive: int = 2, allow_last_cached: bool = False) -> None:
        """Raise ValueError unless the schedule meets the constraints."""
        if self.max_run > max_consecutive:
            raise ValueError(f"{self.pattern}: run of {self.max_run} cached steps > {max_consecutive}")
        if not allow_last_cached and not self.full[-1]:
            raise ValueError(f"{self.pattern}: the last step must be full")


def schedule_cost(full: np.ndarray, cost: CostLike) -> float:
    """sum over cached steps of cost(i, run)."""
    full = np.asarray(full, dtype=bool)
    fn = _as_cost_fn(cost, full.size)
    total, run = 0.0, 0
    for i, f in enumerate(full):
        run = 0 if f else run + 1
        if not f:
            total += fn(i, run)
    return total


def max_cached(n_steps: int, max_consecutive: int = 2, allow_last_cached: bool = False) -> int:
    """Largest feasible number of cached steps.

    The L = N-1 (or N-2 with the last step full) free steps hold at most L - floor(L/(k+1))
    cached steps: runs of k separated by single full steps.
    """
    _check_n_steps(n_steps)
    if max_consecutive < 0:
        raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
    free = n_steps - 1 if allow_last_cached else n_steps - 2
    return free - free // (max_consecutive + 1)


def speedup_of(n_steps: int, n_cached: int, cost_ratio: float) -> float:
    """N / (N - M + M c): ideal speedup when a cached step costs c full steps."""
    return n_steps / (n_steps - n_cached + n_cached * cost_ratio)


def _limits(n_steps: int, max_consecutive: int, allow_last_cached: bool) -> str:
    s = f"with --max-consecutive {max_consecutive}"
    return s if allow_last_cached else s + " and the last step full"


def n_cached_for(
    n_steps: int,
    cache_ratio: float | None = None,
    speedup: float | None = None,
    cost_ratio: float | None = None,
    max_consecutive: int = 2,
    allow_last_cached: bool = False,
) -> int:
    """Number of cached steps M from a cache ratio or a speedup target.

    cache_ratio: M = round(ratio * N), halves rounded up. speedup: the smallest M with
    N / (N - M + M c) >= speedup, c = cost_ratio (measured cost of a cached step relative to a
    full one). Raises ValueError when the M needed exceeds max_cached(...).
    """
    if (cache_ratio is None) == (speedup is None):
        raise ValueError("give exactly one of cache_ratio and speedup")
    mmax = max_cached(n_steps, max_consecutive, allow_last_cached)
    if cache_ratio is not None:
        if not 0.0 <= cache_ratio <= 1.0:
            raise ValueError(f"cache ratio must lie in [0, 1], got {cache_ratio}")
        m = int(math.floor(cache_ratio * n_steps + 0.5 + 1e-9))
        if m > mmax:
            raise ValueError(
                f"cache ratio {cache_ratio:g} needs {m} cached steps of {n_steps} but at most {mmax} "
                f"are possible {_limits(n_steps, max_consecutive, allow_last_cached)}"
            )
        return m
    assert speedup is not None
    if cost_ratio is None:
        raise ValueError("a speedup target needs cost_ratio (cost of a cached step / a full step)")
    if not 0.0 <= cost_ratio < 1.0:
        raise ValueError(f"cost ratio must lie in [0, 1) for caching to pay off, got {cost_ratio}")
    if speedup <= 1.0:
        return 0
    m = max(0, math.ceil(n_steps * (1.0 - 1.0 / speedup) / (1.0 - cost_ratio) - 1e-9))
    if m > mmax:
        raise ValueError(
            f"speedup {speedup:g}x needs {m} cached steps of {n_steps} at cost ratio {cost_ratio:g} "
            f"but at most {mmax} are possible {_limits(n_steps, max_consecutive, allow_last_cached)} "
            f"(at most {speedup_of(n_steps, mmax, cost_ratio):.2f}x)"
        )
    return m


def _check_m(n_steps: int, n_cached: int, max_consecutive: int, allow_last_cached: bool) -> None:
    _check_n_steps(n_steps)
    mmax = max_cached(n_steps, max_consecutive, allow_last_cached)
    if not 0 <= n_cached <= mmax:
        raise ValueError(
            f"{n_cached} cached steps of {n_steps} are infeasible: at most {mmax} are possible "
            f"{_limits(n_steps, max_consecutive, allow_last_cached)}"
        )


def solve_schedule(
    n_steps: int,
    n_cached: int,
    cost: CostLike,
    max_consecutive: int = 2,
    allow_last_cached: bool = False,
) -> Schedule:
    """Exact minimum-cost schedule with n_cached cached steps (DP over step, run length, count).

    cost: a per-step array (cost_i, independent of staleness) or a callable cost(i, run).
    O(N * max_consecutive * M) time; ties go to the first-found (smallest run before a full step).
    """
    _check_m(n_steps, n_cached, max_consecutive, allow_last_cached)
    fn = _as_cost_fn(cost, n_steps)
    k, m_tot = max_consecutive, n_cached
    inf = np.inf
    dp = np.full((k + 1, m_tot + 1), inf)  # dp[run, count] after the steps so far
    dp[0, 0] = 0.0  # step 0 is full
    prev_run = np.zeros((n_steps, m_tot + 1), dtype=np.int64)  # run before a full step i
    for i in range(1, n_steps):
        new = np.full_like(dp, inf)
        prev_run[i] = np.argmin(dp, axis=0)
        new[0] = dp.min(axis=0)
        if i < n_steps - 1 or allow_last_cached:
            for r in range(min(k, i)):  # run r+1 <= i: step 0 is full
                c = float(fn(i, r + 1))
                if math.isnan(c):
                    raise ValueError(f"cost({i}, {r + 1}) is NaN")
                new[r + 1, 1:] = dp[r, :-1] + c
        dp = new
    r = int(np.argmin(dp[:, m_tot]))
    total = float(dp[r, m_tot])
    if not np.isfinite(total):
        raise ValueError(f"no schedule with {n_cached} cached steps has finite cost")
    full = np.ones(n_steps, dtype=bool)
    m = m_tot
    for i in range(n_steps - 1, 0, -1):  # backtrack
        if r > 0:
            full[i] = False
            r, m = r - 1, m - 1
        else:
            r = int(prev_run[i, m])
    assert m == 0 and r == 0
    return Schedule(full, total_cost=total, name="dp")


def alternating_schedule(
    n_steps: int,
    n_cached: int,
    max_consecutive: int = 2,
    allow_last_cached: bool = False,
    cost: CostLike | None = None,
) -> Schedule:
    """Cached steps spread as evenly as possible: F C F C ..., or F C C F C C ... when M demands.

    The free steps' interior full steps split the M cached steps into runs whose lengths
    differ by at most one; cumulative centred rounding puts the odd short/long runs
    symmetrically rather than bunching them at either end.
    """
    _check_m(n_steps, n_cached, max_consecutive, allow_last_cached)
    free = n_steps - 1 if allow_last_cached else n_steps - 2
    n_sep = free - n_cached  # full steps among the free ones
    bounds = [math.floor(n_cached * q / (n_sep + 1) + 0.5) for q in range(n_sep + 2)]
    pat = ["F"]
    for q in range(n_sep + 1):
        pat += ["C"] * (bounds[q + 1] - bounds[q])
        if q < n_sep:
            pat.append("F")
    if not allow_last_cached:
        pat.append("F")
    s = Schedule.from_pattern("".join(pat), cost, name="alternating")
    s.validate(max_consecutive, allow_last_cached)
    return s


def uniform_schedule(
    n_steps: int, every_k: int, allow_last_cached: bool = True, cost: CostLike | None = None
) -> Schedule:
    """FORA-style: full at i % every_k == 0, cached otherwise (runs of every_k - 1)."""
    _check_n_steps(n_steps)
    if every_k < 1:
        raise ValueError(f"every_k must be >= 1, got {every_k}")
    full = np.arange(n_steps) % every_k == 0
    if not allow_last_cached:
        full[-1] = True
    s = Schedule(full, name=f"uniform{every_k}")
    if cost is not None:
        s.total_cost = schedule_cost(s.full, cost)
    return s
