"""Tampered manifests against the hashed graphs (issue 9, item 1): what the runtime acts on (the
schedule, the sampling record, the graphs' IO) and what the manifest says of the correction must
describe cache.onnx and full.onnx; anything else is one line, exit 2, before an engine is loaded.

Real exports of the zoo's tiny DiT (8 steps). The cache graph's tables carry the schedule where a
correction applies (gamma=1 here: coefficient a_i at every cached step with a trend); where the
correction is "none" only the schedule embedded in cache.onnx's metadata can tell a flipped entry.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from omnicache_export.calibration.correction import Correction, CorrectionTables, extrapolation_ratios
from omnicache_export.calibration.filters import StageFilter
from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.hashing import sha256_file
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.runtime import graph_check as gc
from omnicache_export.runtime.manifest import FILENAME, read_manifest
from omnicache_export.runtime.omnicache import OmniCache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS = 8


def _export(zoo_export, folder: Path, correction: str, external_data: bool = False) -> Path:
    calib = folder / "calib.npz"
    np.savez(calib, class_labels=np.array([1, 3], np.int64), **{"uncond/class_labels": np.full(2, 9, np.int64)})
    out = folder / "out"
    opts = ExportOptions(steps=STEPS, calib=calib, num_calib=2, guidance_scale=2.0, cache_ratio=0.5,
                         schedules=("alternation",), correction=correction, progress=False)
    export(zoo_export("dit", "torchscript", external_data=external_data), out, opts)
    return out


@pytest.fixture(scope="module")
def gamma_export(zoo_export, tmp_path_factory):
    """Correction gamma=1: coefficients a_i at the cached steps with a trend."""
    out = _export(zoo_export, tmp_path_factory.mktemp("tamper-gamma"), "gamma1")
    assert np.any(read_manifest(out).correction.coefficients)
    return out


@pytest.fixture(scope="module")
def none_export(zoo_export, tmp_path_factory):
    """No correction: all tables zero."""
    out = _export(zoo_export, tmp_path_factory.mktemp("tamper-none"), "none")
    assert not np.any(read_manifest(out).correction.coefficients)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(folder: Path) -> Path:
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, dst)
        return dst
    return make


def _data(folder: Path) -> dict:
    return json.loads((folder / FILENAME).read_text())


def _write(folder: Path, data: dict) -> None:
    (folder / FILENAME).write_text(json.dumps(data))


def _rehash(folder: Path, data: dict) -> None:
    """Record the graphs' current hashes (as an exporter that wrote them would)."""
    for name in data["artifacts"]:
        data["artifacts"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    _write(folder, data)


def _flip(data: dict, k: int, recompute_ratios: bool) -> None:
    """Flip schedule step k, with every field the schema ties to it (pattern, counts, longest run); with
    `recompute_ratios` also the correction's ratios, so only the graphs can tell."""
    full = list(data["schedule"]["full"])
    full[k] = not full[k]
    data["schedule"] |= {"full": full, "pattern": "".join("F" if f else "C" for f in full),
                         "n_full": sum(full), "n_cached": len(full) - sum(full)}
    if data["schedule"].get("max_run") is not None:  # the longest cached run, within the limit
        runs = "".join("F" if f else "C" for f in full).split("F")
        data["schedule"]["max_run"] = longest = max(map(len, runs))
        data["schedule"]["max_consecutive"] = max(data["schedule"]["max_consecutive"], longest)
    if recompute_ratios:
        data["correction"]["ratios"] = gc.ratios(np.array(full), np.array(data["timesteps"])).tolist()


def _refusal(folder: Path) -> str:
    """The one line OmniCache.load refuses `folder` with."""
    with pytest.raises(UserError) as info:
        OmniCache.load(folder).close()
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder))
    return message[len(str(folder)) + 2:]


