"""`omnicache.json`, manifest version 2: the only contract between export and runtime.

The manifest is a tree of frozen records. `write_manifest` serializes them with their `to_json()`
(atomically); `read_manifest` decodes the file against the records' own type hints (every key
required, no extra key, exact JSON types, finite numbers), checks the rules that tie the fields
together and every artifact's path and hash, and refuses anything else with one line naming the
key path (`UserError`). No absolute path of the build machine is stored.

Imports no graph tooling: the runtime reads the manifest in an environment without onnx.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import os
import re
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Union

from omnicache_export import __version__
from omnicache_export.errors import UserError
from omnicache_export.hashing import sha256_file
from omnicache_export.io_spec import IOSpec, Role
from omnicache_export.runtime.graph_io import Feed, GraphIO, TensorIO
from omnicache_export.runtime.sampler import SamplingSpec

FORMAT = "omnicache-export/manifest"
VERSION = 2
FILENAME = "omnicache.json"
GRAPHS = ("full", "cache")
ANY_DEVICE = "any"  # an engine entry that runs on every device of its backend
MAX_GUIDANCE = 100.0  # |guidance scale| beyond this is a corrupted manifest, not a setting
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SchemaError(ValueError):
    """A manifest that breaks the schema: `path` is the key path (`calibration.quality.rmse`)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path, self.problem = path, problem


# ------------------------------------------------------------------ encoding and decoding by type hints


