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

Invariant: row by row, where ρ[step_b] == 0 the graph computes exactly what it did before (R + 0 · d);
otherwise row b of the output equals the old graph's fed R̂ at step_b, whether ρ is fed or frozen by
FreezeTablesPass; rows at different steps in one call equal each row run alone at its step.
"""

from __future__ import annotations

import operator

import onnx_ir as ir

from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.per_row import scale_rows
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, MASKS, STEP, TREND, add_step_input, add_table_input, prev_cache_name, widened,
)

_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)
_CORRECTION = (FULL_PREV, FULL_PREV2, COEFFICIENTS, BLEND, MASKS)  # what EmbedCorrectionPass adds


class ExtrapolateCachePass(ir.passes.InPlacePass):
    def __init__(self, cache_names: list[str], n_steps: int):
        """cache_names: the cache inputs to carry forward; n_steps: N, the length of the trend table."""
        super().__init__()
        self.cache_names = list(cache_names)
        self.n_steps = operator.index(n_steps)

    def __repr__(self) -> str:
        return f"ExtrapolateCachePass({self.cache_names}, n_steps={self.n_steps})"

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
        clash = sorted(taken & {STEP, TREND, *map(prev_cache_name, self.cache_names)})
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
        for name in self.cache_names:
            cache = inputs[name]
            readers = list(cache.uses())  # taken before the new nodes read it too
            prev = ir.Value(name=prev_cache_name(name), shape=cache.shape, type=cache.type)
            graph.inputs.append(prev)
            wide = widened(cache.dtype)
            d = op("Sub", cache, prev)
            r = op("Cast", rho, to=cache.dtype) if cache.dtype == ir.DataType.DOUBLE else rho
            if wide != cache.dtype:
                d = op("Cast", d, to=wide)
            moved = scale_rows(op, d, r, step)
            if wide != cache.dtype:
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

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        for name in [STEP, TREND, *map(prev_cache_name, self.cache_names)]:
            if name not in inputs:
                raise ir.passes.PostconditionError(f"input {name!r} missing")
