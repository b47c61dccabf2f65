"""The cache trend in the graph: ρ = 0 keeps the cache graph's numbers; otherwise the graph equals the
old one fed R̂ = R + ρ (R − R_prev), whether ρ is fed or frozen; it shares `omnicache_step` with the
correction pass, which runs after it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import doubling_head, max_rel_err, run_ort
from omnicache_export.graph.embed import build_cache_graph, freeze_cache_graph
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, MASKS, STEP, TREND, prev_cache_name,
)
from omnicache_export.passes.extrapolate_cache import ExtrapolateCachePass
from omnicache_export.passes.freeze_tables import FreezeTablesPass

FAMILY_CASES = ["dit", "latte", "flux"]  # image, video, packed latents with a text stream


@pytest.fixture(scope="module")
def split_case(zoo_step):
    """split_case(family) -> (cache.onnx, feeds with this step's caches, cache names, a second step's caches)."""

    def get(family: str):
        folder, feeds, _ = zoo_step(family)
        _, older, _ = zoo_step(family, seed=7)
        names = [v.name for v in ir.load(folder / "cache.onnx").graph.inputs if v.name.startswith("omnicache_cache")]
        return folder / "cache.onnx", feeds, names, {prev_cache_name(k): older[k] for k in names}

    return get


def save(model: ir.Model, path):
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def extrapolated(cache_path, tmp_path, names, trend):
    """(parametric, frozen): the trend pass alone, ρ a table input, then frozen to `trend`."""
    model = ir.load(cache_path)
    ExtrapolateCachePass(names, len(trend))(model)
    parametric = save(model, tmp_path / "parametric.onnx")
    FreezeTablesPass({TREND: trend})(model)
    return parametric, save(model, tmp_path / "frozen.onnx")


def at(step: int) -> dict:
    return {STEP: np.array([step], np.int64)}


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_trend_matches_feeding_the_extrapolated_cache(family, split_case, tmp_path):
    cache, feeds, names, prev = split_case(family)
    trend = np.array([0.0, 0.5, -1.0, 2.0], np.float32)
    parametric, frozen = extrapolated(cache, tmp_path, names, trend)
    plain = run_ort(cache, feeds)["out_sample"]
    for step in range(4):
        out = run_ort(frozen, {**feeds, **prev, **at(step)})["out_sample"]
        fed = run_ort(parametric, {**feeds, **prev, TREND: trend, **at(step)})["out_sample"]
        assert max_rel_err(out, fed) <= 1e-6, step
        if trend[step] == 0:
            assert np.array_equal(out, plain) and np.array_equal(fed, plain)  # R + 0
            continue
        hat = {k: feeds[k] + trend[step] * (feeds[k] - prev[prev_cache_name(k)]) for k in names}
        expected = run_ort(cache, {**feeds, **hat})["out_sample"]
        assert max_rel_err(out, expected) <= 1e-5, step
        assert max_rel_err(out, plain) > 1e-3  # the trend really moves the output


def test_layout_and_shared_step_with_the_correction(split_case, tmp_path):
    cache, feeds, names, prev = split_case("dit")
    tables = {TREND: np.array([0.0, 1.0, 0.5], np.float32), COEFFICIENTS: np.array([0.0, 0.5, 0.25], np.float32),
              BLEND: np.array([0.0, 0.5, 0.5], np.float32)}
    model = build_cache_graph(ir.load(cache), "out_sample", names, 3, trend=True, blend=True, filter_hw=None)
    path = save(freeze_cache_graph(model, tables), tmp_path / "tc.onnx")
    graph = ir.load(path).graph
    before = [v.name for v in ir.load(cache).graph.inputs]
    # The runtime's graph: as today's, the step and the previous caches first, then the last full outputs.
    assert [v.name for v in graph.inputs] == before + [STEP, *map(prev_cache_name, names), FULL_PREV, FULL_PREV2]
    assert graph.initializers[TREND].dtype == ir.DataType.FLOAT
    added = {n.op_type for n in graph if n.name.startswith("omnicache/cache_trend")}
    assert added <= {"Gather", "Sub", "Mul", "Add", "Cast", "Shape", "Concat", "Reshape", "Constant"}
    rng = np.random.default_rng(0)
    shape = run_ort(cache, feeds)["out_sample"].shape
    hist = {FULL_PREV: rng.standard_normal(shape).astype(np.float32), FULL_PREV2: rng.standard_normal(shape).astype(np.float32)}
    out = run_ort(path, {**feeds, **prev, **hist, **at(1)})["out_sample"]
    hat = {k: feeds[k] + (feeds[k] - prev[prev_cache_name(k)]) for k in names}
    tilde = run_ort(cache, {**feeds, **hat})["out_sample"]
    expected = tilde + 0.5 * (hist[FULL_PREV] - tilde) + 0.5 * (hist[FULL_PREV] - hist[FULL_PREV2])
    assert max_rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("family", ["dit", "latte"])  # latte: a cache of batch x frames rows
def test_rows_at_different_steps_equal_each_row_alone(family, split_case, tmp_path):
    """One call with a step per row (`omnicache_step` int64 [B]) gives each row what it gives alone
    at its step (trend, blend, correction and filter all gathered per row), bit for bit."""
    cache, feeds, names, prev = split_case(family)
    n = 4
    rng = np.random.default_rng(3)
    tables = {TREND: np.array([0.0, 1.0, 0.5, -0.5], np.float32), COEFFICIENTS: np.array([0.0, 0.5, 0.25, 1.0], np.float32),
              BLEND: np.array([0.0, 0.5, 0.1, 0.9], np.float32)}
    out_shape = run_ort(cache, feeds)["out_sample"].shape
    hw = out_shape[-2:]
    radius = np.add.outer(np.fft.fftfreq(hw[0]) ** 2, np.fft.fftfreq(hw[1]) ** 2)  # even along each axis
    tables[MASKS] = np.stack([np.exp(-c * radius) for c in (1, 5, 20, 80)]).astype(np.float32) / (hw[0] * hw[1])
    model = build_cache_graph(ir.load(cache), "out_sample", names, n, trend=True, blend=True, filter_hw=hw)
    path = save(freeze_cache_graph(model, tables), tmp_path / "rows.onnx")
    hist = {FULL_PREV: rng.standard_normal(out_shape).astype(np.float32),
            FULL_PREV2: rng.standard_normal(out_shape).astype(np.float32)}
    every = {**feeds, **prev, **hist}
    rows = out_shape[0]
    steps = np.array([1, 3][:rows], np.int64)
    together = run_ort(path, {**every, STEP: steps})["out_sample"]
    batch = {k for k, v in every.items() if v.ndim and len(v) % rows == 0 and k not in ("img_ids", "txt_ids")}
    for r, step in enumerate(steps):
        alone = {k: (np.split(v, rows)[r] if k in batch else v) for k, v in every.items()}
        one = run_ort(path, {**alone, STEP: np.array([step], np.int64)})["out_sample"]
        np.testing.assert_array_equal(together[r:r + 1], one)
    assert max_rel_err(together[1:2], run_ort(path, {**every, STEP: np.array([1, 1], np.int64)})["out_sample"][1:2]) > 1e-4


def test_requires_rejects_bad_arguments(split_case):
    cache, _, names, _ = split_case("dit")
    fails = ir.passes.PreconditionError
    with pytest.raises(fails, match="no cache inputs"):
        ExtrapolateCachePass(["nope"], 3)(ir.load(cache))
    with pytest.raises(fails, match="N >= 1"):
        ExtrapolateCachePass(names, 0)(ir.load(cache))
    with pytest.raises(TypeError):
        ExtrapolateCachePass(names, 2.5)
    model = ir.load(cache)
    ExtrapolateCachePass(names, 3)(model)
    with pytest.raises(fails, match="already has tensors"):
        ExtrapolateCachePass(names, 3)(model)
    with pytest.raises(fails, match="not finite"):
        FreezeTablesPass({TREND: np.array([0.0, np.nan, 1.0])})(model)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes(dtype, tmp_path):
    """A head that doubles the cache: out = 2 R̂, with the trend computed in float32 for 16-bit caches."""
    doubling_head(tmp_path / "h.onnx", dtype)
    trend = np.array([0.0, 0.75], np.float32)
    parametric, frozen = extrapolated(tmp_path / "h.onnx", tmp_path, ["omnicache_cache"], trend)
    rng = np.random.default_rng(1)
    r, r_prev = rng.standard_normal((2, 2, 3)).astype(dtype)
    feeds = {"omnicache_cache": r, "omnicache_cache_prev": r_prev, **at(1)}
    out = run_ort(frozen, feeds)["out_sample"]
    assert out.dtype == dtype
    expected = 2 * (r.astype(np.float64) + 0.75 * (r.astype(np.float64) - r_prev))
    tol = 2e-3 if dtype == np.float16 else 1e-6
    assert max_rel_err(out.astype(np.float64), expected) <= tol
    np.testing.assert_array_equal(run_ort(parametric, {**feeds, TREND: trend})["out_sample"], out)