def _key(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _hint_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "a list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]


def _decode(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value  # a free JSON value (the diffusers scheduler config)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message ("not a finite number")
            return _decode(options[0], value, path)
        for option in options:
            try:
                return _decode(option, value, path)
            except SchemaError:
                continue
        raise SchemaError(path, f"expected {_hint_name(hint)}, got {_json_type(value)}")
    if hint is float:
        if type(value) not in (int, float):
            raise SchemaError(path, f"expected a number, got {_json_type(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer literal past float's range
            number = math.inf
        if not math.isfinite(number):
            raise SchemaError(path, f"{number} is not a finite number")
        return number
    if hint in (bool, int, str):
        if type(value) is not hint:
            raise SchemaError(path, f"expected {_hint_name(hint)}, got {_json_type(value)}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise SchemaError(path, f"{value!r} is not {_hint_name(hint)}") from None
    if origin in (tuple, list):
        if type(value) is not list:
            raise SchemaError(path, f"expected a list, got {_json_type(value)}")
        if origin is tuple and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SchemaError(path, f"expected {len(args)} entries, got {len(value)}")
            return tuple(_decode(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [_decode(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if type(value) is not dict:
            raise SchemaError(path, f"expected an object, got {_json_type(value)}")
        return {k: _decode(args[1], v, _key(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _decode_record(hint, value, path)
    raise TypeError(f"no decoder for {hint!r}")  # a schema bug, not bad input


def _decode_record(cls: type, value: Any, path: str) -> Any:
    if type(value) is not dict:
        raise SchemaError(path, f"expected an object, got {_json_type(value)}")
    fields, hints = _fields(cls), typing.get_type_hints(cls)
    names = [f.name for f in fields]
    optional = {f.name for f in fields if f.metadata.get("optional")}  # may be absent: its default
    missing = [n for n in names if n not in value and n not in optional]
    if missing:
        raise SchemaError(_key(path, missing[0]), "missing key")
    extra = [k for k in value if k not in names]
    if extra:
        raise SchemaError(_key(path, extra[0]), f"unknown key (manifest version {VERSION} has no such field)")
    return cls(**{n: _decode(hints[n], value[n], _key(path, n)) for n in names if n in value})


def _encode(hint: Any, value: Any) -> Any:
    """JSON value of `value` as `hint` types it; non-finite floats become null where null is allowed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and isinstance(value, numbers.Real) and not math.isfinite(value):
            return None
        kinds = [a for a in args if a is not type(None)]
        match = next((a for a in kinds if _instance_of(value, a)), kinds[0])
        return _encode(match, value)
    if hint in (bool, int, float, str):
        return hint(value)
    if isinstance(value, enum.Enum):
        return value.value
    if origin in (tuple, list):
        item = (lambda i: args[i]) if origin is tuple and args[-1] is not Ellipsis else (lambda i: args[0])
        return [_encode(item(i), v) for i, v in enumerate(value)]
    if origin is dict:
        return {k: _encode(args[1], v) for k, v in value.items()}
    return value.to_json()  # a record (ours, GraphIO, IOSpec)


def _instance_of(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


class _Record:
    """Serialized by its fields' type hints, in field order."""

    def to_json(self) -> dict:
        hints = typing.get_type_hints(type(self))
        return {f.name: _encode(hints[f.name], getattr(self, f.name)) for f in _fields(type(self))}


# ------------------------------------------------------------------ the records

record = dataclasses.dataclass(frozen=True)


@record
class Source(_Record):
    """The input model: its file name (never its path) and hash."""

    name: str
    sha256: str


@record
class CacheTensor(_Record):
    name: str
    dtype: str  # ONNX element type name
    shape: tuple[int | str, ...]  # "batch", "batch*k" (k per sample, e.g. frames) or another symbol


@record
class CacheStream(_Record):
    """One stream the block stack writes: h_L (`exit`) and the h_0 it is a residual over (`entry`)."""

    entry: str | None  # None: h_L itself is cached
    exit: str


@record
class BlockRegion(_Record):
    """The block stack the cache graph skips; stream i is cached in `ModelIO.cache_tensors[i]`."""

    method: str  # how it was found, for display ("module scopes (torchscript)" ...)
    streams: tuple[CacheStream, ...]
    block_lists: dict[str, int]  # module list -> number of blocks ({} without scopes)
    n_blocks: int
    n_blocks_estimated: bool
    node_share: float
    flop_share: float | None


@record
class ModelIO(_Record):
    inputs: tuple[IOSpec, ...]  # the model's inputs with their roles
    output: str
    cache_tensors: tuple[CacheTensor, ...]
    block_region: BlockRegion
    # integer input -> [low, high): the rows of the embedding table it indexes (class labels), checked
    # by the runtime before sampling. Optional (manifests written before it lack it: no check).
    index_ranges: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict, metadata={"optional": True})


@record
class Sampling(_Record):
    """SamplingSpec's fields, stored; `Manifest.sampling_spec()` builds the SamplingSpec."""

    scheduler: dict[str, Any]  # diffusers scheduler config with _class_name
    n_steps: int
    latent: str
    timestep: str | None
    output: str
    latent_shape: tuple[int, ...]
    timestep_dtype: str
    timestep_shape: tuple[int, ...] | None
    latent_dtype: str
    timestep_scale: float
    guidance_scale: float
    learned_sigma: bool
    static_batch: int | None

    @classmethod
    def from_spec(cls, spec: SamplingSpec) -> Sampling:
        values = dataclasses.asdict(spec)
        for name in ("latent_shape", "timestep_shape"):
            values[name] = None if values[name] is None else tuple(values[name])
        return cls(**values)

    def to_spec(self) -> SamplingSpec:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("latent_shape", "timestep_shape"):  # SamplingSpec compares them as lists
            values[name] = None if values[name] is None else list(values[name])
        return SamplingSpec(**values)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0


@record
class Schedule(_Record):
    full: tuple[bool, ...]  # per step: True = full step
    name: str  # for display
    family: str  # the calibration's ScheduleFamily value
    pattern: str  # "FFCFC...": `full` as letters
    n_full: int
    n_cached: int
    max_consecutive: int  # the limit on consecutive cached steps calibration ran under (auto: the largest tried)
    # `--max-consecutive auto` (calibration picked the run limit) and the chosen schedule's longest run.
    # Optional (manifests written before them: a fixed limit, the run not recorded).
    max_consecutive_auto: bool = dataclasses.field(default=False, metadata={"optional": True})
    max_run: int | None = dataclasses.field(default=None, metadata={"optional": True})


class Stage(str, enum.Enum):
    """Which frequency filter a step's correction passes through."""

    LOW = "low"
    HIGH = "high"
    ALL = "all"


@record
class FilterParams(_Record):
    """The stage-aware filter: low-pass before step `boundary`, high-pass from it; None: all-pass."""

    name: str
    boundary: int
    low_rho: float | None
    low_order: int
    high_rho: float | None
    high_order: int


@record
class Correction(_Record):
    """The chosen correction, per step; the cache graph holds the tables as constants."""

    name: str
    gammas: tuple[float | None, ...]  # None where no correction applies
    ratios: tuple[float, ...]  # a_i, the time ratio of the last two full steps' trend
    coefficients: tuple[float, ...]
    blend: tuple[float, ...]
    cache_trend: tuple[float, ...]
    filter: FilterParams
    stages: tuple[Stage, ...]
    filter_hw: tuple[int, int] | None  # the filtered axes of the output (its last two)
    # σ, the second-order cache trend's table (N entries), or () where the correction has none
    cache_trend2: tuple[float, ...] = dataclasses.field(default=(), metadata={"optional": True})


@record
class Quality(_Record):
    """The chosen candidate against sampling without cache on the calibration samples it was chosen
    on (psnr_db_mean, psnr_db_min, rmse: optimistic, the choice's luck included) and on samples that
    played no part in the choice (validation_*: the figure to expect on new conditions).
    None: not finite (an infinite PSNR: identical to the reference), or, for validation_psnr_db in
    manifests written before it, not measured."""

    psnr_db_mean: float | None
    psnr_db_min: float | None
    rmse: float | None
    validation_psnr_db: float | None = dataclasses.field(default=None, metadata={"optional": True})
    validation_psnr_min_db: float | None = dataclasses.field(default=None, metadata={"optional": True})
    validation: str = dataclasses.field(default="", metadata={"optional": True})  # split | seeds ("": none)
    validation_samples: int = dataclasses.field(default=0, metadata={"optional": True})


@record
class CalibrationCost(_Record):
    """What choosing cost, in model evaluations (one per sample and step) and seconds: the scoring
    of candidates (by successive halving, or every one on every row), what scoring every candidate
    on every choosing row would have taken, and the rest (reference run, γ fits, validation)."""

    halving: bool
    scoring_evaluations: int
    exhaustive_evaluations: int
    other_evaluations: int
    scoring_seconds: float


@record
class CandidateScore(_Record):
    """One (schedule, correction) pair calibration sampled and scored."""

    schedule: str
    family: str
    pattern: str
    correction: str
    n_full: int
    n_cached: int
    psnr_db: float | None
    psnr_min_db: float | None
    rmse: float | None
    chosen: bool
    n_samples: int | None = dataclasses.field(default=None, metadata={"optional": True})  # rows scored on


@record
class Calibration(_Record):
    n_samples: int
    seed: int
    synthesized_conditioning: bool
    candidates: tuple[CandidateScore, ...]
    quality: Quality
    seconds: float
    cost: CalibrationCost | None = dataclasses.field(default=None, metadata={"optional": True})


@record
class Speed(_Record):
    cost_ratio: float  # cache step / full step, measured
    full_ms: float
    cache_ms: float
    predicted_speedup: float
    measured_speedup: float | None  # None: not measured


@record
class Verification(_Record):
    """The exported graphs run by the runtime against calibration's run of the chosen candidate."""

    runtime_vs_calibration_max_rel_err: float
    tolerance: float
    runtime_psnr_db_vs_no_cache: float | None


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"


TENSORRT = "tensorrt"  # the backend whose engine files are TensorRT plans (built for one GPU)
Shape = tuple[int, ...]


def tensorrt_device(compute_capability: tuple[int, int]) -> str:
    """The device key of TensorRT plans built for GPUs of this compute capability ("cuda-sm90"): a
    plan runs only on the GPU kind it was built for, so one export may hold plans for several."""
    return f"cuda-sm{compute_capability[0]}{compute_capability[1]}"


@record
class TensorRtPlan(_Record):
    """What one graph's TensorRT plan was built with and for. The runtime compares it with the
    TensorRT and GPU at hand before it deserializes the plan (`engines.tensorrt.check_plan_compatible`):
    a plan loads only in the TensorRT version that built it and runs only on that GPU kind."""

    tensorrt_version: str  # "10.16.1.11"
    gpu_name: str  # "NVIDIA H200"
    compute_capability: tuple[int, int]
    # optimization profiles: input -> (min, opt, max) shape, every dynamic input of the graph
    profiles: tuple[dict[str, tuple[Shape, Shape, Shape]], ...]
    opt_level: int  # the builder optimization level
    refittable: bool  # weights can be swapped (LoRA) without a rebuild
    workspace_bytes: int | None  # the workspace limit (None: TensorRT's default, the GPU's memory)


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


@record
class EngineEntry(_Record):
    """The two graph files one backend runs on one device (or `any`) at one precision."""

    backend: str  # an engines backend name ("onnxruntime", "tensorrt", ...)
    device: str  # "any", "cpu", "cuda", ...; TensorRT plans: `tensorrt_device` of their GPU ("cuda-sm90")
    precision: Precision
    full: str  # paths relative to the export folder, listed in artifacts
    cache: str
    # TensorRT plans only: graph ("full", "cache") -> what its plan was built with and for.
    # Optional (absent from the other backends' entries and from manifests written before it).
    plans: dict[str, TensorRtPlan] = dataclasses.field(default_factory=dict, metadata={"optional": True})

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision.value}"

    def to_json(self) -> dict:
        data = super().to_json()
        if not self.plans:  # the other backends' entries read as before
            del data["plans"]
        return data


@record
class Artifact(_Record):
    sha256: str
    bytes: int


@record
class TensorRTReadiness(_Record):
    """One graph checked against one TensorRT line's ONNX parser matrix at export (graph.tensorrt_check)."""

    graph: str  # "source" (the input model), "full", "cache"
    line: str  # the TensorRT line: "10.3", "10.16", "11"
    table_version: str  # the operator table it was checked against
    ready: bool
    first_finding: str | None  # the first finding (node, op, rule); None where ready


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest(_Record):
    format: str = FORMAT
    version: int = VERSION
    created_by: str = f"omnicache-export {__version__}"
    source: Source
    model_io: ModelIO
    graphs: dict[str, GraphIO]  # "full", "cache"
    sampling: Sampling
    timesteps: tuple[float, ...]
    schedule: Schedule
    correction: Correction
    calibration: Calibration
    speed: Speed
    verification: Verification
    engines: tuple[EngineEntry, ...]
    artifacts: dict[str, Artifact]  # path relative to the folder -> hash and size
    # Optional (manifests written before it lack it): the TensorRT readiness check's result per graph and line.
    tensorrt_readiness: tuple[TensorRTReadiness, ...] = dataclasses.field(default=(), metadata={"optional": True})
    # The unconditional conditioning a served request without `uncond/<name>` takes (an npz of one
    # row per input, listed in artifacts; `load_uncond`); None: not stored (no guidance).
    uncond: str | None = dataclasses.field(default=None, metadata={"optional": True})
    # Where it was read from (not serialized): engine_paths resolves inside it.
    folder: Path | None = dataclasses.field(default=None, compare=False, repr=False, metadata={"json": False})

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Decode and check a manifest (raises SchemaError); the files are `read_manifest`'s."""
        if type(data) is not dict:
            raise SchemaError("", f"expected a JSON object, got {_json_type(data)}")
        if data.get("format") != FORMAT:
            raise SchemaError("", f"not an omnicache-export manifest (format {data.get('format')!r})")
        version = data.get("version")
        if type(version) is not int or version != VERSION:
            advice = "upgrade omnicache-export" if type(version) is int and version > VERSION else "re-export"
            raise SchemaError("", f"manifest version {version!r} is not supported (this runtime reads {VERSION}): {advice}")
        manifest = _decode_record(cls, data, "")
        check_rules(manifest)
        return manifest

    def sampling_spec(self) -> SamplingSpec:
        return self.sampling.to_spec()

    def engine(self, backend: str, device: str = ANY_DEVICE, precision: str | Precision | None = None) -> EngineEntry:
        """The entry for `backend` on `device` (an `any` entry serves every device), at `precision`
        (None: the only one there is). An exact device match wins over `any`; a device family
        ("cuda") also matches its keyed members (TensorRT's "cuda-sm90")."""
        have = ", ".join(e.key for e in self.engines)
        try:
            wanted = None if precision is None else Precision(precision)
        except ValueError:
            raise UserError(f"precision {precision!r}: not one of {', '.join(p.value for p in Precision)}") from None
        matches = [e for e in self.engines if e.backend == backend and wanted in (None, e.precision)
                   and (e.device in (device, ANY_DEVICE) or e.device.startswith(f"{device}-"))]  # cuda: cuda-sm90 too
        exact = [e for e in matches if e.device == device]
        matches = exact or matches
        label = f"{backend}/{device}/{wanted.value if wanted else '*'}"
        if not matches:
            raise UserError(f"the export has no engine {label} (it has: {have})")
        if len(matches) > 1:
            what = "device" if len({e.device for e in matches}) > 1 else "precision"
            raise UserError(f"the export has several engines for {label} ({', '.join(e.key for e in matches)}): "
                            f"give the {what}")
        return matches[0]

    def engine_paths(self, backend: str, device: str = ANY_DEVICE,
                     precision: str | Precision | None = None) -> tuple[Path, Path]:
        """(full graph, cache graph) of the engine entry: absolute paths, inside the folder."""
        if self.folder is None:
            raise ValueError("this manifest was not read from a folder (use read_manifest)")
        entry = self.engine(backend, device, precision)
        return resolve_inside(self.folder, entry.full), resolve_inside(self.folder, entry.cache)


# ------------------------------------------------------------------ the rules across fields


def check_rules(m: Manifest) -> None:
    """The rules the types alone do not express (raises SchemaError)."""
    _check_sampling(m)
    _check_steps(m)
    _check_calibration(m)
    _check_io(m)
    _check_files_listed(m)
    _check_tensorrt_readiness(m)
    _check_plans(m)


def _check_tensorrt_readiness(m: Manifest) -> None:
    for i, r in enumerate(m.tensorrt_readiness):
        if r.ready != (r.first_finding is None):
            raise SchemaError(f"tensorrt_readiness[{i}]", "ready exactly when there is no first_finding")


def _check_plans(m: Manifest) -> None:
    """TensorRT entries carry one plan record per graph, built together (one TensorRT, one GPU), for
    the device key of that GPU, with profiles that cover every dynamic input of the graph."""
    for i, entry in enumerate(m.engines):
        path = f"engines[{i}]"
        if entry.backend != TENSORRT:
            if entry.plans:
                raise SchemaError(f"{path}.plans", f"only {TENSORRT} entries record plans")
            continue
        if sorted(entry.plans) != sorted(GRAPHS):
            raise SchemaError(f"{path}.plans", f"needs one plan record per graph ({', '.join(GRAPHS)})")
        first = entry.plans[GRAPHS[0]]
        for graph in GRAPHS:
            plan = entry.plans[graph]
            where = _key(f"{path}.plans", graph)
            built = (plan.tensorrt_version, plan.gpu_name, tuple(plan.compute_capability))
            if built != (first.tensorrt_version, first.gpu_name, tuple(first.compute_capability)):
                raise SchemaError(where, "the two plans were built by different TensorRT versions or GPUs")
            if entry.device != tensorrt_device(plan.compute_capability):
                raise SchemaError(f"{path}.device", f"{entry.device!r}: plans for sm {_cc(plan.compute_capability)} "
                                  f"are device {tensorrt_device(plan.compute_capability)!r}")
            _check_profiles(plan.profiles, m.graphs[graph].inputs, f"{where}.profiles")


def _check_profiles(profiles, inputs: tuple[TensorIO, ...], path: str) -> None:
    if not profiles:
        raise SchemaError(path, "no optimization profile")
    shapes = {t.name: t.shape for t in inputs}
    dynamic = [t.name for t in inputs if any(isinstance(d, str) for d in t.shape)]
    for p, profile in enumerate(profiles):
        missing = [n for n in dynamic if n not in profile]
        if missing:
            raise SchemaError(f"{path}[{p}]", f"no range for the dynamic input {missing[0]!r}")
        for name, (low, opt, high) in profile.items():
            where = _key(f"{path}[{p}]", name)
            if name not in shapes:
                raise SchemaError(where, "not an input of the graph")
            if not len(low) == len(opt) == len(high) == len(shapes[name]):
                raise SchemaError(where, f"min, opt and max must have the input's rank {len(shapes[name])}")
            for axis, (d, a, b, c) in enumerate(zip(shapes[name], low, opt, high)):
                if not 0 < a <= b <= c or (isinstance(d, int) and not a == c == d):
                    raise SchemaError(where, f"axis {axis}: min {a}, opt {b}, max {c} (graph dim {d!r}) "
                                      "need 0 < min <= opt <= max, and the graph's size where it is static")


def _check_sampling(m: Manifest) -> None:
    s = m.sampling
    if s.n_steps < 1:
        raise SchemaError("sampling.n_steps", f"{s.n_steps}: needs at least one step")
    if abs(s.guidance_scale) > MAX_GUIDANCE:
        raise SchemaError("sampling.guidance_scale", f"{s.guidance_scale:g} is absurd (|scale| > {MAX_GUIDANCE:g})")
    if any(d <= 0 for d in s.latent_shape):
        raise SchemaError("sampling.latent_shape", f"{list(s.latent_shape)}: dims must be positive")
    if s.static_batch is not None and (s.static_batch <= 0 or (s.cfg and s.static_batch % 2)):
        raise SchemaError("sampling.static_batch", f"{s.static_batch}: must be positive, and even under guidance")
    if not isinstance(s.scheduler.get("_class_name"), str):
        raise SchemaError("sampling.scheduler._class_name", "missing key (a diffusers scheduler config)")


def _check_steps(m: Manifest) -> None:
    n, sch = m.sampling.n_steps, m.schedule
    if len(m.timesteps) != n:
        raise SchemaError("timesteps", f"{len(m.timesteps)} entries, sampling.n_steps is {n}")
    if len(sch.full) != n:
        raise SchemaError("schedule.full", f"{len(sch.full)} steps, sampling.n_steps and timesteps have {n}")
    if not sch.full[0]:
        raise SchemaError("schedule.full[0]", "step 0 is cached (the first step must be full: nothing to reuse)")
    if sch.pattern != "".join("F" if f else "C" for f in sch.full):
        raise SchemaError("schedule.pattern", f"{sch.pattern!r} does not spell schedule.full")
    if (sch.n_full, sch.n_cached) != (sum(sch.full), n - sum(sch.full)):
        raise SchemaError("schedule.n_full", f"{sch.n_full} full / {sch.n_cached} cached do not count schedule.full")
    c = m.correction
    for name in ("gammas", "ratios", "coefficients", "blend", "cache_trend", "stages"):
        if len(getattr(c, name)) != n:
            raise SchemaError(f"correction.{name}", f"{len(getattr(c, name))} entries, sampling.n_steps is {n}")
    if len(c.cache_trend2) not in (0, n):
        raise SchemaError("correction.cache_trend2",
                          f"{len(c.cache_trend2)} entries, sampling.n_steps is {n} (or none)")
    if c.filter_hw is not None and min(c.filter_hw) <= 0:
        raise SchemaError("correction.filter_hw", f"{list(c.filter_hw)}: must be positive")


def _check_calibration(m: Manifest) -> None:
    sch, cal = m.schedule, m.calibration
    if sch.max_consecutive < 0:
        raise SchemaError("schedule.max_consecutive", f"{sch.max_consecutive}: must be >= 0")
    if sch.max_run is not None:
        longest = max((len(r) for r in sch.pattern.split("F")), default=0)
        if sch.max_run != longest:
            raise SchemaError("schedule.max_run", f"{sch.max_run}, the pattern's longest run of cached steps is {longest}")
        if sch.max_run > sch.max_consecutive:
            raise SchemaError("schedule.max_run", f"{sch.max_run} > schedule.max_consecutive {sch.max_consecutive}")
    q = cal.quality
    if q.validation not in ("", "split", "seeds"):
        raise SchemaError("calibration.quality.validation", f"{q.validation!r} is not one of '', 'split', 'seeds'")
    if q.validation_samples < 0 or (q.validation_samples > 0) != bool(q.validation):
        raise SchemaError("calibration.quality.validation_samples",
                          f"{q.validation_samples}: must be positive exactly where calibration.quality.validation is set")
    if q.validation_psnr_db is not None and not q.validation:
        raise SchemaError("calibration.quality.validation_psnr_db", "a validation figure needs calibration.quality.validation")
    c = cal.cost
    if c is not None:
        for name in ("scoring_evaluations", "exhaustive_evaluations", "other_evaluations", "scoring_seconds"):
            if getattr(c, name) < 0:
                raise SchemaError(f"calibration.cost.{name}", f"{getattr(c, name)}: must be >= 0")
        if c.scoring_evaluations > c.exhaustive_evaluations:
            raise SchemaError("calibration.cost.scoring_evaluations",
                              f"{c.scoring_evaluations} > calibration.cost.exhaustive_evaluations {c.exhaustive_evaluations}")


def _check_io(m: Manifest) -> None:
    io = m.model_io
    roles = {r.value for r in Role}
    names = [s.name for s in io.inputs]
    for i, spec in enumerate(io.inputs):
        if spec.role not in roles - {Role.OUTPUT.value}:
            raise SchemaError(f"model_io.inputs[{i}].role", f"{spec.role!r} is not an input role")
    if len(set(names)) != len(names):
        raise SchemaError("model_io.inputs", "duplicate input names")
    dtypes = {s.name: s.dtype for s in io.inputs}
    for name, (low, high) in io.index_ranges.items():
        path = _key("model_io.index_ranges", name)
        if name not in dtypes or not dtypes[name].startswith(("INT", "UINT")):
            raise SchemaError(path, f"{name!r} is not an integer model input")
        if not 0 <= low < high:
            raise SchemaError(path, f"[{low}, {high}) is not a range of table rows")
    for key in ("latent", "timestep"):
        name = getattr(m.sampling, key)
        if name is not None and name not in names:
            raise SchemaError(f"sampling.{key}", f"{name!r} is not a model input")
    if io.output != m.sampling.output:
        raise SchemaError("model_io.output", f"{io.output!r}, sampling.output is {m.sampling.output!r}")
    if len(io.block_region.streams) != len(io.cache_tensors):
        raise SchemaError("model_io.block_region.streams", "one stream per cache tensor")
    if "/" in m.source.name or "\\" in m.source.name:
        raise SchemaError("source.name", "a file name, not a path")
    if not _SHA256.fullmatch(m.source.sha256):
        raise SchemaError("source.sha256", "not a sha256 hex digest")
    if sorted(m.graphs) != sorted(GRAPHS):
        odd = sorted(set(m.graphs) ^ set(GRAPHS))[0]
        raise SchemaError(_key("graphs", odd), "missing key" if odd in GRAPHS else "unknown graph (full, cache)")
    caches = {t.name for t in io.cache_tensors}
    allowed = {  # feed kinds each place may hold
        ("full", "inputs"): {Feed.MODEL},
        ("full", "outputs"): {Feed.OUTPUT, Feed.CACHE},
        ("cache", "inputs"): {Feed.MODEL, Feed.STEP, Feed.FULL_PREV, Feed.FULL_PREV2, Feed.CACHE, Feed.CACHE_PREV,
                              Feed.CACHE_PREV2},
        ("cache", "outputs"): {Feed.OUTPUT, Feed.UNCORRECTED},
    }
    for (graph, side), feeds in allowed.items():
        tensors: tuple[TensorIO, ...] = getattr(m.graphs[graph], side)
        for i, t in enumerate(tensors):
            path = f"graphs.{graph}.{side}[{i}]"
            if t.feed not in feeds:
                raise SchemaError(f"{path}.feed", f"{t.feed.value!r} cannot be one of the {graph} graph's {side}")
            if t.feed is Feed.MODEL and t.source not in names:
                raise SchemaError(f"{path}.source", f"{t.source!r} is not a model input")
            if (t.feed in (Feed.CACHE, Feed.CACHE_PREV, Feed.CACHE_PREV2)
                    and (t.source if side == "inputs" else t.name) not in caches):
                raise SchemaError(path, f"{t.name!r} is not one of model_io.cache_tensors")
        outputs = [t.name for t in tensors if t.feed is Feed.OUTPUT]
        if side == "outputs" and outputs != [io.output]:
            raise SchemaError(f"graphs.{graph}.outputs", f"must hold the model output {io.output!r} once")


def _check_files_listed(m: Manifest) -> None:
    for name, artifact in m.artifacts.items():
        path = _key("artifacts", name)
        problem = unsafe_path(name)
        if problem:
            raise SchemaError(path, problem)
        if not _SHA256.fullmatch(artifact.sha256):
            raise SchemaError(f"{path}.sha256", "not a sha256 hex digest")
        if artifact.bytes < 0:
            raise SchemaError(f"{path}.bytes", "negative")
    if m.uncond is not None and m.uncond not in m.artifacts:
        raise SchemaError("uncond", f"{m.uncond!r} is not listed in artifacts")
    if not m.engines:
        raise SchemaError("engines", "no engine entry")
    keys = [e.key for e in m.engines]
    if len(set(keys)) != len(keys):
        raise SchemaError("engines", f"two entries for {next(k for k in keys if keys.count(k) > 1)}")
    for i, entry in enumerate(m.engines):
        for graph in GRAPHS:
            name = getattr(entry, graph)
            if name not in m.artifacts:
                raise SchemaError(f"engines[{i}].{graph}", f"{name!r} is not listed in artifacts")


# ------------------------------------------------------------------ files


def unsafe_path(name: str) -> str | None:
    """Why an artifact path may not be used (None: it is a plain relative path)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or name in (".", "./"):
        return "empty path"
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return f"path {name!r} is absolute"
    if ".." in posix.parts or ".." in windows.parts:
        return f"path {name!r} contains '..'"
    return None


def resolve_inside(folder: Path, name: str) -> Path:
    """`folder/name` with symlinks followed; refuses (UserError) a path that leaves the folder. The
    message is the same whether or not anything exists outside."""
    problem = unsafe_path(name)
    if problem:
        raise UserError(f"{folder}: {problem}")
    root = Path(folder).resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"{folder}: path {name!r} cannot be resolved") from None
    if root not in target.parents:
        raise UserError(f"{folder}: path {name!r} resolves outside the export folder")
    return target


def artifact_entries(folder: Path, names: Sequence[str]) -> dict[str, Artifact]:
    """Hash and size of each named file of the export and of its external-data file
    (`<name>.data`, where the graph has one), by path relative to the folder."""
    entries = {}
    for name in names:
        for rel in (name, f"{name}.data"):
            path = resolve_inside(folder, rel)
            if rel == name or path.is_file():
                entries[rel] = Artifact(sha256_file(path), path.stat().st_size)
    return entries


def _check_files(folder: Path, m: Manifest) -> None:
    """Every artifact inside the folder and unchanged; every file an engine opens listed."""
    targets = {name: resolve_inside(folder, name) for name in m.artifacts}  # all paths before any read
    for name, artifact in m.artifacts.items():
        target = targets[name]
        if not target.is_file():
            raise UserError(f"{folder}: artifact {name!r} is missing")
        if target.stat().st_size != artifact.bytes or sha256_file(target) != artifact.sha256:
            raise UserError(f"{folder}: artifact {name!r} changed since export (sha256 mismatch)")
    for i, entry in enumerate(m.engines):
        for graph in GRAPHS:
            data = f"{getattr(entry, graph)}.data"  # external weights the engine would open beside the graph
            if data not in m.artifacts and os.path.lexists(Path(folder) / data):
                raise UserError(f"{folder}: engines[{i}].{graph}: {data!r} is read with the graph but not listed in artifacts")


UNCOND_FILE = "uncond.npz"


def load_uncond(manifest: Manifest) -> dict[str, object]:
    """The export's stored unconditional rows (numpy arrays by input name; {} where none is stored),
    read once into memory and checked against the artifact's hash (UserError if it changed)."""
    import io

    import numpy as np

    if manifest.uncond is None:
        return {}
    folder = manifest.folder or Path(".")
    path = resolve_inside(folder, manifest.uncond)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{folder}: artifact {manifest.uncond!r} cannot be read ({exc.strerror})") from None
    import hashlib

    artifact = manifest.artifacts[manifest.uncond]
    if len(data) != artifact.bytes or hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise UserError(f"{folder}: artifact {manifest.uncond!r} changed since export (sha256 mismatch)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{folder}: artifact {manifest.uncond!r} is not a readable .npz ({exc})") from None


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `folder/omnicache.json` atomically, after checking the reader will accept it."""
    folder = Path(folder)
    data = manifest.to_json()
    try:
        Manifest.from_json(json.loads(json.dumps(data)))
    except SchemaError as exc:
        raise UserError(f"manifest not written, it would be refused: {exc}") from None
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600: the manifest gets the user's umask like the graphs
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / FILENAME


def read_manifest(folder: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Load, decode and check `folder/omnicache.json`; with `check_files`, also every artifact's
    hash. Refuses anything else with one line (UserError)."""
    folder = Path(folder)
    path = resolve_inside(folder, FILENAME)  # before looking at it: a link out reads nothing outside
    if not path.is_file():
        raise UserError(f"{folder}: no {FILENAME} (not an omnicache-export output folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deep)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_json(data)
    except SchemaError as exc:
        raise UserError(f"{path}: {exc}") from None
    if check_files:
        _check_files(folder, manifest)
    return dataclasses.replace(manifest, folder=folder.resolve())
