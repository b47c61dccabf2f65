"""Deployment settings derived from the manifest alone: TensorRT optimization profiles and Triton
model configs for the two graphs.

A graph's batch is the model batch: under classifier-free guidance cond and uncond rows run
together, so it is twice the sample batch; an export with a static batch keeps it. Symbolic dims
other than the batch are resolved from what the manifest states: the latent's and the output's
per-sample shapes (`sampling`), and the cache tensors' shapes (`model_io.cache_tensors`, whose
"batch*k" dims are k rows per sample); anything else comes from the caller (`dims`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from omnicache_export.runtime.graph_io import Feed, TensorIO
from omnicache_export.runtime.manifest import GRAPHS, Manifest

BATCH = "batch"
Shape = tuple[int, ...]

TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16", "INT8": "TYPE_INT8",
                "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}


class TritonPlatform(str, enum.Enum):
    ONNXRUNTIME = "onnxruntime_onnx"
    TENSORRT = "tensorrt_plan"
    PYTHON = "python"  # a Python-backend model (`backend: "python"`): the graph run by code in Triton's stub


@dataclasses.dataclass(frozen=True)
class _Dim:
    """A resolved dim: `rows` × the model batch (rows > 0), or the fixed `size`."""

    rows: int = 0
    size: int = 0

    def at(self, batch: int) -> int:
        return self.rows * batch if self.rows else self.size


def _output_shape(manifest: Manifest) -> Shape:
    """One sample of the model output: the latent's, channels doubled for learned-sigma models."""
    s = manifest.sampling
    shape = list(s.latent_shape)
    if s.learned_sigma:
        shape[0] *= 2
    return tuple(shape)


def _symbol_table(manifest: Manifest) -> dict[str, _Dim]:
    """What each symbolic dim of the graphs stands for, as far as the manifest says."""
    known = {BATCH: _Dim(rows=1)}
    per_sample = {manifest.sampling.latent: tuple(manifest.sampling.latent_shape)}
    caches = {c.name: c.shape for c in manifest.model_io.cache_tensors}
    like_output = (Feed.OUTPUT, Feed.FULL_PREV, Feed.FULL_PREV2, Feed.UNCORRECTED)
    for graph in manifest.graphs.values():
        for t in (*graph.inputs, *graph.outputs):
            if t.feed in like_output or (t.feed is Feed.MODEL and t.source in per_sample):
                stated = (BATCH, *(_output_shape(manifest) if t.feed in like_output else per_sample[t.source]))
            elif t.feed in (Feed.CACHE, Feed.CACHE_PREV, Feed.CACHE_PREV2) and (t.source or t.name) in caches:
                stated = caches[t.source or t.name]
            else:
                continue
            if len(stated) != len(t.shape):
                continue
            for dim, value in zip(t.shape, stated):
                if isinstance(dim, str) and dim not in known:
                    if isinstance(value, int):
                        known[dim] = _Dim(size=value)
                    elif m := re.fullmatch(r"batch(?:\*(\d+))?", value):
                        known[dim] = _Dim(rows=int(m[1] or 1))
    return known


def _resolve(t: TensorIO, known: Mapping[str, _Dim], dims: Mapping[str, int]) -> list[_Dim | None]:
    """Each dim of `t` resolved (None: the manifest does not say)."""
    out: list[_Dim | None] = []
    for d in t.shape:
        if isinstance(d, int):
            out.append(_Dim(size=d))
        elif d in dims:
            out.append(_Dim(size=int(dims[d])))
        else:
            out.append(known.get(d))
    return out


def _model_batches(manifest: Manifest, min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    s = manifest.sampling
    if s.static_batch is not None:
        return (s.static_batch,) * 3
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"sample batches min {min_batch}, opt {opt_batch}, max {max_batch}: need 1 <= min <= opt <= max")
    factor = 2 if s.cfg else 1
    return factor * min_batch, factor * opt_batch, factor * max_batch


