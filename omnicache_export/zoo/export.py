"""Export a zoo family to ONNX with either torch exporter, plus example inputs as .npz."""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path

import numpy as np
import onnx
import torch

from .families import BATCH, FAMILIES, Family
from .patches import export_friendly_tensor_ops

DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
MAX_IR_VERSION = 10  # onnxruntime 1.31 rejects IR 14; 10 is what ORT >= 1.16 reads


def export_family(
    name: str,
    path: str | Path,
    exporter: str = "torchscript",
    opset: int | None = None,
    external_data: bool = False,
    seed: int = 0,
) -> Path:
    """Build family `name` with random weights (seed) and export it to `path`; returns the path."""
    family = FAMILIES[name]
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be one of {tuple(DEFAULT_OPSET)}, got {exporter!r}")
    if exporter not in family.exporters:
        raise ValueError(f"family {name!r} does not export with {exporter!r}: {family.notes}")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if exporter == "dynamo" and opset < 18:
        # torch's dynamo exporter writes opset-18 ops (e.g. ReduceMean with axes input) regardless,
        # and its down-conversion to 17 gives an invalid model.
        raise ValueError(f"the dynamo exporter needs opset >= 18, got {opset}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = family.build(seed).eval()
    feeds = family.example_inputs(batch=2, seed=seed)
    args = tuple(torch.from_numpy(feeds[n]) for n in family.input_names)
    with torch.no_grad(), export_friendly_tensor_ops():
        if exporter == "torchscript":
            proto = _export_torchscript(family, model, args, opset)
        else:
            proto = _export_dynamo(family, model, args, opset)
    _save(proto, path, external_data)
    return path


def write_inputs_npz(name: str, path: str | Path, batch: int = 2, seed: int = 0) -> Path:
    """Save `FAMILIES[name].example_inputs(batch, seed)` to an .npz keyed by input name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **FAMILIES[name].example_inputs(batch, seed))
    return path


def _export_torchscript(family: Family, model: torch.nn.Module, args: tuple, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with _rms_norm_symbolic(opset):
        torch.onnx.export(
            model,
            args,
            buf,
            input_names=family.input_names,
            output_names=[family.output_name],
            dynamic_axes=family.dynamic_axes or None,
            opset_version=opset,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(family: Family, model: torch.nn.Module, args: tuple, opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    axes = family.dynamic_axes
    shapes = tuple({0: batch} if n in axes else None for n in family.input_names) if axes else None
    params = inspect.signature(model.forward).parameters.values()
    if shapes and any(p.kind is p.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*args): torch.export matches one `args` tuple
    # torch.export first, then convert: handing the module to torch.onnx.export re-checks the program's
    # runtime asserts and fails on LTX ("Eq((s21//s33), 32)") where plain torch.export is fine.
    program = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    program = torch.onnx.export(
        program,
        args,
        input_names=family.input_names,
        output_names=[family.output_name],
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    if axes:
        _rename_dim(proto, proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, BATCH)
    return proto


def _rename_dim(proto: onnx.ModelProto, old: str, new: str) -> None:
    """torch.export calls the batch symbol e.g. 's21'; name it like the TorchScript export does."""
    g = proto.graph
    for info in (*g.input, *g.output, *g.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new


def _save(proto: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Write the model (and its weights file) atomically: under a temporary name beside `path`,
    renamed at the end, nothing left on failure (a full disk included)."""
    from omnicache_export.outputs import atomic_output_files

    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    data = path.with_name(path.name + ".data")
    with atomic_output_files(path, data, force=True) as tmp:  # a fresh folder: onnx appends to no old data file
        if external_data:
            onnx.save(proto, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data.name, size_threshold=0)
        else:
            onnx.save(proto, tmp / path.name)
    if not external_data and data.exists():
        data.unlink()  # an earlier export's weights, not this model's


@contextlib.contextmanager
def _rms_norm_symbolic(opset: int):
    """TorchScript has no symbolic for aten::rms_norm (torch.nn.RMSNorm in Flux, Wan, LTX...).

    Decompose it as x / sqrt(mean(x^2) + eps) * weight, with ops valid at `opset`.
    """
    from torch.onnx import symbolic_helper as sh

    def rms_norm(g, x, normalized_shape, weight, eps):
        ndim = len(sh._get_const(normalized_shape, "is", "normalized_shape"))
        axes = list(range(-ndim, 0))
        eps = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        sq = g.op("Mul", x, x)
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            mean = g.op("ReduceMean", sq, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", sq, axes_i=axes, keepdims_i=1)
        rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        out = g.op("Div", x, rms)
        return out if sh._is_none(weight) else g.op("Mul", out, weight)

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)

