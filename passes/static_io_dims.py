"""Pass: the graph inputs' and outputs' shape annotations made exact.

Exporters leave dims symbolic that are not (TorchScript names each dim of a reshaped output
`Reshape<out>_dim_k`), and give the batch other names on other tensors. Tools that feed a graph
from its annotations alone (Polygraphy's default data loader fills every symbolic dim with 1,
TensorRT's optimization profiles) then build inputs the graph cannot take. From the concrete shapes
static shape inference found at batch 1 and at batch 2 (`passes.static_shapes`):
- a dim that is the same at both batches becomes that int;
- axis 0 that is the batch itself (1, then 2) takes the one batch symbol;
- any other dim (batch × frames, a dim inference could not resolve) keeps its annotation.

Invariant: only annotations of graph inputs and outputs change (no node, no value's data, no type),
and every new annotation agrees with the shapes the graph computes at batch 1 and 2.
"""

from __future__ import annotations

import onnx_ir as ir

Shape = tuple[int, ...]


class StaticIODimsPass(ir.passes.InPlacePass):
    def __init__(self, shapes_b1: dict[str, Shape], shapes_b2: dict[str, Shape], batch_symbol: str):
        super().__init__()
        self.b1, self.b2, self.batch = shapes_b1, shapes_b2, batch_symbol

    def _dims(self, value: ir.Value) -> list[int | ir.SymbolicDim] | None:
        s1, s2 = self.b1.get(value.name), self.b2.get(value.name)
        old = list(value.shape.dims) if value.shape is not None else None
        if s1 is None or s2 is None or len(s1) != len(s2) or (old is not None and len(old) != len(s1)):
            return None
        dims: list[int | ir.SymbolicDim] = []
        for axis, (d1, d2) in enumerate(zip(s1, s2)):
            keep = old[axis] if old is not None else ir.SymbolicDim(None)
            if d1 == d2:
                dims.append(int(d1))
            elif axis == 0 and (d1, d2) == (1, 2) and not isinstance(keep, int):
                dims.append(ir.SymbolicDim(self.batch))
            else:
                dims.append(keep)
        return dims

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        for value in (*[v for v in graph.inputs if not v.is_initializer()], *graph.outputs):
            dims = self._dims(value)
            if dims is None or (value.shape is not None and list(value.shape.dims) == dims):
                continue
            value.shape = ir.Shape(dims)
            modified = True
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for value in (*model.graph.inputs, *model.graph.outputs):
            s1 = self.b1.get(value.name)
            if value.shape is None or s1 is None or len(s1) != len(value.shape):
                continue
            for axis, d in enumerate(value.shape.dims):
                if isinstance(d, int) and d != s1[axis]:
                    raise ir.passes.PostconditionError(f"{value.name!r} axis {axis}: annotated {d}, computes {s1[axis]}")
