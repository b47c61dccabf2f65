"""Both TensorRT plans of an export, built from the manifest and recorded in it.

`build(OUT, settings)` (the `build` verb) builds the full and the cache plan with one shared timing
cache, profiles from `runtime.deploy.tensorrt_profiles`, and updates the manifest atomically: the
plans (and the timing cache) are written under a temporary folder inside OUT, the new manifest is
checked, then the files are renamed into place and the manifest replaced last; on any failure the
earlier files are put back and nothing has changed. The builder is `engines.tensorrt.build_engine`.

Without TensorRT (CI, laptops) nothing is built: one line says so (`tensorrt_available`) and
`OUT/build_engines.sh` is the way on the target.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from omnicache_export.errors import UserError
from omnicache_export.hashing import sha256_file
from omnicache_export.pipeline import build_script, reference_io
from omnicache_export.runtime import manifest as mf

PLAN_DIR = build_script.PLAN_DIR
TIMING_CACHE = f"{PLAN_DIR}/timing.cache"  # default: shared by every build of this export


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    batches: tuple[int, int, int] = build_script.DEFAULT_BATCHES  # sample batches min, opt, max
    opt_level: int = build_script.DEFAULT_OPT_LEVEL
    workspace_mib: int | None = None
    refittable: bool = False
    timing_cache: Path | None = None  # None: OUT/tensorrt/timing.cache
    dims: Mapping[str, int] = dataclasses.field(default_factory=dict)  # sizes of dims the manifest leaves open


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) where TensorRT imports and sees a CUDA GPU, else (False, the reason as one line)."""
    from omnicache_export.engines.tensorrt_compat import require_cuda, require_tensorrt, tensorrt_version

    try:
        require_tensorrt()
        require_cuda()
    except UserError as exc:
        return False, str(exc)
    return True, tensorrt_version()


def require_tensorrt(out: Path | None = None, what: str = "") -> None:
    """UserError (one line: `what`, the reason, and with `out` the way on the target) without TensorRT and a GPU."""
    ok, reason = tensorrt_available()
    if not ok:
        where = f"; run {out}/{build_script.FILENAME} on the target" if out is not None else ""
        raise UserError(f"{what}{reason}{where}")


def _shape(s) -> tuple[int, ...]:
    return tuple(int(d) for d in s)


def plan_record(info, settings: BuildSettings) -> mf.TensorRtPlan:
    """The manifest's record of a plan from the builder's PlanInfo."""
    cc = info.compute_capability
    cc = tuple(int(x) for x in (cc.split(".") if isinstance(cc, str) else cc))
    profiles = info.profiles if isinstance(info.profiles, (list, tuple)) else [info.profiles]
    return mf.TensorRtPlan(
        tensorrt_version=str(info.tensorrt_version), gpu_name=str(info.gpu_name), compute_capability=cc,
        profiles=tuple({name: tuple(_shape(s) for s in r) for name, r in p.items()} for p in profiles),
        opt_level=settings.opt_level, refittable=settings.refittable,
        workspace_bytes=None if settings.workspace_mib is None else settings.workspace_mib << 20)


def resolved_dims(folder: Path, manifest: mf.Manifest, given: Mapping[str, int]) -> dict[str, int]:
    """Sizes of the symbolic dims the manifest leaves open: `given`, else those of the reference
    inputs saved at export (the sizes calibration ran)."""
    feeds = {}
    if all((folder / p).is_file() for p in reference_io.files()):
        feeds = {g: reference_io.load_inputs(folder, g) for g in mf.GRAPHS}
    return {**build_script.open_dims(manifest, feeds), **given}


def build_plans(folder: Path, manifest: mf.Manifest, settings: BuildSettings, into: Path,
                timing_cache: Path) -> tuple[mf.EngineEntry, dict[str, Path]]:
    """Build both plans of the export in `folder` into the folder `into`: the manifest entry (paths
    as they will be inside `folder`) and {artifact path: the file built}."""
    from omnicache_export.engines.tensorrt import build_engine

    try:
        profiles = build_script.dynamic_profiles(manifest, settings.batches,
                                                 resolved_dims(folder, manifest, settings.dims))
    except ValueError as exc:
        raise UserError(f"{exc} (--dims NAME=SIZE)") from None
    precision = build_script.graphs_precision(manifest)
    built, records = {}, {}
    for graph in mf.GRAPHS:
        plan = into / f"{graph}.plan"
        info = build_engine(folder / f"{graph}.onnx", plan, profiles[graph], timing_cache=timing_cache,
                            opt_level=settings.opt_level, refittable=settings.refittable,
                            workspace_bytes=None if settings.workspace_mib is None else settings.workspace_mib << 20)
        records[graph] = plan_record(info, settings)
        built[graph] = plan
    device = mf.tensorrt_device(records["full"].compute_capability)
    names = {g: f"{PLAN_DIR}/{device}-{precision.value}/{g}.plan" for g in mf.GRAPHS}
    entry = mf.EngineEntry(mf.TENSORRT, device, precision, names["full"], names["cache"], plans=records)
    return entry, {names[g]: built[g] for g in mf.GRAPHS}


