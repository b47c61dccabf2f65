"""A Triton model repository for an export: `omnicache-export triton-repo OUT -o REPO`.

    REPO/
      omnicache/                    Python backend: the denoising loop (serving/triton_model.py)
        config.pbtxt                the request contract as Triton tensors; file hashes as parameters
        1/model.py                  imports OmniCacheModel from the installed omnicache-export
        1/export/omnicache.json     the manifest, and uncond.npz where the export stores one
      omnicache_full/               the full graph, and omnicache_cache/ the cache graph, as one of
        config.pbtxt                  tensorrt:   platform tensorrt_plan, 1/model.plan
        1/...                         onnxruntime: platform onnxruntime_onnx, 1/model.onnx (a folder
                                        holding the graph and its .data where it has external data)
                                      python-onnxruntime: backend python, 1/model.py + the graph

Tensor names are the manifest's, `/` included (`uncond/class_labels`): Triton takes any name over
HTTP and gRPC (checked on the bundled server by tests/test_triton_repo.py), so a request is the
`--inputs` npz row as it is. The engine models batch axis 0 (dynamic batching, max_batch_size =
requests in flight x rows per request) where every tensor of the graph has the batch axis and the
export left it dynamic; else they take whole batches (max_batch_size 0). Every file copied is hashed
against the manifest while it is copied; the Python models check theirs again at load.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES
from omnicache_export.runtime.deploy import TRITON_TYPES, TritonPlatform, tensorrt_profiles, triton_model_config
from omnicache_export.runtime.manifest import FILENAME, GRAPHS, Manifest
from omnicache_export.serving import triton_model as tm

VERSION = "1"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ONNX_TYPE = {np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k != "BFLOAT16"}  # numpy -> ONNX type name


class EngineKind(str, enum.Enum):
    """What runs the two graphs."""

    TENSORRT = "tensorrt"  # tensorrt_plan models on the export's TensorRT plans
    ONNXRUNTIME = "onnxruntime"  # onnxruntime_onnx models on full.onnx / cache.onnx
    PYTHON_ONNXRUNTIME = "python-onnxruntime"  # Python-backend models running the graphs on ONNX Runtime


@dataclasses.dataclass
class RepoSummary:
    models: list[str]
    engines: EngineKind
    notes: list[str]


_MODEL_PY = '''"""Triton Python-backend model written by omnicache-export triton-repo."""
try:
    from omnicache_export.serving.triton_model import {cls} as TritonPythonModel  # noqa: F401
except ImportError as exc:
    raise ImportError(f"omnicache-export is not installed in Triton's Python environment ({{exc}}): "
                      "pip install omnicache-export there") from exc
'''


def _model_py(cls: str) -> str:
    return _MODEL_PY.format(cls=cls)


def _copy_checked(src: Path, dst: Path, sha256: str | None = None) -> str:
    """Copy, hashing what is read; refuses a file whose hash is not the manifest's. Returns the hash."""
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "wb") as g:
        while block := f.read(1 << 20):
            digest.update(block)
            g.write(block)
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        raise UserError(f"{src}: changed since export (sha256 mismatch)")
    return got


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def _engine_batch(manifest: Manifest, graph: str, max_batch: int, platform: TritonPlatform) -> int:
    """max_batch_size of an engine model: 0 where Triton cannot batch the graph's axis 0."""
    if platform is TritonPlatform.PYTHON:
        return 0
    rows = (2 if manifest.sampling.cfg else 1) * max_batch
    try:
        triton_model_config(manifest, graph, platform, rows)
    except ValueError:  # a fixed batch, or tensors without a batch axis
        return 0
    return rows


def omnicache_config(manifest: Manifest, name: str, params: dict[str, str], gpu: bool) -> str:
    """config.pbtxt of the model `omnicache`: the request contract (serving.requests) as Triton tensors."""
    from omnicache_export.runtime.manifest import load_uncond
    from omnicache_export.serving.requests import RequestContract

    contract = RequestContract(manifest, load_uncond(manifest))  # uncond/<name> optional where stored

    def entry(spec, optional: bool) -> str:
        dtype = TRITON_TYPES[_ONNX_TYPE[spec.dtype]]
        text = f'  {{ name: "{spec.name}" data_type: {dtype} dims: [ {", ".join(map(str, spec.shape))} ]'
        return text + (" optional: true }" if optional else " }")

    inputs = ",\n".join(entry(s, s.optional) for s in contract.inputs)
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return (f"# omnicache-export: the denoising loop; requests of one row, stepped together, engines via BLS\n"
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            f"input [\n{inputs}\n]\noutput [\n{entry(contract.output, False)}\n]\n"
            f"instance_group [ {{ kind: {kind} count: 1 }} ]\n" + _parameters(params))


def _tensorrt_entry(manifest: Manifest, precision: str | None):
    """The export's TensorRT plans (None: it has none yet); several precisions need `precision`."""
    if not any(e.backend == "tensorrt" for e in manifest.engines):
        return None
    return manifest.engine("tensorrt", "cuda", precision)


