"""`export_transformer`: a diffusers DiT to ONNX, with the fixes a user would otherwise hit.

- the dynamo exporter needs opset >= 18 (it writes opset-18 ops and its down-conversion is invalid);
- PixArt's (and Allegro's) no-op `squeeze(1)`, which both exporters turn into a Squeeze ORT refuses,
  is not emitted (`export_fixes.export_friendly_tensor_ops`);
- RMSNorm under TorchScript gets a symbolic (`export_fixes.rms_norm_symbolic`);
- CogVideoX's positional table is made for the sample's frame count (`export_fixes.sample_sized_patch_embeds`);
- weights go to a side file past 2 GB (protobuf's limit), or when asked;
- the batch axis is dynamic (every input whose axis 0 is the sample batch, and the output).

The model keeps its own class and module names while exporting (its class is swapped for a subclass
whose forward takes the graph inputs positionally), so the ONNX scopes are diffusers' own and the
block stack is found from them. The diffusers config goes into the ONNX metadata (`CONFIG_KEY`), for
the drop-in transformer to hand to pipelines.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from omnicache_export.errors import UserError
from omnicache_export.integrations.export_fixes import (
    export_friendly_tensor_ops,
    rms_norm_symbolic,
    sample_sized_patch_embeds,
)

DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
MAX_IR_VERSION = 10  # onnxruntime 1.31 rejects IR 14; 10 is what ORT >= 1.16 reads
PROTOBUF_LIMIT = 2 * 1024**3  # one protobuf message holds at most 2 GB: past it, weights go to a side file
OUTPUT_NAME = "out_sample"
BATCH = "batch"
CONFIG_KEY = "diffusers.config"  # ONNX metadata: the model's diffusers config (JSON, with _class_name)
NESTED = "."  # a graph input named "added_cond_kwargs.resolution" is that dict's entry
INPUTS_KEY = "diffusers.forward_inputs"  # ONNX metadata: the graph inputs, as forward-argument names (JSON list)


def check_exporter(exporter: str, opset: int | None) -> int:
    """The opset to export with (its default where None); UserError for an unknown exporter or dynamo below 18."""
    if exporter not in DEFAULT_OPSET:
        raise UserError(f"exporter {exporter!r}: one of {', '.join(DEFAULT_OPSET)}")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if exporter == "dynamo" and opset < 18:
        raise UserError(f"the dynamo exporter needs opset >= 18, got {opset} (it writes opset-18 ops and its "
                        "down-conversion gives an invalid model)")
    return opset


def export_transformer(
    model: torch.nn.Module,
    sample_inputs: Mapping[str, Any],
    path: str | Path,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
    calib: Mapping[str, Any] | None = None,
    batched: Collection[str] | None = None,
    output_name: str = OUTPUT_NAME,
    force: bool = False,
) -> Path:
    """Export `model` (a diffusers transformer, or any module whose forward takes these keywords) to
    the ONNX file `path`; returns it.

    `sample_inputs`: forward-argument name -> tensor or array (the graph inputs, in this order, named
    alike; the first is the latent) or a constant (None, ints, ... kept out of the graph). Give a batch
    of 2 or more: a batch of 1 lets the exporters specialize it. `batched`: the inputs with a batch
    axis (default: those whose axis 0 equals the first input's). `external_data`: weights in
    `path.data` (None: where the model passes 2 GB). `calib`: conditioning arrays keyed by
    forward-argument name, `uncond/<name>` for guidance: written beside as `<stem>.calib.npz`, the
    format `--calib` takes (`calib_npz.write_calib_npz`). Written atomically; existing files are
    refused unless `force`.
    """
    from omnicache_export import outputs
    from omnicache_export.integrations.calib_npz import calib_arrays, calib_path_for

    opset = check_exporter(exporter, opset)
    path = Path(path)
    tensors, fixed = split_inputs(sample_inputs)
    names = list(tensors)
    batch_axes = batched_names(tensors, batched) if dynamic_batch else set()
    big = external_data if external_data is not None else weight_bytes(model) >= PROTOBUF_LIMIT
    calib_file = calib_path_for(path) if calib is not None else None
    for target in (path, path.with_name(path.name + ".data"), *([calib_file] if calib_file else [])):
        outputs.check_output_file(target, force=force)  # before any work
    arrays = calib_arrays(calib, names) if calib_file else None  # checked before the export
    proto = export_proto(model, tensors, fixed, batch_axes, exporter, opset, output_name,
                         scratch=path.parent if big else None)
    beside = {calib_file: lambda tmp: np.savez(tmp, **arrays)} if calib_file else {}
    return write_model(proto, path, big, force=force, beside=beside)


def write_model(proto: onnx.ModelProto, path: Path, external_data: bool, *, force: bool = False,
                beside: Mapping[Path, Any] | None = None) -> Path:
    """Write the model (its weights in `path.data` with `external_data`) and the files `beside`
    (path -> writer(temporary path)) atomically: under a temporary folder beside `path`, renamed at
    the end, nothing left on failure. A replaced export's own weights file goes with it."""
    from omnicache_export import outputs

    path = Path(path)
    data = path.with_name(path.name + ".data")
    beside = dict(beside or {})
    with outputs.atomic_output_files(path, data, *beside, force=force) as tmp:  # a fresh folder: onnx appends
        save_model(proto, tmp / path.name, external_data)                       # to no old data file
        for target, writer in beside.items():
            writer(tmp / Path(target).name)
    if not external_data and force and data.is_file():
        data.unlink()  # the replaced export's weights, not this model's
    return path


def split_inputs(sample_inputs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(graph inputs as tensors, constant keyword arguments)."""
    if not sample_inputs:
        raise UserError("sample_inputs is empty: give the forward arguments, the latent first")
    tensors, fixed = {}, {}
    for name, value in sample_inputs.items():
        if isinstance(value, Mapping) and any(_is_array(v) for v in value.values()):
            # added_cond_kwargs={"resolution": t, ...}: graph inputs "added_cond_kwargs.resolution" ...
            for key, item in value.items():
                if _is_array(item):
                    tensors[f"{name}{NESTED}{key}"] = _tensor(item)
            fixed[name] = {k: v for k, v in value.items() if not _is_array(v)}
        elif _is_array(value):
            tensors[name] = _tensor(value)
        else:
            fixed[name] = value
    if not tensors:
        raise UserError("sample_inputs holds no tensor: give the latent (hidden_states) at least")
    return tensors, fixed


def _is_array(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def forward_kwargs(names: list[str], args, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The forward's keywords from the graph inputs (`parent.key` names go back into their dict) and constants."""
    kwargs = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in fixed.items()}
    for name, value in zip(names, args):
        parent, sep, key = name.partition(NESTED)
        if sep:
            kwargs.setdefault(parent, {})[key] = value
        else:
            kwargs[name] = value
    return kwargs


def batched_names(tensors: Mapping[str, torch.Tensor], batched: Collection[str] | None) -> set[str]:
    if batched is not None:
        unknown = sorted(set(batched) - set(tensors))
        if unknown:
            raise UserError(f"batched names {unknown}, which are not tensor sample inputs ({', '.join(tensors)})")
        return set(batched)
    first = next(iter(tensors.values()))
    batch = first.shape[0] if first.dim() else None
    return {n for n, t in tensors.items() if t.dim() and t.shape[0] == batch}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_proto(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], fixed: Mapping[str, Any],
                 batched: Collection[str], exporter: str, opset: int, output_name: str = OUTPUT_NAME,
                 scratch: Path | None = None) -> onnx.ModelProto:
    """The ONNX model of `model(**tensors, **fixed)` with the fixes applied; the batch axis of
    `batched` inputs (and of the output) dynamic. `scratch`: a folder for TorchScript to write a
    model past protobuf's 2 GB through (it cannot serialize one in memory)."""
    names = list(tensors)
    args = tuple(tensors.values())
    axes = {n: {0: BATCH} for n in names if n in batched}
    if axes:
        axes[output_name] = {0: BATCH}
    latent = args[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), positional_forward(model, names, fixed), export_friendly_tensor_ops(), \
                sample_sized_patch_embeds(model, latent):
            if exporter == "torchscript":
                proto = _torchscript(model, args, names, output_name, axes, opset, scratch)
            else:
                proto = _dynamo(model, args, names, output_name, axes, opset)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter's own refusal, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{type(model).__name__}: the {exporter} exporter failed ({first[:300]})") from exc
    finally:
        model.train(was_training)
    _set_metadata(proto, model, names)
    return proto


