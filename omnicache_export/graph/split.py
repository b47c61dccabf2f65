"""The split job: analyse the model, write `full.onnx` and `cache.onnx`, check and verify them."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from omnicache_export import outputs
from omnicache_export.graph import modelio
from omnicache_export.graph.analysis import ModelAnalysis, analyze
from omnicache_export.graph.repair import repairs_of
from omnicache_export.graph.tensorrt_fixes import fixes_of
from omnicache_export.graph.synthetic import synthesize
from omnicache_export.hashing import sha256_file
from omnicache_export.passes.add_cache_output import AddCacheOutputPass
from omnicache_export.passes.cache_names import cache_name
from omnicache_export.passes.batch_major_cache import BatchMajorCachePass
from omnicache_export.passes.cut_block_stack import CutBlockStackPass
from omnicache_export.passes.static_io_dims import StaticIODimsPass

logger = logging.getLogger(__name__)

VERIFY_MAX_WEIGHT_BYTES = 1 << 30  # numeric verification runs both graphs once on the CPU


@dataclasses.dataclass
class SplitResult:
    out_dir: Path
    analysis: ModelAnalysis
    verification: dict


def build_graphs(path: Path, analysis: ModelAnalysis, source: ir.Model | None = None) -> tuple[ir.Model, ir.Model]:
    """Two independent lazy loads (weights stay memory-mapped), one rewritten into each graph. Where
    `source` was changed on load (exporter traps repaired, TensorRT fixes), two clones of it instead
    (weights shared, not copied): the graphs are built from the model as loaded, never from the file."""
    repaired = source is not None and changed_on_load(source)
    fresh = (lambda: source.clone()) if repaired else (lambda: modelio.load_model(path))
    full = fresh()
    AddCacheOutputPass(analysis.region)(full)
    cache = fresh()
    latent = next((s.name for s in analysis.io if s.role == "latent"), None)
    CutBlockStackPass(analysis.region, latent, (analysis.shapes_b1, analysis.shapes_b2))(cache)
    batch = batch_symbol(analysis)
    exact_dims = StaticIODimsPass(analysis.shapes_b1, analysis.shapes_b2, batch)
    batch_major = BatchMajorCachePass([s.shape for s in analysis.region.streams], batch)
    for model in (full, cache):  # static dims static, the batch on axis 0 under one symbol (Polygraphy, TensorRT)
        batch_major(model)
        exact_dims(model)
    return full, cache


def changed_on_load(source: ir.Model) -> bool:
    """`modelio.load_user_model` changed the model: the file is not what the graphs derive from."""
    return bool(repairs_of(source) or fixes_of(source))


def batch_symbol(analysis: ModelAnalysis) -> str:
    """The latent's axis-0 name (where symbolic): the batch's one name on every input and output."""
    latent = next((s for s in analysis.io if s.role == "latent"), None)
    return latent.shape[0] if latent is not None and latent.shape and isinstance(latent.shape[0], str) else "batch"


def write_graphs(model_path: Path, source: ir.Model, analysis: ModelAnalysis, folder: Path, cache_name: str = "cache.onnx") -> None:
    """`full.onnx` and the cut cache graph into `folder`, weights external where the source's were."""
    external = modelio.uses_external_data(source)
    full, cache = build_graphs(model_path, analysis, source)
    for name, model in (("full.onnx", full), (cache_name, cache)):
        modelio.save_model(model, folder / name, external=external or None)
        check_saved(folder / name)


def check_saved(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))  # by path: works past 2 GB with external data
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc


def verify(source: Path, full: Path, cache: Path, analysis: ModelAnalysis, seed: int = 0) -> dict:
    """Run source, full and cache on one synthesized input: full must equal the source, cache must
    reproduce it from full's `omnicache_cache`. Returns the max relative errors."""
    from omnicache_export.engines import load_engine
    from omnicache_export.engines.base import infer_numpy

    feeds = synthesize(analysis.io, analysis.shapes_at, seed=seed)
    out_name = analysis.role("output")[0].name
    with load_engine("onnxruntime", source) as e:
        ref = infer_numpy(e, feeds)[out_name]
    with load_engine("onnxruntime", full) as e:
        full_out = infer_numpy(e, feeds)
    with load_engine("onnxruntime", cache) as e:
        cache_out = infer_numpy(e, {**feeds, **full_out}, names=[out_name])[out_name]
    scale = float(np.abs(ref).max()) or 1.0
    return {
        "full_vs_source_max_rel_err": float(np.abs(full_out[out_name] - ref).max() / scale),
        "cache_vs_source_max_rel_err": float(np.abs(cache_out - ref).max() / scale),
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
    }


def split(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    latent: str | None = None,
    timestep: str | None = None,
    region_start: str | None = None,
    region_end: str | None = None,
    input_dims: dict[str, list[int | None]] | None = None,
    force: bool = False,
    numeric_check: bool | None = None,
) -> SplitResult:
    model_path = Path(model_path)
    source = modelio.load_user_model(model_path)
    analysis = analyze(source, latent, timestep, region_start, region_end, input_dims)
    with outputs.atomic_output_dir(out_dir, force=force, inputs=[model_path]) as tmp:
        write_graphs(model_path, source, analysis, tmp)
        verification: dict = {"onnx_checker": "passed"}
        if numeric_check is None:
            numeric_check = modelio.weight_bytes(source) <= VERIFY_MAX_WEIGHT_BYTES
        if numeric_check:
            reference = model_path
            if changed_on_load(source):  # compare with the model as loaded: the file may not load
                reference = tmp / ".source.repaired.onnx"
                modelio.save_model(source, reference, external=modelio.uses_external_data(source) or None)
            try:
                verification.update(verify(reference, tmp / "full.onnx", tmp / "cache.onnx", analysis))
            except ValueError as exc:
                verification["numeric"] = f"skipped: {exc}"
            finally:
                if reference != model_path:
                    for path in (reference, reference.with_name(reference.name + ".data")):
                        path.unlink(missing_ok=True)
        else:
            verification["numeric"] = "skipped (weights over 1 GiB, or --no-verify)"
        report = {
            "source": {"name": model_path.name, "sha256": sha256_file(model_path), "repairs": repairs_of(source),
                       "tensorrt_fixes": fixes_of(source)},
            "analysis": analysis.to_json(),
            "cache_tensors": [cache_name(i) for i in range(len(analysis.region.streams))],
            "verification": verification,
        }
        (tmp / "split.json").write_text(json.dumps(report, indent=2) + "\n")
    return SplitResult(Path(out_dir), analysis, verification)