def tensorrt_profiles(manifest: Manifest, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 8,
                      dims: Mapping[str, int] | None = None) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """Per graph ("full", "cache"), per input: the (min, opt, max) shapes of a TensorRT optimization
    profile for sample batches min_batch..max_batch (model batches twice that under guidance; a
    static batch stays). `dims`: sizes of symbolic dims the manifest cannot resolve (a text
    length ...); raises ValueError naming any still unresolved."""
    batches = _model_batches(manifest, min_batch, opt_batch, max_batch)
    known, dims = _symbol_table(manifest), dict(dims or {})
    profiles: dict[str, dict[str, tuple[Shape, Shape, Shape]]] = {}
    for graph in GRAPHS:
        profiles[graph] = {}
        for t in manifest.graphs[graph].inputs:
            resolved = _resolve(t, known, dims)
            for axis, (d, r) in enumerate(zip(t.shape, resolved)):
                if r is None:
                    raise ValueError(f"{graph} graph input {t.name!r} axis {axis} is the symbolic dim {d!r}: "
                                     f"give its size with dims={{{d!r}: ...}}")
            profiles[graph][t.name] = tuple(tuple(r.at(b) for r in resolved) for b in batches)
    return profiles


def triton_model_config(manifest: Manifest, graph: str, platform: str | TritonPlatform, max_batch_size: int,
                        name: str | None = None) -> str:
    """`config.pbtxt` of one graph for Triton. With max_batch_size > 0, Triton batches axis 0 (the
    model batch: twice the samples under guidance) and `dims` leave it out; every tensor then needs
    it (the cache graph's step index has it: one step per row), so a graph with unbatched inputs
    (Flux's `img_ids`) takes max_batch_size=0.
    Dims the manifest cannot resolve are -1 (variable)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph {graph!r}: not one of {', '.join(GRAPHS)}")
    platform = TritonPlatform(platform)
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size {max_batch_size}: must be >= 0")
    io = manifest.graphs[graph]
    tensors = [*io.inputs, *io.outputs]
    batching = max_batch_size > 0
    if batching:
        if manifest.sampling.static_batch is not None:
            raise ValueError(f"the export's batch is fixed to {manifest.sampling.static_batch}: use max_batch_size=0")
        unbatched = [t.name for t in tensors if not t.shape or t.shape[0] != BATCH]
        if unbatched:
            raise ValueError(f"{graph} graph tensors without a batch axis ({', '.join(unbatched)}): use max_batch_size=0")
    known = _symbol_table(manifest)
    static = manifest.sampling.static_batch

    def entry(t: TensorIO) -> str:
        if t.dtype not in TRITON_TYPES:
            raise ValueError(f"{t.name!r}: no Triton type for {t.dtype}")
        resolved = _resolve(t, known, {})[1 if batching else 0:]
        dims = [(-1 if r is None or (r.rows and static is None) else r.at(static or 0)) for r in resolved]
        text = f"    name: {_quote(t.name)}\n    data_type: {TRITON_TYPES[t.dtype]}\n"
        if dims:
            return text + f"    dims: [ {', '.join(map(str, dims))} ]"
        return text + "    dims: [ 1 ]\n    reshape: { shape: [ ] }"  # Triton's spelling of a scalar

    def block(kind: str, items: tuple[TensorIO, ...]) -> str:
        return f"{kind} [\n" + ",\n".join(f"  {{\n{entry(t)}\n  }}" for t in items) + "\n]\n"

    lines = [f"# omnicache-export {graph} graph; the batch axis is the model batch (2x samples under guidance)\n",
             f"name: {_quote(name or f'omnicache_{graph}')}\n",
             f"backend: {_quote(platform.value)}\n" if platform is TritonPlatform.PYTHON
             else f"platform: {_quote(platform.value)}\n",
             f"max_batch_size: {max_batch_size}\n", block("input", io.inputs), block("output", io.outputs)]
    if batching:
        lines.append("dynamic_batching { }\n")
    return "".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
