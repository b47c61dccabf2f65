"""Repair pass (the dynamo exporter's trap): a Squeeze of an axis whose size is not 1 becomes what
torch computed, a no-op.

`x.squeeze(i)` is a no-op in torch when dim i is not 1, but torch.export records the call and the
dynamo exporter writes a plain `Squeeze(x, [i])`. ONNX's Squeeze requires the axis to be 1, so
where shape inference proves it is some n != 1 for every input (diffusers' PixArt:
`proj_out(x).squeeze(1)` on [B, 16, C]), ONNX Runtime refuses to load the model ("Dimension of
input 1 must be 1 instead of 16"). Those axes are dropped from the Squeeze; a Squeeze left with
none becomes an Identity (same output value name, node name and metadata, name scopes included).

Only Squeezes of the main graph with constant axes are rewritten (where the dynamo exporter writes
them; TorchScript's version inside an If is FoldSqueezeIfPass's).

Invariant: the output equals torch's `x.squeeze(i)`: the input unchanged for the dropped axes (the
only values the model could compute there, since ONNX's Squeeze cannot run on them), the
remaining size-1 axes squeezed as before. Test: the repaired stock PixArt export equals the torch
model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.fold_squeeze_if import Dims, non_unit_axes, remove_dead_chain, squeeze_axes


class DropNoopSqueezePass(ir.passes.InPlacePass):
    def __init__(self, dims: Mapping[str, Dims]):
        """dims: value name -> dims shape inference proves for every input (int) or cannot (None)
        (`passes.static_shapes.symbolic_static_dims`)."""
        super().__init__()
        self.dims = dims
        self.dropped: list[str] = []  # "node: why", one per rewritten Squeeze

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.dropped = []
        for node in [n for n in graph if n.op_type == "Squeeze"]:
            noop = non_unit_axes(node, self.dims)
            if not noop:
                continue
            x = node.inputs[0]
            rank = len(self.dims[x.name])
            keep = [a for a in (a % rank for a in squeeze_axes(node)) if a not in noop]
            sizes = ", ".join(str(self.dims[x.name][a]) for a in noop)
            if keep:
                self._keep_axes(graph, node, keep)
                what = f"squeezes only axes {keep}"
            else:
                self._to_identity(graph, node)
                what = "is an Identity"
            self.dropped.append(f"{node.name!r} (Squeeze of axes {noop} of size {sizes} != 1: {what})")
        return ir.passes.PassResult(model, modified=bool(self.dropped))

    @staticmethod
    def _keep_axes(graph: ir.Graph, node: ir.Node, keep: list[int]) -> None:
        if "axes" in node.attributes:  # opset < 13
            node.attributes["axes"] = ir.AttrInt64s("axes", keep)
            return
        axes = ir.Value(name=f"{node.name or 'squeeze'}_axes_kept", shape=ir.Shape([len(keep)]),
                        type=ir.TensorType(ir.DataType.INT64))
        axes.const_value = ir.tensor(np.array(keep, np.int64), name=axes.name)
        graph.register_initializer(axes)
        node.replace_input_with(1, axes)

    @staticmethod
    def _to_identity(graph: ir.Graph, node: ir.Node) -> None:
        old = node.outputs[0]
        identity = ir.node("Identity", [node.inputs[0]], name=node.name)
        identity.metadata_props.update(node.metadata_props)
        new = identity.outputs[0]
        x = node.inputs[0]
        new.type = old.type
        new.shape = ir.Shape(x.shape.dims) if x.shape is not None else None
        graph.insert_before(node, identity)
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = f"{name}_dropped" if name else None
        new.name = name
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        graph.remove(node, safe=True)
        remove_dead_chain(graph, [axes])
