"""Schedule DP vs brute force, constraints, reuse indices and the M-from-target arithmetic."""
import itertools

import numpy as np
import pytest

from omnicache_export.calibration.schedule import (
    Schedule,
    alternating_schedule,
    max_cached,
    n_cached_for,
    per_step_cost,
    schedule_cost,
    solve_schedule,
    speedup_of,
    staleness_cost,
    uniform_schedule,
)


def feasible(full, k, allow_last):
    run = 0
    for f in full:
        run = 0 if f else run + 1
        if run > k:
            return False
    return bool(full[0]) and (allow_last or bool(full[-1]))


def brute_force(n, m, cost, k, allow_last):
    """Min cost over all cached subsets of {1..N-1} of size m; None if none is feasible."""
    best = None
    for cached in itertools.combinations(range(1, n), m):
        full = np.ones(n, dtype=bool)
        full[list(cached)] = False
        if feasible(full, k, allow_last):
            c = schedule_cost(full, cost)
            best = c if best is None else min(best, c)
    return best


def check_constraints(s, n, m, k, allow_last):
    assert s.n_steps == n and s.n_cached == m and s.n_full == n - m
    assert feasible(s.full, k, allow_last)
    s.validate(k, allow_last)


@pytest.mark.parametrize("n", range(3, 11))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("allow_last", [False, True])
def test_dp_equals_brute_force(n, k, allow_last):
    rng = np.random.default_rng(1000 * n + 10 * k + allow_last)
    kappa = rng.uniform(0.0, 1.0, n + 1)
    kappa[0] = kappa[-1] = np.nan  # as trajectory_curvature returns it: endpoints undefined
    table = rng.uniform(0.0, 1.0, (n, k + 1))
    costs = {
        "array": kappa,
        "per_step": per_step_cost(kappa),
        "staleness": staleness_cost(kappa),
        "generic": lambda i, r: table[i, r],
    }
    mmax = max_cached(n, k, allow_last)
    assert brute_force(n, mmax, costs["array"], k, allow_last) is not None
    assert brute_force(n, mmax + 1, costs["array"], k, allow_last) is None
    for m in range(mmax + 1):
        for name, cost in costs.items():
            s = solve_schedule(n, m, cost, max_consecutive=k, allow_last_cached=allow_last)
            check_constraints(s, n, m, k, allow_last)
            ref = brute_force(n, m, cost, k, allow_last)
            assert np.isclose(s.total_cost, ref), (name, m)
            assert np.isclose(schedule_cost(s.full, cost), s.total_cost)
        a = alternating_schedule(n, m, k, allow_last, cost=kappa)
        check_constraints(a, n, m, k, allow_last)
        assert np.isclose(a.total_cost, schedule_cost(a.full, kappa))
    for bad in (mmax + 1, -1):
        with pytest.raises(ValueError, match="infeasible"):
            solve_schedule(n, bad, kappa, max_consecutive=k, allow_last_cached=allow_last)
        with pytest.raises(ValueError):
            alternating_schedule(n, bad, k, allow_last)


def test_staleness_changes_the_optimum():
    kappa = np.array([np.nan, 0.1, 0.3, 0.5, 0.35, 0.2, np.nan])  # N = 6 steps, step 5 full
    plain = solve_schedule(6, 2, kappa)  # {1,2}: 0.1 + 0.3 = 0.4 beats {1,4}: 0.45
    assert plain.pattern == "FCCFFF" and np.isclose(plain.total_cost, 0.4)
    stale = solve_schedule(6, 2, staleness_cost(kappa))  # {1,2}: 0.1 + 0.4; {1,4}: 0.1 + 0.35
    assert stale.pattern == "FCFFCF" and np.isclose(stale.total_cost, 0.45)
    assert np.isclose(schedule_cost(plain.full, staleness_cost(kappa)), 0.5)


def test_reuse_from_and_prev_full2():
    s = Schedule.from_pattern("FCCFCFFCCF")
    np.testing.assert_array_equal(s.reuse_from, [-1, 0, 0, -1, 3, -1, -1, 6, 6, -1])
    np.testing.assert_array_equal(s.prev_full2, [-1, -1, -1, -1, 0, -1, -1, 5, 5, -1])
    np.testing.assert_array_equal(s.staleness, [0, 1, 2, 0, 1, 0, 0, 1, 2, 0])
    np.testing.assert_array_equal(s.cached, [1, 2, 4, 7, 8])
    assert (s.n_full, s.n_cached, s.max_run) == (5, 5, 2)
    with pytest.raises(ValueError):
        Schedule.from_pattern("CFF")


