"""The correction graph on real splits: coef 0 keeps the cache graph's numbers, otherwise the output is
õ + coef * F(prev - prev2) as numpy.fft computes it; only TensorRT-friendly ops are added."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import max_rel_err, run_ort
from omnicache_export.calibration.filters import butterworth_mask
from omnicache_export.passes.embed_correction import (
    FULL_PREV,
    FULL_PREV2,
    STEP,
    EmbedCorrectionPass,
    correction_reference,
)
from omnicache_export.zoo.families import FAMILIES

ALLOWED = {"MatMul", "Mul", "Add", "Sub", "Gather", "Cast", "Reshape"}
FILTERED = ["dit", "latte"]  # [B, C, h, w] and video [B, C, F, h, w]: the filter runs over (h, w)
ALL = FILTERED + ["flux"]  # packed [B, L, C]: no spatial axes, so no filter


@pytest.fixture(scope="module")
def split_case(zoo_step):
    """split_case(family) -> (cache.onnx path, feeds for the cache graph, full graph's output)."""

    def get(family: str):
        folder, feeds, full = zoo_step(family)
        return folder / "cache.onnx", feeds, full[FAMILIES[family].output_name]

    return get


def corrected(cache_path, dst, coefficients, masks=None, output="out_sample"):
    model = ir.load(cache_path)
    EmbedCorrectionPass(output, coefficients, masks)(model)
    ir.save(model, dst)
    onnx.checker.check_model(str(dst))
    return dst


def history(shape, rng, dtype=np.float32):
    return {FULL_PREV: rng.standard_normal(shape).astype(dtype), FULL_PREV2: rng.standard_normal(shape).astype(dtype)}


def step_masks(n, h, w):
    """A different kind per step: all, low, high, low (order 1), all, high, ..."""
    kinds = [("all", 1.0, 2), ("low", 0.5, 2), ("high", 0.25, 2), ("low", 0.3, 1), ("all", 1.0, 2), ("high", 0.5, 3)]
    return np.stack([butterworth_mask(h, w, rho, order, kind) for kind, rho, order in (kinds * n)[:n]])


@pytest.mark.parametrize("family", ALL)
def test_zero_coefficients_keep_the_cache_output(family, split_case, tmp_path):
    cache, feeds, full_out = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    h, w = full_out.shape[-2:]
    masks = step_masks(5, h, w) if family in FILTERED else None
    path = corrected(cache, tmp_path / "c.onnx", np.zeros(5), masks)
    rng = np.random.default_rng(0)
    for step in (0, 2, 4):
        out = run_ort(path, {**feeds, **history(full_out.shape, rng), STEP: np.array([step], np.int64)})["out_sample"]
        assert np.array_equal(out, uncorrected)  # õ + 0
        assert max_rel_err(out, full_out) <= 1e-4


@pytest.mark.parametrize("family", FILTERED)
def test_filtered_correction_matches_numpy_fft(family, split_case, tmp_path):
    cache, feeds, full_out = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    h, w = full_out.shape[-2:]
    rng = np.random.default_rng(1)
    coefficients = rng.uniform(-1.5, 1.5, 6)
    coefficients[0] = 0.0  # a full step
    masks = step_masks(6, h, w)
    path = corrected(cache, tmp_path / "c.onnx", coefficients, masks)
    hist = history(full_out.shape, rng)
    for step in range(6):
        out = run_ort(path, {**feeds, **hist, STEP: np.array([step], np.int64)})["out_sample"]
        ref = correction_reference(uncorrected, hist[FULL_PREV], hist[FULL_PREV2], coefficients[step], masks[step])
        if coefficients[step] == 0:
            assert np.array_equal(out, uncorrected)
        else:
            assert max_rel_err(out - uncorrected, ref - uncorrected) <= 1e-4, step
            assert np.abs(out - uncorrected).max() > 1e-3  # the correction really is applied


def test_reference_is_the_fft_filter():
    """correction_reference against a direct 2-D DFT sum, one [h, w] slice."""
    rng = np.random.default_rng(2)
    d = rng.standard_normal((5, 6))
    mask = butterworth_mask(5, 6, 0.4, 2, "low")
    k, m = np.arange(5), np.arange(6)
    fh, fw = np.exp(-2j * np.pi * np.outer(k, k) / 5), np.exp(-2j * np.pi * np.outer(m, m) / 6)
    direct = np.real(fh.conj() @ (mask * (fh @ d @ fw)) @ fw.conj()) / 30
    ref = correction_reference(np.zeros_like(d), d, np.zeros_like(d), 1.0, mask)
    np.testing.assert_allclose(ref, direct, atol=1e-12)


@pytest.mark.parametrize("family", ALL)
def test_unfiltered_correction_is_plain_extrapolation(family, split_case, tmp_path):
    cache, feeds, full_out = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    coefficients = np.array([0.0, 0.0, 1.0, -0.5, 2.25], np.float32)
    h, w = full_out.shape[-2:]
    for masks in (None, np.ones((5, h, w))):  # all-pass masks are no filter
        path = corrected(cache, tmp_path / "c.onnx", coefficients, masks)
        added = [n.op_type for n in ir.load(path).graph if n.name.startswith("omnicache/correction")]
        assert sorted(added) == ["Add", "Gather", "Mul", "Sub"]
        hist = history(full_out.shape, np.random.default_rng(3))
        for step in (1, 3, 4):
            out = run_ort(path, {**feeds, **hist, STEP: np.array([step], np.int64)})["out_sample"]
            expected = uncorrected + coefficients[step] * (hist[FULL_PREV] - hist[FULL_PREV2])
            np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("family", ALL)
def test_graph_layout(family, split_case, tmp_path):
    cache, _, full_out = split_case(family)
    h, w = full_out.shape[-2:]
    masks = step_masks(4, h, w) if family in FILTERED else None
    before = ir.load(cache)
    path = corrected(cache, tmp_path / "c.onnx", np.array([0.0, 0.0, 1.0, 1.0]), masks)
    model = ir.load(path)
    added = [n for n in model.graph if n.name.startswith("omnicache/correction")]
    assert {n.op_type for n in model.graph}.isdisjoint({"DFT", "STFT"})
    assert {n.op_type for n in added} <= ALLOWED
    assert len(model.graph) == len(before.graph) + len(added)
    assert [n.op_type for n in added].count("MatMul") == (4 if masks is not None else 0)
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs[STEP].dtype == ir.DataType.INT64 and list(inputs[STEP].shape) == [1]
    out = model.graph.outputs[0]
    assert out.name == "out_sample" and out.shape == before.graph.outputs[0].shape
    for name in (FULL_PREV, FULL_PREV2):
        assert inputs[name].dtype == out.dtype and inputs[name].shape == out.shape
    inits = model.graph.initializers
    assert inits["omnicache_coefficients"].shape == ir.Shape([4])
    if masks is not None:  # h == w: one Hartley matrix serves both sides
        assert [k for k in inits if k.startswith("omnicache_hartley")] == [f"omnicache_hartley_{h}"]
        assert inits["omnicache_filter_masks"].shape == ir.Shape([4, h, w])
        np.testing.assert_allclose(inits["omnicache_filter_masks"].const_value.numpy(), masks / (h * w), rtol=1e-6)


def test_requires_rejects_bad_arguments(split_case):
    cache, _, _ = split_case("dit")
    model = ir.load(cache)
    model.graph.outputs[0].shape = ir.Shape(["batch", 8, 8, 8])  # the exporter left the dims symbolic
    fails = ir.passes.PreconditionError
    with pytest.raises(fails, match="does not match the output's last two dims"):
        EmbedCorrectionPass("out_sample", np.zeros(3), np.stack([butterworth_mask(8, 6)] * 3))(model)
    with pytest.raises(fails, match=r"masks must be \[N=3"):
        EmbedCorrectionPass("out_sample", np.zeros(3), np.stack([butterworth_mask(8, 8)] * 2))(model)
    with pytest.raises(fails, match="even along each axis"):
        EmbedCorrectionPass("out_sample", np.zeros(1), np.arange(64.0).reshape(1, 8, 8))(model)
    with pytest.raises(fails, match="N >= 1"):
        EmbedCorrectionPass("out_sample", np.zeros(0))(model)
    with pytest.raises(fails, match="no output named"):
        EmbedCorrectionPass("nope", np.zeros(3))(model)
    EmbedCorrectionPass("out_sample", np.zeros(3))(model)
    with pytest.raises(fails, match="already has tensors named"):  # applied twice
        EmbedCorrectionPass("out_sample", np.zeros(3))(model)


def tiny_model(path, dtype, shape):
    """y = Relu(x): a stand-in for a cache graph with a given output dtype and (static) shape."""
    elem = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}[dtype]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", elem, shape)], [helper.make_tensor_value_info("y", elem, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "dtype,shape",
    [(np.float16, [2, 3, 6, 10]), (np.float32, [6, 10]), (np.float32, [2, 2, 3, 10, 6])],
    ids=["fp16-nchw", "fp32-rank2", "fp32-video"],
)
def test_dtypes_ranks_and_rectangular_masks(dtype, shape, tmp_path):
    h, w = shape[-2:]
    src = tiny_model(tmp_path / "tiny.onnx", dtype, shape)
    coefficients = np.array([0.0, 0.8, -1.2])
    masks = np.stack([butterworth_mask(h, w, 0.4, 2, k) for k in ("all", "low", "high")])
    path = corrected(src, tmp_path / "c.onnx", coefficients, masks, output="y")
    model = ir.load(path)
    assert {k for k in model.graph.initializers if k.startswith("omnicache_hartley")} == {
        f"omnicache_hartley_{h}", f"omnicache_hartley_{w}"}
    assert all(v.dtype == ir.DataType.FLOAT for k, v in model.graph.initializers.items() if k != "omnicache_mask_shape")
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    hist = history(shape, rng, dtype)
    for step in range(3):
        out = run_ort(path, {"x": x, **hist, STEP: np.array([step], np.int64)})["y"]
        assert out.dtype == dtype and list(out.shape) == shape
        ref = correction_reference(np.maximum(x, 0), hist[FULL_PREV], hist[FULL_PREV2], coefficients[step], masks[step])
        tol = 2e-3 if dtype == np.float16 else 1e-5  # fp16: the final Add rounds to half precision
        assert max_rel_err(out.astype(np.float64), ref.astype(np.float64)) <= tol, step


