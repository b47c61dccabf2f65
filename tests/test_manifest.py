"""Manifest v2: round trip, every refusal, the graphs' IO description, and what deployment derives
from a manifest alone (TensorRT profiles, Triton configs)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from omnicache_export.errors import UserError
from omnicache_export.io_spec import IOSpec
from omnicache_export.hashing import sha256_file
from omnicache_export.runtime import manifest as mf
from omnicache_export.runtime.deploy import tensorrt_profiles, triton_model_config
from omnicache_export.runtime.graph_io import Feed, GraphIO, TensorIO
from omnicache_export.runtime.sampler import SamplingSpec

N = 5
OUT = "out_sample"
OUT_SHAPE = ("batch", "Reshapeout_sample_dim_1", "Reshapeout_sample_dim_2", "Reshapeout_sample_dim_3")
FILES = {"full.onnx": b"full graph", "cache.onnx": b"cache graph", "cache.onnx.data": b"cache weights"}


def spec() -> SamplingSpec:
    """A PixArt-like model: learned sigma, text conditioning of symbolic length, guidance 2."""
    return SamplingSpec(
        scheduler={"_class_name": "DDIMScheduler", "steps_offset": 1}, n_steps=N, latent="hidden_states",
        timestep="timestep", output=OUT, latent_shape=[4, 8, 8], timestep_shape=None, guidance_scale=2.0,
        learned_sigma=True)


def t(name, dtype, shape, feed, source=None) -> TensorIO:
    return TensorIO(name, dtype, tuple(shape), feed, source)


def model_inputs() -> list[TensorIO]:
    return [t("hidden_states", "FLOAT", ("batch", 4, 8, 8), Feed.MODEL, "hidden_states"),
            t("timestep", "FLOAT", ("batch",), Feed.MODEL, "timestep"),
            t("encoder_hidden_states", "FLOAT", ("batch", "sequence", 32), Feed.MODEL, "encoder_hidden_states")]


def graphs() -> dict[str, GraphIO]:
    cache = t("omnicache_cache", "FLOAT", ("batch", 16, 32), Feed.CACHE, "omnicache_cache")
    full = GraphIO(tuple(model_inputs()), (t(OUT, "FLOAT", OUT_SHAPE, Feed.OUTPUT), cache))
    cached = GraphIO(
        (*model_inputs(), cache,
         t("omnicache_cache_prev", "FLOAT", ("batch", 16, 32), Feed.CACHE_PREV, "omnicache_cache"),
         t("omnicache_step", "INT64", ("batch",), Feed.STEP),
         t("omnicache_full_prev", "FLOAT", OUT_SHAPE, Feed.FULL_PREV),
         t("omnicache_full_prev2", "FLOAT", OUT_SHAPE, Feed.FULL_PREV2)),
        (t(OUT, "FLOAT", OUT_SHAPE, Feed.OUTPUT),))
    return {"full": full, "cache": cached}


def make_manifest(folder: Path) -> mf.Manifest:
    """A small, realistic manifest of an export in `folder` (graph files are stand-in bytes)."""
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    full = (True, True, False, True, True)
    io = [IOSpec("hidden_states", "FLOAT", ["batch", 4, 8, 8], "latent"), IOSpec("timestep", "FLOAT", ["batch"], "timestep"),
          IOSpec("encoder_hidden_states", "FLOAT", ["batch", "sequence", 32], "conditioning")]
    ratios = (0.0, 0.0, 1.0, 0.0, 0.0)
    cand = mf.CandidateScore("curvature-dp (runs<=2)", "curvature-dp", "FFCFF", "gamma=1", 4, 1, 41.5, 39.0, 0.012, True)
    return mf.Manifest(
        source=mf.Source("pixart.onnx", "0" * 64),
        model_io=mf.ModelIO(tuple(io), OUT, (mf.CacheTensor("omnicache_cache", "FLOAT", ("batch", 16, 32)),),
                            mf.BlockRegion("module scopes (torchscript)",
                                           (mf.CacheStream("/pos_embed/Add_output_0", "/blocks.1/Add_3_output_0"),),
                                           {"transformer_blocks": 2}, 2, False, 0.91, 0.97)),
        graphs=graphs(),
        sampling=mf.Sampling.from_spec(spec()),
        timesteps=(801.0, 601.0, 401.0, 201.0, 1.0),
        schedule=mf.Schedule(full, "curvature-dp (runs<=2)", "curvature-dp", "FFCFF", 4, 1, 2),
        correction=mf.Correction("gamma=1", (None, None, 1.0, None, None), ratios, ratios, (0.0,) * N, (0.0,) * N,
                                 mf.FilterParams("all-pass", 0, None, 2, None, 2), (mf.Stage.ALL,) * N, (8, 8)),
        calibration=mf.Calibration(2, 0, False, (cand,), mf.Quality(41.5, 39.0, 0.012), 3.2),
        speed=mf.Speed(0.2, 10.0, 2.0, 1.19, 1.12),
        verification=mf.Verification(2e-6, 1e-3, float("inf")),
        engines=(mf.EngineEntry("onnxruntime", "any", mf.Precision.FP32, "full.onnx", "cache.onnx"),),
        artifacts=mf.artifact_entries(folder, ["full.onnx", "cache.onnx"]),
    )


@pytest.fixture
def export_dir(tmp_path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    mf.write_manifest(folder, make_manifest(folder))
    return folder


def test_round_trip(export_dir):
    m = mf.read_manifest(export_dir)
    expected = make_manifest(export_dir)
    # inf PSNR has no JSON number: it is stored as null ("not finite")
    assert m == dataclasses.replace(expected, verification=mf.Verification(2e-6, 1e-3, None))
    assert set(m.artifacts) == set(FILES)  # the graphs and the external-data file
    text = (export_dir / mf.FILENAME).read_text()
    assert str(export_dir.parent) not in text and json.loads(text)["version"] == 2
    assert m.sampling_spec() == spec()
    assert [f.name for f in dataclasses.fields(mf.Sampling)] == [f.name for f in dataclasses.fields(SamplingSpec)]
    full, cache = m.engine_paths("onnxruntime", "cpu")
    assert full == (export_dir / "full.onnx").resolve() and cache.is_absolute()
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]  # no temp file left


def test_schedule_flip_of_valid_length_accepted(export_dir):
    data = json.loads((export_dir / mf.FILENAME).read_text())
    data["schedule"] |= {"full": [True, False, True, True, True], "pattern": "FCFFF"}
    (export_dir / mf.FILENAME).write_text(json.dumps(data))
    assert mf.read_manifest(export_dir).schedule.pattern == "FCFFF"


def _edit(fn):
    """A tampering of the manifest's JSON (fn(data, folder) edits in place)."""
    def apply(folder: Path) -> None:
        path = folder / mf.FILENAME
        data = json.loads(path.read_text())
        fn(data, folder)
        path.write_text(json.dumps(data))
    return apply


