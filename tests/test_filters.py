"""Frequency filter lowered to real MatMuls vs numpy.fft, and its ONNX model in onnxruntime."""
import numpy as np
import pytest

from omnicache_export.calibration.filters import (
    StageFilter,
    apply_filter_numpy,
    butterworth_mask,
    candidate_grid,
    dense_filter_matrix,
    dft_filter_matrices,
    filter_onnx_model,
    normalized_frequency,
)

SHAPES = [(4, 4), (5, 5), (6, 9), (7, 4), (1, 5), (16, 12)]


def fft_ref(z, mask):
    return np.real(np.fft.ifft2(mask * np.fft.fft2(z)))


@pytest.mark.parametrize("h,w", SHAPES)
@pytest.mark.parametrize("kind,rho,order", [("low", 0.3, 2), ("high", 0.5, 1), ("low", 0.7, 4), ("all", 1.0, 1)])
def test_matmul_and_dense_match_fft(h, w, kind, rho, order):
    rng = np.random.default_rng(h * 100 + w)
    z = rng.standard_normal((2, 3, h, w))
    mask = butterworth_mask(h, w, rho, order, kind)
    ref = fft_ref(z, mask)
    scale = np.abs(ref).max() + 1e-12
    y = apply_filter_numpy(z, dft_filter_matrices(h, w, mask))
    assert np.abs(y - ref).max() / scale < 1e-5
    k = dense_filter_matrix(h, w, mask)
    yd = (z.reshape(2, 3, h * w) @ k).reshape(z.shape)
    assert np.abs(yd - ref).max() / scale < 1e-5


@pytest.mark.parametrize("h,w", SHAPES)
def test_all_pass_is_identity_and_low_plus_high_is_identity(h, w):
    z = np.random.default_rng(0).standard_normal((3, h, w))
    ones = butterworth_mask(h, w, kind="all")
    np.testing.assert_allclose(apply_filter_numpy(z, dft_filter_matrices(h, w, ones)), z, atol=1e-10)
    lo = apply_filter_numpy(z, dft_filter_matrices(h, w, butterworth_mask(h, w, 0.4, 3, "low")))
    hi = apply_filter_numpy(z, dft_filter_matrices(h, w, butterworth_mask(h, w, 0.4, 3, "high")))
    np.testing.assert_allclose(lo + hi, z, atol=1e-10)


def test_float32_input_keeps_dtype():
    z = np.random.default_rng(1).standard_normal((2, 8, 8)).astype(np.float32)
    y = apply_filter_numpy(z, dft_filter_matrices(8, 8, butterworth_mask(8, 8, 0.3)))
    assert y.dtype == np.float32


def test_mask_definition():
    r = normalized_frequency(6, 8)
    assert r[0, 0] == 0 and np.isclose(r.max(), 1.0) and np.isclose(r[3, 4], 1.0)  # corner (-0.5, -0.5)
    m = butterworth_mask(6, 8, rho=0.5, order=2)
    assert np.isclose(m[0, 0], 1.0)
    np.testing.assert_allclose(m[r == r.max()], 1 / (1 + 2.0**4))
    assert np.isclose(butterworth_mask(6, 8, 0.5, 2, "high")[0, 0], 0.0)
    assert np.all(np.diff(butterworth_mask(1, 33, 0.3, 2)[0, :17]) < 0)  # monotone in r
    with pytest.raises(ValueError):
        butterworth_mask(4, 4, 0.5, 2, "band")


def test_non_axis_even_mask_is_rejected_by_matmul_path_but_dense_works():
    mask = np.zeros((4, 4))
    mask[1, 0] = 1.0  # not even: +1 kept, -1 dropped
    with pytest.raises(ValueError, match="even"):
        dft_filter_matrices(4, 4, mask)
    z = np.random.default_rng(2).standard_normal((4, 4))
    np.testing.assert_allclose(z.reshape(16) @ dense_filter_matrix(4, 4, mask), fft_ref(z, mask).reshape(16), atol=1e-12)


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7), (6, 10)])
def test_onnx_model_matches_fft(h, w):
    ort = pytest.importorskip("onnxruntime")
    mask = butterworth_mask(h, w, 0.35, 2, "high")
    model = filter_onnx_model(h, w, mask)
    assert model.ir_version == 10
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"MatMul", "Mul", "Add", "Sub", "Constant"} and "DFT" not in ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(3).standard_normal((2, 4, h, w)).astype(np.float32)
    (y,) = sess.run(None, {"z": z})
    ref = fft_ref(z.astype(np.float64), mask)
    assert y.shape == z.shape and np.abs(y - ref).max() < 1e-4
    np.testing.assert_allclose(y, apply_filter_numpy(z, dft_filter_matrices(h, w, mask)), atol=1e-5)


def test_stage_filter_and_grid():
    sf = StageFilter(boundary=10, low_rho=0.25, low_order=2, high_rho=0.5, high_order=3)
    assert sf.stage_of(9) == 0 and sf.stage_of(10) == 1
    np.testing.assert_allclose(sf.mask_for_step(3, 6, 6), butterworth_mask(6, 6, 0.25, 2, "low"))
    np.testing.assert_allclose(sf.mask_for_step(20, 6, 6), butterworth_mask(6, 6, 0.5, 3, "high"))
    one_sided = StageFilter(boundary=5, high_rho=0.5)
    np.testing.assert_allclose(one_sided.mask_for_step(0, 4, 4), np.ones((4, 4)))
    allp = StageFilter()
    assert allp.is_all_pass and np.all(allp.mask_for_step(7, 4, 5) == 1)

    grid = candidate_grid(30)
    assert grid[0].is_all_pass and len(grid) == 7
    assert {g.boundary for g in grid[1:]} == {10, 15, 20}
    assert len({g.name for g in grid}) == len(grid)
    assert all(1 <= g.boundary <= 2 for g in candidate_grid(3)[1:])
