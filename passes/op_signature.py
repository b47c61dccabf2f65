"""Which inputs and outputs of a node share a type variable, from the operator's ONNX schema: what a
precision conversion may retype together (`T` of Add binds both inputs and the output) and what it
must leave alone (Resize's `scales` is always tensor(float), Shape's output always int64)."""

from __future__ import annotations

import dataclasses
import functools

import onnx
import onnx_ir as ir

FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_TYPE_STR = {ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)",
             ir.DataType.BFLOAT16: "tensor(bfloat16)", ir.DataType.DOUBLE: "tensor(double)"}


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]  # per formal input: its type variable, or "" where the type is fixed
    outputs: tuple[str, ...]
    variadic_in: bool
    variadic_out: bool
    allowed: dict[str, frozenset[str]]  # type variable -> allowed type strings

    def input_var(self, i: int) -> str:
        return _slot(self.inputs, i, self.variadic_in)

    def output_var(self, i: int) -> str:
        return _slot(self.outputs, i, self.variadic_out)

    def allows(self, var: str, dtype: ir.DataType) -> bool:
        return _TYPE_STR[dtype] in self.allowed.get(var, ())


def _slot(formals: tuple[str, ...], i: int, variadic: bool) -> str:
    if i < len(formals):
        return formals[i]
    return formals[-1] if variadic and formals else ""


@functools.lru_cache(maxsize=None)
def signature(op_type: str, domain: str, opset: int) -> Signature | None:
    """The schema's slots, or None where ONNX has no schema for the op (custom domains, functions)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints}
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    var = lambda p: p.type_str if p.type_str in allowed else ""  # noqa: E731 - fixed types name no variable
    return Signature(
        tuple(var(p) for p in schema.inputs), tuple(var(p) for p in schema.outputs),
        bool(schema.inputs) and schema.inputs[-1].option == variadic,
        bool(schema.outputs) and schema.outputs[-1].option == variadic, allowed)


def node_signature(node: ir.Node, opsets: dict[str, int]) -> Signature | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    if domain not in opsets:
        return None
    return signature(node.op_type, domain, opsets[domain])