def _set(path: str, value):
    def fn(data, folder):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return _edit(fn)


def _delete(path: str):
    def fn(data, folder):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[last]
    return _edit(fn)


def _schedule(full: list[bool]):
    return _edit(lambda d, f: d["schedule"].update(
        full=full, pattern="".join("F" if x else "C" for x in full), n_full=sum(full), n_cached=len(full) - sum(full)))


def _artifact(name: str):
    return _edit(lambda d, f: d["artifacts"].update({name: {"sha256": "1" * 64, "bytes": 3}}))


def _symlink_out(target_exists: bool):
    def fn(data, folder):
        outside = folder.parent / "outside.onnx"
        if target_exists:
            outside.write_bytes(b"secret")
        os.symlink(outside, folder / "link.onnx")
        data["artifacts"]["link.onnx"] = {"sha256": "1" * 64, "bytes": 6}
    return _edit(fn)


def _write(text: str):
    return lambda folder: (folder / mf.FILENAME).write_text(text)


REFUSALS = {
    "not JSON": (_write("{\"format\": "), "not valid JSON"),
    "not an object": (_write("[]"), "expected a JSON object"),
    "wrong format": (_set("format", "something/else"), "not an omnicache-export manifest"),
    "version 1": (_set("version", 1), "manifest version 1 is not supported (this runtime reads 2): re-export"),
    "newer version": (_set("version", 3), "manifest version 3 is not supported"),
    "version as text": (_set("version", "2"), "manifest version '2' is not supported"),
    "step 0 cached": (_schedule([False, True, False, True, True]), "schedule.full[0]: step 0 is cached"),
    "short schedule": (_schedule([True, True, False, True]), "schedule.full: 4 steps"),
    "short timesteps": (_set("timesteps", [801.0, 1.0]), "timesteps: 2 entries, sampling.n_steps is 5"),
    "pattern mismatch": (_set("schedule.pattern", "FFFFF"), "schedule.pattern"),
    "guidance 1e30": (_set("sampling.guidance_scale", 1e30), "sampling.guidance_scale: 1e+30 is absurd"),
    "guidance NaN": (_set("sampling.guidance_scale", float("nan")), "sampling.guidance_scale: nan is not a finite"),
    "coefficient inf": (_set("correction.coefficients.2", float("inf")), "correction.coefficients[2]: inf is not a finite"),
    "extra key": (_set("notes", "hi"), "notes: unknown key"),
    "extra nested key": (_set("calibration.quality.rmse_mean", 0.1), "calibration.quality.rmse_mean: unknown key"),
    "missing key": (_delete("calibration.quality.rmse"), "calibration.quality.rmse: missing key"),
    "missing section": (_delete("sampling"), "sampling: missing key"),
    "wrong type": (_set("sampling.n_steps", "5"), "sampling.n_steps: expected an integer, got a string"),
    "bool for int": (_set("calibration.seed", True), "calibration.seed: expected an integer, got a boolean"),
    "bad enum": (_set("engines.0.precision", "fp64"), "engines[0].precision: 'fp64' is not one of"),
    "bad feed": (_set("graphs.full.inputs.0.feed", "step"), "graphs.full.inputs[0].feed: 'step' cannot be"),
    "missing graph": (_delete("graphs.cache"), "graphs.cache: missing key"),
    "source path": (_set("source.name", "/home/me/model.onnx"), "source.name: a file name, not a path"),
    "absolute artifact": (_artifact("/etc/passwd"), "path '/etc/passwd' is absolute"),
    "dotdot artifact": (_artifact("../outside.onnx"), "path '../outside.onnx' contains '..'"),
    "symlink out (target exists)": (_symlink_out(True), "path 'link.onnx' resolves outside the export folder"),
    "symlink out (no target)": (_symlink_out(False), "path 'link.onnx' resolves outside the export folder"),
    "engine file not listed": (_set("engines.0.cache", "other.onnx"), "engines[0].cache: 'other.onnx' is not listed"),
    "artifacts deleted": (_delete("artifacts"), "artifacts: missing key"),
    "uncond not listed": (_set("uncond", "uncond.npz"), "uncond: 'uncond.npz' is not listed in artifacts"),
    "external data unlisted": (_edit(lambda d, f: d["artifacts"].pop("cache.onnx.data")),
                               "'cache.onnx.data' is read with the graph but not listed in artifacts"),
    "changed file": (lambda f: (f / "cache.onnx").write_bytes(b"cache graph, edited"), "'cache.onnx' changed since export"),
    "changed data, same size": (lambda f: (f / "cache.onnx.data").write_bytes(b"cache weightZ"),
                                "'cache.onnx.data' changed since export (sha256 mismatch)"),
    "deleted file": (lambda f: (f / "full.onnx").unlink(), "artifact 'full.onnx' is missing"),
    "validation figure without a split": (_set("calibration.quality.validation_psnr_db", 40.0),
                                          "calibration.quality.validation_psnr_db: a validation figure needs"),
    "validation mode unknown": (_set("calibration.quality.validation", "vibes"), "calibration.quality.validation: 'vibes'"),
    "validation samples without mode": (_set("calibration.quality.validation_samples", 3),
                                        "calibration.quality.validation_samples: 3: must be positive exactly"),
    "validation figure not a number": (_set("calibration.quality.validation_psnr_db", "40"),
                                       "calibration.quality.validation_psnr_db: expected a number"),
    "max_run not the pattern's": (_set("schedule.max_run", 2), "schedule.max_run: 2, the pattern's longest run"),
    "cost over exhaustive": (_set("calibration.cost", {"halving": True, "scoring_evaluations": 9,
                                                       "exhaustive_evaluations": 5, "other_evaluations": 0,
                                                       "scoring_seconds": 1.0}),
                             "calibration.cost.scoring_evaluations: 9 > calibration.cost.exhaustive_evaluations 5"),
}


