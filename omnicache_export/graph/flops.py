"""Per-node FLOP estimates from static shapes: enough to say what share of the work the blocks are.

Multiply-accumulates count two FLOPs (MatMul, Gemm, Conv, ConvTranspose); every other op counts one
per output element. Nodes whose shapes are unknown count zero (and are reported as unknown).
"""

from __future__ import annotations

import math

import onnx_ir as ir

Shape = tuple[int, ...]


def node_flops(node: ir.Node, shape_of) -> int | None:
    outs = [shape_of(v) for v in node.outputs if v is not None]
    if not outs or outs[0] is None:
        return None
    out_numel = math.prod(outs[0])
    op = node.op_type
    if op in ("MatMul", "Gemm"):
        a = shape_of(node.inputs[0])
        if a is None or not a:
            return None
        k = a[0] if op == "Gemm" and node.attributes.get_int("transA", 0) else a[-1]
        return 2 * out_numel * k
    if op in ("Conv", "ConvTranspose"):
        w = shape_of(node.inputs[1])
        if w is None:
            return None
        per_output = math.prod(w[1:]) if op == "Conv" else w[0] * math.prod(w[2:]) // max(1, node.attributes.get_int("group", 1))
        return 2 * out_numel * per_output
    return sum(math.prod(s) for s in outs if s is not None)
