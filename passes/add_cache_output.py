"""Pass: the full-step graph. Adds one output per cache stream, R = h_L - h_0 (or h_L itself).

Invariant: the model's own outputs are computed by exactly the same nodes as before (only nodes and
outputs are added), so they are bit-identical; `omnicache_cache` equals h_L - h_0 of this step.
"""

from __future__ import annotations

import onnx_ir as ir

from omnicache_export.passes.cache_names import cache_name, stream_type
from omnicache_export.passes.locate_blocks import BlockRegion


def value_index(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs)
    return values


class AddCacheOutputPass(ir.passes.InPlacePass):
    def __init__(self, region: BlockRegion):
        super().__init__()
        self.region = region

    def requires(self, model: ir.Model) -> None:
        values = value_index(model.graph)
        for stream in self.region.streams:
            for name in (stream.exit, stream.entry):
                if name is not None and name not in values:
                    raise ir.passes.PreconditionError(f"tensor {name!r} is not in the graph")
        taken = {v.name for v in model.graph.outputs} | set(values)
        for i in range(len(self.region.streams)):
            if cache_name(i) in taken:
                raise ir.passes.PreconditionError(f"the graph already has a tensor named {cache_name(i)!r}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = value_index(graph)
        for i, stream in enumerate(self.region.streams):
            exit_value = values[stream.exit]
            type_, shape = stream_type(stream, exit_value)
            out = ir.Value(name=cache_name(i), shape=shape, type=type_)
            if stream.entry is not None:
                node = ir.node("Sub", [exit_value, values[stream.entry]], outputs=[out], name=f"omnicache/residual_{i}")
            else:
                node = ir.node("Identity", [exit_value], outputs=[out], name=f"omnicache/residual_{i}")
            # Appending after every producer keeps the node list topologically sorted.
            graph.append(node)
            graph.outputs.append(out)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        names = [v.name for v in model.graph.outputs]
        for i in range(len(self.region.streams)):
            if cache_name(i) not in names:
                raise ir.passes.PostconditionError(f"output {cache_name(i)!r} missing")
