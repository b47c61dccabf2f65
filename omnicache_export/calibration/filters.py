"""Frequency filter F(z) = Re(IDFT2(M * DFT2(z))) over a latent's last two axes, as real MatMuls.

TensorRT's ONNX parser has no DFT op, so the filter is lowered to constant real matrices: the
Hartley lowering and its constants live with the graph pass that embeds them
(omnicache_export.passes.hartley); this module holds the masks, the numpy filter and the dense form.

The dense alternative, K [hw, hw] (y.flat = z.flat @ K, any real mask), costs (h w)^2 per
channel: cheaper only when h w < 2 (h + w), i.e. h = w <= 4; it can still win for
tiny latents on launch count (1 MatMul instead of 4) but needs Reshapes in a graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from omnicache_export.passes.hartley import FilterMatrices, dft_filter_matrices, hartley_matrix

__all__ = [
    "FilterMatrices",
    "StageFilter",
    "normalized_frequency",
    "butterworth_mask",
    "hartley_matrix",
    "dft_filter_matrices",
    "apply_filter_numpy",
    "dense_filter_matrix",
    "filter_onnx_model",
    "candidate_grid",
]

Kind = Literal["low", "high", "all"]


def normalized_frequency(h: int, w: int) -> np.ndarray:
    """r [h, w] on the unshifted DFT grid: r = sqrt(fy^2 + fx^2) / max_r, in [0, 1].

    fy = np.fft.fftfreq(h), fx = np.fft.fftfreq(w) (cycles per sample, in [-0.5, 0.5)), and
    max_r is the largest radius on this grid, so DC is 0 and the farthest corner is exactly 1.
    (For even h = w the corner is (0.5, 0.5) and the Nyquist frequency of one axis is
    r = 1/sqrt(2).) A 1x1 grid is all zeros.
    """
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    rad = np.sqrt(fy**2 + fx**2)
    top = rad.max()
    return rad / top if top > 0 else rad


def butterworth_mask(h: int, w: int, rho: float = 0.5, order: int = 2, kind: Kind = "low") -> np.ndarray:
    """Soft radial mask [h, w] (float64) in np.fft.fft2 layout.

    low: M(r) = 1 / (1 + (r/rho)^(2 order)); high: 1 - low (zero at DC); all: ones.
    """
    if kind == "all":
        return np.ones((h, w))
    if kind not in ("low", "high"):
        raise ValueError(f"kind must be 'low', 'high' or 'all', got {kind!r}")
    if rho <= 0 or order < 1:
        raise ValueError(f"need rho > 0 and order >= 1, got rho={rho}, order={order}")
    low = 1.0 / (1.0 + (normalized_frequency(h, w) / rho) ** (2 * order))
    return low if kind == "low" else 1.0 - low


def apply_filter_numpy(z: np.ndarray, mats: FilterMatrices) -> np.ndarray:
    """F(z) for real z [..., h, w], in the exact op order of filter_onnx_model (float64 math)."""
    z = np.asarray(z)
    t = mats.left @ z.astype(np.float64)  # MatMul
    t = t @ mats.right  # MatMul
    t = t * mats.scaled_mask  # Mul
    t = mats.left @ t  # MatMul
    y = t @ mats.right  # MatMul
    return y.astype(z.dtype) if np.issubdtype(z.dtype, np.floating) else y


def dense_filter_matrix(h: int, w: int, mask: np.ndarray) -> np.ndarray:
    """K [h*w, h*w] with F(z).reshape(..., h*w) = z.reshape(..., h*w) @ K; any real mask."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (h, w):
        raise ValueError(f"mask shape {mask.shape} != ({h}, {w})")
    basis = np.eye(h * w).reshape(h * w, h, w)  # row p of K is F(e_p)
    return np.real(np.fft.ifft2(mask * np.fft.fft2(basis))).reshape(h * w, h * w)


def filter_onnx_model(h: int, w: int, mask: np.ndarray, opset: int = 18):
    """Standalone ONNX model y = F(z), z [B, C, h, w] float32; only MatMul and Mul nodes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mats = dft_filter_matrices(h, w, mask)
    f32 = lambda a, name: numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name)
    inits = [f32(mats.left, "filter_left"), f32(mats.scaled_mask, "filter_mask")]
    right = "filter_left"
    if h != w:
        inits.append(f32(mats.right, "filter_right"))
        right = "filter_right"
    nodes = [
        helper.make_node("MatMul", ["filter_left", "z"], ["t0"]),
        helper.make_node("MatMul", ["t0", right], ["t1"]),
        helper.make_node("Mul", ["t1", "filter_mask"], ["t2"]),
        helper.make_node("MatMul", ["filter_left", "t2"], ["t3"]),
        helper.make_node("MatMul", ["t3", right], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "frequency_filter",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", "C", h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "C", h, w])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


@dataclass(frozen=True)
class StageFilter:
    """Stage-aware filter: low-pass for steps < boundary, high-pass for steps >= boundary.

    A cut-off of None makes that stage all-pass; StageFilter() is all-pass everywhere.
    """

    boundary: int = 0
    low_rho: float | None = None
    low_order: int = 2
    high_rho: float | None = None
    high_order: int = 2

    @property
    def is_all_pass(self) -> bool:
        return self.low_rho is None and self.high_rho is None

    @property
    def name(self) -> str:
        if self.is_all_pass:
            return "all-pass"
        lo = "all" if self.low_rho is None else f"low(rho={self.low_rho:g},n={self.low_order})"
        hi = "all" if self.high_rho is None else f"high(rho={self.high_rho:g},n={self.high_order})"
        return f"{lo}<{self.boundary}<={hi}"

    def stage_of(self, i: int) -> int:
        """0 for the early (low-pass) stage, 1 for the late (high-pass) stage."""
        return int(i >= self.boundary)

    def stage_masks(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(early mask, late mask), each [h, w]."""
        early = butterworth_mask(h, w, self.low_rho or 1.0, self.low_order, "all" if self.low_rho is None else "low")
        late = butterworth_mask(h, w, self.high_rho or 1.0, self.high_order, "all" if self.high_rho is None else "high")
        return early, late

    def mask_for_step(self, i: int, h: int, w: int) -> np.ndarray:
        return self.stage_masks(h, w)[self.stage_of(i)]


def candidate_grid(
    n_steps: int,
    boundaries: tuple[float, ...] = (1 / 3, 1 / 2, 2 / 3),
    rhos: tuple[float, ...] = (0.25, 0.5),
    order: int = 2,
) -> list[StageFilter]:
    """All-pass first (so filtering can never lose), then low/high pairs per boundary and rho.

    Boundaries are fractions of n_steps, rounded and kept in 1..n_steps-1; 1 + 3 x 2 = 7
    candidates by default, each costing one calibration sampling run.
    """
    out = [StageFilter()]
    seen: set[int] = set()
    for frac in boundaries:
        s = min(max(int(round(frac * n_steps)), 1), max(n_steps - 1, 1))
        if s in seen:
            continue
        seen.add(s)
        out += [StageFilter(s, rho, order, rho, order) for rho in rhos]
    return out