def with_entry(manifest: mf.Manifest, entry: mf.EngineEntry, files: Mapping[str, Path]) -> mf.Manifest:
    """The manifest with `entry` (replacing one of the same key) and its files' hashes."""
    engines = tuple(e for e in manifest.engines if e.key != entry.key) + (entry,)
    artifacts = {**manifest.artifacts, **{name: mf.Artifact(sha256_file(p), p.stat().st_size) for name, p in files.items()}}
    return dataclasses.replace(manifest, engines=engines, artifacts=artifacts)


def build(out: str | os.PathLike, settings: BuildSettings) -> mf.EngineEntry:
    """`omnicache-export build OUT`: both plans built, the manifest updated atomically."""
    from omnicache_export import outputs

    out = Path(out)
    if not (out / mf.FILENAME).is_file():
        raise UserError(f"{out}: no {mf.FILENAME} (not an omnicache-export output folder)")
    require_tensorrt(out)  # before anything is read or written
    manifest = mf.read_manifest(out)  # hash-checked: the graphs are the exported ones
    outputs.clean_stale(out / PLAN_DIR)  # what a killed build left
    tmp = outputs.temp_path(out / PLAN_DIR)
    os.mkdir(tmp)
    try:
        cache_target = settings.timing_cache or out / TIMING_CACHE
        cache = tmp / "timing.cache"
        if cache_target.is_file():
            shutil.copyfile(cache_target, cache)  # augmented by this build, written back with the plans
        entry, files = build_plans(out, manifest, settings, tmp, cache)
        new = with_entry(manifest, entry, files)
        try:
            mf.Manifest.from_json(new.to_json())  # refused here, before any file moves
        except mf.SchemaError as exc:
            raise UserError(f"{out}: the plans were not recorded, the manifest would be refused: {exc}") from None
        moves = {out / name: path for name, path in files.items()}
        if cache.is_file():
            moves[Path(cache_target)] = cache
        _commit(out, moves, new, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _commit(out: Path, moves: Mapping[Path, Path], manifest: mf.Manifest, tmp: Path) -> None:
    """Rename each new file into place (the one it replaces kept aside), then the manifest; on any
    failure everything is put back as it was."""
    from omnicache_export.outputs import _signals_deferred

    done: list[tuple[Path, Path | None]] = []  # (target, its earlier file kept aside)
    created: list[Path] = []
    with _signals_deferred():
        try:
            for i, (target, new) in enumerate(moves.items()):
                for parent in reversed(target.parents):
                    if not parent.exists():
                        parent.mkdir()
                        created.append(parent)
                aside = None
                if target.exists():
                    aside = tmp / f"earlier-{i}"
                    os.replace(target, aside)
                done.append((target, aside))
                os.replace(new, target)
            mf.write_manifest(out, manifest)
        except BaseException:
            for target, aside in reversed(done):
                if aside is not None:
                    os.replace(aside, target)
                else:
                    target.unlink(missing_ok=True)
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    pass
            raise


# ------------------------------------------------------------------ the main job's side


def export_files(folder: Path, manifest: mf.Manifest, cond, uncond, batched: set[str], seed: int,
                 build_engines: bool = False) -> mf.Manifest:
    """At the end of the main job (graphs written, manifest built in the temporary `folder`): the
    reference IO of both graphs (one step each, run by the runtime on ONNX Runtime), build_engines.sh,
    and with `build_engines` (`--backend tensorrt`) both plans; returns the manifest listing them
    all as artifacts (hashed: the folder's every file is accounted for, so `--force` knows them)."""
    import numpy as np

    captured = reference_io.capture(folder / "full.onnx", folder / "cache.onnx", manifest.graphs["full"],
                                    manifest.graphs["cache"], manifest.sampling_spec(),
                                    np.array(manifest.schedule.full, dtype=bool), cond, uncond, batched, seed)
    written = reference_io.save(folder, captured)
    dims = build_script.open_dims(manifest, {g: captured[g][0] for g in mf.GRAPHS})
    try:
        text = build_script.script(manifest, dims=dims)
    except ValueError as exc:
        raise UserError(f"{build_script.FILENAME}: {exc}") from None
    path = folder / build_script.FILENAME
    path.write_text(text, encoding="utf-8")
    path.chmod(0o777 & ~_umask())
    written.append(build_script.FILENAME)
    manifest = dataclasses.replace(manifest, artifacts={**manifest.artifacts, **mf.artifact_entries(folder, written)})
    if build_engines:
        into = folder / f".{PLAN_DIR}.build"
        into.mkdir()
        entry, files = build_plans(folder, manifest, BuildSettings(dims=dims), into, folder / TIMING_CACHE)
        for name, built in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, folder / name)
        into.rmdir()
        manifest = with_entry(manifest, entry, {name: folder / name for name in files})
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_calibration_target(backend: str, device: str | None) -> str:
    """`--backend onnxruntime|tensorrt` and `--device cpu|cuda` checked before any work: the device
    calibration runs on (UserError, one line, where this machine lacks it)."""
    if backend not in ("onnxruntime", mf.TENSORRT):
        raise UserError(f"--backend {backend!r}: choose onnxruntime or tensorrt")
    device = device or ("cuda" if backend == mf.TENSORRT else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose cpu or cuda")
    if backend == mf.TENSORRT:
        if device != "cuda":
            raise UserError("--backend tensorrt runs on the GPU: --device cuda (or leave --device out)")
        require_tensorrt(what="--backend tensorrt: ")
    elif device == "cuda":
        import onnxruntime as ort
        import torch

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("--device cuda: this ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu; "
                            f"it has {', '.join(ort.get_available_providers())})")
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA GPU (the runtime's tensors live on the device)")
    return device


def calibration_loader(backend: str, device: str, spec, batch_rows: int, cond: Mapping, folder: Path):
    """How calibration loads each graph: `load(path, graph, full_io, cache_io) -> Engine`. ONNX
    Runtime on `device`; TensorRT builds a plan first (profiles for 1..batch_rows samples, the other
    open dims at the conditioning's sizes `cond`, one timing cache) and runs it. Not executed on this
    project's machines (no TensorRT)."""
    from types import SimpleNamespace

    from omnicache_export.engines import load_engine

    if backend != mf.TENSORRT:
        return lambda path, graph, full_io, cache_io: load_engine("onnxruntime", path, device)
    plans = folder / CALIBRATION_PLANS

    def load(path: Path, graph: str, full_io, cache_io):
        from omnicache_export.engines.tensorrt import build_engine

        # the manifest's view the profiles need (sampling, both graphs' IO), before the manifest exists
        view = SimpleNamespace(sampling=mf.Sampling.from_spec(spec), graphs={"full": full_io, "cache": cache_io},
                               model_io=SimpleNamespace(cache_tensors=()))
        dims = {d: int(cond[t.source].shape[axis]) for t in full_io.inputs if t.source in cond
                for axis, d in enumerate(t.shape) if axis and isinstance(d, str) and axis < cond[t.source].ndim}
        try:
            profiles = build_script.dynamic_profiles(view, (1, batch_rows, batch_rows), dims)[graph]
        except ValueError as exc:
            raise UserError(f"TensorRT profiles for calibration: {exc}") from None
        plans.mkdir(exist_ok=True)
        plan = plans / f"{Path(path).stem}.plan"
        build_engine(path, plan, profiles, timing_cache=plans / "timing.cache")
        return load_engine(mf.TENSORRT, plan, "cuda")

    return load


CALIBRATION_PLANS = "calibration-plans"  # inside the job's temporary folder; removed with calibration's graphs


def not_built_line(out: Path, backend: str) -> str:
    """The main job's line where it built no TensorRT plan, and why."""
    ok, reason = tensorrt_available()
    if ok:
        reason = f"calibrated on {backend} (--backend tensorrt builds them)"
    return (f"TensorRT engines not built: {reason}; run {out}/{build_script.FILENAME} or "
            f"`omnicache-export build {out}` on the target")
