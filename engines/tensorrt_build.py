"""Build one TensorRT plan from an ONNX graph (`build_engine`), with the TensorRT Python API.

The network is created STRONGLY_TYPED and no precision flag is ever set: the graph carries its
precision (fp16 initializers and Casts), which is the only way TensorRT 11 takes (it removed the
FP16/BF16/INT8 and OBEY_PRECISION_CONSTRAINTS flags), and works the same on 10.3 (JetPack 6).
Explicit batch needs no flag: it is the only mode since 10.0 (EXPLICIT_BATCH was deprecated and
ignored in 10.x and removed in 11.0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omnicache_export.engines.tensorrt_compat import (
    PlanInfo,
    Profile,
    dims_tuple,
    parser_error_line,
    plan_info_of_this_machine,
    profiles_json,
    require_tensorrt,
    trt_logger,
)
from omnicache_export.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, profiles: Profile | Sequence[Profile], *,
                 timing_cache: Path | None = None, opt_level: int = 3, workspace_bytes: int | None = None,
                 refittable: bool = False) -> PlanInfo:
    """Parse `onnx_path`, build a plan and write it to `plan_path` atomically; returns its record.

    `profiles`: one optimization profile (input -> (min, opt, max) shapes) or a list of them; each
    must cover every dynamic input of the graph (static inputs may be listed: their shapes are
    checked). `timing_cache`: a file read if it exists and written back with what this build
    measured, so the two graphs' builds (and later rebuilds) share one. `opt_level`: the builder
    optimization level (0-5). `workspace_bytes`: the workspace pool limit (None: TensorRT's
    default). `refittable`: weights can be swapped (LoRA) without a rebuild.
    Bad input raises UserError in one line (a parser error names the node)."""
    from omnicache_export.outputs import atomic_output_files

    require_tensorrt()
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such ONNX file")
    profile_list = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    if not profile_list:
        raise UserError(f"{onnx_path}: no optimization profile given")
    if not 0 <= opt_level <= 5:
        raise UserError(f"builder optimization level {opt_level}: choose 0 to 5")
    here = plan_info_of_this_machine()  # also refuses a machine without a CUDA GPU, before the build

    logger = trt_logger()
    builder: trt.Builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network: trt.INetworkDefinition = builder.create_network(flags)
    parser: trt.OnnxParser = trt.OnnxParser(network, logger)
    # from the file, not bytes: the parser then finds external data beside the model
    if not parser.parse_from_file(os.fspath(onnx_path)):
        raise UserError(parser_error_line(parser, onnx_path))

    config: trt.IBuilderConfig = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_bytes is not None:
        if workspace_bytes <= 0:
            raise UserError(f"workspace limit {workspace_bytes} bytes: must be positive")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)

    inputs = _network_inputs(network, onnx_path)
    checked = [_checked_profile(p, inputs, onnx_path, i) for i, p in enumerate(profile_list)]
    if not any(-1 in shape for shape in inputs.values()):
        checked = []  # a static graph takes no profile (TensorRT refuses one that sets no shape)
    for i, shapes in enumerate(checked):
        profile: trt.IOptimizationProfile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            if -1 in inputs[name]:
                profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        if config.add_optimization_profile(profile) < 0:
            raise UserError(f"{onnx_path}: TensorRT refused optimization profile {i} (see its log above)")

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache: trt.ITimingCache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise UserError(f"{timing_cache}: TensorRT refused this timing cache (from another TensorRT or GPU?); "
                        "delete it or give another --timing-cache")

    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build a plan (see its log above)")
    plan = memoryview(serialized).cast("B")
    with atomic_output_files(plan_path, force=True, inputs=[onnx_path]) as tmp:
        (tmp / plan_path.name).write_bytes(plan)
    if timing_cache is not None:
        measured: trt.ITimingCache = config.get_timing_cache()
        with atomic_output_files(timing_cache, force=True) as tmp:
            (tmp / timing_cache.name).write_bytes(memoryview(measured.serialize()).cast("B"))
    return PlanInfo(here.tensorrt_version, here.gpu_name, here.compute_capability,
                    profiles_json([{n: r for n, r in p.items() if -1 in inputs[n]} for p in checked]),
                    len(plan))


def _network_inputs(network: trt.INetworkDefinition, onnx_path: Path) -> dict[str, tuple[int, ...]]:
    """Input name -> shape as parsed (-1: dynamic). Shape-tensor inputs (values that set shapes)
    are refused: their profiles take values, which the manifest does not describe."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor: trt.ITensor = network.get_input(i)
        if tensor.is_shape_tensor:
            raise UserError(f"{onnx_path}: input {tensor.name!r} is a shape tensor (its values set shapes); "
                            "this builder takes data inputs only")
        shapes[tensor.name] = dims_tuple(tensor.shape)
    return shapes


def _checked_profile(profile: Profile, inputs: Mapping[str, tuple[int, ...]], onnx_path: Path,
                     index: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The profile as int tuples, checked against the parsed inputs (one line naming the input)."""
    where = f"{onnx_path}: profile {index}"
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise UserError(f"{where} names {unknown[0]!r}, not an input of the graph (inputs: {', '.join(inputs)})")
    missing = [name for name, shape in inputs.items() if -1 in shape and name not in profile]
    if missing:
        raise UserError(f"{where} has no shapes for the dynamic input {missing[0]!r} {_dims(inputs[missing[0]])}")
    out = {}
    for name, shapes in profile.items():
        if len(shapes) != 3:
            raise UserError(f"{where}: input {name!r} needs (min, opt, max) shapes, got {len(shapes)}")
        lo, opt, hi = (tuple(int(d) for d in s) for s in shapes)
        declared = inputs[name]
        for shape in (lo, opt, hi):
            if len(shape) != len(declared) or any(d != -1 and d != n for d, n in zip(declared, shape)):
                raise UserError(f"{where}: input {name!r} shape {shape} does not fit the graph's {_dims(declared)}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)) or min(lo, default=1) < 0:
            raise UserError(f"{where}: input {name!r} needs 0 <= min <= opt <= max per axis, got {lo}, {opt}, {hi}")
        out[name] = (lo, opt, hi)
    return out


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"