def test_blend_moves_the_base_to_the_last_full_output(split_case, tmp_path):
    """λ = 1: the output extrapolates the last full output (õ unused); λ = 0: the cache output is corrected."""
    cache, feeds, full_out = split_case("dit")
    uncorrected = run_ort(cache, feeds)["out_sample"]
    coefficients = np.array([0.0, 0.5, 1.0], np.float32)
    blend = np.array([0.0, 1.0, 0.0], np.float32)
    model = ir.load(cache)
    EmbedCorrectionPass("out_sample", coefficients, None, blend)(model)
    ir.save(model, tmp_path / "b.onnx")
    onnx.checker.check_model(str(tmp_path / "b.onnx"))
    hist = history(full_out.shape, np.random.default_rng(5))
    d = hist[FULL_PREV] - hist[FULL_PREV2]
    out1 = run_ort(tmp_path / "b.onnx", {**feeds, **hist, STEP: np.array([1], np.int64)})["out_sample"]
    np.testing.assert_allclose(out1, hist[FULL_PREV] + 0.5 * d, rtol=0, atol=1e-5)
    out2 = run_ort(tmp_path / "b.onnx", {**feeds, **hist, STEP: np.array([2], np.int64)})["out_sample"]
    np.testing.assert_allclose(out2, uncorrected + d, rtol=0, atol=1e-5)