def _embed(folder: Path, schedule=True, sampling=True) -> None:
    """Keep only the named parts of the record the exporter puts into cache.onnx's metadata
    (`graph_check.embedded_metadata`), as an export without them would have, and rehash."""
    data = _data(folder)
    model = onnx.load(str(folder / "cache.onnx"), load_external_data=False)
    meta = gc.embedded_metadata(data["schedule"]["full"], data["sampling"])
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        if (key == gc.SCHEDULE_KEY and schedule) or (key == gc.SAMPLING_KEY and sampling):
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(folder / "cache.onnx"))
    _rehash(folder, data)


# ------------------------------------------------------------------ untampered


def test_untampered_exports_load(gamma_export, none_export, copy_of):
    for folder in (gamma_export, none_export):
        OmniCache.load(folder).close()
    embedded = copy_of(none_export)
    _embed(embedded)
    rt = OmniCache.load(embedded)
    try:
        labels = {"class_labels": np.array([1], np.int64)}
        out = rt.sample(labels, {"class_labels": np.array([9], np.int64)}, seed=0)
        assert np.isfinite(out).all()
    finally:
        rt.close()


# ------------------------------------------------------------------ the schedule


def test_every_flipped_entry_is_caught_by_the_tables(gamma_export, copy_of):
    """gamma=1 on an alternating schedule: every step's flip changes a table entry the graph holds
    (directly, or the trend of a later cached step) and the line names the flipped step."""
    bare = copy_of(gamma_export)
    _embed(bare, schedule=False, sampling=False)  # the tables alone
    original = _data(bare)
    for recompute in (False, True):
        for k in range(1, STEPS):
            folder = copy_of(bare)
            data = json.loads(json.dumps(original))
            _flip(data, k, recompute)
            _write(folder, data)
            was = "full" if original["schedule"]["full"][k] else "cached"
            now = "cached" if was == "full" else "full"
            assert _refusal(folder).startswith(f"schedule.full[{k}] is {now}, but the export was made with "
                                               f"step {k} {was} (cache.onnx's omnicache_coefficients[")


def test_every_flipped_entry_is_caught_by_the_embedded_schedule(none_export, copy_of):
    """No correction: the tables say nothing of the schedule; the schedule cache.onnx carries does."""
    embedded = copy_of(none_export)
    _embed(embedded, sampling=False)
    original = _data(embedded)
    pattern = original["schedule"]["pattern"]
    for k in range(1, STEPS):
        folder = copy_of(embedded)
        data = json.loads(json.dumps(original))
        _flip(data, k, recompute_ratios=True)
        _write(folder, data)
        was = "full" if original["schedule"]["full"][k] else "cached"
        now = "cached" if was == "full" else "full"
        assert _refusal(folder) == (f"schedule.full[{k}] is {now}, but cache.onnx was exported with step {k} {was} "
                                    f"(schedule {pattern}, the manifest says {data['schedule']['pattern']})")


def test_flip_without_embedded_schedule_or_tables_is_caught_by_the_ratios(none_export, copy_of):
    """No correction, no embedded schedule: a flip that leaves correction.ratios is still caught
    (they are the manifest's own record, so one who rewrites them too is not: see the test above)."""
    for k in (1, 4, STEPS - 1):
        folder = copy_of(none_export)
        _embed(folder, schedule=False, sampling=False)
        data = _data(folder)
        _flip(data, k, recompute_ratios=False)
        _write(folder, data)
        assert _refusal(folder).startswith(f"schedule.full[{k}] is ")


# ------------------------------------------------------------------ the correction and sampling records


def test_changed_coefficient_is_caught(gamma_export, copy_of):
    folder = copy_of(gamma_export)
    data = _data(folder)
    coef = data["correction"]["coefficients"]
    i = int(np.flatnonzero(coef)[0])
    held = coef[i]
    coef[i] = held * 2
    _write(folder, data)
    assert _refusal(folder) == (f"correction.coefficients[{i}] is {held * 2:.6g}, cache.onnx holds {held:.6g} "
                                "(omnicache_coefficients)")
    data["correction"]["coefficients"][i] = held
    data["correction"]["blend"][i] = 0.5
    _write(folder, data)
    assert _refusal(folder) == f"correction.blend[{i}] is 0.5, cache.onnx has no such table (all zeros) (omnicache_blend)"


