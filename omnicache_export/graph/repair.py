"""Known exporter traps, repaired when the user's model is loaded.

Stock exports of some diffusers models do not load in ONNX Runtime: its load-time type and shape
check refuses a node the exporter wrote for a torch call that was a no-op at trace time. Each
trap has one repair pass (`passes/`), which rewrites exactly the nodes it is about:

- TorchScript: `If(dim(x, i) == 1, Squeeze(x, [i]), Identity(x))` on a dim that is static and not 1
  (`x.squeeze(i)` of diffusers' PixArt head): `FoldSqueezeIfPass` inlines the branch taken.
- dynamo: `Squeeze(x, [i])` of such a dim: `DropNoopSqueezePass` makes it the no-op torch ran.

A model ONNX Runtime loads is left as it is: the check is ONNX Runtime itself, loading a weightless
copy of the graph (the weights as typed inputs: its load-time check sees the same types and shapes,
and reads no weights; tens of milliseconds on the zoo). What was repaired is logged as a warning,
one line per trap, and kept in `model.meta` (`repairs_of`). A model ONNX Runtime still refuses after
the repairs is refused (UserError, exit 2) naming the node and how to fold it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import onnx
import onnx_ir as ir

from omnicache_export.errors import UserError
from omnicache_export.passes.drop_noop_squeeze import DropNoopSqueezePass
from omnicache_export.passes.fold_squeeze_if import FoldSqueezeIfPass
from omnicache_export.passes.static_shapes import _weightless_proto, symbolic_static_dims

logger = logging.getLogger(__name__)
META_KEY = "omnicache_export.repairs"
_NODE = re.compile(r"Node \(([^)]*)\) Op \(([^)]*)\)")


def repairs_of(model: ir.Model) -> list[str]:
    """What `repair_traps` repaired in `model` (one line per trap; empty for an untouched model)."""
    return list(model.meta.get(META_KEY, []))


def ort_load_error(proto: onnx.ModelProto) -> str | None:
    """ONNX Runtime's reason for refusing to load the (weightless) graph, or None when it loads it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's Fail, InvalidGraph, ... all say why in their message
        return str(exc)
    return None


def describe_refusal(message: str) -> str:
    """ONNX Runtime's load error as `node 'X' (Op)[, in node 'Y' (Op)]: reason`."""
    text = message.strip().splitlines()[0] if message.strip() else "unknown error"
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    nodes = _NODE.findall(text)
    if not nodes:
        return text.rstrip(". ")
    where = " in ".join(f"node {name!r} ({op})" for name, op in reversed(nodes))
    reason = _NODE.split(text)[-1].strip()
    reason = re.sub(r"^(\[\w+\] )+", "", reason).rstrip(". ")
    return f"{where}: {reason}"


def repair_traps(model: ir.Model, path: Path) -> list[str]:
    """Repair the known exporter traps of `model` (in place) where ONNX Runtime refuses it; returns
    (and logs) what was repaired. Raises UserError for a model it still refuses."""
    error = ort_load_error(_weightless_proto(model))
    if error is None:
        return []
    dims = symbolic_static_dims(model)
    notes = []
    fold, drop = FoldSqueezeIfPass(dims), DropNoopSqueezePass(dims)
    fold(model)
    if fold.folded:
        notes.append("TorchScript's If(dim == 1, Squeeze, Identity) on a static dim, folded: " + "; ".join(fold.folded))
    drop(model)
    if drop.dropped:
        notes.append("the dynamo exporter's Squeeze of a dim that is not 1, made the no-op torch ran: "
                     + "; ".join(drop.dropped))
    if notes:
        error = ort_load_error(_weightless_proto(model))
    if error is not None:
        raise UserError(
            f"{path}: ONNX Runtime cannot load this model: {describe_refusal(error)}"
            + ("" if not notes else f" (after repairing {len(notes)} known exporter trap(s))")
            + f"; no known exporter trap repair applies: fold the node away (e.g. `polygraphy surgeon sanitize "
            f"{path.name} --fold-constants -o {path.stem}.folded.onnx`) or re-export the model (e.g. with the other "
            "torch exporter)"
        )
    for note in notes:
        logger.warning("%s: repaired an exporter trap ONNX Runtime refuses to load: %s", path.name, note)
    model.meta[META_KEY] = notes
    return notes
