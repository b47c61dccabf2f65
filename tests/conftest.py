"""Shared fixtures: zoo exports made once per test session, and an ONNX Runtime runner."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

# Dynamo exports cost 8-15 s each on 2 cores: the others run with OMNICACHE_SLOW=1 (CI time budget).
FAST_DYNAMO = {"dit", "pixart", "stdit", "flux", "sd3", "cogvideox", "wan"}
RUN_SLOW = os.environ.get("OMNICACHE_SLOW") == "1"
SLOW = [pytest.mark.slow, pytest.mark.skipif(not RUN_SLOW, reason="slow dynamo export; set OMNICACHE_SLOW=1")]


def family_cases(families, exporters=("torchscript", "dynamo")):
    """pytest params over (family, exporter), slow dynamo ones marked."""
    for name, family in families.items():
        for exporter in family.exporters:
            if exporter in exporters:
                marks = SLOW if exporter == "dynamo" and name not in FAST_DYNAMO else []
                yield pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks)


def run_ort(path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph on the CPU, feeding only the inputs it declares."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name: feeds[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, wanted)))


def doubling_head(path, dtype) -> None:
    """A cache graph's smallest head, out_sample = 2 · omnicache_cache ([2, 3], `dtype`), saved at `path`."""
    import onnx
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["omnicache_cache", "two"], ["out_sample"])], "head",
        [helper.make_tensor_value_info("omnicache_cache", elem, [2, 3])],
        [helper.make_tensor_value_info("out_sample", elem, [2, 3])],
        [numpy_helper.from_array(np.array(2, dtype), "two")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)


def max_rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """zoo_export(family, exporter, external_data=False) -> path of a cached export."""
    from omnicache_export.zoo.export import export_family

    made: dict[tuple, object] = {}

    def get(family: str, exporter: str, external_data: bool = False):
        key = (family, exporter, external_data)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{exporter}{'-ext' if external_data else ''}")
            made[key] = export_family(family, folder / "model.onnx", exporter=exporter, external_data=external_data)
        return made[key]

    return get


@pytest.fixture(scope="session")
def zoo_split(zoo_export, tmp_path_factory):
    """zoo_split(family) -> folder with the TorchScript export's full.onnx and cache.onnx (made once)."""
    from omnicache_export.graph.split import split

    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            out = tmp_path_factory.mktemp(f"{family}-split") / "split"
            split(zoo_export(family, "torchscript"), out, numeric_check=False)
            made[family] = out
        return made[family]

    return get


@pytest.fixture(scope="session")
def zoo_step(zoo_split):
    """zoo_step(family, seed=1) -> (split folder, the cache graph's feeds: the model inputs plus the
    full graph's cache tensors, the full graph's outputs), at batch 2."""
    from omnicache_export.zoo.families import FAMILIES

    def get(family: str, seed: int = 1):
        folder = zoo_split(family)
        feeds = FAMILIES[family].example_inputs(2, seed)
        full = run_ort(folder / "full.onnx", feeds)
        feeds.update((k, v) for k, v in full.items() if k.startswith("omnicache_cache"))
        return folder, feeds, full

    return get


def with_plans(out, version="10.16.0.72", gpu="NVIDIA H200", cc=(9, 0), **changes):
    """The export's manifest plus a TensorRT entry written by hand (placeholder plan files, hashed as
    artifacts): what `build` records, without TensorRT."""
    import dataclasses

    from omnicache_export.pipeline import build_script, reference_io
    from omnicache_export.runtime import manifest as mf

    m = mf.read_manifest(out)
    dims = reference_io.load_inputs(out, "full")
    profiles = build_script.dynamic_profiles(m, dims=build_script.open_dims(m, {"full": dims}))
    device = mf.tensorrt_device(cc)
    names = {g: f"tensorrt/{device}-fp32/{g}.plan" for g in mf.GRAPHS}
    for g, name in names.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(f"not a real {g} plan".encode())
    plans = {g: mf.TensorRtPlan(version, gpu, cc, (profiles[g],), 3, False, None) for g in mf.GRAPHS}
    entry = mf.EngineEntry(mf.TENSORRT, device, mf.Precision.FP32, names["full"], names["cache"], plans=plans)
    entry = dataclasses.replace(entry, **changes)
    return dataclasses.replace(m, engines=(*m.engines, entry), artifacts={**m.artifacts, **mf.artifact_entries(
        out, list(names.values()))})
