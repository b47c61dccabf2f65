"""TensorRT readiness: every node of a graph (subgraphs and local functions included) against the
ONNX parser's operator matrix and restrictions of each supported TensorRT line (`tensorrt_ops`).

This is a static check of the graph, run where TensorRT cannot be: it finds what the parser is
documented to refuse (an op it lacks, a type the op does not take, an attribute or input form it
restricts, DOUBLE, a tensor of 2^31 elements or more, an opset past the line's), before a build
fails on the device. It does not prove a build succeeds: kernels, memory and tactics are the
device's. Each finding names the node, its op, the rule, the TensorRT line and the table version.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import onnx_ir as ir

from omnicache_export.graph.tensorrt_ops import LINES

DEFAULT_LINES = tuple(LINES)  # "10.3", "10.16", "11"
MAX_ELEMENTS = 2**31  # a TensorRT tensor holds fewer elements than this
MODEL_NODE = "(model)"  # the "node" of a model-wide finding (opset)

# The table's type names for ONNX element types (quantized types are the table's too).
TABLE_TYPES = {
    ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64", ir.DataType.INT8: "INT8", ir.DataType.UINT8: "UINT8",
    ir.DataType.BOOL: "BOOL", ir.DataType.INT4: "INT4", ir.DataType.FLOAT8E4M3FN: "FP8",
    ir.DataType.FLOAT4E2M1: "FP4",
}
REDUCE_OPS = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})
_PASS_THROUGH = frozenset({"Identity", "Cast"})  # a constant through these is still a constant


class Rule(str, enum.Enum):
    UNSUPPORTED_OP = "unsupported op"
    PLUGIN_ONLY = "only through a plugin"
    CUSTOM_DOMAIN = "op of a custom domain"
    TYPE = "type not supported by the op"
    REDUCE_AXES = "Reduce* axes must be an initializer"
    SQUEEZE_AXES = "Squeeze/Unsqueeze axes must be constant"
    LAYERNORM_OUTPUTS = "LayerNormalization: only output Y"
    SCATTERND_REDUCTION = "ScatterND reduction must be none"
    DOUBLE = "no DOUBLE tensors"
    TOO_LARGE = "a tensor must hold fewer than 2^31 elements"
    OPSET = "opset out of the parser's range"


@dataclasses.dataclass(frozen=True)
class Finding:
    line: str  # the TensorRT line ("10.3", "10.16", "11")
    table_version: str
    node: str
    op: str
    rule: Rule
    detail: str

    def text(self) -> str:
        return (f"node {self.node!r} ({self.op}): {self.rule.value}: {self.detail} "
                f"[TensorRT {self.line}, table {self.table_version}]")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "rule": self.rule.name}


@dataclasses.dataclass(frozen=True)
class LineResult:
    line: str
    name: str
    table_version: str
    findings: tuple[Finding, ...]

    @property
    def ready(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        head = f"{self.name} (table {self.table_version}): "
        if self.ready:
            return head + "ready"
        more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        return head + f"NOT ready: {self.findings[0].text()}{more}"

    def to_json(self) -> dict:
        return {"line": self.line, "table_version": self.table_version, "ready": self.ready,
                "findings": [f.to_json() for f in self.findings]}


def parse_lines(text: str | None) -> tuple[str, ...]:
    """`--tensorrt 10.3,10.16,11` (11.x as `11`); None: every supported line."""
    if text is None:
        return DEFAULT_LINES
    lines = tuple(t.strip().removesuffix(".x") for t in text.split(",") if t.strip())
    unknown = [t for t in lines if t not in LINES]
    if unknown or not lines:
        from omnicache_export.errors import UserError

        raise UserError(f"--tensorrt {text!r}: supported TensorRT lines are {', '.join(LINES)}")
    return lines


def check_path(path: str | Path, lines: Iterable[str] = DEFAULT_LINES) -> list[LineResult]:
    """`check_model` of an ONNX file, with the types and batch-1 shapes ONNX inference finds where
    the exporter wrote none (TorchScript annotates only the graph's inputs and outputs)."""
    from omnicache_export.graph import modelio
    from omnicache_export.passes.static_shapes import bind_input_dims, infer_elem_types, infer_static_shapes

    model = modelio.load_model(Path(path))
    shapes = infer_static_shapes(model, bind_input_dims(model, None, 1))
    return check_model(model, lines, shapes, infer_elem_types(model))


def check_model(model: ir.Model, lines: Iterable[str] = DEFAULT_LINES,
                shapes: Mapping[str, tuple[int, ...]] | None = None,
                types: Mapping[str, ir.DataType] | None = None) -> list[LineResult]:
    """One result per TensorRT line. `shapes`: concrete shapes (value name -> dims) where the graph's
    own annotations are symbolic, e.g. static shape inference at batch 1, for the size rule;
    `types`: element types of values the graph leaves untyped (for the type rule)."""
    nodes = list(_all_nodes(model))
    types = types or {}
    sizes = _oversized(model, nodes, shapes or {})
    doubles = _doubles(model, nodes)
    results = []
    for line in lines:
        table = LINES[line]
        findings: list[Finding] = []
        add = lambda node, op, rule, detail: findings.append(  # noqa: E731
            Finding(line, table["table_version"], node, op, rule, detail))
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is not None and not table["min_opset"] <= opset <= table["max_opset"]:
            add(MODEL_NODE, "-", Rule.OPSET, f"opset {opset}; TensorRT {line} parses opsets "
                f"{table['min_opset']} to {table['max_opset']}")
        for node in nodes:
            for rule, detail in _node_findings(node, table["ops"], model, types):
                add(node.name or "<unnamed>", node.op_type, rule, detail)
        for node_name, op, detail in doubles:
            add(node_name, op, Rule.DOUBLE, detail)
        for node_name, op, detail in sizes:
            add(node_name, op, Rule.TOO_LARGE, detail)
        results.append(LineResult(line, table["name"], table["table_version"], tuple(findings)))
    return results


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node the parser imports: the graph's and its subgraphs', and the bodies of local
    functions in place of the calls to them (the parser inlines those)."""
    functions = {(f.domain, f.name, f.overload): f for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if (node.domain, node.op_type, node.overload) not in functions:
            yield node
    for function in functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer (of this graph or an enclosing one) or a Constant, through Identity/Cast."""
    while value is not None:
        if value.is_initializer() or value.const_value is not None:
            return True
        producer = value.producer()
        if producer is None:
            return False
        if producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            return True
        if producer.op_type not in _PASS_THROUGH or not producer.inputs:
            return False
        value = producer.inputs[0]
    return False


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _node_findings(node: ir.Node, ops: Mapping[str, dict], model: ir.Model,
                   types: Mapping[str, ir.DataType]) -> Iterator[tuple[Rule, str]]:
    if node.domain not in ("", "ai.onnx"):
        yield Rule.CUSTOM_DOMAIN, f"domain {node.domain!r}: TensorRT parses it only through a plugin of that name"
        return
    row = ops.get(node.op_type)
    if row is None or row["supported"] is False:
        where = "not in the table" if row is None else "marked unsupported"
        yield Rule.UNSUPPORTED_OP, f"{node.op_type} is {where}" + (f" ({row['restrictions']})" if row and row["restrictions"] else "")
        return
    if row["supported"] == "plugin":
        yield Rule.PLUGIN_ONLY, row["restrictions"]
        return
    yield from _type_findings(node, row["types"], types)
    op = node.op_type
    if op in REDUCE_OPS:
        axes = _input(node, 1)
        if axes is not None and axes.name and not _is_constant(axes):
            yield Rule.REDUCE_AXES, f"axes {axes.name!r} is computed at run time"
    if op in ("Squeeze", "Unsqueeze"):
        axes = _input(node, 1)
        if axes is not None and axes.name and not _is_constant(axes):
            yield Rule.SQUEEZE_AXES, f"axes {axes.name!r} is computed at run time"
    if op == "LayerNormalization":
        extra = [v.name for v in node.outputs[1:] if v.name and (v.uses() or v in model.graph.outputs)]
        if extra:
            yield Rule.LAYERNORM_OUTPUTS, f"outputs {', '.join(extra)} (Mean, InvStdDev) are used"
    if op == "ScatterND":
        reduction = node.attributes.get("reduction")
        if reduction is not None and reduction.as_string() != "none":
            yield Rule.SCATTERND_REDUCTION, f"reduction={reduction.as_string()!r}"


def _type_findings(node: ir.Node, supported: list[str], types: Mapping[str, ir.DataType]) -> Iterator[tuple[Rule, str]]:
    for value in _typed_values(node):
        dtype = value.dtype or types.get(value.name)
        if dtype is None or dtype == ir.DataType.DOUBLE:  # unknown, or the DOUBLE rule's
            continue
        name = TABLE_TYPES.get(dtype, dtype.name)
        if name not in supported:
            yield Rule.TYPE, f"{value.name!r} is {dtype.name}; {node.op_type} takes {', '.join(supported) or 'none'}"


def _typed_values(node: ir.Node) -> list[ir.Value]:
    """The values whose type the table's column means: the op's data input (its first), its output
    where it has no data input (Constant, ConstantOfShape), both for a Cast."""
    first = node.inputs[0] if node.inputs and node.inputs[0] is not None else None
    out = node.outputs[0] if node.outputs else None
    if node.op_type in ("Cast", "CastLike"):
        return [v for v in (first, out) if v is not None]
    if node.op_type == "ConstantOfShape" or first is None:
        return [out] if out is not None else []
    return [first]


def _doubles(model: ir.Model, nodes: list[ir.Node]) -> list[tuple[str, str, str]]:
    found = []
    graph = model.graph
    for value in (*graph.inputs, *graph.initializers.values()):
        if value.dtype == ir.DataType.DOUBLE:
            found.append(("(input)" if value in graph.inputs else "(initializer)", "-", f"{value.name!r} is DOUBLE"))
    for node in nodes:
        for value in node.outputs:
            if value.dtype == ir.DataType.DOUBLE:
                found.append((node.name or "<unnamed>", node.op_type, f"output {value.name!r} is DOUBLE: cast it down"))
    return found


def _oversized(model: ir.Model, nodes: list[ir.Node], shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, str]]:
    """Tensors of known size with 2^31 elements or more (symbolic dims: at `shapes`' size, else unknown)."""
    found = []

    def numel(value: ir.Value) -> int | None:
        dims = shapes.get(value.name) if value.name in shapes else None
        if dims is None and value.shape is not None and all(isinstance(d, int) for d in value.shape.dims):
            dims = tuple(value.shape.dims)
        return math.prod(dims) if dims is not None else None

    graph = model.graph
    for value in (*graph.inputs, *graph.initializers.values()):
        n = numel(value)
        if n is not None and n >= MAX_ELEMENTS:
            found.append(("(input)" if value in graph.inputs else "(initializer)", "-", f"{value.name!r} has {n} elements"))
    for node in nodes:
        for value in node.outputs:
            n = numel(value)
            if n is not None and n >= MAX_ELEMENTS:
                found.append((node.name or "<unnamed>", node.op_type, f"output {value.name!r} has {n} elements"))
    return found


def warning_line(what: str, results: list[LineResult]) -> str | None:
    """One line for a log: the first finding and every TensorRT line it (or another) affects; None
    where every line is ready."""
    failed = [r for r in results if not r.ready]
    if not failed:
        return None
    first = failed[0].findings[0]
    lines = ", ".join(r.line for r in failed)
    return (f"{what} is not TensorRT-ready for TensorRT {lines}: node {first.node!r} ({first.op}): "
            f"{first.rule.value}: {first.detail} (table {first.table_version}; `omnicache-export check` lists all)")


def readiness_records(graph: str, results: list[LineResult]) -> list:
    """The manifest's records of one graph's results (runtime.manifest.TensorRTReadiness)."""
    from omnicache_export.runtime.manifest import TensorRTReadiness

    return [TensorRTReadiness(graph, r.line, r.table_version, r.ready, None if r.ready else r.findings[0].text())
            for r in results]
