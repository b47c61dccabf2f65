"""Reachability over an onnx_ir graph: the small toolkit the region analysis is built from."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

# Ops that only move or relabel elements: a residual stream passes through them unchanged in content.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"})
ATTENTION_OPS = frozenset({"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"})


def descendants(nodes: Iterable[ir.Node], stop: set[ir.Node] | None = None) -> set[ir.Node]:
    """Every node reachable downstream of `nodes` (excluding the seeds unless reached again)."""
    seen: set[ir.Node] = set()
    stack = [c for n in nodes for out in n.outputs for c in out.consumers()]
    while stack:
        node = stack.pop()
        if node in seen or (stop and node in stop):
            continue
        seen.add(node)
        stack.extend(c for out in node.outputs for c in out.consumers())
    return seen


def value_descendants(values: Iterable[ir.Value]) -> set[ir.Node]:
    seeds = [c for v in values for c in v.consumers()]
    return set(seeds) | descendants(seeds)


def ancestors(nodes: Iterable[ir.Node]) -> set[ir.Node]:
    """Every node upstream of `nodes` (excluding the seeds unless reached again)."""
    seen: set[ir.Node] = set()
    stack = [v.producer() for n in nodes for v in n.inputs if v is not None and v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def value_ancestors(values: Iterable[ir.Value]) -> set[ir.Node]:
    seeds = [v.producer() for v in values if v.producer() is not None]
    return set(seeds) | ancestors(seeds)


def depends_on(value: ir.Value, sources: Iterable[ir.Value]) -> bool:
    """True where `value` is computed from any of `sources` (graph inputs or intermediate values)."""
    sources = set(sources)
    if value in sources:
        return True
    anc = value_ancestors([value])
    return any(inp in sources for node in anc for inp in node.inputs)


def region_nodes(entries: Iterable[ir.Value], exits: Iterable[ir.Value]) -> set[ir.Node]:
    """Nodes downstream of any entry and upstream of (or producing) any exit."""
    return value_descendants(entries) & value_ancestors(exits)


def data_dependent(graph: ir.Graph) -> set[ir.Node]:
    """Nodes whose output data depend on a graph input's values (reading only its shape does not count)."""
    seen: set[ir.Node] = set()
    stack = [c for v in graph.inputs if not v.is_initializer() for c in v.consumers()]
    while stack:
        node = stack.pop()
        if node in seen or node.op_type in ("Shape", "Size"):
            continue
        seen.add(node)
        stack.extend(c for out in node.outputs for c in out.consumers())
    return seen
