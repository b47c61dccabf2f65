"""Successive halving: what calibration's scoring costs, and the rounds that cut it.

Every candidate of a batch is scored on the first few choosing rows; the better 1/ETA go on to
twice the rows, and so on until the survivors are scored on every row. A candidate's later rounds
only sample the rows it has not seen, so the winner's score is the same number exhaustive scoring
gives it; the losers stop early. Cost is counted in model evaluations, one per sample and step
(a full step runs the full graph, a cached one the cache graph; guidance's two halves count once).
"""

from __future__ import annotations

import dataclasses

ETA = 2  # the share of a round that goes on: 1/ETA


def halving_rounds(n_rows: int, first: int = 1) -> list[int]:
    """The rows scored after each round: first, 2·first, 4·first, …, n_rows."""
    if n_rows < 1:
        raise ValueError("no rows to score on")
    sizes, size = [], max(1, min(first, n_rows))
    while size < n_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, n_rows]


def survivors(n: int) -> int:
    """How many of n candidates go on to the next round: 1/ETA of them, rounded down (small batches,
    such as the refinements', would otherwise keep more), but never fewer than two while two remain,
    so that the last decision is between candidates scored on every row (on pixart-digits the
    runner-up of the round before the last won on every row, and refining it gained 2 dB)."""
    return min(n, max(2, n // ETA))


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
