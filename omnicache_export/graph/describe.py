"""The two graphs' GraphIO (the manifest's `graphs`): what feeds each input, what each output is.

This is the one place that maps the names the passes give the tensors they add
(`passes.cache_names`: caches, their previous values, the step index, the last full outputs, the
correction tables, the uncorrected output) to Feed kinds: the runtime reads only the kinds.

Shapes: static dims are ints. Axis 0 of a batch-dependent tensor is named "batch" in both graphs:
the batched model inputs (axis 0 symbolic or the latent's, as `batched_inputs` decides), the output
and the tensors shaped like it, and any tensor whose axis 0 is one of those tensors' axis-0 symbol.
A cache whose axis 0 has another symbol (batch × frames in a temporal layout) keeps it. A tensor
shaped like another by construction (the last full outputs and the uncorrected output like the
model output, a cache's previous value like the cache) takes the other's name where its dim is
unnamed or equal. Other symbolic dims keep the exporter's name; an unnamed one becomes
`<tensor>_dim<axis>` (a tensor has the same name in both graphs, so the same dim names).
"""

from __future__ import annotations

import onnx_ir as ir

from omnicache_export.io_spec import IOSpec, Role
from omnicache_export.passes.cache_names import (
    FULL_PREV, FULL_PREV2, STEP, TABLES, prev2_cache_name, prev_cache_name, uncorrected_name,
)
from omnicache_export.runtime.conditioning import batched_inputs
from omnicache_export.runtime.graph_io import Feed, GraphIO, TensorIO

BATCH = "batch"
Dims = tuple[int | str | None, ...]  # the exporter's annotation: None for an unnamed dim


def describe_graphs(full: ir.Model, cache: ir.Model, io: list[IOSpec], cache_names: list[str],
                    output: str) -> tuple[GraphIO, GraphIO]:
    """GraphIO of the full and the cache graph. `io`: the model's inputs with their roles (output
    specs are ignored); `cache_names`: the cache tensors the split added; `output`: the model output.
    Raises ValueError naming any input or output it cannot classify."""
    model_inputs = {s.name for s in io if s.role != Role.OUTPUT.value}
    shapes = {v.name: _dims(v) for g in (full, cache) for v in (*_inputs(g), *g.graph.outputs)}
    if output not in shapes:
        raise ValueError(f"the full graph has no output {output!r}")
    like = {FULL_PREV: output, FULL_PREV2: output, uncorrected_name(output): output}
    earlier = {Feed.CACHE_PREV: prev_cache_name, Feed.CACHE_PREV2: prev2_cache_name}  # a cache's earlier values
    earlier_feed = {name(c): feed for feed, name in earlier.items() for c in cache_names}
    like |= {name(c): c for name in earlier.values() for c in cache_names}
    # the step index is per row of the model batch (one step per row: rows at different steps share a call)
    batched = batched_inputs([s for s in io if s.role != Role.OUTPUT.value]) | {output, STEP}
    namer = _DimNamer(shapes, like, batched)

    def tensor(v: ir.Value, feed: Feed, source: str | None = None) -> TensorIO:
        if v.dtype is None:
            raise ValueError(f"{v.name!r} has no element type")
        return TensorIO(v.name, v.dtype.name, namer.shape(v.name), feed, source)

    def full_input(v: ir.Value) -> TensorIO:
        if v.name not in model_inputs:
            raise ValueError(f"full graph input {v.name!r} is not a model input")
        return tensor(v, Feed.MODEL, v.name)

    def cache_input(v: ir.Value) -> TensorIO:
        name = v.name
        if name in model_inputs:
            return tensor(v, Feed.MODEL, name)
        if name in cache_names:
            return tensor(v, Feed.CACHE, name)
        if name in earlier_feed:
            return tensor(v, earlier_feed[name], like[name])
        fixed = {STEP: Feed.STEP, FULL_PREV: Feed.FULL_PREV, FULL_PREV2: Feed.FULL_PREV2}
        if name in fixed:
            return tensor(v, fixed[name])
        if name in TABLES:
            return tensor(v, Feed.TABLE, name)
        raise ValueError(f"cache graph input {name!r}: not a model input, cache, step or correction table")

    def graph_output(v: ir.Value, graph: str) -> TensorIO:
        if v.name == output:
            return tensor(v, Feed.OUTPUT)
        if graph == "full" and v.name in cache_names:
            return tensor(v, Feed.CACHE, v.name)
        if graph == "cache" and v.name == uncorrected_name(output):
            return tensor(v, Feed.UNCORRECTED)
        raise ValueError(f"{graph} graph output {v.name!r}: neither the model output nor a tensor the passes add")

    full_io = GraphIO(tuple(full_input(v) for v in _inputs(full)),
                      tuple(graph_output(v, "full") for v in full.graph.outputs))
    cache_io = GraphIO(tuple(cache_input(v) for v in _inputs(cache)),
                       tuple(graph_output(v, "cache") for v in cache.graph.outputs))
    return full_io, cache_io


def _inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs the caller feeds (an old-IR initializer listed as an input has its value)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _dims(value: ir.Value) -> Dims | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)


class _DimNamer:
    """Names every dim of every tensor by the rules of the module docstring."""

    def __init__(self, shapes: dict[str, Dims | None], like: dict[str, str], batched: set[str]):
        self.shapes, self.like = shapes, like
        batch_like = batched | {k for k, v in like.items() if v in batched}
        self.batch_symbols = {s[0] for n in batch_like if (s := shapes.get(n)) and isinstance(s[0], str)}
        self.batched = batch_like

    def shape(self, name: str) -> tuple[int | str, ...]:
        ref = self.like.get(name)
        dims = self.shapes.get(name)
        ref_dims = self.shape(ref) if self.shapes.get(ref) is not None else None
        if dims is None:
            if ref_dims is None:
                raise ValueError(f"{name!r} has no shape annotation")
            return ref_dims
        out = []
        for axis, d in enumerate(dims):
            if ref_dims is not None and len(ref_dims) == len(dims) and (d is None or d == self.shapes[ref][axis]):
                out.append(ref_dims[axis])
            elif isinstance(d, int):
                out.append(d)
            elif axis == 0 and (name in self.batched or d in self.batch_symbols):
                out.append(BATCH)
            else:
                out.append(d if d is not None else f"{name}_dim{axis}")
        return tuple(out)
