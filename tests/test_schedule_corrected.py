"""The correction-aware schedule DP equals brute force and honours the constraints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from omnicache_export.calibration.schedule import max_cached
from omnicache_export.calibration.schedule_corrected import solve_pairwise_schedule


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