def test_manifests_before_the_validation_figure_still_read(export_dir):
    """Manifests written before issue 11 lack the validation figure, the cost and the run record."""
    def strip(data, folder):
        for key in ("validation_psnr_db", "validation_psnr_min_db", "validation", "validation_samples"):
            data["calibration"]["quality"].pop(key)
        data["calibration"].pop("cost")
        data["calibration"]["candidates"][0].pop("n_samples")
        for key in ("max_consecutive_auto", "max_run"):
            data["schedule"].pop(key)
    _edit(strip)(export_dir)
    m = mf.read_manifest(export_dir)
    assert m.calibration.quality.validation_psnr_db is None and m.calibration.quality.validation == ""
    assert m.calibration.cost is None and m.schedule.max_run is None and not m.schedule.max_consecutive_auto


def test_second_order_cache_trend_record(export_dir):
    """The second-order cache trend: `correction.cache_trend2` and the `<cache>_prev2` feed are read and
    validated; manifests without them (before it, or a first-order export) read with σ absent."""
    _delete("correction.cache_trend2")(export_dir)
    assert mf.read_manifest(export_dir).correction.cache_trend2 == ()

    def second_order(data, folder):
        data["correction"]["cache_trend2"] = [0.0, 0.0, -0.25, 0.0, 0.0]
        prev = next(x for x in data["graphs"]["cache"]["inputs"] if x["feed"] == "cache_prev")
        data["graphs"]["cache"]["inputs"].append({**prev, "name": "omnicache_cache_prev2", "feed": "cache_prev2"})
    _edit(second_order)(export_dir)
    m = mf.read_manifest(export_dir)
    assert m.correction.cache_trend2 == (0.0, 0.0, -0.25, 0.0, 0.0)
    prev2 = m.graphs["cache"].inputs_fed_by(Feed.CACHE_PREV2)
    assert [(x.name, x.source) for x in prev2] == [("omnicache_cache_prev2", "omnicache_cache")]
    p = tensorrt_profiles(m, min_batch=1, opt_batch=2, max_batch=4, dims={"sequence": 7})  # from the manifest alone
    assert p["cache"]["omnicache_cache_prev2"] == ((2, 16, 32), (4, 16, 32), (8, 16, 32))
    for tamper, message in ((_set("graphs.cache.inputs.-1.source", "nope"), "is not one of model_io.cache_tensors"),
                            (_set("correction.cache_trend2", [0.0, 1.0]), "correction.cache_trend2: 2 entries")):
        tamper(export_dir)  # cumulative: the earlier refusal is checked first
        with pytest.raises(UserError, match=message):
            mf.read_manifest(export_dir)