@contextlib.contextmanager
def positional_forward(model: torch.nn.Module, names: list[str], fixed: Mapping[str, Any]):
    """Give `model` (for the duration) a forward taking `names` positionally and returning the sample
    alone: its class is swapped for a subclass, so module paths, scopes and weight names are unchanged.
    A model whose class already does that for these names (the zoo's) is left as it is."""
    cls = type(model)
    if list(getattr(cls, "positional_inputs", ())) == names and not fixed:
        yield
        return
    signature = inspect.signature(cls.forward).parameters
    takes_return_dict = "return_dict" in signature or any(p.kind is p.VAR_KEYWORD for p in signature.values())
    unknown = [n for n in (*{n.partition(NESTED)[0] for n in names}, *fixed) if n not in signature] if not any(
        p.kind is p.VAR_KEYWORD for p in signature.values()) else []
    if unknown:
        raise UserError(f"{cls.__name__}.forward takes no argument {unknown[0]!r} (it takes: "
                        f"{', '.join(n for n in signature if n != 'self')})")

    def forward(self, *args):
        kwargs = forward_kwargs(names, args, fixed)
        out = cls.forward(self, **kwargs, **({"return_dict": False} if takes_return_dict else {}))
        return _sample_of(out)

    swapped = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
    model.__class__ = swapped
    try:
        yield
    finally:
        model.__class__ = cls


