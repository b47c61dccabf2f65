"""Pass: dead-code elimination that also drops graph inputs nothing reads any more.

onnx_ir's RemoveUnusedNodesPass keeps the signature; after a cut the signature must shrink too (a
cache step that no longer needs, say, `encoder_hidden_states` should not ask for it).
Invariant: every graph output is computed exactly as before; removed nodes/inputs had no path to one.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


class PruneDeadPass(ir.passes.InPlacePass):
    def __init__(self, keep_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.keep_inputs = set(keep_inputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        n_before = len(graph) + len(graph.inputs) + len(graph.initializers)
        RemoveUnusedNodesPass()(model)
        outputs = set(graph.outputs)
        for value in list(graph.inputs):
            if not value.uses() and value not in outputs and value.name not in self.keep_inputs:
                graph.inputs.remove(value)
                if value.name in graph.initializers:
                    del graph.initializers[value.name]
        RemoveUnusedNodesPass()(model)  # initializers that only fed removed inputs
        modified = len(graph) + len(graph.inputs) + len(graph.initializers) != n_before
        return ir.passes.PassResult(model, modified=modified)
