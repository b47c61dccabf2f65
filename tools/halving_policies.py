"""Which successive-halving policy keeps the exhaustive choice, for how many evaluations?

    python tools/halving_policies.py FILE.json [FILE.json ...] [--k 20] [--top 15]

Replays scoring policies (`calibration.halving.HalvingPolicy`) offline on the per-row PSNR matrices
that `tools/bench_calibration.py` records for exhaustive runs (every candidate of every tournament
on every choosing row), following calibration's own decisions (`calibrate.calibrate`): the top
corrected candidate of the schedules' tournament, the predictors re-scored on its schedule where a
round stopped them, the best mix, the final best. A policy keeps the choice in a case where every
one of those decisions equals the exhaustive run's (then the chosen candidate, its score and
everything after it are the same); a decision that differs leaves candidates the record lacks, and
counts as a miss. Cost: rows scored, as a share of the exhaustive run's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnicache_export.calibration.halving import DEFAULT_POLICY, HalvingPolicy, play_rounds  # noqa: E402


def _mean(scores: np.ndarray) -> float:
    m = float(np.mean(scores)) if len(scores) else -np.inf
    return m if np.isfinite(m) or m == np.inf else -np.inf


def tournament(policy: HalvingPolicy, scores: list[np.ndarray]) -> tuple[list[int], int]:
    """As `Scorer.tournament` (the same `play_rounds`): the indices scored on every row, and the rows scored."""
    if not scores:
        return [], 0
    seen = [0] * len(scores)

    def extend(i: int, size: int) -> None:
        seen[i] = max(seen[i], size)

    alive = play_rounds(policy, policy.rounds(len(scores[0])), len(scores), extend, lambda i: _mean(scores[i][:seen[i]]))
    return alive, sum(seen)


def replay(matrix: list[dict], policy: HalvingPolicy) -> dict:
    """One case: does `policy` make every decision the exhaustive run made, and at what cost?"""
    rows = [dict(c, scores=np.asarray(c["scores"], float)) for c in matrix]
    n_rows = max(len(c["scores"]) for c in rows)
    if any(len(c["scores"]) != n_rows for c in rows):
        raise ValueError("not an exhaustive run: candidates scored on different rows")
    batches = sorted({c["batch"] for c in rows})
    by_batch = {b: [c for c in rows if c["batch"] == b] for b in batches}
    best = lambda cs: max(cs, key=lambda c: _mean(c["scores"])) if cs else None  # noqa: E731 - first of equals
    exhaustive_cost = len(rows) * n_rows
    complete: list[dict] = []
    cost = 0

    def run(cands: list[dict]) -> None:
        nonlocal cost
        done, n = tournament(policy, [c["scores"] for c in cands])
        complete.extend(cands[i] for i in done)
        cost += n

    key = lambda c: (c["schedule"], c["correction"])  # noqa: E731
    run(by_batch[0])
    corrected = lambda cs: [c for c in cs if not c["none"]]  # noqa: E731
    top_x, top_s = best(corrected(by_batch[0])), best(corrected(complete))
    verdict = {"policy": policy, "exhaustive_cost": exhaustive_cost}
    if top_s is None or key(top_x) != key(top_s):
        return {**verdict, "kept": False, "where": "top schedule", "cost": cost / exhaustive_cost}
    # every predictor on the top schedule: the exhaustive run had them all (its batch 1 holds the
    # ones batch 0 never ran); here also the ones a round stopped, scored anew
    again = [c for c in by_batch[0] if c["schedule"] == top_x["schedule"] and not c["none"]
             and all(key(c) != key(d) for d in complete)]
    run(by_batch.get(1, []) + again)
    for b in batches[2:]:
        if top_x["trend"] and b == 2:
            run(by_batch[b])
            mix = lambda cs: best([c for c in cs if c["schedule"] == top_x["schedule"] and c["trend"]])  # noqa: E731
            if mix(complete)["blend"] != mix([c for c in rows if c["batch"] <= b])["blend"]:
                return {**verdict, "kept": False, "where": "mix", "cost": cost / exhaustive_cost}
            continue
        run(by_batch[b])
    same = key(best(complete)) == key(best(rows))
    return {**verdict, "kept": same, "where": "" if same else "final", "cost": cost / exhaustive_cost}


def policies() -> list[HalvingPolicy]:
    """The default, the first policy, and a grid: first-round rows (a count or a share), share going
    on, survivors floor, a keep-within-a-margin rule capped at a share of the round."""
    grid = [DEFAULT_POLICY, HalvingPolicy()]
    for first, share, eta, keep in itertools.product((1, 2, 3), (0.0, 0.25, 1 / 3, 0.5), (2, 3, 4, 6, 8), (2, 3)):
        grid.append(HalvingPolicy(first, share, eta, keep))
        grid += [HalvingPolicy(first, share, eta, keep, margin, cap) for margin in (0.5, 1.0) for cap in (0.25, 0.5)]
    return list(dict.fromkeys(grid))


def cases(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            if not r["halving"] and r.get("matrix"):
                out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--k", type=int, default=None, help="only the cases calibrated on K rows")
    a = p.parse_args(argv)
    runs = [r for r in cases(a.files) if a.k is None or r["k"] == a.k]
    print(f"{len(runs)} exhaustive cases: " + ", ".join(f"{r['model']} r={r['ratio']:g} K={r['k']}" for r in runs))
    table = []
    for pol in policies():
        res = [replay(r["matrix"], pol) for r in runs]
        table.append((pol, sum(x["kept"] for x in res), max(x["cost"] for x in res), float(np.mean([x["cost"] for x in res])),
                      [x["where"] for x in res]))
    table.sort(key=lambda t: (t[2] > 0.5, -t[1], t[3]))  # within half the evaluations first, then kept, then cost
    first = [t for t in table if t[0] in (DEFAULT_POLICY, HalvingPolicy())]
    for pol, kept, worst, mean, where in first + table[:a.top]:
        print(f"kept {kept}/{len(runs)} cost max {worst:.3f} mean {mean:.3f}  {pol}  misses: "
              + ",".join(w or "-" for w in where))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
