"""Pass: shape reads of dead values become shape arithmetic on a live input.

TorchScript exports read shapes eagerly (`x.reshape(b, -1, x.shape[-2], x.shape[-1])`), so a head
may hold `Shape(v)` of a value inside the block stack: after the cut, that one read would keep the
whole stack alive. Each such read is replaced by the same shape built from constants and the batch
size (read from a live input), using the value's static shapes at two batch sizes to tell which dims
scale with the batch.

Invariant: at every batch size the replacement tensor equals the Shape it replaces (dims that are
neither constant nor a multiple of the batch are refused, the read is then left alone).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

Shape = tuple[int, ...]


def live_nodes_without_shape_reads(graph: ir.Graph) -> set[ir.Node]:
    """Nodes the outputs need, not looking through Shape/Size (their inputs are not really needed)."""
    live: set[ir.Node] = set()
    stack = [v.producer() for v in graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or node in live:
            continue
        live.add(node)
        if node.op_type not in ("Shape", "Size"):
            stack.extend(v.producer() for v in node.inputs if v is not None)
    return live


class MaterializeShapeReadsPass(ir.passes.InPlacePass):
    def __init__(self, batch_input: str, shapes_b1: dict[str, Shape], shapes_b2: dict[str, Shape]):
        super().__init__()
        self.batch_input = batch_input
        self.shapes_b1, self.shapes_b2 = shapes_b1, shapes_b2

    def _dims(self, value: ir.Value) -> list[tuple[str, int]] | None:
        s1, s2 = self.shapes_b1.get(value.name), self.shapes_b2.get(value.name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            return None
        dims = []
        for d1, d2 in zip(s1, s2):
            if d1 == d2:
                dims.append(("const", d1))
            elif d2 == 2 * d1:
                dims.append(("batch", d1))
            else:
                return None
        return dims

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        live = live_nodes_without_shape_reads(graph)
        batch_source = next((v for v in graph.inputs if v.name == self.batch_input), None)
        modified = False
        for node in [n for n in graph if n in live and n.op_type == "Shape"]:
            source = node.inputs[0]
            if source.producer() is None or source.producer() in live:
                continue
            dims = self._dims(source)
            if dims is None or batch_source is None:
                continue
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            replacement = self._build(graph, dims[slice(start, end)], batch_source, node)
            ir.convenience.replace_all_uses_with(node.outputs[0], replacement, replace_graph_outputs=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _build(self, graph: ir.Graph, dims: list[tuple[str, int]], batch_source: ir.Value, at: ir.Node) -> ir.Value:
        new: list[ir.Node] = []

        def const(values: list[int]) -> ir.Value:
            n = ir.node("Constant", [], {"value": ir.tensor(np.array(values, np.int64))})
            new.append(n)
            return n.outputs[0]

        shape = ir.node("Shape", [batch_source], {"start": 0, "end": 1})
        new.append(shape)
        parts = []
        for kind, d in dims:
            if kind == "const":
                parts.append(const([d]))
            else:
                mul = ir.node("Mul", [shape.outputs[0], const([d])])
                new.append(mul)
                parts.append(mul.outputs[0])
        concat = ir.node("Concat", parts or [const([])], {"axis": 0})
        new.append(concat)
        graph.insert_before(at, new)
        return concat.outputs[0]
