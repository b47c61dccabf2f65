"""Pass: float32 → float16 or bfloat16 mixed precision, the precision carried by the graph itself
(TensorRT 10+ strongly typed networks take it from the graph's types and Casts, never from a flag).

Every node computes either in the target type ("converted") or in float32 ("kept":
`precision_policy.fp32_nodes`, the timestep path, normalizations, softmax), or exactly as before
("untouched": ops without an ONNX schema, ops whose output type comes from an attribute other than
Cast's `to`, ops whose schema has no target-type kernel such as Sin in bfloat16, and If/Loop/Scan with
their subgraphs, which read what they capture in its original type). Each float slot of
a node takes its class's type where the schema's type variable allows it; slots of fixed type
(Resize's scales, Shape's output) keep theirs. Initializers and Constants are rounded once into the
type their consumers compute in (a copy per type where consumers differ). Where a value's type and
its consumer's differ, one Cast per (value, type) is inserted. DOUBLE becomes float32 (kept) or the
target. The graph's inputs and outputs keep their types (`IOPrecision.MODEL`) unless told otherwise;
an output whose type changes inside is Cast back under its own name.

Invariant: the graph computes the same function, every float tensor rounded to the target type
where it is converted (kept nodes exactly as a float32 graph would, given their rounded inputs); no
DOUBLE is left; the IO names, shapes and (with MODEL) types are unchanged; the model passes
`onnx.checker` with full type checks.
"""

from __future__ import annotations

import enum

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.op_signature import FLOATS, Signature, node_signature
from omnicache_export.passes.precision_policy import ALL_KEEPS, KeepFp32, fp32_nodes
from omnicache_export.passes.static_shapes import infer_elem_types


