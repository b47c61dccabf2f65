"""The frequency filter F(z) = Re(IDFT2(M * DFT2(z))) over the last two axes, as real matrices.

TensorRT's ONNX parser has no DFT op, so the correction pass lowers the filter to constant real
MatMuls; these are its constants (calibration's numpy filter uses the same ones).

A radial mask on the fftfreq grid is even in each axis on its own: M[k, l] = M[-k mod h, l] =
M[k, -l mod w]. For such masks (and real z) the Fourier filter equals the same filter in the
separable Hartley basis, whose matrix H[k, m] = cos(2 pi k m/n) + sin(2 pi k m/n) is real and
symmetric with H @ H = n I:

    F(z) = H_h (M/(h w) * (H_h z H_w)) H_w

Why: expanding H = C + S (cosine and sine parts), every term pairing C with S on the same axis
cancels because the mask commutes with the index reversal k -> -k, under which C is even and S odd;
the surviving terms are exactly those of the complex DFT filter. This is 4 MatMul + 1 Mul, all real,
about 2 h w (h + w) multiply-adds per channel (the complex route costs 3x more and 12 MatMuls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def hartley_matrix(n: int) -> np.ndarray:
    """cas matrix H[k, m] = cos(2 pi k m / n) + sin(2 pi k m / n); symmetric, H @ H = n I."""
    km = np.outer(np.arange(n), np.arange(n)) % n  # exact phase index: accurate for large n
    ang = 2.0 * np.pi * km / n
    return np.cos(ang) + np.sin(ang)


def _check_axis_even(mask: np.ndarray) -> None:
    h, w = mask.shape
    rh, rw = (-np.arange(h)) % h, (-np.arange(w)) % w
    if not (np.allclose(mask, mask[rh, :]) and np.allclose(mask, mask[:, rw])):
        raise ValueError(
            "the real-matrix lowering needs a mask that is even along each axis on its own "
            "(M[k, l] = M[-k, l] = M[k, -l]); radial masks are. Use dense_filter_matrix otherwise."
        )


@dataclass
class FilterMatrices:
    """Constants of F(z) = left @ (scaled_mask * (left @ z @ right)) @ right (float64)."""

    left: np.ndarray  # [h, h] Hartley matrix H_h
    right: np.ndarray  # [w, w] Hartley matrix H_w
    scaled_mask: np.ndarray  # [h, w] mask / (h w)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scaled_mask.shape


def dft_filter_matrices(h: int, w: int, mask: np.ndarray) -> FilterMatrices:
    """Real matrices for the masked DFT filter; mask must be real and even along each axis."""
    if np.iscomplexobj(mask):
        raise ValueError("the mask must be real")
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (h, w):
        raise ValueError(f"mask shape {mask.shape} != ({h}, {w})")
    _check_axis_even(mask)
    return FilterMatrices(hartley_matrix(h), hartley_matrix(w), mask / (h * w))
