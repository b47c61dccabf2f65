"""Repair pass (TorchScript's trap): fold `If(dim(x, i) == 1, Squeeze(x, [i]), Identity(x))` where
the dim is static and not 1.

`x.squeeze(i)` is a no-op in torch when dim i is not 1. TorchScript cannot see that at trace time
and writes `If(Equal(Gather(Shape(x), i), 1), then: Squeeze(x, [i]), else: Identity(x))`. Where
shape inference proves dim i of x is some n != 1 for every input (diffusers' PixArt:
`proj_out(x).squeeze(1)` on [B, 16, C]), ONNX Runtime type-checks the dead Squeeze branch against
it and refuses to load the model ("Dimension of input 1 must be 1 instead of 16"). The branch the
condition takes for every input is inlined in place of the If, and the condition's now unread
Shape/Gather/Equal chain is removed.

Only Ifs whose condition the static dims decide, and whose dead branch holds such a Squeeze (a
Squeeze of an axis shape inference proves is not 1: the branch that cannot type-check), are folded;
every other If is left as exported.

Invariant: for every input the model accepts, the If takes the inlined branch, so the graph
computes the same values as before (the same nodes on the same values); only the dead branch,
which ONNX Runtime could not load, and the dead condition are gone. Test: the repaired stock
PixArt export equals the torch model.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from omnicache_export.passes.fold_shape_if import dim_equality, inline_branch

Dims = tuple[int | None, ...]


def squeeze_axes(node: ir.Node) -> list[int] | None:
    """The axes of a Squeeze (an input from opset 13, an attribute before), where constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        value = node.inputs[1]
        tensor = value.const_value
        producer = value.producer()
        if tensor is None and producer is not None and producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            tensor = attr.value if attr is not None else None
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def non_unit_axes(node: ir.Node, dims: Mapping[str, Dims]) -> list[int]:
    """The axes a Squeeze names whose size shape inference proves is not 1 (normalised, >= 0)."""
    axes = squeeze_axes(node)
    x = node.inputs[0] if node.inputs else None
    shape = dims.get(x.name) if x is not None else None
    if axes is None or shape is None:
        return []
    rank = len(shape)
    return [a % rank for a in axes if -rank <= a < rank and shape[a % rank] is not None and shape[a % rank] != 1]


def remove_dead_chain(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the producers of `values` that nothing reads any more, and theirs in turn."""
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or node.graph is not graph or any(out.uses() for out in node.outputs):
            continue
        if any(out in graph.outputs for out in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        stack.extend(inputs)


class FoldSqueezeIfPass(ir.passes.InPlacePass):
    def __init__(self, dims: Mapping[str, Dims]):
        """dims: value name -> dims shape inference proves for every input (int) or cannot (None)
        (`passes.static_shapes.symbolic_static_dims`)."""
        super().__init__()
        self.dims = dims
        self.folded: list[str] = []  # "node: why", one per folded If

    def _static_dim(self, source: str, index: int, start: int) -> int | None:
        """x's dim i (after `start`), where shape inference proves it for every input."""
        shape = self.dims.get(source)
        if shape is None:
            return None
        start = start % len(shape) if shape and start < 0 else start
        index += start
        if not -len(shape) <= index < len(shape):
            return None
        return shape[index]

    def _ill_typed_squeeze(self, branch: ir.Graph) -> ir.Node | None:
        for node in branch:
            if node.op_type == "Squeeze" and non_unit_axes(node, self.dims):
                return node
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.folded = []
        for node in [n for n in graph if n.op_type == "If"]:
            decided = dim_equality(node.inputs[0], self._static_dim)
            if decided is None:
                continue
            taken, why = decided
            dead = node.attributes["else_branch" if taken else "then_branch"].as_graph()
            squeeze = self._ill_typed_squeeze(dead)
            if squeeze is None:  # the dead branch type-checks: ONNX Runtime loads it as it is
                continue
            cond = node.inputs[0]
            inline_branch(graph, node, taken)
            remove_dead_chain(graph, [cond])
            self.folded.append(f"{node.name!r} ({why}: its dead {squeeze.op_type} branch dropped)")
        return ir.passes.PassResult(model, modified=bool(self.folded))