def _engine_model(manifest: Manifest, graph: str, root: Path, name: str, kind: EngineKind, max_batch: int,
                  precision: str | None, notes: list[str]) -> None:
    folder = manifest.folder
    version = root / name / VERSION
    version.mkdir(parents=True)
    platform = {EngineKind.TENSORRT: TritonPlatform.TENSORRT, EngineKind.ONNXRUNTIME: TritonPlatform.ONNXRUNTIME,
                EngineKind.PYTHON_ONNXRUNTIME: TritonPlatform.PYTHON}[kind]
    batch = _engine_batch(manifest, graph, max_batch, platform)
    config = triton_model_config(manifest, graph, platform, batch, name=name)
    params: dict[str, str] = {}
    if kind is EngineKind.TENSORRT:
        entry = _tensorrt_entry(manifest, precision)
        config += 'instance_group [ { kind: KIND_GPU count: 1 } ]\n' + _profile_comment(manifest, graph, max_batch)
        if entry is not None:
            source = getattr(entry, graph)
            _copy_checked(folder / source, version / "model.plan", manifest.artifacts[source].sha256)
        elif graph == GRAPHS[0]:
            notes.append("the export has no TensorRT plans yet: build them on the GPU (OUT/build_engines.sh), then "
                         f"rerun triton-repo, or put them at {name.removesuffix('_full')}_{{full,cache}}/1/model.plan")
    else:
        source = getattr(manifest.engine("onnxruntime", precision=precision), graph)
        data = f"{source}.data"
        external = data in manifest.artifacts
        if kind is EngineKind.ONNXRUNTIME:  # Triton's ONNX Runtime backend: model.onnx, a folder with external data
            target = version / "model.onnx" / "model.onnx" if external else version / "model.onnx"
        else:
            target = version / Path(source).name
            (version / "model.py").write_text(_model_py("OnnxRuntimeGraphModel"))
            params[tm.GRAPH_FILE] = target.name
        params[f"{tm.SHA256}:{target.relative_to(version)}"] = _copy_checked(
            folder / source, target, manifest.artifacts[source].sha256)
        if external:
            copied = target.parent / Path(data).name  # the graph names its data file relative to itself
            params[f"{tm.SHA256}:{copied.relative_to(version)}"] = _copy_checked(
                folder / data, copied, manifest.artifacts[data].sha256)
        if kind is EngineKind.PYTHON_ONNXRUNTIME:  # its hashes, checked at load (Triton checks none)
            config += "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + _parameters(params)
    (root / name / "config.pbtxt").write_text(config)


def _profile_comment(manifest: Manifest, graph: str, max_batch: int) -> str:
    """The shapes the plan's optimization profile must cover for 1..max_batch requests in flight, as
    comments (from the manifest)."""
    try:
        profile = tensorrt_profiles(manifest, 1, max_batch, max_batch)[graph]
    except ValueError as exc:
        return f"# optimization profile: not derivable from the manifest ({exc})\n"
    lines = [f"# {k}: min {list(v[0])} opt {list(v[1])} max {list(v[2])}" for k, v in profile.items()]
    head = f"# the plan's optimization profile must cover (1 to {max_batch} requests in flight):\n"
    return head + "\n".join(lines) + "\n"


def write_repository(manifest: Manifest, tmp: Path, engines: EngineKind, max_batch: int, name: str,
                     precision: str | None = None) -> RepoSummary:
    """The repository's models into `tmp` (an empty folder); `manifest` read with its files checked."""
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be at least 1")
    if not _NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: a Triton model name takes letters, digits, '_', '-' and '.'")
    folder = manifest.folder
    notes: list[str] = []
    names = {graph: f"{name}_{graph}" for graph in GRAPHS}
    for graph in GRAPHS:
        _engine_model(manifest, graph, tmp, names[graph], engines, max_batch, precision, notes)
    export = tmp / name / VERSION / tm.EXPORT_DIR
    params = {tm.FULL_MODEL: names["full"], tm.CACHE_MODEL: names["cache"], tm.MAX_BATCH: str(max_batch)}
    raw = (folder / FILENAME).read_bytes()
    export.mkdir(parents=True)
    (export / FILENAME).write_bytes(raw)
    params[f"{tm.SHA256}:{FILENAME}"] = hashlib.sha256(raw).hexdigest()
    if manifest.uncond is not None:
        params[f"{tm.SHA256}:{manifest.uncond}"] = _copy_checked(
            folder / manifest.uncond, export / manifest.uncond, manifest.artifacts[manifest.uncond].sha256)
    (tmp / name / VERSION / "model.py").write_text(_model_py("OmniCacheModel"))
    (tmp / name / "config.pbtxt").write_text(omnicache_config(manifest, name, params, engines is EngineKind.TENSORRT))
    return RepoSummary([name, *names.values()], engines, notes)


def triton_repo(out_dir: str | Path, repo: str | Path, engines: EngineKind | str = EngineKind.ONNXRUNTIME,
                max_batch: int = 16, name: str = "omnicache", force: bool = False,
                precision: str | None = None) -> RepoSummary:
    """Write the repository for export `out_dir` at `repo`, atomically (outputs.atomic_output_dir)."""
    from omnicache_export import outputs
    from omnicache_export.runtime.manifest import read_manifest

    engines = EngineKind(engines)
    out_dir, repo = Path(out_dir), Path(repo)
    outputs.check_output_dir(repo, force=force, inputs=[out_dir])  # before any work
    manifest = read_manifest(out_dir)  # every artifact's hash
    with outputs.atomic_output_dir(repo, force=force, inputs=[out_dir]) as tmp:
        summary = write_repository(manifest, tmp, engines, max_batch, name, precision)
        # Triton loads only the folders; the marker lets a later --force replace what this wrote, and nothing else
        marker = {"written_by": "omnicache-export triton-repo", "engines": summary.engines.value,
                  "models": summary.models}
        (tmp / outputs.REPOSITORY_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return summary
