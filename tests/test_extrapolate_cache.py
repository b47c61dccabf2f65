"""The cache trend in the graph: ρ = 0 keeps the cache graph's numbers; otherwise the graph equals the
old one fed R̂ = R + ρ (R − R_prev); it shares `omnicache_step` with the correction pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import max_rel_err, run_ort
from omnicache_export.passes.cache_names import prev_cache_name
from omnicache_export.passes.embed_correction import FULL_PREV, FULL_PREV2, EmbedCorrectionPass
from omnicache_export.passes.extrapolate_cache import STEP, ExtrapolateCachePass

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


def extrapolated(cache_path, dst, names, trend, coefficients=None, blend=None):
    model = ir.load(cache_path)
    ExtrapolateCachePass(names, trend)(model)
    if coefficients is not None:
        EmbedCorrectionPass("out_sample", coefficients, None, blend)(model)
    ir.save(model, dst)
    onnx.checker.check_model(str(dst), full_check=True)
    return dst


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_trend_matches_feeding_the_extrapolated_cache(family, split_case, tmp_path):
    cache, feeds, names, prev = split_case(family)
    trend = np.array([0.0, 0.5, -1.0, 2.0], np.float32)
    path = extrapolated(cache, tmp_path / "t.onnx", names, trend)
    plain = run_ort(cache, feeds)["out_sample"]
    for step in range(4):
        out = run_ort(path, {**feeds, **prev, STEP: np.array([step], np.int64)})["out_sample"]
        if trend[step] == 0:
            assert np.array_equal(out, plain)  # R + 0
            continue
        hat = {k: feeds[k] + trend[step] * (feeds[k] - prev[prev_cache_name(k)]) for k in names}
        expected = run_ort(cache, {**feeds, **hat})["out_sample"]
        assert max_rel_err(out, expected) <= 1e-5, step
        assert max_rel_err(out, plain) > 1e-3  # the trend really moves the output


def test_layout_and_shared_step_with_the_correction(split_case, tmp_path):
    cache, feeds, names, prev = split_case("dit")
    trend = np.array([0.0, 1.0, 0.5], np.float32)
    coefficients = np.array([0.0, 0.5, 0.25], np.float32)
    blend = np.array([0.0, 0.5, 0.5], np.float32)
    path = extrapolated(cache, tmp_path / "tc.onnx", names, trend, coefficients, blend)
    graph = ir.load(path).graph
    inputs = [v.name for v in graph.inputs]
    assert inputs.count(STEP) == 1 and all(prev_cache_name(k) in inputs for k in names)
    added = {n.op_type for n in graph if n.name.startswith("omnicache/cache_trend")}
    assert added <= {"Gather", "Sub", "Mul", "Add", "Cast"}
    rng = np.random.default_rng(0)
    shape = run_ort(cache, feeds)["out_sample"].shape
    hist = {FULL_PREV: rng.standard_normal(shape).astype(np.float32), FULL_PREV2: rng.standard_normal(shape).astype(np.float32)}
    out = run_ort(path, {**feeds, **prev, **hist, STEP: np.array([1], np.int64)})["out_sample"]
    hat = {k: feeds[k] + (feeds[k] - prev[prev_cache_name(k)]) for k in names}
    tilde = run_ort(cache, {**feeds, **hat})["out_sample"]
    expected = tilde + 0.5 * (hist[FULL_PREV] - tilde) + 0.5 * (hist[FULL_PREV] - hist[FULL_PREV2])
    assert max_rel_err(out, expected) <= 1e-5


def test_requires_rejects_bad_arguments(split_case):
    cache, _, names, _ = split_case("dit")
    with pytest.raises(ir.passes.PreconditionError, match="no cache inputs"):
        ExtrapolateCachePass(["nope"], np.zeros(3))(ir.load(cache))
    with pytest.raises(ir.passes.PreconditionError, match="finite 1-D"):
        ExtrapolateCachePass(names, np.array([0.0, np.nan]))(ir.load(cache))
    model = ir.load(cache)
    ExtrapolateCachePass(names, np.zeros(3))(model)
    with pytest.raises(ir.passes.PreconditionError, match="already has tensors"):
        ExtrapolateCachePass(names, np.zeros(3))(model)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes(dtype, tmp_path):
    """A head that doubles the cache: out = 2 R̂, with the trend computed in float32 for 16-bit caches."""
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["omnicache_cache", "two"], ["out_sample"])], "head",
        [helper.make_tensor_value_info("omnicache_cache", elem, [2, 3])],
        [helper.make_tensor_value_info("out_sample", elem, [2, 3])],
        [numpy_helper.from_array(np.array(2, dtype), "two")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "h.onnx")
    path = extrapolated(tmp_path / "h.onnx", tmp_path / "t.onnx", ["omnicache_cache"], np.array([0.0, 0.75]))
    rng = np.random.default_rng(1)
    r, r_prev = rng.standard_normal((2, 2, 3)).astype(dtype)
    out = run_ort(path, {"omnicache_cache": r, "omnicache_cache_prev": r_prev, STEP: np.array([1], np.int64)})["out_sample"]
    assert out.dtype == dtype
    expected = 2 * (r.astype(np.float64) + 0.75 * (r.astype(np.float64) - r_prev))
    tol = 2e-3 if dtype == np.float16 else 1e-6
    assert max_rel_err(out.astype(np.float64), expected) <= tol
