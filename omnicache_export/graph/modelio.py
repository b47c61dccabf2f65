"""Loading and saving ONNX models through onnx_ir, safely.

Loading is lazy (external weights are memory-mapped, never read whole), and refuses external
data that points outside the model's folder. Output folders are written atomically by
`omnicache_export.outputs.atomic_output_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from omnicache_export.errors import UserError

# Protobuf cannot hold more than 2 GiB: past this, weights must go to a side file.
_INLINE_LIMIT_BYTES = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model lazily, with one clear error for anything that is not a usable model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types on garbage input
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not len(model.graph) or not model.graph.outputs:
        raise UserError(f"{path}: the ONNX graph is empty")
    check_external_data(model, path.parent)
    return model


def load_user_model(path: str | os.PathLike) -> ir.Model:
    """The user's model, as `load_model` loads it, with the known exporter traps ONNX Runtime refuses
    to load repaired (a warning line says what; `graph.repair.repairs_of` lists it), and what TensorRT
    refuses but a rewrite keeps fixed (`graph.tensorrt_fixes`); a model ONNX Runtime still refuses is
    a UserError naming the node and the fix."""
    from omnicache_export.graph.repair import repair_traps
    from omnicache_export.graph.tensorrt_fixes import fix_for_tensorrt

    model = load_model(path)
    repair_traps(model, Path(path))
    fix_for_tensorrt(model, Path(path))  # what TensorRT refuses but a rewrite keeps (a warning line each)
    return model


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph in it (If branches, Loop and Scan bodies), nested ones too."""
    yield graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor stored outside the file: initializers of the graph and of its subgraphs, and
    tensor attributes (Constant values) anywhere."""
    for graph in _graphs(model.graph):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external data outside the model's folder (a model file must not read arbitrary paths)."""
    root = base_dir.resolve()
    for tensor in external_tensors(model):
        location = Path(tensor.location)
        target = (root / location).resolve()
        if location.is_absolute() or (root not in target.parents and target != root):
            raise UserError(
                f"external data location {str(tensor.location)!r} of tensor {tensor.name!r} points outside "
                f"the model's folder {root}"
            )
        if not target.is_file():
            raise UserError(f"external data file {str(tensor.location)!r} of tensor {tensor.name!r} is missing")
        if target.stat().st_size < tensor.offset + tensor.length:
            raise UserError(f"external data file {str(tensor.location)!r} is truncated (tensor {tensor.name!r})")


def uses_external_data(model: ir.Model) -> bool:
    return next(external_tensors(model), None) is not None


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def save_model(model: ir.Model, path: Path, external: bool | None = None) -> None:
    """Save `model`; weights go to `<name>.data` beside it when asked, or when they must (≥ 1 GiB)."""
    if external is None:
        external = weight_bytes(model) >= _INLINE_LIMIT_BYTES
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