class Precision(str, enum.Enum):
    """What `--precision` converts to (FP32: no conversion, the model as it is)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class IOPrecision(str, enum.Enum):
    MODEL = "model"  # the inputs and outputs keep the types the model has
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


DTYPES = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_ATTRIBUTE_TYPED = {"Cast", "Constant", "ConstantOfShape"}  # output type from an attribute we rewrite


class _Class(enum.Enum):
    CONVERTED = "converted"
    KEPT = "kept"
    UNTOUCHED = "untouched"


def _np_dtype(dtype: ir.DataType):
    return dtype.numpy()  # ml_dtypes.bfloat16 for BFLOAT16


def _round(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.FLOAT16:  # saturate: an fp32 constant past 65504 must not become inf
        array = np.clip(array, -65504, 65504)
    return np.asarray(array).astype(_np_dtype(dtype))


class ConvertPrecisionPass(ir.passes.InPlacePass):
    def __init__(self, precision: Precision | str, io: IOPrecision | str = IOPrecision.MODEL,
                 timestep: str | None = None, keep: frozenset[KeepFp32] = ALL_KEEPS):
        super().__init__()
        self.precision = Precision(precision)
        self.io = IOPrecision(io)
        self.timestep = timestep
        self.keep = frozenset(keep)
        self.kept: dict[str, KeepFp32] = {}  # after the call: kept node name -> why

    @property
    def target(self) -> ir.DataType:
        return DTYPES[self.precision.value]

    def requires(self, model: ir.Model) -> None:
        if self.precision == Precision.FP32:
            raise ir.passes.PreconditionError("fp32 is no conversion: do not run the pass")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fill_types(model)
        kept = fp32_nodes(graph, self.timestep, self.keep)
        self.kept = {n.name: r for n, r in kept.items()}
        opsets = dict(model.opset_imports)
        classes: dict[ir.Node, tuple[_Class, Signature | None]] = {}
        for node in graph:
            if node.op_type == "Constant":
                continue  # free values, like initializers: typed by their consumers
            sig = None if _subgraphs(node) else node_signature(node, opsets)  # If, Loop, Scan: as they are
            want = ir.DataType.FLOAT if node in kept else self.target
            cls = _Class.KEPT if node in kept else _Class.CONVERTED
            if sig is None or not _convertible(node, sig, want):
                cls = _Class.UNTOUCHED
            classes[node] = (cls, sig)
        old = {v: v.dtype for v in _all_values(graph)}
        # 1. node outputs take their class's type
        for node, (cls, sig) in classes.items():
            if cls == _Class.UNTOUCHED:
                continue
            want = ir.DataType.FLOAT if cls == _Class.KEPT else self.target
            for i, out in enumerate(node.outputs):
                if old[out] in FLOATS and sig.output_var(i):
                    out.dtype = want
            if node.op_type == "Cast" and node.outputs[0].dtype in FLOATS:
                node.attributes["to"] = ir.AttrInt64("to", int(node.outputs[0].dtype))
            elif node.op_type == "ConstantOfShape" and node.outputs[0].dtype in FLOATS:
                value = node.attributes.get("value")
                base = value.value.numpy() if value is not None else np.zeros(1, np.float32)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_round(base, want)))
        # 2. graph inputs as the IO option says
        io_type = None if self.io == IOPrecision.MODEL else DTYPES[self.io.value]
        for value in graph.inputs:
            if io_type is not None and value.dtype in FLOATS:
                value.dtype = io_type
        # 3. what each consumer slot expects
        expect: dict[ir.Value, list[tuple[ir.Node, int, ir.DataType]]] = {}
        for node, outer in _consumers(graph):
            cls, sig = classes.get(node, (_Class.UNTOUCHED, None)) if outer is None else (_Class.UNTOUCHED, None)
            want = ir.DataType.FLOAT if cls == _Class.KEPT else self.target
            for i, value in enumerate(node.inputs):
                if outer is not None and value not in old:
                    continue  # the subgraph's own value
                if value is None or old.get(value) not in FLOATS:
                    continue
                if cls != _Class.UNTOUCHED and sig.input_var(i):
                    dtype = want
                else:  # a fixed-type slot, or a node left as it was: its own type (no DOUBLE left behind)
                    dtype = old[value] if old[value] != ir.DataType.DOUBLE else ir.DataType.FLOAT
                expect.setdefault(value, []).append((node, i, dtype))
        # 4. free values (initializers, Constants) rounded into what their consumers compute in
        outputs, inputs = set(graph.outputs), set(graph.inputs)
        for value in [*graph.initializers.values(), *(n.outputs[0] for n in graph if n.op_type == "Constant")]:
            if value in inputs or old.get(value) not in FLOATS or value in outputs:
                continue
            _retype_constant(graph, value, expect.get(value, []))
        # 5. a Cast per (value, type) wherever a value's type and its consumer's differ
        for value, uses in expect.items():
            casts: dict[ir.DataType, ir.Value] = {}
            for node, i, dtype in uses:
                if node.inputs[i] is not value or value.dtype == dtype:  # a constant's typed copy took it
                    continue
                if dtype not in casts:
                    casts[dtype] = _insert_cast(graph, value, dtype)
                node.replace_input_with(i, casts[dtype])
        # 6. graph outputs keep their type (or take the IO option's), under their own name
        for k, value in enumerate(list(graph.outputs)):
            want = old[value] if io_type is None or old[value] not in FLOATS else io_type
            if want == ir.DataType.DOUBLE:
                want = ir.DataType.FLOAT if io_type is None else io_type
            if value.dtype in FLOATS and value.dtype != want:
                graph.outputs[k] = _cast_output(graph, value, want)
        _drop_identity_casts(graph)
        left = {n.name for n in graph}
        self.kept = {name: why for name, why in self.kept.items() if name in left}
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        for value in _all_values(model.graph):
            if value.dtype == ir.DataType.DOUBLE:
                raise ir.passes.PostconditionError(f"tensor {value.name!r} is still DOUBLE")


def fill_types(model: ir.Model) -> None:
    """Element types for the values the exporter left untyped (TorchScript writes no value_info)."""
    graph = model.graph
    if all(v.dtype is not None for n in graph for v in n.outputs):
        return
    types = infer_elem_types(model)
    for node in graph:
        for out in node.outputs:
            if out.dtype is None and out.name in types:
                out.dtype = types[out.name]
    untyped = [v.name for n in graph for v in n.outputs if v.dtype is None and v.uses()]
    if untyped:
        raise ir.passes.PreconditionError(f"ONNX type inference leaves {untyped[0]!r} untyped")


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


def _consumers(graph: ir.Graph):
    """(node, None) for the graph's nodes, then (node, owner) for every node inside a subgraph of an
    owner (the values it captures from the graph keep their type there: a Cast in the graph feeds it)."""
    for node in graph:
        yield node, None
    for owner in graph:
        for sub in _subgraphs(owner):
            for node in ir.traversal.RecursiveGraphIterator(sub):
                yield node, owner


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _convertible(node: ir.Node, sig: Signature, want: ir.DataType) -> bool:
    """Every type variable that binds a float of this node allows `want`, and no attribute other than
    the ones we rewrite fixes a type (dtype of RandomNormal, EyeLike ...)."""
    if node.op_type not in _ATTRIBUTE_TYPED and ("dtype" in node.attributes or any(
            a.type == ir.AttributeType.TENSOR for a in node.attributes.values())):
        return False
    bound = [(sig.input_var(i), v) for i, v in enumerate(node.inputs) if v is not None]
    bound += [(sig.output_var(i), v) for i, v in enumerate(node.outputs)]
    float_vars = {var for var, v in bound if var and v.dtype in FLOATS}
    return all(sig.allows(var, want) for var in float_vars)


def _retype_constant(graph: ir.Graph, value: ir.Value, uses: list[tuple[ir.Node, int, ir.DataType]]) -> None:
    wanted = list(dict.fromkeys(dtype for _, _, dtype in uses)) or [ir.DataType.FLOAT]
    producer = value.producer()
    if producer is not None:  # a Constant node: one type for it; other consumers get a Cast
        array = _constant_array(producer)
        dtype = wanted[0]
        producer.attributes.clear()
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(_round(array, dtype), name=value.name))
        value.dtype = dtype
        return
    array = value.const_value.numpy()
    value.const_value = ir.tensor(_round(array, wanted[0]), name=value.name)
    value.dtype = wanted[0]
    for dtype in wanted[1:]:  # consumers in another type share one copy per type
        copy = ir.Value(name=f"{value.name}__{dtype.name.lower()}", shape=value.shape, type=ir.TensorType(dtype),
                        const_value=ir.tensor(_round(array, dtype), name=f"{value.name}__{dtype.name.lower()}"))
        graph.register_initializer(copy)
        for node, i, d in uses:
            if d == dtype:
                node.replace_input_with(i, copy)


def _constant_array(node: ir.Node) -> np.ndarray:
    attr = next(iter(node.attributes.values()))
    if attr.type == ir.AttributeType.TENSOR:
        return attr.value.numpy()
    return np.asarray(attr.value, np.float32)  # value_float / value_floats


def _insert_cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    out = ir.Value(name=f"{value.name}__to_{dtype.name.lower()}", shape=value.shape, type=ir.TensorType(dtype))
    cast = ir.node("Cast", [value], {"to": int(dtype)}, outputs=[out], name=f"omnicache/precision/{out.name}")
    producer = value.producer()
    if producer is None or producer.graph is not graph:
        graph.insert_before(graph.node(0), cast) if len(graph) else graph.append(cast)
    else:
        graph.insert_after(producer, cast)
    return out


def _cast_output(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    name = value.name
    value.name = f"{name}__{value.dtype.name.lower()}"
    out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(dtype))
    graph.append(ir.node("Cast", [value], {"to": int(dtype)}, outputs=[out], name=f"omnicache/precision/{name}"))
    return out


def _drop_identity_casts(graph: ir.Graph) -> None:
    """Casts to the type their input already has (a model's own Casts the conversion made moot)."""
    outputs = set(graph.outputs)
    for node in list(graph):
        if node.op_type != "Cast" or node.outputs[0] in outputs:
            continue
        src = node.inputs[0]
        if src is not None and src.dtype is not None and src.dtype == node.outputs[0].dtype:
            ir.convenience.replace_all_uses_with(node.outputs[0], src)
            graph.remove(node, safe=True)