def test_changed_gamma_is_caught(gamma_export, copy_of):
    folder = copy_of(gamma_export)
    data = _data(folder)
    i = int(np.flatnonzero(data["correction"]["coefficients"])[0])
    data["correction"]["gammas"][i] = 1.5
    _write(folder, data)
    assert _refusal(folder).startswith(f"the schedule does not match the export at step {i}: cache.onnx's "
                                       f"omnicache_coefficients[{i}] is ")


def test_changed_sampling_is_caught(none_export, copy_of):
    embedded = copy_of(none_export)
    _embed(embedded)
    folder = copy_of(embedded)
    data = _data(folder)
    data["sampling"]["guidance_scale"] = 3.0
    _write(folder, data)
    assert _refusal(folder) == "sampling.guidance_scale is 3.0, but cache.onnx was exported for 2.0"
    # without the embedded record, a scheduler config that moves the timesteps is still caught
    folder = copy_of(none_export)
    _embed(folder, schedule=False, sampling=False)
    data = _data(folder)
    data["sampling"]["scheduler"]["steps_offset"] = 0
    _write(folder, data)
    assert _refusal(folder).startswith(f"timesteps[0] is {data['timesteps'][0]:.6g}, but this runtime's scheduler gives")


def test_changed_graph_io_is_caught(gamma_export, copy_of):
    folder = copy_of(gamma_export)
    data = _data(folder)
    data["graphs"]["full"]["outputs"][0]["dtype"] = "DOUBLE"
    _write(folder, data)
    name = data["graphs"]["full"]["outputs"][0]["name"]
    assert _refusal(folder) == f"graphs.full.outputs[0] ({name!r}) is DOUBLE, full.onnx has FLOAT"


