"""Pass: a float16 / bfloat16 graph rewritten into a float32 graph that rounds every 16-bit result,
the per-op emulation of a GPU's half-precision kernels on any float32 backend.

ONNX Runtime's CPU provider computes most fp16 ops by casting to float32 inside and keeps fp16 only
in layout ops, and has few bfloat16 kernels at all: its numbers flatter an fp16 graph and cannot
run a bf16 one. A GPU kernel computes in float32 (tensor cores accumulate in it) and rounds its
result to the output type. This pass makes every 16-bit value float32 and follows each node that
produced one by Cast(to=16-bit) → Cast(to=FLOAT): each op then sees the rounded inputs a GPU kernel
sees and its result is rounded as the GPU's is. 16-bit initializers and Constants become float32
(exactly: their values are already rounded); Casts to the 16-bit type become Casts to float32 plus the
rounding pair; 16-bit graph inputs and outputs keep their type (a Cast at the edge).

Invariant: every value the original graph computes in 16 bits equals, in float32, that value
rounded to 16 bits after an op evaluated in float32 on the rounded inputs (so the graph's outputs
match a reference evaluator that rounds each node's 16-bit results; run it with graph optimizations
off, which could fold the rounding pairs away).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.convert_precision import fill_types

LOW = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


class EmulateLowPrecisionPass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in model.graph for a in n.attributes.values()):
            raise ir.passes.PreconditionError("the emulation handles flat graphs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fill_types(model)
        f32 = ir.DataType.FLOAT
        for value in graph.initializers.values():
            if value.dtype in LOW and value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
                value.dtype = f32
        for k, value in enumerate(list(graph.inputs)):
            if value.dtype in LOW:
                up = ir.Value(name=f"{value.name}__emul32", shape=value.shape, type=ir.TensorType(f32))
                ir.convenience.replace_all_uses_with(value, up)
                graph.insert_before(graph.node(0), ir.node("Cast", [value], {"to": int(f32)}, outputs=[up]))
        outputs = {v: i for i, v in enumerate(graph.outputs)}
        for node in list(graph):
            if node.op_type == "Cast" and node.outputs[0].dtype in LOW:
                node.attributes["to"] = ir.AttrInt64("to", int(f32))
            for key, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in LOW:
                    node.attributes[key] = ir.AttrTensor(key, ir.tensor(attr.value.numpy().astype(np.float32)))
            for out in node.outputs:
                if out.dtype not in LOW:
                    continue
                low = out.dtype
                out.dtype = f32
                rounded = ir.Value(name=f"{out.name}__emul16", shape=out.shape, type=ir.TensorType(low))
                back = ir.Value(name=f"{out.name}__emul", shape=out.shape, type=ir.TensorType(f32))
                uses = list(out.uses())
                pair = [ir.node("Cast", [out], {"to": int(low)}, outputs=[rounded]),
                        ir.node("Cast", [rounded], {"to": int(f32)}, outputs=[back])]
                graph.insert_after(node, pair)
                for use in uses:
                    use.node.replace_input_with(use.idx, back)
                if out in outputs:  # a 16-bit graph output: the rounded value, under the output's name
                    name = out.name
                    out.name, rounded.name = f"{name}__emul_raw", name
                    graph.outputs[outputs[out]] = rounded
        return ir.passes.PassResult(model, modified=True)
