"""Static shape inference: every value's concrete shape for one choice of the dynamic input dims.

Exports keep the batch (and sometimes more) symbolic, and each exporter names symbolic dims its own
way, so symbolic shapes cannot be compared across the graph. Binding the dynamic input dims to
numbers and running ONNX shape inference with data propagation resolves nearly every shape.
Large initializers are turned into typed graph inputs first, so this never copies the weights.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
_KEEP_INITIALIZER_ELEMENTS = 4096  # small constants (shape tensors) stay: data propagation needs them


def _weightless_proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    keep = []
    for init in proto.graph.initializer:
        numel = 1
        for d in init.dims:
            numel *= d
        if numel <= _KEEP_INITIALIZER_ELEMENTS and init.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(init)
            continue
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    # The exporter's symbolic annotations would be merged into (and mask) the concrete result.
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        if out.type.HasField("tensor_type"):  # an untyped output stays untyped (not element type 0)
            out.type.tensor_type.ClearField("shape")
    return proto


def bind_input_dims(model: ir.Model, dims: dict[str, list[int | None]] | None, batch: int) -> dict[str, Shape]:
    """Concrete input shapes: explicit `dims` per input, else the batch for a dynamic axis 0."""
    bound: dict[str, Shape] = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        given = (dims or {}).get(value.name)
        shape = []
        for axis, dim in enumerate(value.shape.dims if value.shape is not None else []):
            if given is not None and axis < len(given) and given[axis] is not None:
                shape.append(int(given[axis]))
            elif isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(batch)
            else:
                shape.append(-1)
        bound[value.name] = tuple(shape)
    return bound


def _collect(proto: onnx.ModelProto) -> dict[str, Shape]:
    result: dict[str, Shape] = {}
    for info in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            result[info.name] = tuple(d.dim_value for d in dims)
    return result


def infer_static_shapes(model: ir.Model, input_shapes: dict[str, Shape]) -> dict[str, Shape]:
    """Value name -> concrete shape, for the values whose shape inference could resolve fully.

    ONNX Runtime's symbolic shape inference resolves computed Slice bounds and shape arithmetic that
    ONNX's own data propagation gives up on; ONNX's runs too and fills what the other missed.
    """
    proto = _weightless_proto(model)
    for inp in proto.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None or any(d < 0 for d in shape):
            continue
        tensor_shape = inp.type.tensor_type.shape
        del tensor_shape.dim[:]
        for d in shape:
            tensor_shape.dim.add().dim_value = d
    result: dict[str, Shape] = {}
    try:
        result.update(_collect(onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)))
    except Exception as exc:  # best effort: callers fall back to symbolic shapes
        logger.info("ONNX shape inference failed: %s", exc)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # Where it resolves only part of the graph it saves the model into the working folder
        # (sym_shape_infer_temp.onnx + data) before raising: run it in a throwaway one.
        with tempfile.TemporaryDirectory(prefix="omnicache-shapes-") as scratch, contextlib.chdir(scratch):
            result.update(_collect(SymbolicShapeInference.infer_shapes(proto, auto_merge=True)))
    except Exception as exc:
        logger.info("ONNX Runtime symbolic shape inference failed: %r", exc)
    return result


def infer_elem_types(model: ir.Model) -> dict[str, ir.DataType]:
    """Value name -> element type by ONNX type inference, for the values the export left untyped
    (TorchScript writes no value_info: a half-precision model's block stack is FLOAT16 inside)."""
    proto = _weightless_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:  # best effort, like the shapes
        logger.info("ONNX type inference failed: %s", exc)
        return {}
    types: dict[str, ir.DataType] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = ir.DataType(info.type.tensor_type.elem_type)
    return types


def symbolic_static_dims(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Value name -> its dims as ONNX shape inference sees them for every input (the input dims left
    as exported, symbolic): an int where the dim is the same whatever the inputs, None where not.
    What ONNX Runtime's load-time type check sees, so what its shape errors are about."""
    dims: dict[str, tuple[int | None, ...]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is not None:  # the exporter's annotations, subgraphs included
                dims[value.name] = tuple(d if isinstance(d, int) else None for d in value.shape.dims)
    proto = _weightless_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:
        logger.info("ONNX shape inference failed: %s", exc)
        inferred = proto
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            inferred_dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
            known = dims.get(info.name)
            if known is None or len(known) != len(inferred_dims):
                dims[info.name] = inferred_dims
            else:  # merge: a dim either side pins down
                dims[info.name] = tuple(a if a is not None else b for a, b in zip(known, inferred_dims))
    return dims