def test_cli_run_refuses_in_one_line(gamma_export, copy_of, tmp_path, capsys):
    folder = copy_of(gamma_export)
    data = _data(folder)
    _flip(data, 3, recompute_ratios=True)
    _write(folder, data)
    np.savez(tmp_path / "in.npz", class_labels=np.array([1], np.int64), **{"uncond/class_labels": np.array([9])})
    assert main(["run", str(folder), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schedule.full[3] is" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "r.npz").exists()


# ------------------------------------------------------------------ external data


def test_tables_in_external_data(zoo_export, tmp_path_factory, copy_of):
    """An export with external weights, its tables moved to the hashed .data file as well (they are
    small enough to stay in the graph as exported): read from there; tampering still caught, and a
    table's data outside the hashed files is refused."""
    out = _export(zoo_export, tmp_path_factory.mktemp("tamper-ext"), "gamma1", external_data=True)
    assert (out / "cache.onnx.data").is_file()
    moved = copy_of(out)
    model = onnx.load(str(moved / "cache.onnx"))
    onnx.save(model, str(moved / "cache.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="cache.onnx.data", size_threshold=0)
    data = _data(moved)
    _rehash(moved, data)
    facts = gc.read_graph(moved / "cache.onnx", {gc.COEFFICIENTS}, external_file=lambda loc: moved / loc)
    assert facts.tables[gc.COEFFICIENTS].tolist() == data["correction"]["coefficients"]
    table = next(t for t in onnx.load(str(moved / "cache.onnx"), load_external_data=False).graph.initializer
                 if t.name == gc.COEFFICIENTS)
    assert table.data_location == onnx.TensorProto.EXTERNAL
    OmniCache.load(moved).close()

    folder = copy_of(moved)
    data = _data(folder)
    i = int(np.flatnonzero(data["correction"]["coefficients"])[0])
    data["correction"]["coefficients"][i] = 0.0
    _write(folder, data)
    assert _refusal(folder).startswith(f"correction.coefficients[{i}] is 0, cache.onnx holds ")

    folder = copy_of(moved)  # the table's bytes in a file the manifest does not hash
    shutil.copy(folder / "cache.onnx.data", folder / "other.bin")
    model = onnx.load(str(folder / "cache.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == gc.COEFFICIENTS:
            next(e for e in t.external_data if e.key == "location").value = "other.bin"
    onnx.save(model, str(folder / "cache.onnx"))
    _rehash(folder, _data(folder))
    assert _refusal(folder) == ("cache.onnx: refusing the external data 'other.bin' of a correction table: "
                                "it is not listed in artifacts (not hashed)")


# ------------------------------------------------------------------ the rules, against calibration's own tables


@pytest.mark.parametrize("seed", range(6))
def test_rules_match_calibrations_tables(seed):
    """For random schedules and each kind of correction calibration builds, the true schedule agrees
    with its tables, and a flipped step is caught exactly when it changes some step's trend ratio a_i
    (for the cache trend alone: which steps have one). Where it does not, only the embedded schedule
    tells."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    full = rng.random(n) < 0.5
    full[0] = True
    t = np.sort(rng.choice(np.arange(1, 1000), n, replace=False))[::-1].astype(np.float64)
    corrections = [Correction.gamma(1.0, n, "gamma=1"),
                   Correction.gamma(np.where(np.arange(n) < n // 2, 0.9, 1.1), n, "per stage"),
                   Correction.gamma(1 + 0.3 * rng.standard_normal(n), n, "local"),
                   Correction.mixed(0.5, n), Correction.mixed(0.25, n, 1.1), Correction.mixed(0.0, n, 0.9),
                   Correction.mixed(0.5, n, filt=StageFilter())]
    a_true = extrapolation_ratios(full, t)
    np.testing.assert_array_equal(gc.ratios(full, t), a_true)
    for corr in corrections:
        tab = CorrectionTables.build(corr, full, t, None)
        tables = {gc.COEFFICIENTS: tab.coefficients.astype(np.float64), gc.BLEND: tab.blend.astype(np.float64),
                  gc.TREND: tab.trend.astype(np.float64)}
        gammas = [None if np.isnan(g) else float(g) for g in corr.gammas]
        assert gc.schedule_disagreement(full, t, gammas, tables) is None, corr.name
        for k in range(1, n):
            flipped = full.copy()
            flipped[k] = not flipped[k]
            a = extrapolation_ratios(flipped, t)
            # with gamma 0 (the cache trend alone) the coefficients are 0: only the trend's support tells
            changes = not (np.array_equal(a != 0, a_true != 0) if not np.any(corr.gammas) else np.array_equal(a, a_true))
            caught = gc.schedule_disagreement(flipped, t, gammas, tables) is not None
            assert caught == changes, (corr.name, full.astype(int), k)


def test_reader_streams_past_weights(tmp_path, monkeypatch):
    """A graph with 64 MB of inline weights: its IO, metadata and tables come from a few kB of reads."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((4096, 4096), np.float32), "w")
    coef = numpy_helper.from_array(np.array([0, 0, 0.5, 0.25], np.float32), gc.COEFFICIENTS)
    masks = numpy_helper.from_array(np.ones((4, 8, 8), np.float32), gc.MASKS)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [weight, coef, masks])
    model = helper.make_model(graph)
    model.metadata_props.add(key=gc.SCHEDULE_KEY, value="FFCC")
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    assert path.stat().st_size > 64e6
    read = []

    class Counting(io.FileIO):  # what the reader takes from the disk, below its buffer
        def readinto(self, b):
            n = super().readinto(b)
            read.append(n or 0)
            return n

    monkeypatch.setattr(gc, "open", lambda p, mode="rb": io.BufferedReader(Counting(p, "rb")), raising=False)
    facts = gc.read_graph(path, {gc.COEFFICIENTS}, {gc.MASKS})
    assert facts.inputs == [("x", "FLOAT")] and facts.outputs == [("y", "FLOAT")]
    assert facts.metadata == {gc.SCHEDULE_KEY: "FFCC"}
    assert facts.tables[gc.COEFFICIENTS].tolist() == [0, 0, 0.5, 0.25] and facts.shapes[gc.MASKS] == (4, 8, 8)
    assert sum(read) < 64 * 1024
