"""Pass: a cache tensor whose axis 0 is batch × k (temporal layouts: batch × frames) leaves the full
graph and enters the cache graph as [batch, k, ...], so that every graph input and output has the
batch itself on axis 0, under one symbol.

Tools that size inputs from the annotations alone cannot express batch × k: Polygraphy's default
data loader feeds 1 for a symbolic dim (1 ≠ k at batch 1), a TensorRT profile or a Triton config
wants the batch on axis 0. A Reshape at each graph boundary costs nothing (a view).

Full graph: output `omnicache_cache[_k]` [B·k, ...] becomes Reshape(·, [-1, k, ...]). Cache graph:
input `omnicache_cache[_k]` becomes [B, k, ...], reshaped back to [B·k, ...] before its first use.

Invariant: the model outputs are unchanged (a Reshape pair is the identity on the data), and the
cache tensor holds the same numbers in the same order.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from omnicache_export.passes.cache_names import cache_name

_BATCH_TIMES = re.compile(r"batch\*(\d+)")


def batch_multiple(shape) -> int | None:
    """k where axis 0 is `batch*k` and the other dims are static, else None."""
    if not shape:
        return None
    m = _BATCH_TIMES.fullmatch(str(shape[0]))
    if m is None or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return int(m[1])


class BatchMajorCachePass(ir.passes.InPlacePass):
    def __init__(self, stream_shapes: list, batch_symbol: str):
        """`stream_shapes`: each cache stream's shape as the analysis found it (`batch*k` dims)."""
        super().__init__()
        self.shapes, self.batch = stream_shapes, batch_symbol

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for i, shape in enumerate(self.shapes):
            k = batch_multiple(shape)
            if k is None:
                continue
            rest = [int(d) for d in shape[1:]]
            name = cache_name(i)
            outputs = [j for j, v in enumerate(graph.outputs) if v.name == name]
            inputs = [j for j, v in enumerate(graph.inputs) if v.name == name]
            for j in outputs:
                flat = graph.outputs[j]
                flat.name = f"{name}/flat"
                major = ir.Value(name=name, shape=ir.Shape([ir.SymbolicDim(self.batch), k, *rest]), type=flat.type)
                target = ir.val(f"{name}/batch_major_shape", const_value=ir.tensor(np.array([-1, k, *rest], np.int64)))
                graph.register_initializer(target)
                graph.append(ir.node("Reshape", [flat, target], outputs=[major], name=f"omnicache/batch_major_{i}"))
                graph.outputs[j] = major
                modified = True
            for j in inputs:
                flat = graph.inputs[j]
                major = ir.Value(name=name, shape=ir.Shape([ir.SymbolicDim(self.batch), k, *rest]), type=flat.type)
                flat.name = f"{name}/flat"
                target = ir.val(f"{name}/flat_shape", const_value=ir.tensor(np.array([-1, *rest], np.int64)))
                graph.register_initializer(target)
                restored = ir.Value(name=f"{name}/restored", shape=flat.shape, type=flat.type)
                flat.replace_all_uses_with(restored)
                graph.inputs[j] = major
                graph.insert_before(graph.node(0), ir.node("Reshape", [major, target], outputs=[restored],
                                                           name=f"omnicache/batch_flat_{i}"))
                modified = True
        return ir.passes.PassResult(model, modified)
