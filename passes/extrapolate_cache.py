"""Pass: the cache graph carries its cache tensors forward by their trend before the head reads them.

For each cache input R (`omnicache_cache`, `omnicache_cache_1`, …) a new input `<R>_prev` (same
dtype and shape: the cache of the full step before the last one) is added, and every node that read
R reads instead

    R̂ = R + ρ[step] * (R − R_prev)

with ρ the float32 table input `omnicache_cache_trend` [N] (ρ_i = a_i · scale: the time ratio of
step i to its last two full steps) gathered per row by the new input `omnicache_step` (int64
[model batch]: each row's own step, so rows at different steps share one call; the correction pass
shares it, so it runs after this one) and applied to each row (`per_row.scale_rows`; a cache in a
temporal layout holds B × k rows, batch-major). TaylorSeer's first-order prediction of the block
stack's output, with the embedding of the current step kept: R is the stack residual h_L − h_0 (or
h_L for direct reuse). For 16-bit caches the trend is computed in float32 and cast back.

With `second_order`, each cache also gets `<R>_prev2` (the cache two full steps before the last)
and the float32 table `omnicache_cache_trend2` σ [N], gathered by the same step:

    R̂ = R + ρ[step] * (R − R_prev) + σ[step] * (R_prev − R_prev2)

so any affine combination w0 R + w1 R_prev + w2 R_prev2 (w summing to 1: a quadratic through the
last three full steps, a line fitted to them) is ρ = w0 − 1, σ = −w2.

Invariant: row by row, where ρ[step_b] == 0 the graph computes exactly what it did before (R + 0 · d);
otherwise row b of the output equals the old graph's fed R̂ at step_b, whether ρ is fed or frozen by
FreezeTablesPass; rows at different steps in one call equal each row run alone at its step. With
`second_order`, where σ[step_b] == 0 row b equals the first-order graph's (the σ term adds exact
zeros to the float32 sum of finite values).
"""

from __future__ import annotations

import operator

import onnx_ir as ir

from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.per_row import scale_rows
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, MASKS, STEP, TREND, TREND2, add_step_input, add_table_input,
    prev2_cache_name, prev_cache_name, widened,
)

_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)
_CORRECTION = (FULL_PREV, FULL_PREV2, COEFFICIENTS, BLEND, MASKS)  # what EmbedCorrectionPass adds


class ExtrapolateCachePass(ir.passes.InPlacePass):
    def __init__(self, cache_names: list[str], n_steps: int, second_order: bool = False):
        """cache_names: the cache inputs to carry forward; n_steps: N, the length of the trend tables;
        second_order: also the σ term on the trend one full step earlier."""
        super().__init__()
        self.cache_names = list(cache_names)
        self.n_steps = operator.index(n_steps)
        self.second_order = bool(second_order)

    def __repr__(self) -> str:
        return f"ExtrapolateCachePass({self.cache_names}, n_steps={self.n_steps}, second_order={self.second_order})"

    def _added(self) -> list[str]:
        """The inputs this pass adds."""
        names = [STEP, TREND, *map(prev_cache_name, self.cache_names)]
        if self.second_order:
            names += [TREND2, *map(prev2_cache_name, self.cache_names)]
        return names

    def requires(self, model: ir.Model) -> None:
        fail = ir.passes.PreconditionError
        if self.n_steps < 1:
            raise fail(f"the trend table needs N >= 1 steps, got {self.n_steps}")
        inputs = {v.name: v for v in model.graph.inputs}
        missing = [n for n in self.cache_names if n not in inputs]
        if missing or not self.cache_names:
            raise fail(f"the graph has no cache inputs {missing or self.cache_names}")
        for name in self.cache_names:
            if inputs[name].dtype not in _FLOATS:
                raise fail(f"cache input {name!r} has dtype {inputs[name].dtype}; a floating-point type is needed")
        taken = set(value_index(model.graph)) | {v.name for v in model.graph.outputs}
        corrected = [n for n in _CORRECTION if n in taken]
        if corrected:
            raise fail(
                f"ExtrapolateCachePass must run before EmbedCorrectionPass (which shares its {STEP!r}): "
                f"the graph already has the correction's tensors {corrected}"
            )
        clash = sorted(taken & set(self._added()))
        if clash:
            raise fail(f"the graph already has tensors named {clash} (ExtrapolateCachePass runs once)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        step = add_step_input(graph)
        table = add_table_input(graph, TREND, [self.n_steps], ir.DataType.FLOAT)
        nodes: list[ir.Node] = []

        def op(op_type, *args, **attributes) -> ir.Value:
            node = ir.node(op_type, list(args), attributes or None, name=f"omnicache/cache_trend/{len(nodes)}")
            nodes.append(node)
            return node.outputs[0]

        rho = op("Gather", table, step, axis=0)  # [B]: each row's step
        sigma = None
        if self.second_order:
            sigma = op("Gather", add_table_input(graph, TREND2, [self.n_steps], ir.DataType.FLOAT), step, axis=0)
        for name in self.cache_names:
            cache = inputs[name]
            readers = list(cache.uses())  # taken before the new nodes read it too
            prev = ir.Value(name=prev_cache_name(name), shape=cache.shape, type=cache.type)
            graph.inputs.append(prev)
            moved = self._scaled(op, cache, prev, rho, step)
            if sigma is not None:
                prev2 = ir.Value(name=prev2_cache_name(name), shape=cache.shape, type=cache.type)
                graph.inputs.append(prev2)
                moved = op("Add", moved, self._scaled(op, prev, prev2, sigma, step))
            if widened(cache.dtype) != cache.dtype:
                moved = op("Cast", moved, to=cache.dtype)
            hat = op("Add", cache, moved)
            hat.shape, hat.type = cache.shape, cache.type
            hat.name = f"{name}_extrapolated"
            for use in readers:
                use.node.replace_input_with(use.idx, hat)
        if len(graph):  # first: the new nodes read only graph inputs
            graph.insert_before(next(iter(graph)), nodes)
        else:
            graph.extend(nodes)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _scaled(op, newer: ir.Value, older: ir.Value, factor: ir.Value, step: ir.Value) -> ir.Value:
        """factor[step] * (newer − older) per row, in the widened dtype (float32 for 16-bit caches)."""
        dtype, wide = newer.dtype, widened(newer.dtype)
        d = op("Sub", newer, older)
        r = op("Cast", factor, to=dtype) if dtype == ir.DataType.DOUBLE else factor
        if wide != dtype:
            d = op("Cast", d, to=wide)
        return scale_rows(op, d, r, step)

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        for name in self._added():
            if name not in inputs:
                raise ir.passes.PostconditionError(f"input {name!r} missing")
