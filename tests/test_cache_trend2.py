"""The second-order cache trend (issue 11, predictors for long runs): the graph's σ term against
numpy, σ = 0 giving the first-order graph's numbers, the tables of the three-point fits, and the
runtime feeding a third cache buffer end to end, equal to calibration's scoring."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from conftest import doubling_head, max_rel_err, run_ort
from omnicache_export.calibration.correction import Correction, CorrectionTables, TrendFit, trend_weights
from omnicache_export.graph.embed import build_cache_graph, freeze_cache_graph
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, STEP, TREND, TREND2, prev2_cache_name, prev_cache_name,
)
from omnicache_export.passes.extrapolate_cache import ExtrapolateCachePass
from omnicache_export.passes.freeze_tables import FreezeTablesPass
from omnicache_export.runtime.dispatch import CacheState
from omnicache_export.runtime.graph_io import Feed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def history(zoo_step):
    """history(family) -> (cache.onnx, feeds with the last caches, cache names, the two earlier caches)."""

    def get(family: str):
        folder, feeds, _ = zoo_step(family)
        _, older, _ = zoo_step(family, seed=7)
        _, oldest, _ = zoo_step(family, seed=11)
        names = [v.name for v in ir.load(folder / "cache.onnx").graph.inputs if v.name.startswith("omnicache_cache")]
        earlier = {**{prev_cache_name(k): older[k] for k in names}, **{prev2_cache_name(k): oldest[k] for k in names}}
        return folder / "cache.onnx", feeds, names, earlier

    return get


def save(model: ir.Model, path):
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def at(step: int) -> dict:
    return {STEP: np.array([step], np.int64)}


@pytest.mark.parametrize("family", ["dit", "latte", "flux"])  # image, video (B x frames rows), two streams
def test_second_order_matches_feeding_the_extrapolated_cache(family, history, tmp_path):
    cache, feeds, names, earlier = history(family)
    rho = np.array([0.0, 0.5, -0.4, 1.2], np.float32)
    sigma = np.array([0.0, 0.0, 0.7, -0.3], np.float32)
    first = ir.load(cache)
    ExtrapolateCachePass(names, 4)(first)
    first_path = save(first, tmp_path / "first.onnx")
    model = ir.load(cache)
    ExtrapolateCachePass(names, 4, second_order=True)(model)
    parametric = save(model, tmp_path / "second.onnx")
    FreezeTablesPass({TREND: rho, TREND2: sigma})(model)
    frozen = save(model, tmp_path / "frozen.onnx")
    prev_only = {k: v for k, v in earlier.items() if k.endswith("_prev")}
    for step in range(4):
        fed = run_ort(parametric, {**feeds, **earlier, TREND: rho, TREND2: sigma, **at(step)})["out_sample"]
        out = run_ort(frozen, {**feeds, **earlier, **at(step)})["out_sample"]
        np.testing.assert_array_equal(out, fed)
        if sigma[step] == 0:  # σ = 0: the first-order graph's numbers, bit for bit
            np.testing.assert_array_equal(fed, run_ort(first_path, {**feeds, **prev_only, TREND: rho, **at(step)})["out_sample"])
            continue
        hat = {k: feeds[k] + rho[step] * (feeds[k] - earlier[prev_cache_name(k)])
               + sigma[step] * (earlier[prev_cache_name(k)] - earlier[prev2_cache_name(k)]) for k in names}
        expected = run_ort(cache, {**feeds, **hat})["out_sample"]
        assert max_rel_err(out, expected) <= 1e-5, step
        first_order = run_ort(first_path, {**feeds, **prev_only, TREND: rho, **at(step)})["out_sample"]
        assert max_rel_err(out, first_order) > 1e-4  # σ really moves the output


@pytest.mark.parametrize("family", ["dit", "latte"])
def test_rows_at_different_steps_equal_each_row_alone(family, history, tmp_path):
    cache, feeds, names, earlier = history(family)
    tables = {TREND: np.array([0.0, 1.0, -0.5, 0.5], np.float32), TREND2: np.array([0.0, 0.0, 0.6, -0.2], np.float32),
              COEFFICIENTS: np.array([0.0, 0.5, 0.25, 1.0], np.float32), BLEND: np.array([0.0, 0.5, 0.1, 0.9], np.float32)}
    model = build_cache_graph(ir.load(cache), "out_sample", names, 4, trend=True, blend=True, filter_hw=None, trend2=True)
    path = save(freeze_cache_graph(model, tables), tmp_path / "rows.onnx")
    graph = ir.load(path).graph
    before = [v.name for v in ir.load(cache).graph.inputs]
    assert [v.name for v in graph.inputs] == before + [
        STEP, *[f(k) for k in names for f in (prev_cache_name, prev2_cache_name)], FULL_PREV, FULL_PREV2]
    assert graph.initializers[TREND2].dtype == ir.DataType.FLOAT
    out_shape = run_ort(cache, feeds)["out_sample"].shape
    rng = np.random.default_rng(5)
    every = {**feeds, **earlier, FULL_PREV: rng.standard_normal(out_shape).astype(np.float32),
             FULL_PREV2: rng.standard_normal(out_shape).astype(np.float32)}
    rows = out_shape[0]
    steps = np.array([2, 3][:rows], np.int64)
    together = run_ort(path, {**every, STEP: steps})["out_sample"]
    batch = {k for k, v in every.items() if v.ndim and len(v) % rows == 0}
    for r, step in enumerate(steps):
        alone = {k: (np.split(v, rows)[r] if k in batch else v) for k, v in every.items()}
        np.testing.assert_array_equal(together[r:r + 1], run_ort(path, {**alone, **at(int(step))})["out_sample"])


def test_trend2_only_when_asked(history):
    cache, _, names, _ = history("dit")
    plain = build_cache_graph(ir.load(cache), "out_sample", names, 3, trend=True, blend=True, filter_hw=None)
    inputs = {v.name for v in plain.graph.inputs}
    assert TREND2 not in inputs and not inputs & {prev2_cache_name(k) for k in names}
    with pytest.raises(ValueError, match="trend2 needs trend"):
        build_cache_graph(ir.load(cache), "out_sample", names, 3, trend=False, blend=True, filter_hw=None, trend2=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_16_bit_caches_computed_in_float32(dtype, tmp_path):
    doubling_head(tmp_path / "h.onnx", dtype)
    model = ir.load(tmp_path / "h.onnx")
    ExtrapolateCachePass(["omnicache_cache"], 2, second_order=True)(model)
    FreezeTablesPass({TREND: np.array([0.0, 0.75], np.float32), TREND2: np.array([0.0, -0.5], np.float32)})(model)
    path = save(model, tmp_path / "f.onnx")
    r, r1, r2 = np.random.default_rng(1).standard_normal((3, 2, 3)).astype(dtype)
    out = run_ort(path, {"omnicache_cache": r, "omnicache_cache_prev": r1, "omnicache_cache_prev2": r2, **at(1)})["out_sample"]
    assert out.dtype == dtype
    r, r1, r2 = (x.astype(np.float64) for x in (r, r1, r2))
    expected = 2 * (r + 0.75 * (r - r1) - 0.5 * (r1 - r2))
    assert max_rel_err(out.astype(np.float64), expected) <= (2e-3 if dtype == np.float16 else 1e-6)


# ------------------------------------------------------------------ the tables


def test_three_point_fits_reproduce_what_they_fit():
    t3 = np.array([400.0, 650.0, 900.0])  # t_j, t_j', t_j'' (newest first), non-uniform below
    t3b = np.array([380.0, 700.0, 910.0])
    for times in (t3, t3b):
        for target in (250.0, 100.0):
            quad = trend_weights(TrendFit.QUADRATIC, target, times)
            line = trend_weights(TrendFit.FITTED3, target, times)
            assert np.isclose(quad.sum(), 1) and np.isclose(line.sum(), 1)
            poly = np.poly1d([1e-3, -0.7, 3.0])  # a quadratic in t: the Lagrange weights are exact
            assert np.isclose(quad @ poly(times), poly(target))
            fit = np.polyfit(times, poly(times), 1)  # the least-squares line, evaluated at t_i
            assert np.isclose(line @ poly(times), np.polyval(fit, target))


def test_tables_where_three_full_steps_exist():
    t = np.linspace(999, 0, 10)
    full = np.array([c == "F" for c in "FFCFCCFCCF"])
    first = CorrectionTables.build(Correction.mixed(0.25, 10), full, t, None)
    quad = CorrectionTables.build(Correction.mixed(0.25, 10, 1.1, fit=TrendFit.QUADRATIC, damping=0.5), full, t, None)
    assert first.trend2 is not None and not first.has_trend2
    # steps 2 (two full steps before it) keep the first-order trend; 4, 5, 7, 8 have three
    assert quad.sigma[2] == 0 and np.isclose(quad.trend[2], 1.1 * first.trend[2])
    assert np.all(quad.sigma[[4, 5, 7, 8]] != 0) and np.all(quad.sigma[full] == 0) and np.all(quad.trend[full] == 0)
    np.testing.assert_array_equal(quad.coefficients, CorrectionTables.build(Correction.mixed(0.25, 10, 1.1), full, t,
                                                                            None).coefficients)  # output trend as before
    for i, (j, j1, j2) in {4: (3, 1, 0), 8: (6, 3, 1)}.items():
        w = trend_weights(TrendFit.QUADRATIC, t[i], t[[j, j1, j2]])
        assert np.isclose(quad.trend[i], 1.1 * (w[0] - 1), rtol=1e-6)
        assert np.isclose(quad.sigma[i], -1.1 * 0.5 * w[2], rtol=1e-6)
    name = Correction.mixed(0.5, 10, fit=TrendFit.FITTED3).name
    assert name == "cache trend, mix 0.5, fitted over 3 full steps"
    assert Correction.mixed(0.5, 10, fit=TrendFit.QUADRATIC).name == "cache trend, mix 0.5, second order"


# ------------------------------------------------------------------ the runtime


def test_cache_state_rings():
    shapes, dtypes = {"out": (2,), "c": (2,)}, {"out": torch.float32, "c": torch.float32}
    st = CacheState("out", shapes, dtypes, torch.device("cpu"), cache_depth=3)
    assert [len(st.buffers[k]) for k in ("out", "c")] == [2, 3]
    assert len(CacheState("out", shapes, dtypes, torch.device("cpu")).buffers["c"]) == 2  # no third buffer
    for k in range(1, 5):
        for name, target in st.targets().items():
            target.fill_(k)
        st.advance()
        assert float(st.last("c")[0]) == k and float(st.prev[0]) == k
        if k >= 3:
            assert float(st.ago("c", 2)[0]) == k - 2 and float(st.before_last("c")[0]) == k - 1
    assert float(st.prev2[0]) == 3


def test_export_with_second_order_trend_runs_as_calibrated(zoo_export, tmp_path, monkeypatch):
    """The whole export with calibration's choice forced to a second-order candidate (scored as every
    candidate is): cache.onnx takes `<cache>_prev2`, the manifest records the feed and σ and loads,
    and OmniCache's samples equal calibration's within 1e-5."""
    from omnicache_export.calibration import calibrate as cal
    from omnicache_export.calibration import schedule as sched
    from omnicache_export.calibration.correction import extrapolation_ratios
    from omnicache_export.pipeline import job
    from omnicache_export.runtime.manifest import read_manifest
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.serving.batcher import StepBatcher

    path = zoo_export("dit", "torchscript")
    forced = {}
    real = job.calibrate

    def calibrate_forced(graphs, data, plan, hw, progress=True):
        result = real(graphs, data, plan, hw, progress=False)
        n = data.spec.n_steps
        s = sched.Schedule.from_pattern("FFFCCFCCCF", name="forced")
        reference = np.zeros((data.n_samples, *result.reference.shape[1:]), result.reference.dtype)
        reference[list(data.split.choose)] = result.reference
        scorer = cal.Scorer(graphs, data, reference, result.timesteps, hw, halving=False)
        cand = scorer.score(s, Correction.mixed(0.5, n, fit=TrendFit.QUADRATIC))
        forced["final"], forced["rows"] = cand.final.copy(), cand.rows
        result.best, result.candidates = cand, [*result.candidates, cand]
        result.ratios = extrapolation_ratios(s.full, result.timesteps)
        return result

    monkeypatch.setattr(job, "calibrate", calibrate_forced)
    cond = tmp_path / "calib.npz"
    np.savez(cond, class_labels=np.arange(6, dtype=np.int64))
    out = tmp_path / "export"
    job.export(path, out, job.ExportOptions(steps=10, calib=cond, num_calib=6, cache_ratio=0.5, max_consecutive=3,
                                            filters=False, progress=False))
    m = read_manifest(out)
    cache_in = m.graphs["cache"].inputs_fed_by(Feed.CACHE_PREV2)
    assert [t.name for t in cache_in] == ["omnicache_cache_prev2"]
    assert m.correction.name == "cache trend, mix 0.5, second order" and any(m.correction.cache_trend2)
    rt = OmniCache.load(out)  # manifest and graph checks, σ included
    try:
        assert rt.dispatch.cache_depth == 3
        rows = list(forced["rows"])
        labels = np.arange(6, dtype=np.int64)
        got = rt.sample({"class_labels": labels[rows]}, {}, m.calibration.seed, rows=rows, batched={"class_labels"})
        alone = [rt.sample({"class_labels": labels[[r]]}, {}, 50 + r, rows=[0], batched={"class_labels"}) for r in range(3)]
    finally:
        rt.close()
    expected = forced["final"]
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5

    # the step batcher: requests joining mid-flight (other steps, their own three cache buffers)
    batcher = StepBatcher.load(out, max_batch=4)
    try:
        futures = []
        for r in range(3):
            futures.append(batcher.submit({"class_labels": labels[[r]], "seed": np.array([50 + r], np.int64)}))
            batcher.tick()
            batcher.tick()
        batcher.run_until_idle()
        served = [f.result()["latent"] for f in futures]
    finally:
        batcher.close()
    for a, b in zip(served, alone):
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-6

    # the manifest's σ is checked against the graph's frozen table
    import json

    from omnicache_export.errors import UserError
    from omnicache_export.runtime.manifest import FILENAME

    data = json.loads((out / FILENAME).read_text())
    k = next(i for i, v in enumerate(data["correction"]["cache_trend2"]) if v)
    data["correction"]["cache_trend2"][k] *= 2
    (out / FILENAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"correction.cache_trend2\[{k}\] is .*omnicache_cache_trend2"):
        OmniCache.load(out)


def test_graph_check_places_sigma_after_three_full_steps():
    from omnicache_export.runtime.graph_check import COEFFICIENTS as C, TREND as T, TREND2 as S, schedule_disagreement

    t = np.linspace(999, 0, 10)
    full = np.array([c == "F" for c in "FFCFCCFCCF"])
    tab = CorrectionTables.build(Correction.mixed(0.0, 10, fit=TrendFit.QUADRATIC), full, t, None)
    tables = {C: tab.coefficients.astype(np.float64), T: tab.trend.astype(np.float64), S: tab.sigma.astype(np.float64)}
    gammas = [None if f else 0.0 for f in full]
    assert schedule_disagreement(full, t, gammas, tables) is None
    moved = tables[S].copy()
    moved[2] = 0.1  # step 2 has two full steps before it
    step, why = schedule_disagreement(full, t, gammas, {**tables, S: moved})
    assert step == 2 and "fewer than three full steps" in why
