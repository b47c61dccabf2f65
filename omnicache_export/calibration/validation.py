"""Which calibration samples choose the candidate and which report its quality.

Calibration picks the best of some fifty candidates by their PSNR on the samples it scores them on;
reported on those same samples, the winner's figure carries the selection's luck (about 5 dB on a
held-out model, issue 11). The figure the export reports is measured on samples that played no
part in the choice:

- `SPLIT`: the last `share` of the K rows (their conditions and noise) are held out; the candidates
  are scored on the others;
- `SEEDS`: every candidate is scored on the K rows, and the chosen one is validated on the same K
  conditions at a fresh seed (new noise, the conditions seen).

Validation scores one candidate, so it can afford more samples than the choice: the validation rows
are sampled at `seeds` noise seeds (SPLIT: the calibration seed, then fresh ones; SEEDS: fresh ones
only), each sample against sampling without cache at the same seed, and the figure is the mean of
the per-sample PSNR (as candidates are scored, and as `tools/bench_calibration.py` measures new
conditions).

With one calibration row there is nothing to hold out: SPLIT falls back to SEEDS.
"""

from __future__ import annotations

import dataclasses
import enum

VALIDATION_SEED_OFFSET = 7919  # the SEEDS mode's noise: seed + this (any seed the choice never saw)


class Validation(str, enum.Enum):
    SPLIT = "split"  # hold out rows of the K samples
    SEEDS = "seeds"  # the same K conditions at a fresh seed


DEFAULT_VALIDATION = Validation.SPLIT
DEFAULT_SHARE = 0.5  # of the K rows held out (SPLIT); chosen by tools/bench_calibration.py (docs/benchmarks.md)
DEFAULT_SEEDS = 3  # noise seeds per validation row; chosen by tools/bench_calibration.py (docs/benchmarks.md)


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """Rows (indices into the calibration set) that choose, rows that validate, and the seeds the
    validation rows are sampled at (the noise of row r is that of (seed, r), as everywhere)."""

    mode: Validation
    choose: tuple[int, ...]
    validate: tuple[int, ...]
    seed: int  # the choosing rows' seed
    validation_seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.choose or not self.validate or not self.validation_seeds:
            raise ValueError("a split needs rows to choose on and rows and seeds to validate on")
        if self.seed in self.validation_seeds and set(self.choose) & set(self.validate):
            raise ValueError("the validation samples overlap the samples that choose")

    @property
    def validation_seed(self) -> int:
        return self.validation_seeds[0]

    @property
    def n_validation(self) -> int:
        """Validation samples: rows × seeds."""
        return len(self.validate) * len(self.validation_seeds)


def split_rows(n_rows: int, seed: int, mode: Validation | str = DEFAULT_VALIDATION,
               share: float = DEFAULT_SHARE, seeds: int = DEFAULT_SEEDS) -> RowSplit:
    mode = Validation(mode)
    if not 0.0 < share < 1.0:
        raise ValueError(f"validation share {share:g}: must lie in (0, 1)")
    if n_rows < 1:
        raise ValueError("calibration needs at least one sample")
    if seeds < 1:
        raise ValueError(f"validation seeds {seeds}: must be at least 1")
    fresh = tuple(seed + VALIDATION_SEED_OFFSET * i for i in range(1, seeds + 1))
    if mode == Validation.SPLIT and n_rows >= 2:
        held = min(n_rows - 1, max(1, round(n_rows * share)))
        return RowSplit(mode, tuple(range(n_rows - held)), tuple(range(n_rows - held, n_rows)), seed,
                        (seed, *fresh[:seeds - 1]))
    return RowSplit(Validation.SEEDS, tuple(range(n_rows)), tuple(range(n_rows)), seed, fresh)
