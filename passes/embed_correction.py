"""Pass: the cache-reuse-with-correction graph. The cache graph's output gets the OmniCache correction.

New graph inputs: `omnicache_step` (int64 [1]), `omnicache_full_prev` and `omnicache_full_prev2`
(dtype and shape of the output: the model outputs of the last two full steps). The output keeps its
name and declared shape and becomes

    out = õ + λ[step] * (full_prev - õ) + coef[step] * F_step(full_prev - full_prev2)

(λ, optional, moves the prediction's base from the cache output to the last full output), with õ the value the graph computed before and F_step(z) = Re(IDFT2(M_step * DFT2(z))) over the last
two axes, lowered to real Hartley MatMuls (see omnicache_export.calibration.filters):

    F(z) = H_h @ ((M / (h w)) * (H_h @ z @ H_w)) @ H_w

MatMul broadcasting runs it per batch, channel (and frame) of [B, C, h, w] or [B, C, F, h, w]. Only
Sub, Gather, Mul, MatMul, Add (+ Cast for 16-bit outputs, + one Reshape of the gathered mask when the
output's rank is not known to be >= 3); no DFT op, which TensorRT's ONNX parser lacks.

Constants (initializers): `omnicache_coefficients` [N], `omnicache_filter_masks` [N, h, w] (mask / (h w))
and `omnicache_hartley_<n>` [n, n] (one, shared, when h == w). `omnicache_step` Gathers the step's
coefficient and mask; the coefficient is folded into the gathered [1, h, w] mask, so the full-size
tensor sees one Mul. Without masks (or all-ones masks) the correction is a plain coef * (prev - prev2).

Precision: the correction is computed in the output's dtype for float32/float64 outputs; for float16
and bfloat16 outputs it is computed in float32 (constants stored in float32, the difference Cast up,
the correction Cast back) because the spectrum's DC term sums h*w entries, and only the final Add runs
in the output's dtype.

Invariant: where coef[step] == 0 (full steps, steps with no trend yet) the output equals what the
graph computed before (õ + 0; the runtime feeds finite values, e.g. zeros, for missing full outputs);
otherwise it equals correction_reference(õ, full_prev, full_prev2, coef[step], mask[step]).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.calibration.filters import dft_filter_matrices, hartley_matrix
from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.cache_names import FULL_PREV, FULL_PREV2, STEP, widened

COEFFICIENTS = "omnicache_coefficients"
MASKS = "omnicache_filter_masks"
BLEND = "omnicache_blend"

_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)


def correction_reference(out_tilde, full_prev, full_prev2, coef: float, mask: np.ndarray | None):
    """numpy reference: õ + coef * Re(ifft2(mask * fft2(prev - prev2))) over the last two axes.

    mask None means no filter. Computed in float64, returned in out_tilde's dtype.
    """
    d = np.asarray(full_prev, np.float64) - np.asarray(full_prev2, np.float64)
    if mask is not None:
        d = np.real(np.fft.ifft2(np.asarray(mask, np.float64) * np.fft.fft2(d, axes=(-2, -1)), axes=(-2, -1)))
    out_tilde = np.asarray(out_tilde)
    return (out_tilde.astype(np.float64) + float(coef) * d).astype(out_tilde.dtype)


def _step_input(graph: ir.Graph) -> ir.Value | None:
    """An existing int64 `omnicache_step` graph input (from ExtrapolateCachePass), else None."""
    return next((v for v in graph.inputs if v.name == STEP and v.dtype == ir.DataType.INT64), None)


class EmbedCorrectionPass(ir.passes.InPlacePass):
    def __init__(
        self, output_name: str, coefficients: np.ndarray, masks: np.ndarray | None = None, blend: np.ndarray | None = None
    ):
        """coefficients [N]: the per-step factor, 0 at full steps; masks [N, h, w] (unscaled) or None;
        blend [N] or None: λ_i, the base of the prediction moves from õ to the last full output,
        õ + λ_i (full_prev − õ) (λ = 1: extrapolate the output itself, 0: correct the cache output)."""
        super().__init__()
        self.output_name = output_name
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        self.blend = None if blend is None or not np.any(blend) else np.asarray(blend, dtype=np.float64)
        self.masks = None if masks is None else np.asarray(masks, dtype=np.float64)
        if self.masks is not None and self.masks.size and np.all(self.masks == 1.0):
            self.masks = None  # all-pass everywhere: no filter

    def _output(self, model: ir.Model) -> ir.Value | None:
        return next((v for v in model.graph.outputs if v.name == self.output_name), None)

    def _new_names(self) -> list[str]:
        names = [STEP, FULL_PREV, FULL_PREV2, COEFFICIENTS, BLEND, f"{self.output_name}_uncorrected"]
        if self.masks is not None:
            h, w = self.masks.shape[1:]
            names += [MASKS, f"omnicache_hartley_{h}", f"omnicache_hartley_{w}", "omnicache_mask_shape"]
        return names

    def requires(self, model: ir.Model) -> None:
        fail = ir.passes.PreconditionError
        out = self._output(model)
        if out is None:
            raise fail(f"the graph has no output named {self.output_name!r}")
        if out.producer() is None:
            raise fail(f"output {self.output_name!r} is a graph input or initializer, not computed by a node")
        if out.dtype not in _FLOATS:
            raise fail(f"output {self.output_name!r} has dtype {out.dtype}; a floating-point type is needed")
        coef = self.coefficients
        if coef.ndim != 1 or coef.size < 1 or not np.all(np.isfinite(coef)):
            raise fail(f"coefficients must be a finite 1-D array with N >= 1 entries, got shape {coef.shape}")
        if self.masks is not None:
            masks = self.masks
            if masks.ndim != 3 or masks.shape[0] != coef.size:
                raise fail(f"masks must be [N={coef.size}, h, w], got shape {masks.shape}")
            h, w = masks.shape[1:]
            if out.shape is not None:
                if len(out.shape) < 2:
                    raise fail(f"output {self.output_name!r} has rank {len(out.shape)}; the filter needs >= 2 axes")
                last = tuple(out.shape)[-2:]
                if any(isinstance(dim, int) and dim != size for dim, size in zip(last, (h, w))):
                    raise fail(f"mask (h, w) = {(h, w)} does not match the output's last two dims {last}")
            for i, mask in enumerate(masks):
                try:
                    dft_filter_matrices(h, w, mask)  # real, even along each axis (radial masks are)
                except ValueError as exc:
                    raise fail(f"mask of step {i}: {exc}") from exc
        taken = set(value_index(model.graph)) | {v.name for v in model.graph.outputs}
        if _step_input(model.graph) is not None:  # added by ExtrapolateCachePass: shared
            taken.discard(STEP)
        clash = sorted(taken & set(self._new_names()))
        if clash:
            raise fail(f"the graph already has tensors named {clash}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        out_tilde = self._output(model)
        out_type = out_tilde.dtype
        compute = widened(out_type)
        nodes: list[ir.Node] = []

        def op(op_type, *inputs, **attributes) -> ir.Value:
            node = ir.node(op_type, list(inputs), attributes or None, name=f"omnicache/correction/{len(nodes)}")
            nodes.append(node)
            return node.outputs[0]

        def const(name: str, array: np.ndarray) -> ir.Value:
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(compute))
            value.const_value = ir.tensor(array.astype(compute.numpy()), name=name)
            graph.register_initializer(value)
            return value

        step = _step_input(graph)
        if step is None:
            step = ir.Value(name=STEP, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
            graph.inputs.append(step)
        prev, prev2 = (ir.Value(name=n, shape=out_tilde.shape, type=out_tilde.type) for n in (FULL_PREV, FULL_PREV2))
        graph.inputs.extend([prev, prev2])

        d = op("Sub", prev, prev2)
        if compute != out_type:
            d = op("Cast", d, to=compute)
        coef = op("Gather", const(COEFFICIENTS, self.coefficients), step, axis=0)  # [1]
        if self.masks is None:
            corr = op("Mul", d, coef)
        else:
            n, h, w = self.masks.shape
            mats = [dft_filter_matrices(h, w, m) for m in self.masks]
            left = const(f"omnicache_hartley_{h}", hartley_matrix(h))
            right = left if w == h else const(f"omnicache_hartley_{w}", hartley_matrix(w))
            table = const(MASKS, np.stack([m.scaled_mask for m in mats]))
            scale = op("Mul", op("Gather", table, step, axis=0), coef)  # [1, h, w]: coef * M / (h w)
            if out_tilde.shape is None or len(out_tilde.shape) < 3:  # keep [1, h, w] from adding an axis
                shape = ir.Value(name="omnicache_mask_shape", type=ir.TensorType(ir.DataType.INT64))
                shape.const_value = ir.tensor(np.array([h, w], np.int64), name=shape.name)
                shape.shape = shape.const_value.shape
                graph.register_initializer(shape)
                scale = op("Reshape", scale, shape)
            spectrum = op("MatMul", op("MatMul", left, d), right)
            corr = op("MatMul", op("MatMul", left, op("Mul", spectrum, scale)), right)
        if compute != out_type:
            corr = op("Cast", corr, to=out_type)
        base = out_tilde
        if self.blend is not None:
            delta = op("Sub", prev, out_tilde)
            if compute != out_type:
                delta = op("Cast", delta, to=compute)
            moved = op("Mul", delta, op("Gather", const(BLEND, self.blend), step, axis=0))
            if compute != out_type:
                moved = op("Cast", moved, to=out_type)
            base = op("Add", out_tilde, moved)
        result = ir.Value(shape=out_tilde.shape, type=out_tilde.type)
        nodes.append(ir.node("Add", [base, corr], outputs=[result], name="omnicache/correction/out"))
        graph.extend(nodes)  # after every producer of õ: the node list stays topologically sorted

        # Only the graph output is rewired: any node that read õ inside the graph keeps reading it.
        graph.outputs[graph.outputs.index(out_tilde)] = result
        out_tilde.name = f"{self.output_name}_uncorrected"
        result.name = self.output_name
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        for name in (STEP, FULL_PREV, FULL_PREV2):
            if name not in inputs:
                raise ir.passes.PostconditionError(f"input {name!r} missing")
        if self._output(model) is None:
            raise ir.passes.PostconditionError(f"output {self.output_name!r} missing")
