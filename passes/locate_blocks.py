"""Analysis pass: find the transformer block stack of an exported DiT.

Result: a `BlockRegion`, the stream(s) the stack writes that the rest of the graph reads (exit h_L)
and, for each, the tensor that entered the stack on that stream (entry h_0) where one exists with
h_L's shape. Cutting the graph at the exits and feeding them back from a cache skips every block:
nothing upstream of an exit is needed at a cached step except what the embedding and head use.

Three ways to find it, tried in order:
1. module scopes (TorchScript node names or dynamo's `pkg.torch.onnx.name_scopes` metadata): the
   blocks are the entries of an indexed module list (`transformer_blocks.3`, `blocks.0`,
   `single_transformer_blocks.1`, ...) that contain attention. Several lists may alternate or follow
   each other (spatial/temporal, double/single stream); the stack is their hull: the blocks and
   everything between them.
2. structure, for graphs without scopes: the residual stream, the longest chain of residual
   Adds (x + f(x)) whose branches hold attention.
3. a manual override: the user names the entry and the exit tensor.

Invariant (proved by the split tests): every exit is computed inside the region, every region node
is upstream of an exit, and no block node is needed to compute the model output once the exits
are given.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable

import onnx_ir as ir

from omnicache_export.passes import graph_walk as gw
from omnicache_export.passes.scopes import indexed_modules, node_scope

ShapeOf = Callable[[ir.Value], tuple | None]

# Ops a stream passes through between blocks, or out of the stack towards the head.
_PASSTHROUGH = gw.LAYOUT_OPS | {"Slice", "Concat", "Split", "Clip", "Gather"}


class BlockStackNotFound(Exception):
    """The graph holds no transformer block stack that can be cut."""


@dataclasses.dataclass
class CacheStream:
    """One stream the stack writes and the head reads: h_L, and the h_0 it is a residual over."""

    exit: str
    entry: str | None  # None: cache h_L itself (no stack input has its shape)
    shape: list[int | str | None]
    dtype: str


@dataclasses.dataclass
class BlockRegion:
    method: str
    streams: list[CacheStream]
    block_lists: dict[str, int]  # module list -> number of blocks ({} without scopes)
    n_blocks: int
    n_blocks_estimated: bool = False

    @property
    def exits(self) -> list[str]:
        return [s.exit for s in self.streams]


# ---------------------------------------------------------------- scopes


def scoped_blocks(graph: ir.Graph) -> tuple[set[ir.Node], dict[str, int], str | None]:
    """Nodes inside indexed module lists that hold attention, the lists with their sizes, and the convention."""
    members: dict[str, dict[int, list[ir.Node]]] = defaultdict(lambda: defaultdict(list))
    conventions: set[str] = set()
    for node in graph:
        scope, convention = node_scope(node)
        if scope is None:
            continue
        conventions.add(convention)
        for prefix, index in indexed_modules(scope):
            members[prefix][index].append(node)
    lists: dict[str, int] = {}
    for name, blocks in members.items():
        with_attention = [i for i, ns in blocks.items() if any(n.op_type in gw.ATTENTION_OPS for n in ns)]
        # A block list: two or more repeated modules, most holding attention (FF `net.0` lists and
        # embedder MLPs hold none; a wrapper's single `models.0` is no list).
        if len(blocks) >= 2 and len(with_attention) * 2 > len(blocks):
            lists[name] = len(blocks)
    # Lists nested in another list (a block's own sub-lists) belong to the outer one.
    for name in list(lists):
        if any(name.startswith(other + ".") for other in lists if other != name):
            del lists[name]
    nodes = {n for name in lists for ns in members[name].values() for n in ns}
    convention = "dynamo metadata" if "dynamo metadata" in conventions else (conventions.pop() if conventions else None)
    return nodes, lists, convention


def hull(blocks: set[ir.Node]) -> set[ir.Node]:
    """The blocks plus every node between them (downstream of one block and upstream of another)."""
    return blocks | (gw.descendants(blocks) & gw.ancestors(blocks))


# ---------------------------------------------------------------- structure


def _topo_index(graph: ir.Graph) -> dict[ir.Node, int]:
    return {node: i for i, node in enumerate(graph)}


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _strip_casts(value: ir.Value) -> ir.Value:
    while value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
        value = value.producer().inputs[0]
    return value


def _bounded_ancestors(value: ir.Value, floor: int, order: dict[ir.Node, int]) -> set[ir.Node]:
    """Ancestors of `value` no earlier than topological position `floor` (the span of one branch)."""
    seen: set[ir.Node] = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in seen or order.get(node, -1) < floor:
            continue
        seen.add(node)
        if node.op_type not in ("Shape", "Size"):  # reading a shape is no data dependence
            stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


@dataclasses.dataclass
class _Residual:
    node: ir.Node
    skip: ir.Value
    branch_has_attention: bool


def residual_adds(graph: ir.Graph, order: dict[ir.Node, int], dynamic: set[ir.Node]) -> list[_Residual]:
    """Adds of the form x + f(x) on data (not shape arithmetic): one operand is an ancestor of the other."""
    found = []
    for node in graph:
        if node.op_type != "Add" or node not in dynamic or len(node.inputs) != 2:
            continue
        if any(v is None or _is_constant(v) for v in node.inputs):
            continue
        a, b = node.inputs
        pa, pb = a.producer(), b.producer()
        pos_a = order.get(pa, -1) if pa is not None else -1
        pos_b = order.get(pb, -1) if pb is not None else -1
        skip, other = (a, b) if pos_a <= pos_b else (b, a)
        # `x.float() + f(x.float())` may cast twice: compare the stream beneath casts.
        root = _strip_casts(skip)
        floor = order.get(root.producer(), -1) if root.producer() is not None else -1
        branch = _bounded_ancestors(other, floor, order)
        reaches_skip = any(skip in n.inputs or root in n.inputs for n in branch)
        if reaches_skip:
            found.append(_Residual(node, skip, any(n.op_type in gw.ATTENTION_OPS for n in branch)))
    return found


def _reaches(start: ir.Value, target: ir.Value, static: set[ir.Node], max_hops: int = 12, max_compute: int = 3) -> bool:
    """Does `start` flow into `target` along the stream between two residuals?

    Layout ops, slices, concatenations and adding or scaling by a constant (a positional embedding,
    even one computed in the graph from constants only: `static` holds the nodes that depend on no
    graph input) pass the stream through freely. A few other ops may sit between two residuals too
    (HunyuanDiT's long skips: concat, norm, linear), but no attention.
    """
    frontier = [(start, 0, 0)]
    seen: set[tuple[ir.Value, int]] = set()
    while frontier:
        value, hops, compute = frontier.pop()
        if value is target:
            return True
        if hops >= max_hops or (value, compute) in seen:
            continue
        seen.add((value, compute))
        for node in value.consumers():
            passthrough = node.op_type in _PASSTHROUGH or (
                node.op_type in ("Add", "Sub", "Mul")
                and any(_is_constant(v) or v.producer() in static for v in node.inputs if v is not None)
            )
            cost = 0 if passthrough else 1
            if node.op_type not in gw.ATTENTION_OPS and compute + cost <= max_compute:
                frontier.extend((out, hops + 1, compute + cost) for out in node.outputs)
    return False


def residual_stream(graph: ir.Graph) -> tuple[list[_Residual], int]:
    """The longest chain of residual Adds that carry attention; and an estimate of its block count."""
    order = _topo_index(graph)
    dynamic = gw.data_dependent(graph)
    static = {n for n in graph if n not in dynamic}
    residuals = residual_adds(graph, order, dynamic)
    # Longest path over "r_i's output flows into r_j's skip", residuals already in topological order.
    best = [1] * len(residuals)
    prev = [-1] * len(residuals)
    for j, rj in enumerate(residuals):
        for i in range(j):
            if best[i] + 1 > best[j] and _reaches(residuals[i].node.outputs[0], rj.skip, static):
                best[j], prev[j] = best[i] + 1, i
    if not residuals:
        return [], 0
    end = max(range(len(residuals)), key=lambda k: (best[k], k))
    chain = []
    while end != -1:
        chain.append(residuals[end])
        end = prev[end]
    chain.reverse()
    attention = [r.branch_has_attention for r in chain]
    if sum(attention) < 2:
        return [], 0
    # A block = one MLP residual (attention-free branch); parallel blocks (attention and MLP in one
    # branch, as Flux's single-stream blocks) count one each when no attention-free branch follows.
    n_mlp = sum(not a for a in attention)
    runs = sum(1 for k, a in enumerate(attention) if a and (k == 0 or not attention[k - 1]))
    return chain, max(n_mlp, runs)


# ---------------------------------------------------------------- exits and entries


def boundary(region: set[ir.Node], graph: ir.Graph) -> tuple[list[ir.Value], list[ir.Value]]:
    """(entries, exits): non-constant values flowing into the region, and values flowing out of it."""
    outputs = set(graph.outputs)
    entries: dict[ir.Value, None] = {}
    exits: dict[ir.Value, None] = {}
    for node in graph:  # graph order keeps the result deterministic
        if node not in region:
            continue
        for v in node.inputs:
            if v is not None and v.producer() not in region and not _is_constant(v):
                entries[v] = None
        for v in node.outputs:
            if v in outputs or any(c not in region for c in v.consumers()):
                exits[v] = None
    return list(entries), list(exits)


def _trace_back(value: ir.Value, region: set[ir.Node]) -> ir.Value | None:
    """Follow a stream upstream through residual Adds and layout ops to where it enters the region."""
    for _ in range(100_000):
        node = value.producer()
        if node is None or node not in region:
            return value
        if node.op_type in gw.LAYOUT_OPS or node.op_type in ("Slice", "Clip"):
            value = node.inputs[0]
        elif node.op_type == "Add" and len(node.inputs) == 2:
            a, b = node.inputs
            if _is_constant(a) or _is_constant(b):
                value = b if _is_constant(a) else a
            elif a.producer() is not None and a.producer() in gw.value_ancestors([b]):
                value = a
            elif b.producer() is not None and b.producer() in gw.value_ancestors([a]):
                value = b
            else:
                value = a if a.producer() in region else b
        else:
            return None
    return None


def _forward_layout_chain(value: ir.Value) -> list[ir.Value]:
    """Values reached from `value` through single-consumer layout/slice ops (how a stack output may be reshaped)."""
    chain = []
    while not value.is_graph_output():
        # Shape reads do not consume the data; the cut rebuilds them (MaterializeShapeReadsPass).
        readers = [c for c in value.consumers() if c.op_type not in ("Shape", "Size")]
        if len(readers) != 1:
            break
        node = readers[0]
        if node.op_type not in gw.LAYOUT_OPS | {"Slice"} or len(node.outputs) != 1:
            break
        value = node.outputs[0]
        chain.append(value)
    return chain


def pair_streams(
    region: set[ir.Node],
    graph: ir.Graph,
    shape_of: ShapeOf,
    latent_inputs: Iterable[ir.Value] = (),
) -> list[CacheStream]:
    """Pair each exit of the region with the entry on its stream (same shape), largest stream first."""
    entries, exits = boundary(region, graph)
    latent_inputs = list(latent_inputs)
    streams = []
    for exit_value in exits:
        if exit_value.dtype is not None and not exit_value.dtype.is_floating_point():
            raise BlockStackNotFound(
                f"the block region outputs the non-float tensor {exit_value.name!r} to the rest of the graph; "
                "name the stack's entry and exit with --region-start/--region-end"
            )
        upstream = gw.value_ancestors([exit_value])
        candidates = [e for e in entries if any(c in upstream for c in e.consumers())]
        chosen_exit, entry = exit_value, None
        for out in [exit_value, *_forward_layout_chain(exit_value)]:
            entry = _match_entry(out, candidates, region, shape_of, latent_inputs)
            if entry is not None:
                chosen_exit = out
                break
        shape = shape_of(chosen_exit)
        if shape is None and chosen_exit.shape is not None:
            shape = tuple(d if isinstance(d, int) else str(d) for d in chosen_exit.shape.dims)
        streams.append(
            CacheStream(
                exit=chosen_exit.name,
                entry=entry.name if entry is not None else None,
                shape=list(shape) if shape is not None else [],
                dtype=chosen_exit.dtype.name if chosen_exit.dtype is not None else "FLOAT",
            )
        )
    streams.sort(key=lambda s: -_numel(s.shape))
    return streams


def _numel(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) and d > 0 else 1
    return n


def _match_entry(
    exit_value: ir.Value,
    candidates: list[ir.Value],
    region: set[ir.Node],
    shape_of: ShapeOf,
    latent_inputs: list[ir.Value],
) -> ir.Value | None:
    target = shape_of(exit_value)
    if target is None:
        return None
    same = [c for c in candidates if shape_of(c) == target]
    if not same:
        return None
    traced = _trace_back(exit_value, region)
    if traced is not None and traced in same:
        return traced
    if latent_inputs:
        from_latent = [c for c in same if gw.depends_on(c, latent_inputs)]
        if from_latent:
            return from_latent[0]
    return same[0]


# ---------------------------------------------------------------- entry point


def locate_block_stack(
    model: ir.Model,
    shape_of: ShapeOf,
    latent_inputs: Iterable[str] = (),
    region_start: str | None = None,
    region_end: str | None = None,
) -> BlockRegion:
    """Find the block stack: manual override if given, else scopes, else the residual stream."""
    graph = model.graph
    latents = [v for v in graph.inputs if v.name in set(latent_inputs)]
    if region_start or region_end:
        return _manual_region(graph, shape_of, region_start, region_end)
    blocks, lists, convention = scoped_blocks(graph)
    if blocks and latents:
        # Block-scoped nodes that never see the latent are conditioning (per-block modulation, text K/V,
        # DiT's head reusing block 0's embedder): not part of the stack.
        on_stream = gw.value_descendants(latents)
        blocks = {n for n in blocks if n in on_stream}
    if blocks:
        region = hull(blocks)
        streams = pair_streams(region, graph, shape_of, latents)
        return BlockRegion(f"module scopes ({convention})", streams, lists, sum(lists.values()))
    chain, n_blocks = residual_stream(graph)
    if not chain:
        raise BlockStackNotFound(
            "no transformer block stack found: no module list with attention in the node scopes and no "
            "residual stream of attention blocks (name it with --region-start/--region-end)"
        )
    start, end = _strip_casts(chain[0].skip), chain[-1].node.outputs[0]
    region = gw.region_nodes([start], [end])
    streams = pair_streams(region, graph, shape_of, latents)
    return BlockRegion("residual stream (structure)", streams, {}, n_blocks, n_blocks_estimated=True)


def _manual_region(graph: ir.Graph, shape_of: ShapeOf, start: str | None, end: str | None) -> BlockRegion:
    if not (start and end):
        raise BlockStackNotFound("--region-start and --region-end must be given together")
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update((v.name, v) for v in node.outputs)
    for flag, name in (("--region-start", start), ("--region-end", end)):
        if name not in values:
            raise BlockStackNotFound(f"{flag} names {name!r}, which is no tensor of this graph")
    entry, exit_value = values[start], values[end]
    if not gw.depends_on(exit_value, [entry]):
        raise BlockStackNotFound(f"--region-end {end!r} is not computed from --region-start {start!r}")
    shape = shape_of(exit_value)
    residual = shape is not None and shape == shape_of(entry)
    region = gw.region_nodes([entry], [exit_value])
    n_attention = sum(n.op_type in gw.ATTENTION_OPS for n in region)
    stream = CacheStream(
        exit=end,
        entry=start if residual else None,
        shape=list(shape) if shape is not None else [],
        dtype=exit_value.dtype.name if exit_value.dtype is not None else "FLOAT",
    )
    return BlockRegion("manual (--region-start/--region-end)", [stream], {}, n_attention, n_blocks_estimated=True)
