"""Calibration's choices on a denoiser whose cache error is known exactly.

The test denoiser's output is smooth in t and independent of x, and its cache step returns the
output of the last full step: the γ = 1 linear extrapolation then removes most of the cache error,
so calibration must pick a correction, refine it (fitted γ, filters) and keep the best score.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnx
from onnx import TensorProto, helper

from omnicache_export.calibration.calibrate import CalibrationSet, calibrate, pair_estimate, psnr, reference_run
from omnicache_export.calibration.correction import Correction
from omnicache_export.calibration.schedule_corrected import corrected_errors
from omnicache_export.calibration.candidates import CalibrationPlan
from omnicache_export.calibration.correction import extrapolation_ratios
from omnicache_export.calibration.schedule import ScheduleFamily
from omnicache_export.io_spec import IOSpec
from omnicache_export.pipeline.job import UNCORRECTED, calibration_graphs
from omnicache_export.runtime.sampler import SamplingSpec, scheduler_config, timesteps_of

H = W = 8


def smooth_denoiser(folder, curvature: float = 0.05):
    """full.onnx: o = a + b t' + 0.05 t'^2 (t' = t / 1000) for every sample, and the cache tensor
    `omnicache_cache` = o; the uncorrected cache graph returns the cache it is fed."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 4, H, W)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, H, W])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 4, H, W])
    cache = helper.make_tensor_value_info("omnicache_cache", TensorProto.FLOAT, ["batch", 4, H, W])
    consts = [onnx.numpy_helper.from_array(v, n) for n, v in (
        ("a", a), ("b", b), ("k", np.float32(0.001)), ("q", np.float32(curvature)), ("zero", np.float32(0.0)),
        ("shape", np.array([-1, 1, 1, 1], np.int64)))]
    nodes = [
        helper.make_node("Mul", ["t", "k"], ["ts"]), helper.make_node("Reshape", ["ts", "shape"], ["tr"]),
        helper.make_node("Mul", ["b", "tr"], ["bt"]), helper.make_node("Mul", ["tr", "tr"], ["t2"]),
        helper.make_node("Mul", ["q", "t2"], ["qt2"]), helper.make_node("Add", ["a", "bt"], ["s1"]),
        helper.make_node("Add", ["s1", "qt2"], ["s2"]), helper.make_node("Mul", ["x", "zero"], ["x0"]),
        helper.make_node("Add", ["s2", "x0"], ["o"]), helper.make_node("Identity", ["o"], ["omnicache_cache"]),
    ]
    full = helper.make_model(helper.make_graph(nodes, "full", [x, t], [o, cache], consts),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    cut = helper.make_model(helper.make_graph([helper.make_node("Identity", ["omnicache_cache"], ["o"])], "cache",
                                              [x, t, cache], [o]),
                            opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(full, folder / "full.onnx")
    onnx.save(cut, folder / UNCORRECTED)
    return [IOSpec("x", "FLOAT", ["batch", 4, H, W], "latent"), IOSpec("t", "FLOAT", ["batch"], "timestep")]


def denoiser_graphs(folder, n_steps: int, curvature: float = 0.05):
    io = smooth_denoiser(folder, curvature)
    spec = SamplingSpec(scheduler_config("ddim"), n_steps, "x", "t", "o", [4, H, W], timestep_dtype="float32")
    return spec, calibration_graphs(folder, io, spec, ["omnicache_cache"], (H, W))


def run_calibration(folder, n_steps: int, n_samples: int, plan: CalibrationPlan):
    spec, graphs = denoiser_graphs(folder, n_steps)
    try:
        return calibrate(graphs, CalibrationSet(spec, {}, {}, 0, set(), n_samples), plan, (H, W), progress=False)
    finally:
        graphs.close()


def test_calibration_picks_and_refines_correction(tmp_path):
    result = run_calibration(tmp_path, 12, 2, CalibrationPlan(n_cached=6))
    names = [c.correction.name for c in result.candidates]
    assert "none" in names and "gamma=1" in names and "cache trend, mix 0.5" in names
    dp = [c.schedule.name for c in result.candidates if c.schedule.family == ScheduleFamily.CORRECTED_ERROR_DP]
    assert any(n.endswith("[gamma=1]") for n in dp) and any(n.endswith("[cache trend, mix 0.5]") for n in dp)
    # the best predictor at γ = 1 is refined on its schedule: γ line search and filters
    assert any("gamma=1.1" in n for n in names) and any("+ filter" in n for n in names)
    best = result.best
    complete = [c for c in result.candidates if len(c.rows) == len(result.split.choose)]
    assert best.psnr_db == max(c.psnr_db for c in complete)
    none = max((c for c in result.candidates if c.correction.name == "none"), key=lambda c: c.psnr_db)
    assert best.correction.name != "none" and best.psnr_db > none.psnr_db + 10
    # the locally fitted gammas are close to 1 where the trend is linear
    local = next((c for c in result.candidates if c.correction.name == "local least-squares gamma"), None)
    if local is not None:
        fitted = local.correction.gammas[~local.schedule.full & (extrapolation_ratios(local.schedule.full, result.timesteps) > 0)]
        assert np.all(np.abs(fitted - 1) < 0.2)
    # every schedule candidate honours the constraints; the last step is cached only where allowed
    for c in result.candidates:
        # auto: 6 of 12 fit in runs of 2, and runs of 3 are tried beside them
        assert c.schedule.full[0] and c.schedule.max_run <= 3 and c.schedule.n_cached == 6
        assert c.schedule.full[-1] or "last step cacheable" in c.schedule.name
    assert {c.schedule.full[-1] for c in result.candidates} == {True, False}  # both policies were tried
    dp = {c.schedule.name for c in result.candidates if c.schedule.family == ScheduleFamily.CORRECTED_ERROR_DP}
    assert dp and all("p=" in name for name in dp)
    assert np.all(psnr(result.reference, result.reference) > 150)  # identical: capped, finite


def test_extrapolation_ratios_follow_time():
    full = np.array([True, True, False, True, False, False, True])
    t = np.array([900.0, 800.0, 700.0, 500.0, 400.0, 200.0, 100.0])
    r = extrapolation_ratios(full, t)
    np.testing.assert_allclose(r, [0, 0, 1.0, 0, (400 - 500) / (500 - 800), (200 - 500) / (500 - 800), 0])
    # before two full steps exist there is no trend
    assert extrapolation_ratios(np.array([True, False, True]), np.array([3.0, 2.0, 1.0]))[1] == 0


def test_candidates_can_be_restricted_for_ablations(tmp_path):
    only_none = run_calibration(tmp_path, 9, 1, CalibrationPlan(4, correction="none"))
    assert {c.correction.name for c in only_none.candidates} == {"none"}
    gammas = run_calibration(tmp_path, 9, 1, CalibrationPlan(4, correction="gamma", schedules=("alternation",)))
    assert {c.schedule.name for c in gammas.candidates} <= {"alternation", "alternation (last step cacheable)"}
    names = {c.correction.name for c in gammas.candidates}
    assert "gamma=1" in names and "gamma=0.9" in names and not any("filter" in n for n in names)


def test_last_step_policy_can_be_forced(tmp_path):
    for last in (False, True):
        result = run_calibration(tmp_path, 9, 1, CalibrationPlan(4, allow_last_cached=last, correction="gamma1"))
        last_full = {bool(c.schedule.full[-1]) for c in result.candidates}
        assert last_full == ({True, False} if last else {True})
        assert not any("last step cacheable" in c.schedule.name for c in result.candidates)
    # 6 of 9 cached in runs of 2 only fits with the last step cached: those candidates alone
    result = run_calibration(tmp_path, 9, 1, CalibrationPlan(6, max_consecutive=2, correction="gamma1"))
    assert all(not c.schedule.full[-1] for c in result.candidates)


def test_corrected_errors_vanish_for_linear_outputs(tmp_path):
    """The DP's pair errors come from the real cache graph fed from the reference run's records."""
    spec, graphs = denoiser_graphs(tmp_path, 9, curvature=0.0)
    try:
        data = CalibrationSet(spec, {}, {}, 0, set(), 1)
        ref = reference_run(graphs, data, progress=False)
        t = timesteps_of(spec)
        estimate = pair_estimate(Correction.gamma(1.0, 9, "gamma=1"), ref.records, graphs.plain, t)
        cost = corrected_errors([r[1].numpy() for r in ref.records], estimate)
        scale = float(np.mean(ref.records[4][1].numpy() ** 2))
        assert cost(4, 3, 2) <= 1e-10 * scale  # linear in t: the γ = 1 extrapolation is exact
        assert cost(4, 3, -1) > 1e-6 * scale  # no trend yet: the stale output's error remains
    finally:
        graphs.close()


def test_a_non_finite_candidate_never_wins():
    import math

    from omnicache_export.calibration.calibrate import Candidate
    from omnicache_export.calibration.schedule import Schedule

    s = Schedule(np.array([True, False, True]))
    nan, good = (Candidate(s, Correction.none(3), psnr_db=v) for v in (math.nan, 30.0))
    assert max([nan, good], key=lambda c: c.rank) is good and nan.rank == -math.inf


def _calibrate(folder, n_steps: int, data_kw: dict, plan: CalibrationPlan):
    spec, graphs = denoiser_graphs(folder, n_steps)
    try:
        data = CalibrationSet(spec, {}, {}, 0, set(), **data_kw)
        return calibrate(graphs, data, plan, (H, W), progress=False)
    finally:
        graphs.close()


def test_halving_policy_rounds_and_keep_rule():
    from omnicache_export.calibration.halving import DEFAULT_POLICY, HalvingPolicy

    # the default: a quarter of the choosing rows first (3 of 10 at K = 20), rows doubling, all at the end
    assert DEFAULT_POLICY.rounds(10) == [3, 6, 10] and DEFAULT_POLICY.rounds(6) == [2, 4, 6]
    assert DEFAULT_POLICY.rounds(1) == [1] and HalvingPolicy().rounds(6) == [1, 2, 4, 6]  # the first policy
    ranks = np.array([40.0, 45.0, np.nan, 44.5, 30.0, 46.0, -np.inf, 41.0, 39.0, 38.0, 37.0, 36.0])
    # a quarter goes on (12 // 4 = 3), best first; NaN and -inf (non-finite runs) rank last
    assert DEFAULT_POLICY.going_on(ranks).tolist() == [5, 1, 3]
    assert DEFAULT_POLICY.going_on([1.0, 3.0, 2.0]).tolist() == [1, 2]  # never fewer than min_keep = 2
    assert DEFAULT_POLICY.going_on([5.0, 5.0, 5.0, 1.0, 1.0]).tolist() == [0, 1]  # ties: the first come first
    # the margin rule: every candidate within margin_db of the leader too, up to a share max_keep of the round
    near = HalvingPolicy(eta=4, margin_db=1.0, max_keep=0.5)
    assert near.going_on([46.0, 45.5, 45.1, 44.9, 30, 30, 30, 30]).tolist() == [0, 1, 2]
    assert near.going_on([46.0, 45.9, 45.8, 45.7, 45.6, 30, 30, 30]).tolist() == [0, 1, 2, 3]  # capped at 8 * 0.5


def test_halving_chooses_as_exhaustive_scoring_for_at_most_half_the_evaluations(tmp_path):
    # K = 20, the default: ten rows choose (rounds of 3, 6, 10 rows), ten report
    from omnicache_export.calibration.halving import DEFAULT_POLICY

    halving = _calibrate(tmp_path, 10, {"n_samples": 20}, CalibrationPlan(5))
    exhaustive = _calibrate(tmp_path, 10, {"n_samples": 20}, CalibrationPlan(5, halving=False))
    assert (halving.best.schedule.pattern, halving.best.correction.name) == \
        (exhaustive.best.schedule.pattern, exhaustive.best.correction.name)
    # the winner's score is the one exhaustive scoring gives it: the same rows, the same samples
    assert len(halving.best.rows) == len(exhaustive.best.rows) == 10
    np.testing.assert_allclose(halving.best.scores, exhaustive.best.scores, rtol=0, atol=1e-6)
    h, e = halving.cost, exhaustive.cost
    assert e.scoring_evaluations == e.exhaustive_evaluations  # every candidate on every choosing row
    assert h.scoring_evaluations <= 0.5 * e.scoring_evaluations, (h.scoring_evaluations, e.scoring_evaluations)
    # cost accounting: one evaluation per sample and step, summed over the rows each candidate saw
    assert h.scoring_evaluations == sum(len(c.rows) * c.schedule.n_steps for c in halving.candidates)
    assert h.exhaustive_evaluations == 10 * sum(c.schedule.n_steps for c in halving.candidates)
    assert {len(c.rows) for c in halving.candidates} <= set(DEFAULT_POLICY.rounds(10))
    assert halving.best.final.shape[0] == 10
    # the schedules' tournament: a quarter of its candidates went on from each round, at least two
    first = [c for c in halving.candidates if c.batch == 0]
    assert sum(len(c.rows) > 3 for c in first) == max(2, len(first) // 4)


def test_halving_replay_counts_as_the_scorer(tmp_path):
    """tools/halving_policies.py replays a policy on an exhaustive run's per-row scores: on the same
    denoiser it must reach the real halving run's choice and cost, else its policy search is moot."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_calibration import score_matrix
    from halving_policies import replay

    from omnicache_export.calibration.halving import DEFAULT_POLICY

    halving = _calibrate(tmp_path, 10, {"n_samples": 20}, CalibrationPlan(5))
    exhaustive = _calibrate(tmp_path, 10, {"n_samples": 20}, CalibrationPlan(5, halving=False))
    verdict = replay(score_matrix(exhaustive), DEFAULT_POLICY)
    assert verdict["kept"]
    assert verdict["cost"] == pytest.approx(halving.cost.scoring_evaluations / exhaustive.cost.scoring_evaluations)


def test_validation_rows_played_no_part_in_the_choice(tmp_path):
    result = _calibrate(tmp_path, 9, {"n_samples": 4}, CalibrationPlan(4, correction="gamma1"))
    split, v = result.split, result.validation
    assert split.mode == "split" and split.choose == (0, 1) and split.validate == (2, 3)
    assert not set(split.choose) & set(split.validate)
    for c in result.candidates:  # every candidate was scored on choosing rows only
        assert c.rows and set(c.rows) <= set(split.choose)
    assert v.rows == (2, 3) and np.isfinite(v.psnr_db) and v.psnr_min_db <= v.psnr_db
    assert result.reference.shape[0] == len(result.best.rows)  # the reference of the rows that chose
    seeds = _calibrate(tmp_path, 9, {"n_samples": 2, "validation": "seeds"}, CalibrationPlan(4, correction="gamma1"))
    assert seeds.split.choose == seeds.split.validate == (0, 1) and seeds.split.validation_seed != seeds.split.seed
    one = _calibrate(tmp_path, 9, {"n_samples": 1}, CalibrationPlan(4, correction="gamma1"))
    assert one.split.mode == "seeds"  # one row: nothing to hold out, fresh seeds instead


def test_validation_averages_the_held_out_rows_over_seeds(tmp_path):
    from omnicache_export.calibration.validation import VALIDATION_SEED_OFFSET

    one = _calibrate(tmp_path, 9, {"n_samples": 4, "validation_seeds": 1}, CalibrationPlan(4, correction="gamma1"))
    three = _calibrate(tmp_path, 9, {"n_samples": 4, "validation_seeds": 3}, CalibrationPlan(4, correction="gamma1"))
    v = three.validation
    assert v.seeds == (0, VALIDATION_SEED_OFFSET, 2 * VALIDATION_SEED_OFFSET) and v.rows == (2, 3)
    assert v.scores.shape == (3, 2) and v.n_samples == 6
    # the mean of per-sample PSNR over every (seed, row); the calibration seed's part is the one-seed figure
    assert v.psnr_db == pytest.approx(v.scores.mean()) and v.psnr_min_db == pytest.approx(v.scores.min())
    assert one.validation.psnr_db == pytest.approx(v.scores[0].mean(), abs=1e-9)
    assert three.best.correction.name == one.best.correction.name  # validation plays no part in the choice
    # the cost: no-cache and chosen candidate, per validation sample and step
    assert three.cost.other_evaluations - one.cost.other_evaluations == 2 * 2 * 2 * 9


def test_auto_run_limits_reach_past_two_thirds(tmp_path):
    from omnicache_export.calibration.candidates import auto_run_limits

    n = 12
    assert auto_run_limits(n, 6, None) == [2, 3] and auto_run_limits(n, 9, None) == [3, 4]
    assert auto_run_limits(n, 8, False) == [3, 4]  # 8 of 12 with the last step full: runs of 3
    result = _calibrate(tmp_path, n, {"n_samples": 2}, CalibrationPlan(9, correction="gamma"))
    assert result.best.schedule.n_cached / n > 2 / 3 and result.best.schedule.max_run in (3, 4)
    assert result.max_consecutive_auto and result.max_consecutive == 4
    assert max(c.schedule.max_run for c in result.candidates) == 4
    # a γ per run position was tried on the top schedule
    assert any("run position" in c.correction.name for c in result.candidates)
    with pytest.raises(ValueError, match="need runs longer than 4"):
        auto_run_limits(n, 10, None)
