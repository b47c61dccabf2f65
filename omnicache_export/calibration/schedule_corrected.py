"""The correction-aware schedule (ours): a DP whose cost of a cached step sees the correction.

With the γ = 1 correction in the loop, which steps are cached matters more than curvature says
(METHOD.md: the curvature DP lost to alternation by 14 dB with the correction on): the cost of
caching step i depends on the two full steps j' < j it extrapolates from. Here cost(i, j, j') is the
error of the corrected cache output at step i, measured on the reference trajectories (the cache
graph fed the residual of step j, corrected with the trend of j and j'), times a weight for how much
an error at step i moves the final latent (`sensitivity`).
The DP runs over the last two full steps and the number of full steps placed, exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from omnicache_export.calibration.schedule import Schedule, _check_m

PairCost = Callable[[int, int, int], float]
"""cost(i, j, j2): caching step i with j the last full step before it and j2 the one before (-1: none)."""


def solve_pairwise_schedule(
    n_steps: int, n_cached: int, cost: PairCost, max_consecutive: int = 2, allow_last_cached: bool = False,
    name: str | None = None,
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
    return Schedule(full, total_cost=float(best), name=name or f"corrected-error-dp (runs<={k})")


def weighted(errors: PairCost, weights: np.ndarray) -> PairCost:
    """The DP's cost: each step's error times its weight (`sensitivity.step_weights`)."""
    return lambda i, j, j2: float(weights[i]) * errors(i, j, j2)


def corrected_errors(outputs: list[np.ndarray], estimate: Callable[[int, int, int], np.ndarray]) -> PairCost:
    """error(i, j, j2): the mean squared error against the reference output o_i of the prediction
    estimate(i, j, j2) a predictor makes at a cached step i from full steps j and j2 (memoised)."""
    table: dict[tuple[int, int, int], float] = {}

    def cost(i: int, j: int, j2: int) -> float:
        key = (i, j, j2)
        if key not in table:
            table[key] = float(np.mean((estimate(i, j, j2) - outputs[i]) ** 2))
        return table[key]

    return cost
