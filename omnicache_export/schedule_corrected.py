"""The correction-aware schedule (ours): a DP whose cost of a cached step sees the correction.

With the γ = 1 correction in the loop, which steps are cached matters more than curvature says
(METHOD.md: the curvature DP lost to alternation by 14 dB with the correction on): the cost of
caching step i depends on the two full steps j' < j it extrapolates from. Here cost(i, j, j') is the
error of the corrected cache output at step i, measured on the reference trajectories (the cache
graph fed the residual of step j, corrected with the trend of j and j'), weighted by step size.
The DP runs over the last two full steps and the number of full steps placed, exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from omnicache_export.schedule import Schedule, _check_m

PairCost = Callable[[int, int, int], float]
"""cost(i, j, j2): caching step i with j the last full step before it and j2 the one before (-1: none)."""


def solve_pairwise_schedule(
    n_steps: int, n_cached: int, cost: PairCost, max_consecutive: int = 2, allow_last_cached: bool = False
) -> Schedule:
    _check_m(n_steps, n_cached, max_consecutive, allow_last_cached)
    n_full, k = n_steps - n_cached, max_consecutive

    def gap_cost(j: int, j2: int, stop: int) -> float:
        return sum(cost(i, j, j2) for i in range(j + 1, stop))

    layer: dict[tuple[int, int], float] = {(0, -1): 0.0}  # (last full, previous full) -> cost
    back: list[dict[tuple[int, int], tuple[int, int]]] = []
    for _ in range(1, n_full):
        nxt: dict[tuple[int, int], float] = {}
        links: dict[tuple[int, int], tuple[int, int]] = {}
        for (j, j2), c in layer.items():
            for p in range(j + 1, min(n_steps, j + k + 2)):
                total = c + gap_cost(j, j2, p)
                if total < nxt.get((p, j), np.inf):
                    nxt[(p, j)], links[(p, j)] = total, (j, j2)
        layer = nxt
        back.append(links)
    best_state, best = None, np.inf
    for (j, j2), c in layer.items():
        tail = n_steps - 1 - j
        if tail > (k if allow_last_cached else 0):
            continue
        total = c + gap_cost(j, j2, n_steps)
        if total < best:
            best_state, best = (j, j2), total
    if best_state is None:
        raise ValueError(f"no schedule with {n_cached} cached steps of {n_steps}")
    full = np.zeros(n_steps, dtype=bool)
    state = best_state
    full[state[0]] = True
    for links in reversed(back):
        state = links[state]
        full[state[0]] = True
    return Schedule(full, total_cost=float(best), name=f"corrected-error-dp (runs<={k})")


def corrected_errors(
    outputs: list[np.ndarray],
    cached_output: Callable[[int, int], np.ndarray],
    timesteps: np.ndarray,
    max_consecutive: int,
) -> PairCost:
    """cost(i, j, j2) from reference full outputs o_i and cache outputs õ_i(j) = cached_output(i, j):
    the step-size-weighted mean squared error of õ_i(j) + a_i (o_j − o_j2) against o_i."""
    n = len(outputs)
    t_next = np.append(timesteps[1:], 0.0)
    weights = np.abs(timesteps - t_next)
    weights = weights / weights.mean() if weights.mean() > 0 else np.ones(n)
    tilde: dict[tuple[int, int], np.ndarray] = {}
    table: dict[tuple[int, int, int], float] = {}

    def cost(i: int, j: int, j2: int) -> float:
        key = (i, j, j2)
        if key not in table:
            if (i, j) not in tilde:
                tilde[(i, j)] = cached_output(i, j)
            est = tilde[(i, j)]
            if j2 >= 0 and timesteps[j] != timesteps[j2]:
                a = (timesteps[i] - timesteps[j]) / (timesteps[j] - timesteps[j2])
                est = est + np.float32(a) * (outputs[j] - outputs[j2])
            table[key] = float(weights[i] * np.mean((est - outputs[i]) ** 2))
        return table[key]

    return cost
