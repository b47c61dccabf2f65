"""Analysis: the nodes a 16-bit conversion keeps in float32, and why (`KeepFp32`).

- TIMESTEP: nodes computed only from the timestep input and constants (integer side inputs such as
  shapes aside): the sinusoidal embedding and its MLP. fp16 spaces values near t = 1000 by 0.5, so t
  itself rounds by up to 0.25 and sin(t·f) of the highest frequencies is off by as much.
- NORMS: normalizations (LayerNormalization, RMSNormalization, Group/Instance/BatchNormalization)
  and the reductions of decomposed ones (ReduceMean, ReduceSumSquare, ReduceL2, the Pow that feeds
  a reduction), with the elementwise tail that only combines their results with scalars (+ eps,
  Sqrt, Reciprocal, Div): x² overflows fp16 past |x| = 256 and a mean of many terms loses digits.
- SOFTMAX: Softmax and LogSoftmax (the exponentials' sum).
- POSITIONS: float nodes computed from constants and shapes alone, no float input behind them: rotary
  and sin-cos position tables, whose frequencies times positions overflow fp16 (LTX's RoPE: 15704·5).
"""

from __future__ import annotations

import enum

import onnx_ir as ir

from omnicache_export.passes.op_signature import FLOATS


class KeepFp32(str, enum.Enum):
    TIMESTEP = "timestep"
    NORMS = "norms"
    SOFTMAX = "softmax"
    POSITIONS = "positions"


ALL_KEEPS = frozenset(KeepFp32)
NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "GroupNormalization",
                      "InstanceNormalization", "BatchNormalization", "ReduceMean", "ReduceSumSquare", "ReduceL2",
                      "ReduceLogSumExp"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
# The elementwise tail of a decomposed norm's statistics: var + eps, sqrt, 1 / std ...
_NORM_TAIL = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Max", "Min", "Clip", "Neg", "Cast"})


def constant_values(graph: ir.Graph) -> dict[ir.Value, int]:
    """Values known before the run (initializers, Constant outputs) -> their element count."""
    inputs = set(graph.inputs)
    sizes = {v: (v.const_value.size if v.const_value is not None else 0) for v in graph.initializers.values()
             if v not in inputs}
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = next(iter(node.attributes.values()), None)
            size = getattr(attr.value, "size", None) if attr is not None and attr.type == ir.AttributeType.TENSOR else None
            sizes[node.outputs[0]] = size if size is not None else len(attr.value) if attr is not None and \
                isinstance(attr.value, (list, tuple)) else 1
    return sizes


def _is_float(value: ir.Value) -> bool:
    return value.dtype in FLOATS


def timestep_path(graph: ir.Graph, timestep: str | None, constants: dict[ir.Value, int]) -> set[ir.Node]:
    """Nodes whose every non-constant float input derives from the timestep input alone (at least one
    input from it; integer inputs that do not, such as a Shape, are ignored)."""
    start = [v for v in graph.inputs if v.name == timestep]
    if not start:
        return set()
    on_path: set[ir.Value] = set(start)
    nodes: set[ir.Node] = set()
    for node in graph:  # topological order
        ins = [v for v in node.inputs if v is not None]
        if not any(v in on_path for v in ins):
            continue
        if all(v in on_path or v in constants or not _is_float(v) for v in ins):
            nodes.add(node)
            on_path.update(node.outputs)
    return nodes


def position_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Float-producing nodes no float graph input flows into (constants, shapes, integer inputs only)."""
    data: set[ir.Value] = {v for v in graph.inputs if _is_float(v)}
    nodes: set[ir.Node] = set()
    for node in graph:
        if node.op_type in ("Shape", "Size"):
            continue  # a shape carries no data
        if any(v in data for v in node.inputs if v is not None):
            data.update(node.outputs)
        elif node.op_type != "Constant" and any(_is_float(v) for v in node.outputs):
            nodes.add(node)
    return nodes


def norm_nodes(graph: ir.Graph, constants: dict[ir.Value, int]) -> set[ir.Node]:
    kept = {n for n in graph if n.op_type in NORM_OPS}
    for node in graph:  # x² feeding a reduction (RMSNorm, a decomposed LayerNorm's variance)
        if node.op_type == "Pow" and any(u.node.op_type in REDUCTIONS for u in node.outputs[0].uses()):
            kept.add(node)
    kept_values = {v for n in kept for v in n.outputs}
    for node in graph:
        if node in kept or node.op_type not in _NORM_TAIL:
            continue
        floats = [v for v in node.inputs if v is not None and _is_float(v)]
        if any(v in kept_values for v in floats) and \
                all(v in kept_values or constants.get(v, 2) <= 1 for v in floats):
            kept.add(node)
            kept_values.update(node.outputs)
    return kept


def fp32_nodes(graph: ir.Graph, timestep: str | None, keep: frozenset[KeepFp32] = ALL_KEEPS
               ) -> dict[ir.Node, KeepFp32]:
    """Each node the conversion keeps in float32 -> the first reason that keeps it."""
    constants = constant_values(graph)
    found: dict[ir.Node, KeepFp32] = {}
    if KeepFp32.TIMESTEP in keep:
        found.update(dict.fromkeys(timestep_path(graph, timestep, constants), KeepFp32.TIMESTEP))
    if KeepFp32.NORMS in keep:
        for node in norm_nodes(graph, constants):
            found.setdefault(node, KeepFp32.NORMS)
    if KeepFp32.POSITIONS in keep:
        for node in position_nodes(graph):
            found.setdefault(node, KeepFp32.POSITIONS)
    if KeepFp32.SOFTMAX in keep:
        for node in graph:
            if node.op_type in SOFTMAX_OPS:
                found.setdefault(node, KeepFp32.SOFTMAX)
    return {n: r for n, r in found.items() if n.op_type != "Constant"}
