"""Pass: fold `If` nodes whose condition only compares a static dimension with a constant.

TorchScript exports `x.squeeze(1)` on a dimension it cannot see as `If(dim(x, 1) == 1, Squeeze,
Identity)`. In the source graph that dim is symbolic, so the dead Squeeze branch type-checks; once a
cut feeds the head a value of concrete shape, ONNX Runtime type-checks the dead branch against it and
refuses to load the graph. With the dimension known (equal at two batch sizes), the condition is a
constant and the taken branch is inlined.

Invariant: the graph computes the same values for every input shape the static shapes hold for.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

Shape = tuple[int, ...]


def _const_int(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None:
        return None
    array = tensor.numpy()
    return int(array.reshape(-1)[0]) if array.size == 1 else None


def _through_unit_ops(value: ir.Value) -> ir.Value:
    while value.producer() is not None and value.producer().op_type in ("Cast", "Squeeze", "Unsqueeze", "Identity"):
        value = value.producer().inputs[0]
    return value


def inline_branch(graph: ir.Graph, node: ir.Node, taken: bool) -> None:
    """Replace the `If` node of `graph` by the nodes of its then (`taken`) or else branch."""
    branch = node.attributes["then_branch" if taken else "else_branch"].as_graph()
    inner = list(branch)
    outputs = list(branch.outputs)
    branch.outputs.clear()  # a value may be the output of one graph only
    for n in inner:
        branch.remove(n)
    graph.insert_before(node, inner)
    for old, new in zip(node.outputs, outputs):
        name, is_output = old.name, old in graph.outputs
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if is_output:  # a graph output keeps its name
            old.name, new.name = f"{name}_folded", name
    graph.remove(node, safe=True)


def shape_dim_read(value: ir.Value) -> tuple[str, int, int] | None:
    """(x, i, start) where `value` is Gather(Shape(x, start), i), through unit ops; else None."""
    gather = _through_unit_ops(value).producer()
    if gather is None or gather.op_type != "Gather" or gather.inputs[0] is None:
        return None
    shape_node = gather.inputs[0].producer()
    index = _const_int(gather.inputs[1])
    if shape_node is None or shape_node.op_type != "Shape" or index is None:
        return None
    return shape_node.inputs[0].name, index, shape_node.attributes.get_int("start", 0)


DimOf = Callable[[str, int, int], "int | None"]  # (x, i, start) -> x's dim, where it is static


def dim_equality(cond: ir.Value, dim_of: DimOf) -> tuple[bool, str] | None:
    """(whether it holds, why) for a condition Equal(dim of x, constant), either order, whose dim
    `dim_of` knows; None for any other condition."""
    node = _through_unit_ops(cond).producer()
    if node is None or node.op_type != "Equal":
        return None
    a, b = node.inputs
    for dim_side, const_side in ((a, b), (b, a)):
        read, const = shape_dim_read(dim_side), _const_int(const_side)
        dim = dim_of(*read) if read is not None else None
        if dim is not None and const is not None:
            return dim == const, f"dim of {read[0]!r} is {dim}, the condition compares it with {const}"
    return None


class FoldShapeIfPass(ir.passes.InPlacePass):
    def __init__(self, shapes_b1: dict[str, Shape], shapes_b2: dict[str, Shape]):
        super().__init__()
        self.shapes_b1, self.shapes_b2 = shapes_b1, shapes_b2

    def _static_dim(self, source: str, index: int, start: int) -> int | None:
        """x's dim i (after `start`), where it is the same at both batch sizes."""
        s1, s2 = self.shapes_b1.get(source), self.shapes_b2.get(source)
        if s1 is None or s2 is None or len(s1) != len(s2):
            return None
        index += start
        if not -len(s1) <= index < len(s1) or s1[index] != s2[index]:
            return None
        return s1[index]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in [n for n in graph if n.op_type == "If"]:
            decided = dim_equality(node.inputs[0], self._static_dim)
            if decided is None:
                continue
            inline_branch(graph, node, decided[0])
            modified = True
        return ir.passes.PassResult(model, modified=modified)
