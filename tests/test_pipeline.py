"""The main job end to end on real exports: artifacts, manifest, runtime, `run`, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from omnicache_export.calibration import schedule as sched
from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.runtime.manifest import read_manifest
from omnicache_export.hashing import sha256_file
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.zoo.export import write_inputs_npz

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS = 8


@pytest.fixture(scope="module")
def dit_export(zoo_export, tmp_path_factory):
    """DiT (class labels, learned sigma, DDIM), calibrated on real class labels with guidance."""
    folder = tmp_path_factory.mktemp("pipe")
    calib = folder / "calib.npz"
    labels = np.array([1, 3, 5], np.int64)
    np.savez(calib, class_labels=labels, **{"uncond/class_labels": np.full(3, 9, np.int64)})
    out = folder / "out"
    opts = ExportOptions(steps=STEPS, calib=calib, num_calib=3, guidance_scale=2.0, cache_ratio=0.5, progress=False)
    export(zoo_export("dit", "torchscript"), out, opts)
    return out, calib


def test_export_writes_consistent_artifacts(dit_export):
    out, _ = dit_export
    for name in ("full.onnx", "cache.onnx", "omnicache.json", "report.html"):
        assert (out / name).is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(("cache.uncorrected", "calibration."))]
    m = read_manifest(out)
    for name, entry in m.artifacts.items():
        assert sha256_file(out / name) == entry.sha256
    assert m.sampling.learned_sigma is True and m.sampling.guidance_scale == 2.0
    assert len(m.timesteps) == STEPS

    full = np.array(m.schedule.full)
    s = sched.Schedule(full)
    # auto run limits: half the steps fit in runs of 2, runs of 3 are tried beside them
    assert full[0] and s.max_run <= 3 and s.n_cached == STEPS // 2 and m.schedule.max_run == s.max_run
    assert m.schedule.max_consecutive == 3 and m.schedule.max_consecutive_auto

    candidates = [c.to_json() for c in m.calibration.candidates]
    names = {c["schedule"] for c in candidates}
    assert {"alternation", "curvature-dp (runs<=2)"} <= names or "alternation" in names
    assert {c["correction"] for c in candidates} >= {"none", "gamma=1"}
    chosen = [c for c in candidates if c["chosen"]]
    complete = [c for c in candidates if c["n_samples"] == chosen[0]["n_samples"]]  # halving stops losers early
    assert len(chosen) == 1 and chosen[0]["psnr_db"] == max(c["psnr_db"] for c in complete)
    # K = 3: one sample chooses, two report (split), each at 3 seeds; one row leaves no room for halving rounds
    q = m.calibration.quality
    assert chosen[0]["n_samples"] == 1 and q.validation == "split" and q.validation_samples == 2 * 3
    assert m.calibration.cost.scoring_evaluations == m.calibration.cost.exhaustive_evaluations > 0
    assert chosen[0]["pattern"] == m.schedule.pattern

    # the correction coefficients vanish at full steps and before two full steps exist
    coef = np.array(m.correction.coefficients)
    assert np.all(coef[full] == 0)
    # the runtime, correction inside the graph, reproduces calibration's numpy correction
    assert m.verification.runtime_vs_calibration_max_rel_err <= 1e-4
    # timings of a tiny model on shared cores: only their presence is asserted (ratios are for tools/)
    assert m.speed.predicted_speedup > 0 and m.speed.measured_speedup > 0

    cache = ir.load(out / "cache.onnx")
    inputs = {v.name for v in cache.graph.inputs}
    assert {"omnicache_cache", "omnicache_step", "omnicache_full_prev", "omnicache_full_prev2"} <= inputs
    assert not {n.op_type for n in cache.graph} & {"DFT", "STFT", "Softmax"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and m.schedule.name.split(" ")[0] in html


def test_run_cli_and_runtime(dit_export, tmp_path, capsys):
    out, calib = dit_export
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(tmp_path / "c.npz"), "--seed", "4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = read_manifest(out)
    n_cached = m.schedule.n_cached
    assert line["cached_steps"] == n_cached and line["full_steps"] == STEPS - n_cached  # one batch of 3 rows
    assert line["wall_s"] > 0
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(tmp_path / "f.npz"), "--seed", "4", "--no-cache"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["cached_steps"] == 0 and line["full_steps"] == STEPS
    cached, reference = np.load(tmp_path / "c.npz")["latent"], np.load(tmp_path / "f.npz")["latent"]
    assert cached.shape == reference.shape == (3, 4, 8, 8)
    assert np.isfinite(cached).all() and not np.array_equal(cached, reference)
    rel = np.abs(cached - reference).max() / np.abs(reference).max()
    assert rel < 0.5  # stays close to the no-cache result (random weights: no quality claim here)

    rt = OmniCache.load(out)
    try:
        # concurrent generations keep their own cache state: interleaving changes nothing
        cond = {"class_labels": np.array([1], np.int64)}
        uncond = {"class_labels": np.array([9], np.int64)}
        solo = rt.sample(cond, uncond, seed=4)
        a, b = rt.generation(cond, uncond, [0], seed=4), rt.generation({"class_labels": np.array([5])}, uncond, [0], seed=9)
        try:
            while not a.done:
                a.step()
                b.step()
        finally:
            a.close()
            b.close()
        np.testing.assert_array_equal(a.x.numpy(), solo)
        np.testing.assert_allclose(solo, cached[:1], rtol=0, atol=1e-5 * np.abs(cached).max())
    finally:
        rt.close()


def test_runtime_refuses_changed_or_unknown(dit_export, tmp_path):
    out, _ = dit_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "omnicache.json").read_text())
    (copy / "omnicache.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(UserError, match="version 99 is not supported"):
        OmniCache.load(copy)
    (copy / "omnicache.json").write_text(json.dumps(manifest))
    with open(copy / "cache.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="artifact 'cache.onnx' changed since export"):
        OmniCache.load(copy)


def _bad_calib(tmp_path, case):
    path = tmp_path / "calib.npz"
    good = {"class_labels": np.array([1, 2], np.int64)}
    arrays = {
        "missing": {"other": np.zeros(2, np.int64)},
        "shape": {"class_labels": np.zeros((2, 3), np.int64)},
        "dtype": {"class_labels": np.array([1.0, 2.0], np.float32)},
        "nan": None,
        "notnpz": None,
    }[case]
    if case == "notnpz":
        path.write_text("nope")
    elif case == "nan":
        return None
    else:
        np.savez(path, **(arrays if arrays is not None else good))
    return path


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing", [], "missing input 'class_labels'"),
        ("shape", [], "has shape [2, 3], expected ['K']"),
        ("dtype", [], "has dtype float32"),
        ("notnpz", [], "not a readable .npz"),
        (None, ["--steps", "2"], "at least 3 steps"),
        (None, ["--cache-ratio", "0.9", "--max-consecutive", "1"], "at most"),
        (None, ["--scheduler", "nope"], "--scheduler 'nope'"),
        ("exists", [], "already exists"),
    ],
)
def test_export_bad_input(case, args, message, zoo_export, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(zoo_export("dit", "torchscript")), "-o", str(out), "--steps", "6", "-q", *args]
    if case == "exists":
        out.mkdir()
    elif case is not None:
        argv += ["--calib", str(_bad_calib(tmp_path, case))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnicache-export: error: ") and message in err and err.count("\n") == 1
    assert out.exists() == (case == "exists")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_nan_in_inputs_is_refused(dit_export, tmp_path, zoo_export, capsys):
    path = tmp_path / "in.npz"
    np.savez(path, hidden_states=np.zeros(1, np.float32), encoder_hidden_states=np.full((1, 8, 32), np.nan, np.float32))
    out, _ = dit_export
    pix = tmp_path / "pix"
    argv = [str(zoo_export("pixart", "torchscript")), "-o", str(pix), "--steps", "4", "-q", "--calib", str(path)]
    assert main(argv) == 2
    assert "NaN" in capsys.readouterr().err and not pix.exists()
    assert main(["run", str(out), "--inputs", str(tmp_path / "none.npz"), "--out", str(tmp_path / "r.npz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_flow_model_with_text_conditioning_and_speedup_target(zoo_export, tmp_path):
    """PixArt-like model, rectified flow (flow-euler), caption embeddings from the zoo, a speedup target."""
    calib = write_inputs_npz("pixart", tmp_path / "calib.npz", batch=2, seed=3)
    out = tmp_path / "out"
    opts = ExportOptions(scheduler="flow-euler", steps=10, calib=calib, num_calib=2, speedup=1.1, progress=False)
    export(zoo_export("pixart", "torchscript"), out, opts)
    m = read_manifest(out)
    assert m.sampling.scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    c = m.speed.cost_ratio
    n_cached = m.schedule.n_cached
    assert sched.speedup_of(10, n_cached, c) >= 1.1
    assert n_cached == 0 or sched.speedup_of(10, n_cached - 1, c) < 1.1  # the fewest cached steps that meet it
    assert m.verification.runtime_vs_calibration_max_rel_err <= 1e-4


def test_packed_latent_flux_and_video_latte(zoo_export, tmp_path):
    """Flux: packed [B, L, C] latents, position ids without a batch axis, a timestep scale (no
    spatial axes, so no filter). Latte: a 5-D video latent."""
    for family, extra in (("flux", {"timestep_scale": 0.001}), ("latte", {})):
        calib = write_inputs_npz(family, tmp_path / f"{family}.npz", batch=2, seed=1)
        out = tmp_path / family
        opts = ExportOptions(scheduler="flow-euler", steps=6, calib=calib, num_calib=2, progress=False, **extra)
        export(zoo_export(family, "torchscript"), out, opts)
        m = read_manifest(out)
        assert m.correction.filter_hw is None if family == "flux" else len(m.correction.filter_hw) == 2
        assert m.verification.runtime_vs_calibration_max_rel_err <= 1e-4
        assert m.schedule.n_cached == 3 and m.sampling.timestep_scale == extra.get("timestep_scale", 1.0)
        assert (out / "report.html").stat().st_size > 10_000


@pytest.fixture(scope="module")
def static_batch_dit(tmp_path_factory):
    """DiT exported the plain way, without dynamic axes: the batch is fixed at 2."""
    import torch

    from omnicache_export.zoo.families import FAMILIES

    fam = FAMILIES["dit"]
    feeds = fam.example_inputs(2, 0)
    path = tmp_path_factory.mktemp("static") / "dit-b2.onnx"
    with torch.no_grad():
        torch.onnx.export(fam.build(0).eval(), tuple(torch.from_numpy(feeds[n]) for n in fam.input_names), str(path),
                          dynamo=False, opset_version=17, input_names=fam.input_names, output_names=[fam.output_name])
    return path


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_static_batch_export_is_chunked(static_batch_dit, guidance, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, class_labels=np.array([1, 2, 3], np.int64), **{"uncond/class_labels": np.full(3, 9, np.int64)})
    out = tmp_path / "out"
    opts = ExportOptions(steps=6, calib=calib, num_calib=3, guidance_scale=guidance, progress=False)
    export(static_batch_dit, out, opts)
    m = read_manifest(out)
    assert m.sampling.static_batch == 2
    assert m.verification.runtime_vs_calibration_max_rel_err <= 1e-4
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(tmp_path / "r.npz"), "-q"]) == 0
    assert np.load(tmp_path / "r.npz")["latent"].shape == (3, 4, 8, 8)


def test_verification_failure_is_exit_2_and_leaves_nothing(zoo_export, tmp_path, capsys, monkeypatch):
    """Runtime and calibration disagreeing past the stated tolerance fails the export (here forced by
    a negative tolerance: they agree bit for bit on CPU)."""
    import omnicache_export.pipeline.job as job

    monkeypatch.setattr(job, "VERIFY_TOLERANCE", -1.0)
    out = tmp_path / "out"
    assert main([str(zoo_export("dit", "torchscript")), "-o", str(out), "--steps", "4", "-q"]) == 2
    err = capsys.readouterr().err
    assert "verification failed" in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
