"""What the user's model needs before TensorRT's ONNX parser takes it, fixed when it is loaded.

Exports of some diffusers models hold constructs ONNX Runtime runs but TensorRT refuses (its
operator table; `graph/tensorrt_check.py` names them). Where a rewrite keeps the model's function,
it is made here, one pass each, before the split, so both graphs, calibration and the engines see
the same model:

- DOUBLE tensors inside the graph (Flux's RoPE tables under the dynamo exporter): made FLOAT
  (`passes/demote_double.py`; float32 rounding of those values, as torch runs them without float64);
- ops given a type TensorRT's parser does not take, where a cast round trip is exact (Mochi's BOOL
  Pad and integer NonZero): `passes/cast_unsupported_types.py`.

Each fix is one warning line and is kept in `model.meta` (`fixes_of`). A model with DOUBLE graph
inputs or outputs keeps them (its interface); the readiness check then reports it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from omnicache_export.passes.cast_unsupported_types import RULES, CastUnsupportedTypesPass
from omnicache_export.passes.demote_double import DemoteDoublePass
from omnicache_export.passes.static_shapes import infer_elem_types

logger = logging.getLogger(__name__)
META_KEY = "omnicache_export.tensorrt_fixes"


def fixes_of(model: ir.Model) -> list[str]:
    """What `fix_for_tensorrt` changed in `model` (one line per fix; empty for an untouched model)."""
    return list(model.meta.get(META_KEY, []))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def fix_for_tensorrt(model: ir.Model, path: Path) -> list[str]:
    """Apply the fixes `model` needs (in place); returns and logs what was fixed."""
    if not _needs_types(model):
        return []
    types = infer_elem_types(model)
    notes = []
    demote = DemoteDoublePass(types)
    try:
        demote(model)
    except ir.passes.PreconditionError as exc:
        logger.info("%s: DOUBLE tensors kept: %s", path.name, exc)
    if demote.demoted:
        notes.append(f"DOUBLE tensors computed in FLOAT (TensorRT has no DOUBLE): {len(demote.demoted)} nodes and "
                     f"initializers, {_shown([repr(n) for n in demote.demoted])}")
    retype = CastUnsupportedTypesPass(types)
    retype(model)
    if retype.cast:
        notes.append(f"ops computed in a type TensorRT's parser takes (exact): {_shown(retype.cast)}")
    for note in notes:
        logger.warning("%s: changed for TensorRT: %s", path.name, note)
    if notes:
        model.meta[META_KEY] = notes
    return notes


def _needs_types(model: ir.Model) -> bool:
    """Cheap pre-check (no inference): a DOUBLE anywhere, or an op a cast rule is about."""
    double = int(ir.DataType.DOUBLE)
    for graph in (model.graph, *model.graph.subgraphs()):
        if any(v.const_value is not None and v.const_value.dtype == ir.DataType.DOUBLE
               for v in graph.initializers.values()):
            return True
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in RULES:
            return True
        if any(a.type == ir.AttributeType.INT and a.value == double for k, a in node.attributes.items()
               if k in ("to", "dtype")):
            return True
        if any(v.dtype == ir.DataType.DOUBLE for v in node.outputs):
            return True
    return False
