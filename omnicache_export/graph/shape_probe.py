"""Shapes measured by running the model: analysis for the small models shape inference gives up on.

It runs ONNX Runtime, so it lives with the analysis, not with the graph passes (no pass runs a model).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

Shape = tuple[int, ...]


def probe_shapes(model: ir.Model, feeds: dict, names: list[str]) -> dict[str, Shape]:
    """Shapes of `names` measured by one ONNX Runtime run on the CPU."""
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    known = {o.name for o in proto.graph.output}
    for name in names:
        if name not in known:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name: feeds[i.name] for i in session.get_inputs()}
    outputs = session.run(names, wanted)
    return {name: tuple(out.shape) for name, out in zip(names, outputs) if hasattr(out, "shape")}
