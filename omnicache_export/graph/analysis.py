"""Model analysis: input roles, the block stack, and how much of the model it is (`inspect`)."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from omnicache_export.graph import flops as flops_mod
from omnicache_export.errors import UserError
from omnicache_export.passes import graph_walk as gw
from omnicache_export.passes.add_cache_output import value_index
from omnicache_export.passes.locate_blocks import BlockRegion, BlockStackNotFound, locate_block_stack
from omnicache_export.graph.synthetic import synthesize
from omnicache_export.graph.modelio import weight_bytes
from omnicache_export.passes.static_shapes import bind_input_dims, infer_elem_types, infer_static_shapes
from omnicache_export.graph.shape_probe import probe_shapes
from omnicache_export.graph.roles import guess_roles
from omnicache_export.io_spec import IOSpec

logger = logging.getLogger(__name__)
PROBE_MAX_WEIGHT_BYTES = 256 << 20


@dataclasses.dataclass
class ModelAnalysis:
    io: list[IOSpec]
    region: BlockRegion
    n_nodes: int
    n_region_nodes: int
    flops_total: int
    flops_region: int
    shapes_at: dict[str, list[int]]  # the concrete input shapes the FLOPs were estimated at
    # every value's static shape at the batch above and at twice it (which dims scale with the batch)
    shapes_b1: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)
    shapes_b2: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def node_share(self) -> float:
        return self.n_region_nodes / max(1, self.n_nodes)

    @property
    def flop_share(self) -> float | None:
        return self.flops_region / self.flops_total if self.flops_total else None

    def role(self, role: str) -> list[IOSpec]:
        return [s for s in self.io if s.role == role]

    def to_json(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.io if s.role != "output"],
            "outputs": [s.to_json() for s in self.role("output")],
            "block_region": {
                "method": self.region.method,
                "streams": [dataclasses.asdict(s) for s in self.region.streams],
                "entry": self.region.streams[0].entry,
                "exit": self.region.streams[0].exit,
                "block_lists": self.region.block_lists,
                "n_blocks": self.region.n_blocks,
                "n_blocks_estimated": self.region.n_blocks_estimated,
                "n_nodes": self.n_region_nodes,
                "node_share": round(self.node_share, 4),
                "flops": self.flops_region,
                "flop_share": None if self.flop_share is None else round(self.flop_share, 4),
            },
            "n_nodes": self.n_nodes,
            "flops_total": self.flops_total,
            "flops_at_input_shapes": self.shapes_at,
        }

    def summary(self) -> str:
        lines = ["inputs:"]
        for s in self.io:
            if s.role != "output":
                lines.append(f"  {s.name:<28} {s.role:<13} {s.dtype:<8} {s.shape}")
        for s in self.role("output"):
            lines.append(f"output: {s.name} {s.dtype} {s.shape}")
        r = self.region
        lines.append(f"block stack ({r.method}):")
        lists = ", ".join(f"{k} x{v}" for k, v in r.block_lists.items())
        lines.append(f"  blocks: {'~' if r.n_blocks_estimated else ''}{r.n_blocks}" + (f" ({lists})" if lists else ""))
        for i, s in enumerate(r.streams):
            kind = f"residual over {s.entry}" if s.entry else "direct reuse"
            lines.append(f"  stream {i}: exit {s.exit} {s.shape}, {kind}")
        lines.append(f"  nodes: {self.n_region_nodes} of {self.n_nodes} ({100 * self.node_share:.1f} %)")
        if self.flop_share is not None:
            lines.append(
                f"  estimated FLOPs: {self.flops_region:.3g} of {self.flops_total:.3g} "
                f"({100 * self.flop_share:.1f} %) at {self.shapes_at}"
            )
        return "\n".join(lines)


def removed_by_cut(graph: ir.Graph, region: BlockRegion) -> set[ir.Node]:
    """The nodes a cache step no longer runs: not needed for the outputs once the exits are given."""
    values = value_index(graph)
    exits = {values[s.exit] for s in region.streams}
    live: set[ir.Node] = gw.value_ancestors([values[s.entry] for s in region.streams if s.entry])
    stack = [v.producer() for v in graph.outputs if v not in exits]
    while stack:
        node = stack.pop()
        if node is None or node in live:
            continue
        live.add(node)
        if node.op_type not in ("Shape", "Size"):  # shape reads of cut values are rebuilt by the cut
            stack.extend(v.producer() for v in node.inputs if v is not None and v not in exits)
    return {n for n in graph if n not in live}


def symbolic_batch_dims(shape: list, doubled: tuple[int, ...] | None) -> list:
    """Dims that double with the batch become `batch` (or `batch*k`, e.g. batch times frames)."""
    if doubled is None or len(doubled) != len(shape):
        return shape
    out = []
    for d, d2 in zip(shape, doubled):
        if isinstance(d, int) and d2 == 2 * d:
            out.append("batch" if d == 1 else f"batch*{d}")
        else:
            out.append(d)
    return out


def make_shape_of(model: ir.Model, static: dict[str, tuple[int, ...]]):
    def shape_of(value: ir.Value) -> tuple[int, ...] | None:
        if value is None:
            return None
        if value.name in static:
            return static[value.name]
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        if value.shape is not None and all(isinstance(d, int) for d in value.shape.dims):
            return tuple(value.shape.dims)
        return None

    return shape_of


def analyze(
    model: ir.Model,
    latent: str | None = None,
    timestep: str | None = None,
    region_start: str | None = None,
    region_end: str | None = None,
    input_dims: dict[str, list[int | None]] | None = None,
    batch: int = 1,
) -> ModelAnalysis:
    io = guess_roles(model, latent, timestep)
    bound = bind_input_dims(model, input_dims, batch)
    static = infer_static_shapes(model, bound)
    doubled_dims = bind_input_dims(model, input_dims, 2 * batch)
    doubled = infer_static_shapes(model, doubled_dims)
    missing = [v.name for n in model.graph for v in n.outputs if v.name not in static or v.name not in doubled]
    if missing and weight_bytes(model) <= PROBE_MAX_WEIGHT_BYTES:
        # Shape inference gave up somewhere; a small model is cheaper to measure than to guess.
        try:
            static.update(probe_shapes(model, synthesize(io, {k: list(v) for k, v in bound.items()}), missing))
            doubled.update(probe_shapes(model, synthesize(io, {k: list(v) for k, v in doubled_dims.items()}), missing))
        except Exception as exc:  # dynamic dims without hints, or a model ORT cannot run
            logger.info("shape probe failed: %s", exc)
    shape_of = make_shape_of(model, static)
    latents = [s.name for s in io if s.role == "latent"]
    try:
        region = locate_block_stack(model, shape_of, latents, region_start, region_end)
    except BlockStackNotFound as exc:
        raise UserError(str(exc)) from None
    values = value_index(model.graph)
    if any(values[s.exit].dtype is None for s in region.streams):
        # Untyped exits (TorchScript keeps no value_info) get the type inference gives them, not a
        # default FLOAT: a half-precision stack's cache is FLOAT16.
        types = infer_elem_types(model)
        for stream in region.streams:
            if values[stream.exit].dtype is None and stream.exit in types:
                stream.dtype = types[stream.exit].name
    # The second inference at twice the batch tells which dims of each cache tensor scale with it.
    for stream in region.streams:
        if not stream.shape:
            exit_value = value_index(model.graph)[stream.exit]
            if exit_value.shape is None:
                raise UserError(
                    f"cannot infer the shape of the block stack's output {stream.exit!r}; "
                    "give the dynamic input shapes with --input-shape NAME=D0,D1,..."
                )
        stream.shape = symbolic_batch_dims(stream.shape, doubled.get(stream.exit))
    graph = model.graph
    removed = removed_by_cut(graph, region)
    total = inside = 0
    for node in graph:
        f = flops_mod.node_flops(node, shape_of) or 0
        total += f
        if node in removed:
            inside += f
    return ModelAnalysis(
        io=io,
        region=region,
        n_nodes=len(graph),
        n_region_nodes=len(removed),
        flops_total=total,
        flops_region=inside,
        shapes_at={k: list(v) for k, v in bound.items()},
        shapes_b1=static,
        shapes_b2=doubled,
    )
