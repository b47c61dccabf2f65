"""Does the quality calibration reports hold on new conditions, and what does choosing cost?

    python tools/bench_calibration.py [--models dit-digits,pixart-digits,latte-digits] [--steps 20]
                                      [--ratios 0.5,0.7] [--configs 20:split,20:split:exhaustive,12:split:s1]
                                      [--eval-per-class 4] [--out docs/benchmarks.md] [--json FILE]

For each trained reference model (`omnicache_export.zoo.reference`), step count and cache ratio, and
each calibration config K:VALIDATION[:exhaustive][:sN] (K calibration rows, `--validation split|seeds`,
successive halving unless `exhaustive`, N validation seeds), the main job (`pipeline.export`) calibrates on conditions
of classes 0–4 only (K rows cycling through them, seed 0). The export is then sampled on the other
classes, 5–9 (`--eval-per-class` each, seed 1234): conditions and noise outside the calibration set.
Reported: the figure on the samples that chose (the old report), the held-out figure the manifest
now records (`calibration.quality.validation_psnr_db`), the PSNR new conditions get (against
no-cache sampling of the same seed and condition), the gaps, and the scoring cost (model evaluations
and seconds); exhaustive runs also record every candidate's per-row scores for
tools/halving_policies.py. With --out the section "Calibration: reported vs new conditions" of the markdown file
is written (other sections kept); with --section long-runs, "Predictors for long runs": the
three-point cache trends against the best other correction on each chosen schedule. Every number
is measured in the run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

SECTION = "Calibration: reported vs new conditions"
CALIB_CLASSES = np.arange(5)
NEW_CLASSES = np.arange(5, 10)
EVAL_SEED = 1234


def parse_config(text: str) -> tuple[int, str, bool, int | None]:
    """K[:split|seeds][:exhaustive][:sN]: K rows, the validation mode, exhaustive scoring, N validation
    seeds (default: the tool's default)."""
    k, *tokens = text.split(":")
    validation = next((t for t in tokens if t in ("split", "seeds")), "split")
    seeds = next((int(t[1:]) for t in tokens if t[:1] == "s" and t[1:].isdigit()), None)
    return int(k), validation, "exhaustive" in tokens, seeds


def observed_calibration(export_fn, *args, **kwargs):
    """Runs the main job and returns its CalibrationResult too: the job's own `calibrate`, observed
    (the result's per-row scores are not in the manifest)."""
    import omnicache_export.pipeline.job as job

    real, seen = job.calibrate, {}

    def calibrate(*a, **kw):
        seen["result"] = real(*a, **kw)
        return seen["result"]

    job.calibrate = calibrate
    try:
        export_fn(*args, **kwargs)
    finally:
        job.calibrate = real
    return seen["result"]


def score_matrix(result) -> list[dict]:
    """Every candidate's per-row PSNR on the choosing rows it was scored on, with its tournament:
    what tools/halving_policies.py replays scoring policies on."""
    schedules: list = []
    out = []
    for c in result.candidates:
        if not any(c.schedule is s for s in schedules):
            schedules.append(c.schedule)
        out.append({"batch": c.batch, "schedule": next(i for i, s in enumerate(schedules) if c.schedule is s),
                    "pattern": c.schedule.pattern, "correction": c.correction.name, "none": c.correction.is_none,
                    "trend": bool(c.correction.has_trend), "blend": float(c.correction.blend),
                    "scores": [float(v) for v in c.scores]})
    return out


def run_case(ref, onnx: Path, wd: Path, steps: int, ratio: float, config: tuple[int, str, bool], eval_per_class: int,
             baseline: dict) -> dict:
    from bench_quality import psnr, run_omnicache

    from omnicache_export.pipeline.job import ExportOptions, export
    from omnicache_export.runtime.manifest import read_manifest
    from omnicache_export.zoo.reference import scheduler_json, write_calib_npz

    k, validation, exhaustive, seeds = config
    labels = np.resize(CALIB_CLASSES, k)
    calib = write_calib_npz(ref.name, labels, wd / f"calib-{k}.npz")
    sched_json = scheduler_json(ref.name, wd / "scheduler.json")
    out = wd / f"n{steps}-r{ratio:g}-k{k}-{validation}{'-exhaustive' if exhaustive else ''}-s{seeds or 0}"
    t0 = time.perf_counter()
    result = observed_calibration(
        export, onnx, out, ExportOptions(scheduler=str(sched_json), steps=steps, calib=calib, num_calib=k, seed=0,
                                         guidance_scale=ref.guidance_scale, cache_ratio=ratio, validation=validation,
                                         **({} if seeds is None else {"validation_seeds": seeds}),
                                         halving=not exhaustive, progress=False, force=True))
    seconds = time.perf_counter() - t0
    m = read_manifest(out)
    new_labels = np.repeat(NEW_CLASSES, eval_per_class)
    cond, uncond = ref.conditioning(new_labels)
    key = (steps, len(new_labels))
    if key not in baseline:
        from bench_quality import no_cache_onnx

        baseline[key] = no_cache_onnx(out, cond, uncond, len(new_labels))[0]
    final, _ = run_omnicache(out, cond, uncond, len(new_labels))
    new_scores = psnr(final, baseline[key])
    new = float(np.mean(new_scores))
    q, c = m.calibration.quality, m.calibration.cost
    return {"model": ref.name, "steps": steps, "ratio": ratio, "k": k, "validation": q.validation,
            "halving": c.halving, "n_cached": m.schedule.n_cached, "max_run": m.schedule.max_run,
            "schedule": m.schedule.name, "pattern": m.schedule.pattern, "correction": m.correction.name,
            "chose_db": q.psnr_db_mean, "validation_db": q.validation_psnr_db, "validation_samples": q.validation_samples,
            "new_db": new, "n_new": len(new_labels), "scoring_evaluations": c.scoring_evaluations,
            "exhaustive_evaluations": c.exhaustive_evaluations, "other_evaluations": c.other_evaluations,
            "scoring_seconds": c.scoring_seconds, "export_seconds": seconds, "folder": out.name,
            "calibration_seconds": result.seconds, "validation_seeds": len(result.validation.seeds),
            "validation_scores": result.validation.scores.tolist(), "new_scores": new_scores.tolist(),
            "matrix": score_matrix(result),
            **position_scores(m.calibration.candidates), **long_run_scores(m.calibration.candidates)}


LONG_RUN_MARKS = ("second order", "fitted over 3 full steps")  # the three-point cache trends' names


def long_run_scores(candidates) -> dict:
    """On the chosen schedule, among candidates scored on every choosing row: the best three-point
    cache trend (second order, fitted line) and the best other correction (dB, name; None where none)."""
    chosen = next(c for c in candidates if c.chosen)
    same = [c for c in candidates if c.pattern == chosen.pattern and c.n_samples == chosen.n_samples
            and c.psnr_db is not None]
    new = [c for c in same if any(k in c.correction for k in LONG_RUN_MARKS)]
    other = [c for c in same if c not in new]
    best_new, best_other = (max(x, key=lambda c: c.psnr_db) if x else None for x in (new, other))
    tried = [c for c in candidates if c.pattern == chosen.pattern and any(k in c.correction for k in LONG_RUN_MARKS)]
    return {"long_run_db": best_new and best_new.psnr_db, "long_run_name": best_new and best_new.correction,
            "long_run_other_db": best_other and best_other.psnr_db,
            "long_run_other_name": best_other and best_other.correction, "long_run_tried": len(tried),
            "long_run_won": bool(best_new and best_new.chosen),
            "fitted_db": max((c.psnr_db for c in new if LONG_RUN_MARKS[1] in c.correction), default=None)}


def position_scores(candidates) -> dict:
    """On the chosen schedule, among candidates scored on every choosing row: the best γ-per-run-position
    candidate and the best other one (dB; None where none was scored)."""
    chosen = next(c for c in candidates if c.chosen)
    same = [c for c in candidates if c.pattern == chosen.pattern and c.n_samples == chosen.n_samples
            and c.psnr_db is not None]
    pos = [c.psnr_db for c in same if "run position" in c.correction]
    other = [c.psnr_db for c in same if "run position" not in c.correction]
    tried = any("run position" in c.correction for c in candidates if c.pattern == chosen.pattern)
    return {"position_db": max(pos) if pos else None, "other_db": max(other) if other else None,
            "position_tried": tried}


def _f(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def render(rows: list[dict], meta: dict) -> str:
    out = [f"Regenerated by `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta['seconds']:.0f} s). "
           "Calibration on conditions of classes 0–4 (K rows cycling through them, seed 0); \"new conditions\": "
           f"classes 5–9, {rows[0]['n_new'] // 5 if rows else 0} samples each, seed {EVAL_SEED}, against no-cache "
           "sampling of the same seed and condition. \"chose\": the chosen candidate's PSNR on the samples that "
           "chose it (what the manifest reported before); \"reported\": `calibration.quality.validation_psnr_db`, "
           "on samples that played no part in the choice (split: the last half of the K rows, at the calibration "
           "seed and fresh ones; seeds: the K conditions at fresh seeds), the mean of per-sample PSNR like the new "
           "conditions' figure; \"1 seed\": the same rows at the calibration seed only (the figure before "
           "validation seeds). Gap = figure − new conditions (positive: optimistic). Evaluations: model "
           "evaluations (sample-steps) spent scoring candidates; exhaustive: every candidate on every choosing "
           "sample; calibration s: the whole calibration (reference run, candidates, refinements, validation).", "",
           "| model | N | r | K | validation (samples) | scoring | cached (longest run) | chose dB | reported dB | 1 seed dB "
           "| new conditions dB | gap chose | gap reported | gap 1 seed | evaluations (exhaustive) | calibration s | chosen |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap_c = None if r["chose_db"] is None else r["chose_db"] - r["new_db"]
        gap_v = None if r["validation_db"] is None else r["validation_db"] - r["new_db"]
        one = one_seed(r)
        gap_1 = None if one is None else one - r["new_db"]
        out.append(f"| {r['model']} | {r['steps']} | {r['ratio']:g} | {r['k']} | {r['validation']} ({r['validation_samples']}) "
                   f"| {'halving' if r['halving'] else 'exhaustive'} | {r['n_cached']}/{r['steps']} ({r['max_run']}) "
                   f"| {_f(r['chose_db'])} | {_f(r['validation_db'])} | {_f(one)} | {_f(r['new_db'])} | {_f(gap_c, '+.2f')} "
                   f"| {_f(gap_v, '+.2f')} | {_f(gap_1, '+.2f')} | {r['scoring_evaluations']} ({r['exhaustive_evaluations']}) "
                   f"| {_f(r.get('calibration_seconds'), '.1f')} | `{r['pattern']}` {r['correction']} |")
    out += ["", summary(rows), "", positions(rows)]
    return "\n".join(out)


def one_seed(r: dict) -> float | None:
    """The validation rows' figure at the first validation seed alone (None: not recorded)."""
    v = r.get("validation_scores")
    return float(np.mean(v[0])) if v else None


def summary(rows: list[dict]) -> str:
    """Per config, over the model cases: mean |gap| of each figure; and halving against exhaustive
    where both ran on the same case."""
    lines = []
    config = lambda r: (r["k"], r["validation"], r["halving"], r.get("validation_seeds", 1))  # noqa: E731
    gaps = {}
    for k, v, h, n_seeds in sorted({config(r) for r in rows}):
        at = [r for r in rows if config(r) == (k, v, h, n_seeds) and r["validation_db"] is not None]
        if not at:
            continue
        gv = [abs(r["validation_db"] - r["new_db"]) for r in at]
        gc = [abs(r["chose_db"] - r["new_db"]) for r in at]
        g1 = [abs(one_seed(r) - r["new_db"]) for r in at if one_seed(r) is not None]
        gaps[(k, v, h, n_seeds)] = (float(np.mean(gv)), float(np.max(gv)), len(at))
        samples = sorted({r["validation_samples"] for r in at})
        lines.append(f"- K = {k}, {v} at {n_seeds} seed{'s' if n_seeds > 1 else ''} ({'/'.join(map(str, samples))} "
                     f"samples), {'halving' if h else 'exhaustive'}: "
                     f"mean |gap| reported {np.mean(gv):.2f} dB "
                     f"(max {np.max(gv):.2f}, within 1.5 dB in {sum(g <= 1.5 for g in gv)} of {len(at)} cases), "
                     + (f"at 1 seed {np.mean(g1):.2f} dB (max {np.max(g1):.2f}, within 1.5 dB in "
                        f"{sum(g <= 1.5 for g in g1)}), " if g1 else "")
                     + f"chose {np.mean(gc):.2f} dB (max {np.max(gc):.2f}); calibration "
                     + (f"{np.mean([r['calibration_seconds'] for r in at]):.1f} s and " if all('calibration_seconds' in r for r in at) else "")
                     + f"{np.mean([r['scoring_evaluations'] + r['other_evaluations'] for r in at]):.0f} model evaluations "
                       "on average.")
    halving = {c: g for c, g in gaps.items() if c[2]}
    if halving:
        (k, v, _, n_seeds), (mean, worst, n) = min(halving.items(), key=lambda kv: (kv[1][1], kv[1][0]))
        lines.append(f"- Smallest worst |gap| with halving: K = {k}, {v} at {n_seeds} seeds ({mean:.2f} dB mean, "
                     f"worst {worst:.2f} dB over {n} cases).")
    pairs = []
    for r in rows:
        if r["halving"]:
            continue
        twin = next((x for x in rows if x["halving"] and all(x[f] == r[f] for f in ("model", "steps", "ratio", "k"))
                     and x["validation"] == r["validation"] and config(x) == config(r)[:2] + (True, config(r)[3])), None)
        if twin:
            same = (twin["pattern"], twin["correction"]) == (r["pattern"], r["correction"])
            lines.append(f"- halving vs exhaustive, {r['model']} N={r['steps']} r={r['ratio']:g} K={r['k']}: "
                         f"{'the same choice' if same else 'a different choice'}, new conditions "
                         f"{twin['new_db']:.2f} vs {r['new_db']:.2f} dB, {twin['scoring_evaluations']} vs "
                         f"{r['scoring_evaluations']} evaluations ({twin['scoring_evaluations'] / r['scoring_evaluations']:.2f}), "
                         f"{twin['scoring_seconds']:.1f} vs {r['scoring_seconds']:.1f} s.")
            pairs.append((same, twin["new_db"] >= r["new_db"], twin["scoring_evaluations"] / r["scoring_evaluations"]))
    if pairs:  # the issue's target: the same or a better choice (better: a higher PSNR on new conditions)
        lines.append(f"- Halving against exhaustive scoring over {len(pairs)} cases: the same choice in "
                     f"{sum(p[0] for p in pairs)}, the same or higher PSNR on new conditions in {sum(p[0] or p[1] for p in pairs)}, "
                     f"at {min(p[2] for p in pairs):.2f}–{max(p[2] for p in pairs):.2f} of the evaluations.")
    lines += replayed(rows) + by_seeds(rows)
    return "\n".join(lines)


def by_seeds(rows: list[dict]) -> list[str]:
    """Where runs recorded the validation rows at several seeds: the gap to new conditions of the
    figure from the first s seeds, per K, over the cases (what K and --validation-seeds were chosen by)."""
    lines = []
    multi = [r for r in rows if not r["halving"] and len(r.get("validation_scores") or []) > 1]
    for k, n_seeds in sorted({(r["k"], len(r["validation_scores"])) for r in multi}):
        at = [r for r in multi if (r["k"], len(r["validation_scores"])) == (k, n_seeds)]
        cells = []
        for s in range(1, min(len(r["validation_scores"]) for r in at) + 1):
            g = [abs(float(np.mean(r["validation_scores"][:s])) - r["new_db"]) for r in at]
            cells.append(f"{s} seed{'s' if s > 1 else ''} ({s * len(at[0]['validation_scores'][0])} samples): "
                         f"max {max(g):.2f}, mean {np.mean(g):.2f}, within 1.5 dB in {sum(x <= 1.5 for x in g)}")
        lines.append(f"- |gap| reported by validation seeds, K = {k}, exhaustive ({len(at)} cases; dB): " + "; ".join(cells) + ".")
    return lines


def replayed(rows: list[dict]) -> list[str]:
    """The default halving policy and the first one, replayed (tools/halving_policies.py) on the
    exhaustive runs' per-row score matrices: kept choices and cost, per K."""
    from halving_policies import replay

    from omnicache_export.calibration.halving import DEFAULT_POLICY, HalvingPolicy

    lines = []
    exhaustive = [r for r in rows if not r["halving"] and r.get("matrix")]
    for k, n_seeds in sorted({(r["k"], r.get("validation_seeds", 1)) for r in exhaustive}):
        at = [r for r in exhaustive if (r["k"], r.get("validation_seeds", 1)) == (k, n_seeds)]
        for name, policy in (("default", DEFAULT_POLICY), ("first (one row first, half going on)", HalvingPolicy())):
            res = [replay(r["matrix"], policy) for r in at]
            lines.append(f"- Replayed on the K = {k} exhaustive score matrices ({len(at)} cases, the runs at {n_seeds} "
                         f"validation seeds), the {name} halving policy "
                         f"keeps the exhaustive choice in {sum(x['kept'] for x in res)}, at "
                         f"{min(x['cost'] for x in res):.2f}–{max(x['cost'] for x in res):.2f} of the evaluations.")
    return lines


def positions(rows: list[dict]) -> str:
    """The γ-per-run-position candidates against the best other correction on the chosen schedule."""
    at = [r for r in rows if r.get("position_tried")]
    if not at:
        return ""
    scored = [r for r in at if r.get("position_db") is not None and r.get("other_db") is not None]
    won = [r for r in scored if r["position_db"] > r["other_db"]]
    lines = [f"γ per run position (d^(p−1), d ∈ {{0.8, 0.9, 1.1}}), tried on the chosen schedule of {len(at)} exports: "
             f"won {len(won)}; scored on every choosing row in {len(scored)} (the others stopped in a halving round)"
             + (f", mean {np.mean([r['position_db'] - r['other_db'] for r in scored]):+.2f} dB against the best other "
                "correction there" if scored else "") + ".", "",
             "| model | N | r | K | validation | scoring | longest run | best per-position γ dB | best other dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in at:
        pos = "stopped by halving" if r.get("position_db") is None else f"{r['position_db']:.2f}" + (" (won)" if r in won else "")
        lines.append(f"| {r['model']} | {r['steps']} | {r['ratio']:g} | {r['k']} | {r['validation']} "
                     f"| {'halving' if r['halving'] else 'exhaustive'} | {r['max_run']} | {pos} | {_f(r.get('other_db'))} |")
    return "\n".join(lines)


LONG_RUN_SECTION = "Predictors for long runs"


def render_long_runs(rows: list[dict], meta: dict) -> str:
    """The three-point cache trends against the best other correction on each export's chosen schedule."""
    at = [r for r in rows if "long_run_tried" in r]
    won = [r for r in at if r["long_run_won"]]
    scored = [r for r in at if r["long_run_db"] is not None and r["long_run_other_db"] is not None]
    lines = [f"Regenerated by `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta['seconds']:.0f} s). "
             "On the chosen schedule of each export (calibration as above), the best of the cache trend through the "
             "last three full steps (second order, second order with σ damped 0.5, the least-squares line over them; "
             "at the best mix λ with γ = 1, and at the best global γ where that was not 1) against the best other "
             "correction, both scored on every choosing row (with halving, the best of those that reached the last "
             "round; exhaustive: of every candidate); \"tried\": how many three-point trends were scored; \"new "
             "conditions\": the export's PSNR on classes 5–9 (as above). "
             f"Won (chosen) in {len(won)} of the {sum(1 for r in at if r['long_run_tried'])} exports where they were "
             f"tried ({len(at)} exports)"
             + (f"; mean {np.mean([r['long_run_db'] - r['long_run_other_db'] for r in scored]):+.2f} dB against the "
                "best other correction where both finished" if scored else "") + ".", "",
             "| model | N | r | K | scoring | cached (longest run) | tried | best three-point trend dB | of it, fitted "
             "line dB | best other dB | won | new conditions dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in at:
        new = (f"{r['long_run_db']:.2f} ({r['long_run_name']})" if r["long_run_db"] is not None else
               "stopped by halving" if r["long_run_tried"] else "not tried (no run of 2 after 3 full steps)")
        other = ("–" if r["long_run_other_db"] is None
                 else f"{r['long_run_other_db']:.2f} ({r['long_run_other_name']})")
        scoring = "halving" if r["halving"] else "exhaustive"
        lines.append(f"| {r['model']} | {r['steps']} | {r['ratio']:g} | {r['k']} | {scoring} "
                     f"| {r['n_cached']}/{r['steps']} ({r['max_run']}) | {r['long_run_tried']} | {new} "
                     f"| {_f(r.get('fitted_db'))} | {other} "
                     f"| {'yes' if r['long_run_won'] else 'no'} | {r['new_db']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dit-digits,pixart-digits,latte-digits")
    p.add_argument("--steps", default="20")
    p.add_argument("--ratios", default="0.5")
    p.add_argument("--configs", default="20:split,20:split:exhaustive")
    p.add_argument("--eval-per-class", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the rows here; with --merge, add to its rows")
    p.add_argument("--merge", action="store_true", help="render --out from the --json file's rows plus this run's")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--render", action="store_true", help="only render --out from the --json file")
    p.add_argument("--also", type=Path, nargs="*", default=[], help="with --render: more JSON files whose rows join")
    p.add_argument("--section", choices=("calibration", "long-runs"), default="calibration",
                   help=f"which section --out gets: {SECTION!r} or {LONG_RUN_SECTION!r}")
    a = p.parse_args(argv)
    section = {"calibration": (render, SECTION), "long-runs": (render_long_runs, LONG_RUN_SECTION)}[a.section]
    if a.render:
        from bench_quality import write_section

        saved = json.loads(a.json.read_text())
        rows, meta = saved["rows"], dict(saved["meta"])
        for extra in a.also:  # other runs' rows and commands, rendered beside these
            more = json.loads(extra.read_text())
            rows = rows + more["rows"]
            meta["command"] += "; " + more["meta"]["command"]
            meta["seconds"] += more["meta"]["seconds"]
        if a.also:
            meta["command"] += "; python tools/bench_calibration.py " + " ".join(
                shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        write_section(a.out, section[0](rows, meta), section[1])
        return 0
    from bench_quality import set_threads, write_section

    from omnicache_export.zoo.reference import export_reference, load_reference

    os.environ.setdefault("TQDM_DISABLE", "1")
    restore = set_threads(1)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_calibration_") if a.workdir is None else None
    workdir = Path(tmp.name) if tmp else a.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_calibration.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    saved = json.loads(a.json.read_text()) if a.json and a.merge and a.json.exists() else {"rows": [], "meta": {}}
    earlier = saved["rows"]
    rows: list[dict] = []

    def meta() -> dict:
        commands = [c for c in saved["meta"].get("command", "").split("; ") if c]
        return {"command": "; ".join([*commands, command]), "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "machine": f"{os.cpu_count()} CPU cores shared, 1 intra-op thread",
                "seconds": saved["meta"].get("seconds", 0.0) + time.perf_counter() - t_start}

    try:
        for name in [m for m in a.models.split(",") if m]:
            ref = load_reference(name)
            onnx = workdir / f"{name}.onnx"
            if not onnx.exists():
                export_reference(name, onnx)
            wd = workdir / name
            wd.mkdir(exist_ok=True)
            for steps in (int(s) for s in a.steps.split(",")):
                baseline: dict = {}
                for ratio in (float(r) for r in a.ratios.split(",")):
                    for config in (parse_config(c) for c in a.configs.split(",")):
                        row = run_case(ref, onnx, wd, steps, ratio, config, a.eval_per_class, baseline)
                        rows.append(row)
                        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                                          if not isinstance(v, list)}),
                              flush=True)
                        if a.json:  # after every case: a run cut short keeps what it measured
                            a.json.write_text(json.dumps({"meta": meta(), "rows": earlier + rows}, indent=1))
    finally:
        restore()
        if tmp:
            tmp.cleanup()
    rows = earlier + rows
    print(summary(rows))
    if a.out:
        write_section(a.out, section[0](rows, meta()), section[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
