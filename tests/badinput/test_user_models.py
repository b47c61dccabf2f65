"""Models as users bring them (issue 9, item 7).

- Stock `torch.onnx.export` of diffusers' PixArt, by either exporter and without the zoo's patches,
  holds the If(Squeeze) / Squeeze trap ONNX Runtime refuses to load: the main job and `split`
  repair it on load, say so in one warning line naming the node, and go through. A trap no repair
  applies to is exit 2 with one line naming the node and the fix, and nothing left behind.
- Half-precision exports, all-fp16 (`model.half()`: fp16 inputs and outputs) and fp16 weights with
  float32 IO, go through the main job: the cache tensors are FLOAT16 (the model's own float type),
  and the samples are finite and close to the float32 model's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import torch

from omnicache_export.cli.main import main
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.runtime.graph_io import Feed
from omnicache_export.runtime.manifest import read_manifest
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.runtime.sampler import sample
from omnicache_export.zoo.families import FAMILIES
from test_repair import TRAP, stock_export, stock_inputs, unrepairable_pixart

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning")
# fp16 exports against the float32 torch model, final latents, max |a - b| / max |b| (measured on the tiny
# DiT, DDIM, and PixArt, flow-Euler, 6 steps, 3 of them cached: <= 1.1e-3 without cache, <= 4.6e-3 with it)
FP16_NO_CACHE_TOL = 5e-3
FP16_CACHED_TOL = 2e-2
SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("OMNICACHE_SLOW") != "1",
                                             reason="slow dynamo export; set OMNICACHE_SLOW=1")]


@pytest.fixture(scope="session")
def stock(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "stock-exports"
    folder.mkdir(exist_ok=True)
    return lambda family, exporter, precision="fp32": stock_export(family, exporter, folder, precision)


def conditioning(family: str, n: int, precision: str = "fp32") -> dict[str, np.ndarray]:
    feeds = stock_inputs(family, n, 4, precision)
    return {k: v for k, v in feeds.items() if k not in ("hidden_states", "timestep")}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def leftovers(folder, keep) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stock_pixart_goes_through_the_main_job(stock, exporter, tmp_path, caplog):
    path = stock("pixart", exporter)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="omnicache_export.graph.repair"):
        export(path, out, ExportOptions(scheduler="flow-euler", steps=4, num_calib=2, progress=False))
    notes = [r.getMessage() for r in caplog.records if r.name == "omnicache_export.graph.repair"]
    node = "'/If'" if exporter == "torchscript" else "'node_squeeze'"
    assert len(notes) == 1 and node in notes[0] and path.name in notes[0]
    m = read_manifest(out)
    assert m.verification.runtime_vs_calibration_max_rel_err <= 1e-4
    rt = OmniCache.load(out)
    result = rt.sample(conditioning("pixart", 2), {}, seed=0)
    assert result.shape == (2, 4, 8, 8) and np.isfinite(result).all()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stock_pixart_split_verifies_against_the_repaired_model(stock, exporter, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", str(stock("pixart", exporter)), "-o", str(out)]) == 0
    report = json.loads((out / "split.json").read_text())
    assert len(report["source"]["repairs"]) == 1
    assert report["verification"]["full_vs_source_max_rel_err"] <= 1e-5
    assert report["verification"]["cache_vs_source_max_rel_err"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["cache.onnx", "full.onnx", "split.json"]
    assert "repaired" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["export", "split"])
def test_a_trap_no_repair_applies_to_is_exit_2_naming_the_node(stock, verb, tmp_path, capsys):
    path = unrepairable_pixart(stock, tmp_path)
    out = tmp_path / "out"
    argv = ([] if verb == "export" else ["split"]) + [str(path), "-o", str(out), "-q"]
    assert main(argv + (["--steps", "4", "--scheduler", "flow-euler"] if verb == "export" else [])) == 2
    err = one_line_error(capsys)
    assert path.name in err and "node '/Squeeze' (Squeeze) in node '/If' (If)" in err and TRAP in err
    assert "polygraphy surgeon sanitize" in err and "--fold-constants" in err
    assert leftovers(tmp_path, {path.name}) == []


def _fp32_reference(family: str, spec, cond: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The float32 torch model sampled with the export's sampler (same noise, timesteps, scheduler)."""
    fam = FAMILIES[family]
    model = fam.build(0).eval()
    spec32 = dataclasses.replace(spec, latent_dtype="float32", timestep_dtype="float32")

    def fn(i, feeds):
        with torch.no_grad():
            args = [torch.from_numpy(feeds[k].astype(np.float32) if feeds[k].dtype == np.float16 else feeds[k])
                    for k in fam.input_names]
            return model(*args).numpy()

    return sample(spec32, fn, cond, {}, n, seed=0)[0]


FP16_CASES = [
    pytest.param("dit", "torchscript", "fp16", "ddim", id="dit-all-fp16"),
    pytest.param("dit", "torchscript", "fp16-io32", "ddim", id="dit-fp16-fp32-io"),
    pytest.param("pixart", "torchscript", "fp16", "flow-euler", id="stock-pixart-all-fp16"),
    pytest.param("pixart", "dynamo", "fp16-io32", "flow-euler", id="stock-pixart-dynamo-fp16-fp32-io",
                 marks=SLOW),
]


@pytest.mark.parametrize("family,exporter,precision,scheduler", FP16_CASES)
def test_fp16_exports_go_through(stock, family, exporter, precision, scheduler, tmp_path):
    out = tmp_path / "out"
    export(stock(family, exporter, precision), out,
           ExportOptions(scheduler=scheduler, steps=6, num_calib=2, cache_ratio=0.5, progress=False))
    m = read_manifest(out)
    assert [(c.name, c.dtype) for c in m.model_io.cache_tensors] == [("omnicache_cache", "FLOAT16")]
    io_dtype = "FLOAT16" if precision == "fp16" else "FLOAT"
    full, cache = m.graphs["full"], m.graphs["cache"]
    assert {t.name: t.dtype for t in full.outputs} == {"out_sample": io_dtype, "omnicache_cache": "FLOAT16"}
    assert {t.dtype for t in cache.inputs_fed_by(Feed.CACHE, Feed.CACHE_PREV)} == {"FLOAT16"}
    assert {t.dtype for t in cache.inputs_fed_by(Feed.FULL_PREV, Feed.FULL_PREV2)} == {io_dtype}
    assert {t.dtype for t in cache.outputs_of(Feed.OUTPUT)} == {io_dtype}
    assert m.sampling.latent_dtype == ("float16" if precision == "fp16" else "float32")
    assert m.schedule.n_cached == 3 and m.verification.runtime_vs_calibration_max_rel_err <= 1e-3

    rt = OmniCache.load(out)
    cond = conditioning(family, 3, precision if precision == "fp16" else "fp32")
    cached = rt.sample(cond, {}, seed=0)
    no_cache = rt.sample(cond, {}, seed=0, no_cache=True)
    reference = _fp32_reference(family, rt.spec, conditioning(family, 3), 3)
    scale = np.abs(reference).max()
    assert np.isfinite(cached).all() and cached.dtype == np.float32
    assert np.abs(no_cache - reference).max() / scale <= FP16_NO_CACHE_TOL
    assert np.abs(cached - reference).max() / scale <= FP16_CACHED_TOL
