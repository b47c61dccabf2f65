"""Pass: the cache-reuse-with-correction graph. The cache graph's output gets the OmniCache correction.

New graph inputs: `omnicache_step` (int64 [model batch]: each row's own step, shared with
ExtrapolateCachePass where it ran first),
`omnicache_full_prev` and `omnicache_full_prev2` (dtype and shape of the output: the model outputs of
the last two full steps), and the per-step tables, [N, ...] graph inputs gathered by the step:
`omnicache_coefficients` [N], `omnicache_blend` [N] (with `blend`) and `omnicache_filter_masks`
[N, h, w] (with `filter_hw`: each step's mask M scaled by 1/(h w)). Tables are inputs so calibration
can score every candidate on this very graph; FreezeTablesPass turns them into constants for export.
The output keeps its name and declared shape and becomes

    out_b = õ_b + λ[step_b] * (full_prev_b - õ_b) + coef[step_b] * F_step_b(full_prev_b - full_prev2_b)

row by row (b: a row of the batch; the gathered [B] or [B, h, w] entries scale their own row,
`per_row.scale_rows`), so rows at different steps share one call,

with õ the value the graph computed before (also an output, `<output>_uncorrected`, with
`expose_uncorrected`: calibration fits γ on it) and F_step(z) = Re(IDFT2(M_step * DFT2(z))) over the
last two axes, lowered to real Hartley MatMuls (omnicache_export.passes.hartley):

    F(z) = H_h @ ((M / (h w)) * (H_h @ z @ H_w)) @ H_w

MatMul broadcasting runs it per batch, channel (and frame) of [B, C, h, w] or [B, C, F, h, w]. Only
Sub, Gather, Mul, MatMul, Add, and Shape/Concat/Reshape for the per-row factors (+ Cast for 16-bit
outputs); no DFT op, which TensorRT's ONNX parser lacks. The Hartley
matrices `omnicache_hartley_<n>` [n, n] are initializers (one, shared, when h == w): they depend on
(h, w) only. The coefficient is folded into the gathered [1, h, w] mask, so the full-size tensor sees
one Mul per row; without a filter the correction is a plain coef * (prev - prev2).

Precision: the tables and the correction are in the output's dtype for float32/float64 outputs; for
float16 and bfloat16 outputs in float32 (the difference Cast up, the correction Cast back) because the
spectrum's DC term sums h*w entries, and only the final Add runs in the output's dtype.

Invariant, per row b at its step s_b: where coef[s_b] == 0 and λ[s_b] == 0 (full steps, steps with no
trend yet) the row equals õ_b (õ + 0; the runtime feeds finite values, e.g. zeros, for missing full
outputs); otherwise it equals õ + λ (full_prev − õ) + coef · Re(ifft2(M · fft2(full_prev − full_prev2)))
at s_b — the same numbers whether the tables are fed or frozen, and whether the row runs alone or
beside rows at other steps.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, MASKS, STEP, TREND, add_step_input, add_table_input, uncorrected_name, widened,
)
from omnicache_export.passes.hartley import hartley_matrix
from omnicache_export.passes.per_row import scale_rows

_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)


def hartley_name(n: int) -> str:
    return f"omnicache_hartley_{n}"


class EmbedCorrectionPass(ir.passes.InPlacePass):
    def __init__(
        self, output_name: str, n_steps: int, *, blend: bool, filter_hw: tuple[int, int] | None,
        expose_uncorrected: bool = False,
    ):
        """n_steps: N, the tables' length; blend: add λ (the base moves from õ to the last full output,
        λ = 1: extrapolate the output itself, 0: correct the cache output); filter_hw: (h, w) of the
        frequency filter over the output's last two axes, None for none."""
        super().__init__()
        self.output_name = output_name
        self.n_steps = operator.index(n_steps)
        self.blend = bool(blend)
        self.filter_hw = None if filter_hw is None else tuple(operator.index(d) for d in filter_hw)
        self.expose_uncorrected = bool(expose_uncorrected)

    def __repr__(self) -> str:
        return (f"EmbedCorrectionPass({self.output_name!r}, n_steps={self.n_steps}, blend={self.blend}, "
                f"filter_hw={self.filter_hw}, expose_uncorrected={self.expose_uncorrected})")

    def _output(self, model: ir.Model) -> ir.Value | None:
        return next((v for v in model.graph.outputs if v.name == self.output_name), None)

    def _new_names(self) -> list[str]:
        names = [FULL_PREV, FULL_PREV2, COEFFICIENTS, BLEND, MASKS, uncorrected_name(self.output_name)]
        if self.filter_hw is not None:
            names += [hartley_name(n) for n in self.filter_hw]
        return names

    def requires(self, model: ir.Model) -> None:
        fail = ir.passes.PreconditionError
        graph = model.graph
        out = self._output(model)
        if out is None:
            raise fail(f"the graph has no output named {self.output_name!r}")
        if out.producer() is None:
            raise fail(f"output {self.output_name!r} is a graph input or initializer, not computed by a node")
        if out.dtype not in _FLOATS:
            raise fail(f"output {self.output_name!r} has dtype {out.dtype}; a floating-point type is needed")
        if self.n_steps < 1:
            raise fail(f"the tables need N >= 1 steps, got {self.n_steps}")
        if self.filter_hw is not None:
            if len(self.filter_hw) != 2 or min(self.filter_hw) < 1:
                raise fail(f"filter_hw must be two positive sizes (h, w), got {self.filter_hw}")
            if out.shape is not None:
                if len(out.shape) < 2:
                    raise fail(f"output {self.output_name!r} has rank {len(out.shape)}; the filter needs >= 2 axes")
                last = tuple(out.shape)[-2:]
                if any(isinstance(dim, int) and dim != size for dim, size in zip(last, self.filter_hw)):
                    raise fail(f"filter (h, w) = {self.filter_hw} does not match the output's last two dims {last}")
        values = value_index(graph)
        inputs = {v.name: v for v in graph.inputs}
        if TREND in values:  # ExtrapolateCachePass ran: share its step, gather tables of the same length
            if TREND not in inputs:
                raise fail(f"{TREND!r} is frozen already: FreezeTablesPass runs after EmbedCorrectionPass")
            if tuple(inputs[TREND].shape or ()) != (self.n_steps,):
                raise fail(f"the trend table is {inputs[TREND].shape}, the correction's N = {self.n_steps}: "
                           "tables gathered by one step need one length")
        if STEP in values:
            step = inputs.get(STEP)
            if step is None or step.dtype != ir.DataType.INT64 or step.shape is None or len(step.shape) != 1:
                raise fail(f"{STEP!r} exists but is no int64 [batch] graph input, which the correction gathers by")
        taken = set(values) | {v.name for v in graph.outputs}
        clash = sorted(taken & set(self._new_names()))
        if clash:
            raise fail(f"the graph already has tensors named {clash} (EmbedCorrectionPass runs once)")

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

        step = next((v for v in graph.inputs if v.name == STEP), None)
        if step is None:
            step = add_step_input(graph)
        prev, prev2 = (ir.Value(name=n, shape=out_tilde.shape, type=out_tilde.type) for n in (FULL_PREV, FULL_PREV2))
        graph.inputs.extend([prev, prev2])

        d = op("Sub", prev, prev2)
        if compute != out_type:
            d = op("Cast", d, to=compute)
        coef = op("Gather", add_table_input(graph, COEFFICIENTS, [self.n_steps], compute), step, axis=0)  # [B]
        if self.filter_hw is None:
            corr = scale_rows(op, d, coef, step)
        else:
            h, w = self.filter_hw
            left = const(hartley_name(h), hartley_matrix(h))
            right = left if w == h else const(hartley_name(w), hartley_matrix(w))
            table = add_table_input(graph, MASKS, [self.n_steps, h, w], compute)
            # [B, h, w]: coef * M / (h w) per row
            scale = scale_rows(op, op("Gather", table, step, axis=0), coef, step)
            spectrum = op("MatMul", op("MatMul", left, d), right)
            corr = op("MatMul", op("MatMul", left, scale_rows(op, spectrum, scale, step, (h, w))), right)
        if compute != out_type:
            corr = op("Cast", corr, to=out_type)
        base = out_tilde
        if self.blend:
            delta = op("Sub", prev, out_tilde)
            if compute != out_type:
                delta = op("Cast", delta, to=compute)
            lam = op("Gather", add_table_input(graph, BLEND, [self.n_steps], compute), step, axis=0)
            moved = scale_rows(op, delta, lam, step)
            if compute != out_type:
                moved = op("Cast", moved, to=out_type)
            base = op("Add", out_tilde, moved)
        result = ir.Value(shape=out_tilde.shape, type=out_tilde.type)
        nodes.append(ir.node("Add", [base, corr], outputs=[result], name="omnicache/correction/out"))
        graph.extend(nodes)  # after every producer of õ: the node list stays topologically sorted

        # Only the graph output is rewired: any node that read õ inside the graph keeps reading it.
        graph.outputs[graph.outputs.index(out_tilde)] = result
        out_tilde.name = uncorrected_name(self.output_name)
        result.name = self.output_name
        if self.expose_uncorrected:
            graph.outputs.append(out_tilde)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        wanted = [STEP, FULL_PREV, FULL_PREV2, COEFFICIENTS]
        wanted += [BLEND] * self.blend + [MASKS] * (self.filter_hw is not None)
        for name in wanted:
            if name not in inputs:
                raise ir.passes.PostconditionError(f"input {name!r} missing")
        outputs = {v.name for v in model.graph.outputs}
        for name in [self.output_name] + [uncorrected_name(self.output_name)] * self.expose_uncorrected:
            if name not in outputs:
                raise ir.passes.PostconditionError(f"output {name!r} missing")