def test_named_schedules():
    assert alternating_schedule(30, 15, allow_last_cached=True).pattern == "FC" * 15
    a19 = alternating_schedule(30, 19)  # the repeated F-C-C pattern, one single run in the middle
    assert a19.pattern == "FCCFCCFCCFCCFCCFCFCCFCCFCCFCCF" and a19.max_run == 2
    a14 = alternating_schedule(30, 14)
    assert a14.max_run == 1 and a14.full[-1] and a14.n_cached == 14
    assert alternating_schedule(6, 0).pattern == "FFFFFF"
    assert uniform_schedule(7, 3).pattern == "FCCFCCF"
    assert uniform_schedule(8, 3).pattern == "FCCFCCFC"
    assert uniform_schedule(8, 3, allow_last_cached=False).pattern == "FCCFCCFF"
    assert uniform_schedule(8, 1).n_cached == 0


def test_max_cached_and_n_cached_for():
    # free steps L = N-2 (last full) or N-1; max = L - floor(L / (k+1))
    assert max_cached(30) == 19  # 28 - 9
    assert max_cached(30, allow_last_cached=True) == 20  # 29 - 9
    assert max_cached(30, max_consecutive=1) == 14  # 28 - 14
    assert max_cached(30, max_consecutive=1, allow_last_cached=True) == 15  # 29 - 14
    assert max_cached(3, 1) == 1 and max_cached(3, 0) == 0
    assert n_cached_for(30, cache_ratio=0.5) == 15
    assert n_cached_for(5, cache_ratio=0.5, allow_last_cached=True) == 3  # 2.5 rounds up
    assert n_cached_for(5, cache_ratio=0.3) == 2  # 1.5 rounds up
    assert n_cached_for(30, cache_ratio=0.0) == 0
    with pytest.raises(ValueError, match="cache ratio 0.8 needs 24 cached steps of 30 but at most 19"):
        n_cached_for(30, cache_ratio=0.8)
    # speedup 2 at c = 0.02: M >= 30 * 0.5 / 0.98 = 15.31 -> 16 (15 gives 30/15.3 = 1.96x)
    assert n_cached_for(30, speedup=2.0, cost_ratio=0.02) == 16
    assert speedup_of(30, 16, 0.02) >= 2.0 > speedup_of(30, 15, 0.02)
    assert n_cached_for(30, speedup=2.0, cost_ratio=0.0) == 15  # exact boundary, no float slop
    assert n_cached_for(10, speedup=2.5, cost_ratio=0.0) == 6  # 10 * 0.6 = 6 = max_cached(10)
    assert n_cached_for(30, speedup=1.0, cost_ratio=0.5) == 0
    with pytest.raises(ValueError, match="speedup 3x needs 7 cached steps of 10"):
        n_cached_for(10, speedup=3.0, cost_ratio=0.0)
    with pytest.raises(ValueError, match="cost_ratio"):
        n_cached_for(30, speedup=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        n_cached_for(30)
    with pytest.raises(ValueError, match="exactly one"):
        n_cached_for(30, cache_ratio=0.5, speedup=2.0, cost_ratio=0.1)
    with pytest.raises(ValueError):
        n_cached_for(30, speedup=2.0, cost_ratio=1.0)


@pytest.mark.parametrize("fn", [lambda n: max_cached(n), lambda n: solve_schedule(n, 0, np.zeros(5)),
                                lambda n: alternating_schedule(n, 0), lambda n: uniform_schedule(n, 2)])
def test_too_few_steps(fn):
    with pytest.raises(ValueError, match="at least 3 steps"):
        fn(2)


def test_nan_cost_is_rejected_and_short_array():
    with pytest.raises(ValueError, match="NaN"):
        solve_schedule(5, 1, np.array([0.0, np.nan, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="at least 5"):
        solve_schedule(5, 1, np.ones(3))


def test_speedup_3_is_reachable_with_auto_run_limits():
    """Runs of 2 cap the cached share at 2/3 (about 2.5x at cost ratio 0.1); auto's runs of up to 4 reach 3x
    from 30 steps on, and the auto limits then hold the count."""
    from omnicache_export.calibration.candidates import AUTO_MAX_CONSECUTIVE, auto_run_limits
    from omnicache_export.calibration.schedule import n_cached_for, speedup_of

    for n in (30, 50):
        with pytest.raises(ValueError, match="at most"):
            n_cached_for(n, speedup=3, cost_ratio=0.1, max_consecutive=2, allow_last_cached=True)
        m = n_cached_for(n, speedup=3, cost_ratio=0.1, max_consecutive=AUTO_MAX_CONSECUTIVE, allow_last_cached=True)
        assert m / n > 2 / 3 and speedup_of(n, m, 0.1) >= 3
        assert max(auto_run_limits(n, m, None)) >= 3
