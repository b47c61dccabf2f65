"""TensorRT pass: an op given a type TensorRT's parser does not take computes in one it takes,
where the round trip is exact.

onnx-tensorrt's operator table lists the types each op takes; exports feed some ops other types
that ONNX Runtime runs. Each rule casts the op's data inputs to a type it takes and, where the
output carries the data, casts the output back:

- `Pad` of BOOL (diffusers' Mochi attention pooler pads its mask with True): padded as INT32, cast
  back to BOOL. True/False are 1/0 and every pad mode only copies values or writes the constant.
- `NonZero` of integers or BOOL (Mochi's masked attention gathers the mask's nonzero positions):
  taken as FLOAT. Its output is indices (INT64), unchanged: an integer is nonzero exactly when its
  float32 value is (rounding never reaches 0).

The rewritten op keeps its name, attributes and metadata; its output keeps its name and type.

Invariant: bit-exact: every output equals the old graph's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir

DT = ir.DataType
_INTEGERS = frozenset({DT.BOOL, DT.INT8, DT.INT16, DT.INT32, DT.INT64, DT.UINT8, DT.UINT16, DT.UINT32})


@dataclasses.dataclass(frozen=True)
class CastRule:
    sources: frozenset[ir.DataType]  # the data types rewritten (input 0's)
    compute: ir.DataType  # the type the op runs in
    inputs: tuple[int, ...]  # the inputs cast (data, and a constant of the same type)
    cast_back: bool  # the output carries the data's type


RULES: dict[str, CastRule] = {
    "Pad": CastRule(frozenset({DT.BOOL}), DT.INT32, (0, 2), cast_back=True),
    "NonZero": CastRule(_INTEGERS, DT.FLOAT, (0,), cast_back=False),
}


class CastUnsupportedTypesPass(ir.passes.InPlacePass):
    def __init__(self, types: Mapping[str, ir.DataType] | None = None):
        """types: value name -> element type, for values the export left unannotated
        (`passes.static_shapes.infer_elem_types`)."""
        super().__init__()
        self.types = dict(types or {})
        self.cast: list[str] = []  # "op 'name' (TYPE as TYPE)", one per rewritten node

    def _dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        return value.dtype if value.dtype is not None else self.types.get(value.name)

    def _rule(self, node: ir.Node) -> CastRule | None:
        rule = RULES.get(node.op_type) if node.domain == "" else None
        return rule if rule is not None and node.inputs and self._dtype(node.inputs[0]) in rule.sources else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.cast = []
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            rule = self._rule(node)
            if rule is not None:
                source = self._dtype(node.inputs[0])
                self._rewrite(node, rule, source)
                self.cast.append(f"{node.op_type} {node.name!r} ({source.name} as {rule.compute.name})")
        return ir.passes.PassResult(model, modified=bool(self.cast))

    @staticmethod
    def _rewrite(node: ir.Node, rule: CastRule, source: ir.DataType) -> None:
        graph = node.graph
        tag = node.name or node.op_type
        inputs = list(node.inputs)
        for i in rule.inputs:
            if i < len(inputs) and inputs[i] is not None:
                cast = ir.node("Cast", [inputs[i]], {"to": int(rule.compute)}, name=f"{tag}_as_{rule.compute.name}_{i}")
                out = cast.outputs[0]
                out.name, out.dtype, out.shape = f"{tag}_input{i}_{rule.compute.name.lower()}", rule.compute, inputs[i].shape
                graph.insert_before(node, cast)
                inputs[i] = cast.outputs[0]
        old = node.outputs[0]
        new_op = ir.node(node.op_type, inputs, node.attributes, name=node.name, version=node.version)
        new_op.metadata_props.update(node.metadata_props)
        added = [new_op]
        new = new_op.outputs[0]
        new.shape = old.shape
        if rule.cast_back:
            new.name, new.dtype = f"{tag}_output_{rule.compute.name.lower()}", rule.compute
            back = ir.node("Cast", [new], {"to": int(source)}, name=f"{tag}_back_to_{source.name}")
            added.append(back)
            new = back.outputs[0]
            new.shape = old.shape
        new.dtype = old.dtype if old.dtype is not None else (source if rule.cast_back else DT.INT64)
        graph.insert_before(node, added)
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = f"{name}_replaced" if name else None
        new.name = name  # the value keeps its name (graph outputs too)
        graph.remove(node, safe=True)

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if self._rule(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"nodes {left} still take a type TensorRT does not")
