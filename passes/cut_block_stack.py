"""Pass: the cache-reuse graph. The block stack is cut out and its output comes from the cache.

For each stream, a new input `omnicache_cache[_k]` replaces h_L by h_0 + cache (or by the cache
itself for direct reuse); everything that only fed the stack is then dead and pruned, graph inputs
included.

Invariant: fed the `omnicache_cache` the full graph emitted for the same inputs, the cache graph
computes the same model outputs (h_0 + (h_L - h_0) = h_L up to one rounding), and none of the block
nodes remain.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.cache_names import cache_name, stream_type
from omnicache_export.passes.locate_blocks import BlockRegion
from omnicache_export.passes.fold_shape_if import FoldShapeIfPass
from omnicache_export.passes.materialize_shape_reads import MaterializeShapeReadsPass
from omnicache_export.passes.prune import PruneDeadPass


class CutBlockStackPass(ir.passes.InPlacePass):
    def __init__(self, region: BlockRegion, batch_input: str | None = None, shapes: tuple[dict, dict] | None = None):
        """`batch_input` and `shapes` (static shapes at batch 1 and 2) let shape reads of cut values be rebuilt."""
        super().__init__()
        self.region = region
        self.batch_input = batch_input
        self.shapes = shapes

    def requires(self, model: ir.Model) -> None:
        values = value_index(model.graph)
        for stream in self.region.streams:
            for name in (stream.exit, stream.entry):
                if name is not None and name not in values:
                    raise ir.passes.PreconditionError(f"tensor {name!r} is not in the graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = value_index(graph)
        cache_inputs = []
        for i, stream in enumerate(self.region.streams):
            exit_value = values[stream.exit]
            type_, shape = stream_type(stream, exit_value)
            cache = ir.Value(name=cache_name(i), shape=shape, type=type_)
            graph.inputs.append(cache)
            cache_inputs.append(cache.name)
            if stream.entry is None:
                restored = cache
            else:
                node = ir.node("Add", [values[stream.entry], cache], name=f"omnicache/restore_{i}")
                restored = node.outputs[0]
                restored.name = f"omnicache_restored_{i}"
                restored.shape, restored.type = shape, type_
                graph.append(node)
            ir.convenience.replace_all_uses_with(exit_value, restored, replace_graph_outputs=True)
            if exit_value in graph.outputs:  # keep the output's name
                restored.name, exit_value.name = exit_value.name, f"{exit_value.name}_cut"
        # The restore Adds were appended at the end: sort before pruning, which sweeps in reverse order.
        TopologicalSortPass()(model)
        if self.shapes:
            FoldShapeIfPass(*self.shapes)(model)
            if self.batch_input:
                MaterializeShapeReadsPass(self.batch_input, *self.shapes)(model)
        PruneDeadPass(keep_inputs=tuple(cache_inputs))(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        for i in range(len(self.region.streams)):
            if cache_name(i) not in inputs:
                raise ir.passes.PostconditionError(f"input {cache_name(i)!r} missing")
