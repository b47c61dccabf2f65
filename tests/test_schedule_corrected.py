"""The correction-aware schedule DP equals brute force and honours the constraints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from omnicache_export.calibration.schedule import max_cached
from omnicache_export.calibration.calibrate import Correction, pair_estimate
from omnicache_export.calibration.schedule_corrected import corrected_errors, solve_pairwise_schedule


def brute_force(n, m, cost, k, last):
    best = np.inf
    for cached in itertools.combinations(range(1, n), m):
        full = np.ones(n, bool)
        full[list(cached)] = False
        if not last and not full[-1]:
            continue
        run, ok = 0, True
        for f in full:
            run = 0 if f else run + 1
            ok &= run <= k
        if not ok:
            continue
        total, j, j2 = 0.0, -1, -1
        for i in range(n):
            if full[i]:
                j2, j = j, i
            else:
                total += cost(i, j, j2)
        best = min(best, total)
    return best


@pytest.mark.parametrize("n", [3, 5, 8, 10])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("last", [False, True])
def test_pairwise_dp_matches_brute_force(n, k, last):
    rng = np.random.default_rng(n * 10 + k)
    table = rng.random((n, n + 1, n + 1))
    cost = lambda i, j, j2: float(table[i, j, j2 + 1])  # noqa: E731
    for m in range(0, max_cached(n, k, last) + 1):
        s = solve_pairwise_schedule(n, m, cost, k, last)
        assert s.n_cached == m and s.full[0] and s.max_run <= k and (last or s.full[-1])
        assert s.total_cost == pytest.approx(brute_force(n, m, cost, k, last))


def test_corrected_errors_vanish_for_linear_outputs():
    t = np.linspace(900, 100, 9)
    outputs = [np.full((1, 2), 3.0 + 0.01 * ti, np.float32) for ti in t]
    # the cache returns the last full output; the seed's predictor adds the trend of the last two
    records = [({"i": i}, o, {"c": o}) for i, o in enumerate(outputs)]
    estimate = pair_estimate(Correction("gamma=1", np.ones(9)), records, lambda feeds, caches: caches["c"], t)
    cost = corrected_errors(outputs, estimate)
    assert cost(4, 3, 2) == pytest.approx(0.0, abs=1e-9)  # linear trend: extrapolation is exact
    assert cost(4, 3, -1) > 0  # no trend yet: the stale output's error remains