def _sample_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise UserError(f"the model's forward returned {type(out).__name__}, not a tensor, a tuple or an output with .sample")


def _torchscript(model, args, names, output_name, axes, opset, scratch: Path | None = None) -> onnx.ModelProto:
    options = dict(input_names=names, output_names=[output_name], dynamic_axes=axes or None, opset_version=opset,
                   dynamo=False)
    with rms_norm_symbolic(opset):
        if scratch is None:
            buf = io.BytesIO()
            torch.onnx.export(model, args, buf, **options)
            return onnx.load_from_string(buf.getvalue())
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".omnicache-export-") as folder:
            torch.onnx.export(model, args, str(Path(folder) / "model.onnx"), **options)  # weights beside it
            return onnx.load(str(Path(folder) / "model.onnx"))  # with its weights, in memory


def _dynamo(model, args, names, output_name, axes, opset) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} if n in axes else None for n in names) if axes else None
    params = inspect.signature(model.forward).parameters.values()
    if shapes and any(p.kind is p.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*args): torch.export matches one `args` tuple
    # torch.export first, then convert: handing the module to torch.onnx.export re-checks the program's
    # runtime asserts and fails on LTX ("Eq((s21//s33), 32)") where plain torch.export is fine.
    program = torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    program = torch.onnx.export(program, args, input_names=names, output_names=[output_name],
                                opset_version=opset, dynamo=True, verbose=False)
    proto = program.model_proto
    if axes:
        first = next(i for i, n in enumerate(names) if n in axes)
        _rename_dim(proto, proto.graph.input[first].type.tensor_type.shape.dim[0].dim_param, BATCH)
    return proto


def _rename_dim(proto: onnx.ModelProto, old: str, new: str) -> None:
    """torch.export calls the batch symbol e.g. 's21'; name it like the TorchScript export does."""
    g = proto.graph
    for info in (*g.input, *g.output, *g.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new


def _set_metadata(proto: onnx.ModelProto, model: torch.nn.Module, names: list[str]) -> None:
    entries = {INPUTS_KEY: json.dumps(names)}
    if hasattr(model, "to_json_string"):  # a diffusers ConfigMixin: its config, with _class_name
        entries[CONFIG_KEY] = model.to_json_string()
    for prop in list(proto.metadata_props):
        if prop.key in entries:
            proto.metadata_props.remove(prop)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def save_model(proto: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Write the model at IR <= 10, its weights in `path.data` with `external_data` (into a fresh
    folder: onnx appends to an existing data file)."""
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    if external_data:
        onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(proto, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """What `export_transformer` put in an ONNX file's metadata: {"config": dict | None, "inputs": list | None}."""
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return {"config": json.loads(props[CONFIG_KEY]) if CONFIG_KEY in props else None,
            "inputs": json.loads(props[INPUTS_KEY]) if INPUTS_KEY in props else None}
