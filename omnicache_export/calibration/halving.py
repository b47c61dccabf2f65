"""Successive halving: what calibration's scoring costs, and the rounds that cut it.

Every candidate of a batch is scored on the first few choosing rows; the better ones (`HalvingPolicy`)
go on to twice the rows, and so on until the survivors are scored on every row. A candidate's later rounds
only sample the rows it has not seen, so the winner's score is the same number exhaustive scoring
gives it; the losers stop early. Cost is counted in model evaluations, one per sample and step
(a full step runs the full graph, a cached one the cache graph; guidance's two halves count once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class HalvingPolicy:
    """How a batch of candidates is scored in rounds: every candidate on the first `first_rows`
    choosing rows (a share `first_share` of them where that is more), then the rows doubling; after
    a round the better 1/`eta` go on (rounded down, at least `min_keep`), and so does every
    candidate within `margin_db` of the round's leader (mean PSNR on the same rows), up to a share
    `max_keep` of the round. The survivors of the round before the last are scored on every row."""

    first_rows: int = 1
    first_share: float = 0.0
    eta: float = 2.0
    min_keep: int = 2
    margin_db: float = 0.0
    max_keep: float = 1.0

    def rounds(self, n_rows: int) -> list[int]:
        """The rows scored after each round: first, 2·first, 4·first, …, n_rows."""
        if n_rows < 1:
            raise ValueError("no rows to score on")
        first = max(self.first_rows, int(np.ceil(self.first_share * n_rows)))
        sizes, size = [], max(1, min(first, n_rows))
        while size < n_rows:
            sizes.append(size)
            size *= 2
        return [*sizes, n_rows]

    def going_on(self, ranks) -> np.ndarray:
        """Indices of the candidates that go on after a round, best first, from their mean PSNR on
        the rows of that round (NaN or -inf: a run that went non-finite, last). Ties keep the order
        the candidates came in."""
        ranks = np.nan_to_num(np.asarray(ranks, float), nan=-np.inf)
        n = len(ranks)
        order = np.argsort(-ranks, kind="stable")
        keep = min(n, max(self.min_keep, int(n // self.eta)))
        if self.margin_db > 0 and n:
            near = int(np.sum(ranks >= ranks[order[0]] - self.margin_db))
            keep = max(keep, min(near, int(n * self.max_keep)))
        return order[:min(n, keep)]


def play_rounds(policy: HalvingPolicy, rounds: list[int], n: int, extend: Callable[[int, int], None],
                rank: Callable[[int], float], dropped: Callable[[int], None] = lambda i: None) -> list[int]:
    """The rounds of one batch of `n` candidates (`rounds`: the rows scored after each, the last all
    of them; `policy.rounds(n_rows)`, or `[n_rows]` for exhaustive scoring): `extend(i, size)` scores
    candidate i on the first `size` rows (those it has not seen), `rank(i)` is its mean on them,
    `dropped(i)` is told when it stops. Returns the survivors' indices, in batch order, each scored
    on every row."""
    n_rows = rounds[-1]
    alive = list(range(n))
    for size in rounds:
        for i in alive:
            extend(i, size)
        if size == n_rows or len(alive) <= policy.min_keep:
            break
        going = set(policy.going_on([rank(i) for i in alive]).tolist())
        for j, i in enumerate(alive):
            if j not in going:
                dropped(i)
        alive = [i for j, i in enumerate(alive) if j in going]
    for i in alive:  # the last survivors skip to every row
        extend(i, n_rows)
    return alive


# The defaults above are the first policy: one row first, half going on. It often lost the
# exhaustive choice: the refinements of one schedule differ by tenths of a dB, and the first one or
# two rows ranked the eventual winner mid-field. A quarter of the rows first (3 of 10 at the default
# K = 20), a quarter going on, kept every exhaustive choice measured at K = 20 for under half the
# evaluations, and so did its neighbours in the grid (tools/halving_policies.py replays policies on
# tools/bench_calibration.py's exhaustive score matrices; the figures are in docs/benchmarks.md).
DEFAULT_POLICY = HalvingPolicy(first_share=0.25, eta=4.0)


@dataclasses.dataclass
class ScoringCost:
    """Model evaluations (sample-steps) and seconds of calibration: the scoring of candidates, what
    scoring every candidate on every choosing row would have taken, and everything else (the
    reference run, the γ fits, the validation)."""

    halving: bool = True
    scoring_evaluations: int = 0
    exhaustive_evaluations: int = 0  # the same candidates, each on every choosing row
    other_evaluations: int = 0
    scoring_seconds: float = 0.0

    def scored(self, n_rows: int, n_steps: int) -> None:
        self.scoring_evaluations += n_rows * n_steps

    def candidate(self, n_rows: int, n_steps: int) -> None:
        self.exhaustive_evaluations += n_rows * n_steps

    def other(self, n_rows: int, n_steps: int) -> None:
        self.other_evaluations += n_rows * n_steps