def test_validation_figure_round_trips(export_dir):
    _set("calibration.quality", {"psnr_db_mean": 41.5, "psnr_db_min": 39.0, "rmse": 0.012, "validation_psnr_db": 38.25,
                                 "validation_psnr_min_db": 36.0, "validation": "split", "validation_samples": 4})(export_dir)
    q = mf.read_manifest(export_dir).calibration.quality
    assert (q.validation_psnr_db, q.validation, q.validation_samples) == (38.25, "split", 4)


@pytest.mark.parametrize("tamper, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals(export_dir, tamper, message):
    tamper(export_dir)
    with pytest.raises(UserError) as info:
        mf.read_manifest(export_dir)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_symlink_refusal_does_not_tell_whether_the_target_exists(tmp_path):
    messages = []
    for exists in (True, False):
        folder = tmp_path / f"e{exists}"
        folder.mkdir()
        mf.write_manifest(folder, make_manifest(folder))
        _symlink_out(exists)(folder)
        with pytest.raises(UserError) as info:
            mf.read_manifest(folder)
        messages.append(str(info.value).replace(str(folder), "FOLDER"))
    assert messages[0] == messages[1]


def test_write_refuses_what_read_would(tmp_path):
    bad = dataclasses.replace(make_manifest(tmp_path),
                              sampling=dataclasses.replace(mf.Sampling.from_spec(spec()), guidance_scale=1e30))
    with pytest.raises(UserError, match="manifest not written.*guidance_scale"):
        mf.write_manifest(tmp_path, bad)
    assert not (tmp_path / mf.FILENAME).exists() and not list(tmp_path.glob(".omnicache*"))


def test_engine_choice(export_dir):
    m = mf.read_manifest(export_dir)
    trt = mf.EngineEntry("tensorrt", "cuda", mf.Precision.FP16, "full.onnx", "cache.onnx")
    m = dataclasses.replace(m, engines=(*m.engines, trt))
    assert m.engine("tensorrt", "cuda").precision is mf.Precision.FP16
    assert m.engine("onnxruntime", "cuda", "fp32").backend == "onnxruntime"
    with pytest.raises(UserError, match=r"no engine tensorrt/cpu/\* \(it has: onnxruntime/any/fp32, tensorrt/cuda/fp16\)"):
        m.engine("tensorrt", "cpu")
    with pytest.raises(UserError, match="precision 'fp64': not one of"):
        m.engine("onnxruntime", "cpu", "fp64")


def test_check_files_off_skips_hashes(export_dir):
    (export_dir / "cache.onnx").write_bytes(b"edited")
    assert mf.read_manifest(export_dir, check_files=False).schedule.n_cached == 1


# ------------------------------------------------------------------ the report reads the quality record


def test_report_shows_the_quality_record(tmp_path):
    from omnicache_export.report.page import ReportData, render_html

    data = ReportData.example(n_steps=6, k=2)
    data.quality = mf.Quality(psnr_db_mean=40.0, psnr_db_min=38.0, rmse=0.0123)
    assert "RMSE</div><div class='v'>0.0123" in render_html(data)
    data.quality = make_manifest(tmp_path).calibration.quality.to_json()  # the manifest's JSON, as stored
    assert "RMSE</div><div class='v'>0.012<" in render_html(data)
    # the held-out figure leads, and the scoring cost is shown
    data.quality = mf.Quality(40.0, 38.0, 0.0123, 37.5, 36.25, "split", 4).to_json()
    data.cost = mf.CalibrationCost(True, 2100, 4240, 240, 5.9).to_json()
    data.max_consecutive = "3 (auto)"
    html = render_html(data)
    assert "PSNR on held-out samples (expect this)</div><div class='v'>37.50 / 36.25 dB (4 samples)" in html
    assert "scoring cost (successive halving)</div><div class='v'>2100 of 4240 evaluations, 5.9 s" in html
    assert "longest run limit</div><div class='v'>3 (auto)" in html


# ------------------------------------------------------------------ the pipeline's record


def test_build_manifest(tmp_path):
    from omnicache_export.calibration.filters import StageFilter
    from omnicache_export.pipeline.record import build_manifest

    base = make_manifest(tmp_path)
    model = tmp_path / "src" / "pixart.onnx"
    model.parent.mkdir()
    model.write_bytes(b"model")
    schedule = SimpleNamespace(full=np.array(base.schedule.full), name=base.schedule.name,
                               family=SimpleNamespace(value="curvature-dp"), pattern="FFCFF", n_full=4, n_cached=1,
                               max_run=1)
    correction = SimpleNamespace(name="gamma=1 + filter", gammas=np.array([np.nan, np.nan, 1.0, np.nan, np.nan]),
                                 filter=StageFilter(boundary=3, low_rho=0.25, high_rho=0.5))
    best = SimpleNamespace(schedule=schedule, correction=correction, psnr_db=np.float64("inf"), psnr_min_db=39.0,
                           rmse=np.float32(0.01), rows=(0, 1))
    other = SimpleNamespace(schedule=schedule, correction=SimpleNamespace(name="none"), psnr_db=30.0, psnr_min_db=29.0,
                            rmse=0.1, rows=(0,))
    from omnicache_export.calibration.halving import ScoringCost
    from omnicache_export.calibration.calibrate import ValidationScore
    from omnicache_export.calibration.validation import Validation

    validation = ValidationScore(Validation.SPLIT, (2, 3), (0, 7919), 38.5, 37.25)  # two rows at two seeds
    result = SimpleNamespace(timesteps=np.array(base.timesteps), best=best, candidates=[other, best],
                             ratios=np.array(base.correction.ratios), filter_hw=(8, 8), max_consecutive_auto=True,
                             validation=validation, cost=ScoringCost(True, 15, 20, 30, 1.5))
    tables = SimpleNamespace(coefficients=np.array(base.correction.ratios, np.float32), blend=np.zeros(N, np.float32),
                             trend=np.zeros(N, np.float32), sigma=np.zeros(N, np.float32), has_trend2=False)
    stream = SimpleNamespace(entry="h0", exit="hL", shape=["batch", 16, None], dtype="FLOAT")
    region = SimpleNamespace(method="module scopes (dynamo)", streams=[stream], block_lists={"transformer_blocks": 2},
                             n_blocks=2, n_blocks_estimated=False)
    analysis = SimpleNamespace(io=[*base.model_io.inputs, IOSpec(OUT, "FLOAT", list(OUT_SHAPE), "output")],
                               region=region, node_share=0.912345, flop_share=None)
    m = build_manifest(tmp_path, model_path=model, analysis=analysis, spec=spec(), result=result, tables=tables,
                       full_io=base.graphs["full"], cache_io=base.graphs["cache"], max_consecutive=2, n_samples=2,
                       seed=0, synthesized_conditioning=True, seconds=1.234, speed=base.speed,
                       verification=base.verification)
    mf.write_manifest(tmp_path, m)
    back = mf.read_manifest(tmp_path)
    assert back.source == mf.Source("pixart.onnx", sha256_file(model)) and str(tmp_path) not in json.dumps(back.to_json())
    assert back.model_io.cache_tensors[0].shape == ("batch", 16, 32) and back.model_io.block_region.node_share == 0.9123
    assert [s.value for s in back.correction.stages] == ["low"] * 3 + ["high"] * 2
    assert back.correction.gammas == (None, None, 1.0, None, None)
    assert back.correction.filter == mf.FilterParams(StageFilter(3, 0.25, 2, 0.5, 2).name, 3, 0.25, 2, 0.5, 2)
    assert back.calibration.quality.psnr_db_mean is None and [c.chosen for c in back.calibration.candidates] == [False, True]
    assert set(back.artifacts) == set(FILES) and back.schedule.pattern == "FFCFF"
    q = back.calibration.quality
    assert (q.validation_psnr_db, q.validation_psnr_min_db, q.validation, q.validation_samples) == (38.5, 37.25, "split", 4)
    assert [c.n_samples for c in back.calibration.candidates] == [1, 2]
    assert back.calibration.cost == mf.CalibrationCost(True, 15, 20, 30, 1.5)
    assert back.schedule.max_consecutive_auto and back.schedule.max_run == 1


# ------------------------------------------------------------------ describe_graphs


def _model(inputs, outputs, nodes):
    import onnx_ir as ir
    from onnx import TensorProto, helper

    types = {"FLOAT": TensorProto.FLOAT, "INT64": TensorProto.INT64}
    graph = helper.make_graph(
        [helper.make_node("Identity", [src], [dst]) for src, dst in nodes], "g",
        [helper.make_tensor_value_info(n, types[d], s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, types[d], s) for n, d, s in outputs])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_describe_graphs():
    from omnicache_export.graph.describe import describe_graphs

    out = [OUT, "FLOAT", ["s0", "c2", 8, 8]]
    full = _model([["x", "FLOAT", ["s0", 4, 8, 8]], ["t", "FLOAT", ["s0"]], ["y", "INT64", [None]]],
                  [out, ["omnicache_cache", "FLOAT", ["s0", 16, None]], ["omnicache_cache_1", "FLOAT", ["s1", 4, 32]]],
                  [("x", OUT), ("x", "omnicache_cache"), ("x", "omnicache_cache_1")])
    cache = _model([["x", "FLOAT", ["s0", 4, 8, 8]], ["omnicache_cache", "FLOAT", ["s0", 16, None]],
                    ["omnicache_cache_1", "FLOAT", ["s1", 4, 32]], ["omnicache_cache_prev", "FLOAT", [None, 16, None]],
                    ["omnicache_step", "INT64", [None]], ["omnicache_full_prev", "FLOAT", [None, None, 8, 8]],
                    ["omnicache_full_prev2", "FLOAT", ["s0", "c2", 8, 8]], ["omnicache_coefficients", "FLOAT", [5]]],
                   [out, [f"{OUT}_uncorrected", "FLOAT", ["s0", "c2", 8, 8]]],
                   [("x", OUT), ("x", f"{OUT}_uncorrected")])
    io = [IOSpec("x", "FLOAT", ["s0", 4, 8, 8], "latent"), IOSpec("t", "FLOAT", ["s0"], "timestep"),
          IOSpec("y", "INT64", [None], "conditioning"), IOSpec(OUT, "FLOAT", ["s0", "c2", 8, 8], "output")]
    f, c = describe_graphs(full, cache, io, ["omnicache_cache", "omnicache_cache_1"], OUT)
    assert [(x.name, x.feed, x.source, x.shape) for x in f.inputs] == [
        ("x", Feed.MODEL, "x", ("batch", 4, 8, 8)), ("t", Feed.MODEL, "t", ("batch",)), ("y", Feed.MODEL, "y", ("batch",))]
    assert [(x.name, x.feed, x.shape) for x in f.outputs] == [
        (OUT, Feed.OUTPUT, ("batch", "c2", 8, 8)), ("omnicache_cache", Feed.CACHE, ("batch", 16, "omnicache_cache_dim2")),
        ("omnicache_cache_1", Feed.CACHE, ("s1", 4, 32))]  # batch × frames: not the batch symbol
    feeds = {x.name: (x.feed, x.source, x.shape) for x in c.inputs}
    assert feeds["omnicache_cache"] == (Feed.CACHE, "omnicache_cache", ("batch", 16, "omnicache_cache_dim2"))
    assert feeds["omnicache_cache_prev"] == (Feed.CACHE_PREV, "omnicache_cache", ("batch", 16, "omnicache_cache_dim2"))
    assert feeds["omnicache_step"] == (Feed.STEP, None, ("batch",))  # one step per row
    assert feeds["omnicache_full_prev"] == (Feed.FULL_PREV, None, ("batch", "c2", 8, 8))  # unnamed: the output's
    assert feeds["omnicache_full_prev2"] == (Feed.FULL_PREV2, None, ("batch", "c2", 8, 8))
    assert feeds["omnicache_coefficients"] == (Feed.TABLE, "omnicache_coefficients", (5,))
    assert [(x.feed, x.shape) for x in c.outputs] == [(Feed.OUTPUT, ("batch", "c2", 8, 8)),
                                                      (Feed.UNCORRECTED, ("batch", "c2", 8, 8))]

    stray = _model([["x", "FLOAT", ["s0", 4, 8, 8]], ["mystery", "FLOAT", [3]]], [out], [("x", OUT)])
    with pytest.raises(ValueError, match="'mystery'"):
        describe_graphs(full, stray, io, ["omnicache_cache", "omnicache_cache_1"], OUT)


def test_describe_static_batch():
    from omnicache_export.graph.describe import describe_graphs

    full = _model([["x", "FLOAT", [2, 4, 8, 8]]], [[OUT, "FLOAT", [2, 4, 8, 8]], ["omnicache_cache", "FLOAT", [2, 16, 32]]],
                  [("x", OUT), ("x", "omnicache_cache")])
    cache = _model([["x", "FLOAT", [2, 4, 8, 8]], ["omnicache_cache", "FLOAT", [2, 16, 32]]], [[OUT, "FLOAT", [2, 4, 8, 8]]],
                   [("x", OUT)])
    f, c = describe_graphs(full, cache, [IOSpec("x", "FLOAT", [2, 4, 8, 8], "latent")], ["omnicache_cache"], OUT)
    assert all(isinstance(d, int) for x in (*f.inputs, *f.outputs, *c.inputs, *c.outputs) for d in x.shape)


# ------------------------------------------------------------------ deployment from the manifest alone


def test_tensorrt_profiles(export_dir):
    m = mf.read_manifest(export_dir)
    with pytest.raises(ValueError, match="'encoder_hidden_states' axis 1 is the symbolic dim 'sequence'"):
        tensorrt_profiles(m)
    p = tensorrt_profiles(m, min_batch=1, opt_batch=2, max_batch=4, dims={"sequence": 7})
    assert set(p) == {"full", "cache"} and list(p["full"]) == [x.name for x in m.graphs["full"].inputs]
    assert p["full"]["hidden_states"] == ((2, 4, 8, 8), (4, 4, 8, 8), (8, 4, 8, 8))  # guidance: 2 rows per sample
    assert p["full"]["encoder_hidden_states"] == ((2, 7, 32), (4, 7, 32), (8, 7, 32))
    assert p["cache"]["omnicache_full_prev"] == ((2, 8, 8, 8), (4, 8, 8, 8), (8, 8, 8, 8))  # learned sigma: 2C
    assert p["cache"]["omnicache_cache_prev"] == ((2, 16, 32), (4, 16, 32), (8, 16, 32))
    assert p["cache"]["omnicache_step"] == ((2,), (4,), (8,))  # one step per model row

    def static(x: TensorIO) -> TensorIO:
        return dataclasses.replace(x, shape=tuple(4 if d == "batch" else d for d in x.shape))

    fixed = dataclasses.replace(
        m, sampling=dataclasses.replace(m.sampling, static_batch=4),
        graphs={k: GraphIO(tuple(map(static, g.inputs)), tuple(map(static, g.outputs))) for k, g in m.graphs.items()})
    q = tensorrt_profiles(fixed, max_batch=16, dims={"sequence": 7})
    assert q["full"]["hidden_states"] == ((4, 4, 8, 8),) * 3 and q["cache"]["omnicache_full_prev"] == ((4, 8, 8, 8),) * 3


def test_triton_configs(export_dir):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    m = mf.read_manifest(export_dir)
    full = text_format.Parse(triton_model_config(m, "full", "onnxruntime_onnx", 8), model_config_pb2.ModelConfig())
    assert (full.name, full.platform, full.max_batch_size) == ("omnicache_full", "onnxruntime_onnx", 8)
    assert full.HasField("dynamic_batching")
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert [(i.name, i.data_type, list(i.dims)) for i in full.input] == [
        ("hidden_states", fp32, [4, 8, 8]), ("timestep", fp32, [1]), ("encoder_hidden_states", fp32, [-1, 32])]
    assert [tuple(i.reshape.shape) for i in full.input] == [(), (), ()] and full.input[1].HasField("reshape")
    assert [(o.name, o.data_type, list(o.dims)) for o in full.output] == [
        (OUT, fp32, [8, 8, 8]), ("omnicache_cache", fp32, [16, 32])]

    batched = text_format.Parse(triton_model_config(m, "cache", "tensorrt_plan", 8), model_config_pb2.ModelConfig())
    assert batched.max_batch_size == 8 and batched.HasField("dynamic_batching")  # the step has the batch axis
    step = next(i for i in batched.input if i.name == "omnicache_step")
    assert list(step.dims) == [1] and step.HasField("reshape") and list(step.reshape.shape) == []  # [B] per row
    cache = text_format.Parse(triton_model_config(m, "cache", "tensorrt_plan", 0, name="dit_cache"),
                              model_config_pb2.ModelConfig())
    assert (cache.name, cache.platform, cache.max_batch_size) == ("dit_cache", "tensorrt_plan", 0)
    assert not cache.HasField("dynamic_batching")
    got = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cache.input}
    assert got == {"hidden_states": ("TYPE_FP32", [-1, 4, 8, 8]), "timestep": ("TYPE_FP32", [-1]),
                   "encoder_hidden_states": ("TYPE_FP32", [-1, -1, 32]), "omnicache_cache": ("TYPE_FP32", [-1, 16, 32]),
                   "omnicache_cache_prev": ("TYPE_FP32", [-1, 16, 32]), "omnicache_step": ("TYPE_INT64", [-1]),
                   "omnicache_full_prev": ("TYPE_FP32", [-1, 8, 8, 8]), "omnicache_full_prev2": ("TYPE_FP32", [-1, 8, 8, 8])}
    assert [(o.name, list(o.dims)) for o in cache.output] == [(OUT, [-1, 8, 8, 8])]
    with pytest.raises(ValueError, match="graph 'other'"):
        triton_model_config(m, "other", "onnxruntime_onnx", 0)
