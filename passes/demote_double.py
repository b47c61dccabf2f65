"""TensorRT pass: every DOUBLE tensor inside the graph becomes FLOAT.

TensorRT has no DOUBLE type (onnx-tensorrt's operator table; its parser refuses the graph). Exports
compute in float64 where the torch code asks for it: diffusers' Flux RoPE (`FluxPosEmbed`) builds
its tables in float64 and casts them to float32, which the dynamo exporter writes as
`Cast(to=DOUBLE)`, float64 constants, Mul/Cos/Sin in DOUBLE and `Cast(to=FLOAT)`. This pass makes
that path float32, as torch itself runs it on devices without float64 (MPS):

- `Cast(to=DOUBLE)` casts to FLOAT, and an op's `dtype` attribute of DOUBLE (RandomNormal, EyeLike …)
  becomes FLOAT;
- DOUBLE initializers and the tensors of `Constant` / `ConstantOfShape` become float32;
- every value annotated DOUBLE is annotated FLOAT.

The graph's inputs and outputs are the model's contract: a DOUBLE one is a precondition failure,
and the graph is left as it is.

Invariant: no tensor of the graph (subgraphs included) is DOUBLE afterwards; every output equals
the old graph's to float32 rounding of the values that were float64 (exactly, where none were).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

_DOUBLE, _FLOAT = ir.DataType.DOUBLE, ir.DataType.FLOAT
_TENSOR_ATTRS = {"Constant": "value", "ConstantOfShape": "value"}


class DemoteDoublePass(ir.passes.InPlacePass):
    def __init__(self, types: Mapping[str, ir.DataType] | None = None):
        """types: value name -> element type, for values the export left unannotated
        (`passes.static_shapes.infer_elem_types`)."""
        super().__init__()
        self.types = dict(types or {})
        self.demoted: list[str] = []  # node or initializer names, one per rewrite

    def _dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype if value.dtype is not None else self.types.get(value.name)

    def requires(self, model: ir.Model) -> None:
        io = [v for v in [*model.graph.inputs, *model.graph.outputs] if self._dtype(v) == _DOUBLE]
        if io:
            raise ir.passes.PreconditionError(
                f"graph inputs/outputs {[v.name for v in io]} are DOUBLE: the model's interface, not demoted")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.demoted = []
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                if value.const_value is not None and value.const_value.dtype == _DOUBLE:
                    value.const_value = _to_float(value.const_value, value.name)
                    value.dtype = _FLOAT
                    self.demoted.append(value.name)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if self._demote_node(node):
                self.demoted.append(node.name or node.op_type)
            for value in node.outputs:
                if self._dtype(value) == _DOUBLE:
                    value.dtype = _FLOAT
        return ir.passes.PassResult(model, modified=bool(self.demoted))

    @staticmethod
    def _demote_node(node: ir.Node) -> bool:
        changed = False
        for key in ("to", "dtype"):
            attr = node.attributes.get(key)
            if attr is not None and attr.type == ir.AttributeType.INT and attr.value == int(_DOUBLE):
                node.attributes[key] = ir.AttrInt64(key, int(_FLOAT))
                changed = True
        key = _TENSOR_ATTRS.get(node.op_type)
        attr = node.attributes.get(key) if key else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == _DOUBLE:
            node.attributes[key] = ir.AttrTensor(key, _to_float(attr.value, attr.value.name))
            changed = True
        return changed

    def ensures(self, model: ir.Model) -> None:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            left = [v.name for v in node.outputs if v.dtype == _DOUBLE]
            if left:
                raise ir.passes.PostconditionError(f"node {node.name!r} still yields DOUBLE {left}")


def _to_float(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=name)
