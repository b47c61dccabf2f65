"""Bad values and runaway work (issue 9, items 4 and 5): each case one UserError line naming the
input, the value and what is valid; exit 2 from the CLI; refused before any work where it can be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx_ir as ir
import pytest

from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.graph.analysis import analyze
from omnicache_export.graph.synthetic import SynthesizedRows, index_ranges, synthesize_conditioning
from omnicache_export.pipeline import memory
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.runtime import manifest as mf
from omnicache_export.runtime.conditioning import load_conditioning
from omnicache_export.runtime.generation import NonFiniteSamples
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.runtime.sampler import Denoiser, check_steps, scheduler_config
from omnicache_export.zoo.export import write_inputs_npz

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TABLE = 11  # the zoo DiT's class embedding: 10 classes and the null class (row 10)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def dit(zoo_export):
    return zoo_export("dit", "torchscript")


@pytest.fixture(scope="module")
def dit_out(dit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("values")
    calib = folder / "calib.npz"
    np.savez(calib, class_labels=np.array([1, 3], np.int64), **{"uncond/class_labels": np.full(2, 10, np.int64)})
    out = folder / "out"
    export(dit, out, ExportOptions(scheduler="ddim", steps=4, calib=calib, num_calib=2, guidance_scale=2.0,
                                   progress=False))
    return out


def labels_npz(path, cond, uncond=10):
    cond = np.asarray(cond, np.int64)
    np.savez(path, class_labels=cond, **{"uncond/class_labels": np.full(cond.shape, uncond, np.int64)})
    return path


# ------------------------------------------------------------------ integer conditioning


def test_embedding_range_is_found_and_recorded(dit, dit_out):
    model = ir.load(dit)
    assert index_ranges(model, analyze(model).io) == {"class_labels": (0, TABLE)}
    m = mf.read_manifest(dit_out)
    assert m.model_io.index_ranges == {"class_labels": (0, TABLE)} and m.version == 2


@pytest.mark.parametrize("labels,bad,sample", [([1, 99], 99, 1), ([-100, 2], -100, 0), ([3, -1], -1, 1),
                                               ([TABLE], TABLE, 0)])
def test_class_label_out_of_range_at_run(dit_out, labels, bad, sample):
    rt = OmniCache.load(dit_out)
    try:
        with pytest.raises(UserError) as info:
            rt.sample({"class_labels": np.array(labels, np.int64)},
                      {"class_labels": np.full(len(labels), 10, np.int64)}, seed=0)
        assert str(info.value) == (f"input 'class_labels' holds {bad} at sample {sample}: outside the embedding "
                                   f"table's valid range [0, {TABLE})")
        with pytest.raises(UserError, match=r"'uncond/class_labels' holds -1 at sample 0: .*\[0, 11\)"):
            rt.sample({"class_labels": np.array([1], np.int64)}, {"class_labels": np.array([-1], np.int64)})
        # the edges of the table are valid: class 0 and the null class
        out = rt.sample({"class_labels": np.array([0, TABLE - 1], np.int64)},
                        {"class_labels": np.full(2, TABLE - 1, np.int64)})
        assert out.shape == (2, 4, 8, 8) and np.isfinite(out).all()
    finally:
        rt.close()


def test_class_label_out_of_range_at_export(dit, tmp_path, capsys):
    calib = labels_npz(tmp_path / "calib.npz", [1, 99])
    with pytest.raises(UserError) as info:
        export(dit, tmp_path / "out", ExportOptions(scheduler="ddim", steps=4, calib=calib, progress=False))
    assert str(info.value) == (f"{calib}: 'class_labels' holds 99 at sample 1: outside the embedding table's "
                               "valid range [0, 11)")
    assert not (tmp_path / "out").exists()

    calib = labels_npz(tmp_path / "neg.npz", [-1, 2])  # -1 would have picked the null class's row
    argv = [str(dit), "-o", str(tmp_path / "out"), "--scheduler", "ddim", "--steps", "4", "--calib", str(calib), "-q"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "'class_labels' holds -1 at sample 0: outside the embedding table's valid range [0, 11)" in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_class_label_out_of_range_via_cli_run(dit_out, tmp_path, capsys):
    inputs = labels_npz(tmp_path / "in.npz", [5, 99])
    assert main(["run", str(dit_out), "--inputs", str(inputs), "--out", str(tmp_path / "r.npz"), "-q"]) == 2
    assert "input 'class_labels' holds 99 at sample 1: outside the embedding table's valid range [0, 11)" in \
        one_line_error(capsys)
    assert not (tmp_path / "r.npz").exists()


def test_manifest_index_ranges_optional_and_checked(dit_out, tmp_path):
    data = json.loads((dit_out / mf.FILENAME).read_text())
    del data["model_io"]["index_ranges"]  # a v2 manifest from before the field: read, no check
    assert mf.Manifest.from_json(data).model_io.index_ranges == {}
    data["model_io"]["index_ranges"] = {"hidden_states": [0, 4]}
    with pytest.raises(mf.SchemaError, match=r"model_io.index_ranges.hidden_states: 'hidden_states' is not an integer"):
        mf.Manifest.from_json(data)
    data["model_io"]["index_ranges"] = {"class_labels": [5, 5]}
    with pytest.raises(mf.SchemaError, match=r"\[5, 5\) is not a range"):
        mf.Manifest.from_json(data)
    data["model_io"]["index_ranges"] = {"class_labels": [0]}
    with pytest.raises(mf.SchemaError, match=r"index_ranges.class_labels: expected 2 entries"):
        mf.Manifest.from_json(data)


# ------------------------------------------------------------------ inputs files and seeds


def test_npy_inputs_and_negative_seed(dit_out, tmp_path, capsys):
    npy = tmp_path / "x.npy"
    np.save(npy, np.array([1, 2], np.int64))
    io = list(mf.read_manifest(dit_out).model_io.inputs)
    with pytest.raises(UserError, match=r"x.npy: a single .npy array, not an .npz of arrays keyed by input name"):
        load_conditioning(npy, io, guidance=True)
    assert main(["run", str(dit_out), "--inputs", str(npy), "--out", str(tmp_path / "r.npz"), "-q"]) == 2
    assert "a single .npy array" in one_line_error(capsys)

    rt = OmniCache.load(dit_out)
    try:
        labels = {"class_labels": np.array([1], np.int64)}, {"class_labels": np.array([10], np.int64)}
        with pytest.raises(UserError, match=r"^seed -1: must be >= 0$"):
            rt.sample(*labels, seed=-1)
        with pytest.raises(UserError, match=r"^seed 1.5: must be an integer >= 0$"):
            rt.sample(*labels, seed=1.5)
    finally:
        rt.close()
    inputs = labels_npz(tmp_path / "in.npz", [1])
    assert main(["run", str(dit_out), "--inputs", str(inputs), "--out", str(tmp_path / "r.npz"), "--seed", "-1"]) == 2
    assert "seed -1" in one_line_error(capsys)


# ------------------------------------------------------------------ non-finite sampling


@pytest.fixture(scope="module")
def pixart(zoo_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart-values")
    calib = write_inputs_npz("pixart", folder / "calib.npz", batch=2, seed=3)
    huge = folder / "huge.npz"
    arrays = dict(np.load(calib))
    arrays["encoder_hidden_states"] = arrays["encoder_hidden_states"] * np.float32(1e38)
    np.savez(huge, **arrays)
    return zoo_export("pixart", "torchscript"), calib, huge


def test_non_finite_export_names_rows_and_step(pixart, tmp_path, capsys):
    model, _, huge = pixart
    with pytest.raises(NonFiniteSamples) as info:
        export(model, tmp_path / "out", ExportOptions(scheduler="flow-euler", steps=4, calib=huge, num_calib=2,
                                                      validation="seeds", progress=False))  # both rows choose
    assert info.value.rows == [0, 1] and info.value.step == 0
    assert str(info.value).startswith("sampling went non-finite (NaN or inf) in rows 0, 1 of 2, from step 0 of 4")
    assert not (tmp_path / "out").exists()
    argv = [str(model), "-o", str(tmp_path / "out"), "--scheduler", "flow-euler", "--steps", "4", "--calib", str(huge),
            "--validation", "seeds", "-q"]
    assert main(argv) == 2
    assert "in rows 0, 1 of 2, from step 0 of 4" in one_line_error(capsys)


def test_non_finite_run_names_rows_and_step(pixart, tmp_path, capsys):
    model, calib, huge = pixart
    out = tmp_path / "out"
    export(model, out, ExportOptions(scheduler="flow-euler", steps=4, calib=calib, num_calib=2, progress=False))
    rt = OmniCache.load(out)
    try:
        arrays = dict(np.load(calib))
        one = dict(arrays, encoder_hidden_states=arrays["encoder_hidden_states"].copy())
        one["encoder_hidden_states"][1] *= np.float32(1e38)  # row 1 only
        cond = {"encoder_hidden_states": one["encoder_hidden_states"]}
        with pytest.raises(NonFiniteSamples) as info:
            rt.sample(cond, {}, seed=0, batched={"encoder_hidden_states"})
        assert info.value.rows == [1] and info.value.step == 0
        assert "in row 1 of 2, from step 0 of 4" in str(info.value)
    finally:
        rt.close()
    assert main(["run", str(out), "--inputs", str(huge), "--out", str(tmp_path / "r.npz"), "-q"]) == 2
    assert "sampling went non-finite (NaN or inf) in rows 0, 1 of 2, from step 0 of 4" in one_line_error(capsys)
    assert not (tmp_path / "r.npz").exists()


def test_first_non_finite_step_is_found_by_replay(dit_out, monkeypatch):
    """NaN injected into row 2's latents at step 2 of 4 (batches of 2; the replay sees it too):
    rows [2], step 2."""
    from omnicache_export.runtime import generation
    from omnicache_export.runtime.sampler import initial_noise

    rt = OmniCache.load(dit_out)
    noise = initial_noise(rt.spec, 0, range(4))
    real_init, real_step = generation.Generation.__init__, Denoiser.step

    def init(self, dispatch, spec, full_steps, cond, uncond, x0, **kw):
        real_init(self, dispatch, spec, full_steps, cond, uncond, x0, **kw)
        self.den.first_row = next(r for r in range(4) if np.allclose(x0[0].numpy(), noise[r]))

    def step(self, i, prediction, x):
        out = real_step(self, i, prediction, x)
        if i == 2 and self.first_row == 2:
            out[0] = float("nan")
        return out

    monkeypatch.setattr(generation.Generation, "__init__", init)
    monkeypatch.setattr(Denoiser, "step", step)
    try:
        with pytest.raises(NonFiniteSamples) as info:
            rt.sample({"class_labels": np.arange(4, dtype=np.int64)}, {"class_labels": np.full(4, 10, np.int64)},
                      batch_size=2)
    finally:
        rt.close()
    assert info.value.rows == [2] and info.value.step == 2
    assert str(info.value).startswith("sampling went non-finite (NaN or inf) in row 2 of 4, from step 2 of 4")


# ------------------------------------------------------------------ steps against the scheduler


@pytest.mark.parametrize("scheduler,steps,message", [
    ("ddim", 1000, "--steps 1000: DDIMScheduler cannot sample 1000 steps (its timesteps reach 1000, outside its "
                   "1000 training timesteps [0, 1000)): use at most 999"),
    ("ddim", 5000, "--steps 5000: DDIMScheduler takes 1 to 1000 steps (it has 1000 training timesteps)"),
    ("dpmsolver++", 1000, "--steps 1000: DPMSolverMultistepScheduler cannot sample 1000 steps (its timesteps "
                          "repeat): use at most 999"),
    ("flow-euler", 100000, "--steps 100000: FlowMatchEulerDiscreteScheduler takes 1 to 1000 steps (a flow "
                           "scheduler is capped at its num_train_timesteps, 1000)"),
])
def test_steps_checked_against_the_scheduler_up_front(dit, tmp_path, scheduler, steps, message):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        export(dit, tmp_path / "out", ExportOptions(scheduler=scheduler, steps=steps, progress=False))
    assert str(info.value) == message
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "out").exists()


def test_steps_at_the_limits_are_accepted():
    for scheduler, steps in (("ddim", 999), ("dpmsolver++", 999), ("euler", 1000), ("flow-euler", 1000)):
        check_steps(scheduler_config(scheduler), steps)


def test_steps_refused_via_cli(dit, tmp_path, capsys):
    argv = [str(dit), "-o", str(tmp_path / "out"), "--scheduler", "ddim", "--steps", "1000", "-q"]
    assert main(argv) == 2
    assert "--steps 1000: DDIMScheduler cannot sample 1000 steps" in one_line_error(capsys)


# ------------------------------------------------------------------ bounded work


def test_synthesized_conditioning_is_made_per_batch(dit):
    model = ir.load(dit)
    io = analyze(model).io
    huge = synthesize_conditioning(model, io, 10**12, seed=0)  # nothing materialized
    small = synthesize_conditioning(model, io, 5, seed=0)
    labels = huge.cond["class_labels"]
    assert isinstance(labels, SynthesizedRows) and labels.shape == (10**12,)
    rows = labels[[0, 3, 4]]
    assert rows.dtype == np.int64 and np.array_equal(rows, small.cond["class_labels"][[0, 3, 4]])
    assert np.array_equal(np.asarray(small.cond["class_labels"]), small.cond["class_labels"][list(range(5))])
    assert ((rows >= 0) & (rows < TABLE - 1)).all()  # real classes, never the null one
    assert np.array_equal(huge.uncond["class_labels"][[7, 10**12 - 1]], [TABLE - 1] * 2)
    view = labels[10**12 - 2:]
    assert len(view) == 2 and np.array_equal(view[[0, 1]], labels[[10**12 - 2, 10**12 - 1]])


def test_calibration_batch_from_the_memory_estimate(dit):
    from omnicache_export.pipeline.job import sampling_spec

    model = ir.load(dit)
    analysis = analyze(model)
    spec = sampling_spec(analysis, ExportOptions(scheduler="ddim", steps=3))
    plan = memory.plan_calibration(analysis, spec, 100_000, 300_000, available=8 << 30)
    assert plan.batch_size == memory.MAX_CALIB_BATCH and plan.needed < 1 << 30
    assert plan.kept == memory.FINAL_COPIES * 4 * 4 * 8 * 8 + 8 * 4  # final latents, curvature per point
    io, _ = memory.io_bytes_per_sample(analysis, spec)
    assert plan.per_sample >= memory.ACTIVATION_FACTOR * io
    tight = int((plan.fixed + 100_000 * plan.kept + 10.5 * plan.per_sample) / memory.USABLE_SHARE)
    small = memory.plan_calibration(analysis, spec, 100_000, 300_000, available=tight)
    assert small.batch_size == 10 and small.needed <= memory.USABLE_SHARE * tight
    assert memory.plan_calibration(analysis, spec, 3, 300_000, available=8 << 30).batch_size == 3
    with pytest.raises(UserError, match=r"^the export does not fit in memory: it needs about .* \(the model's weights "
                                        r"×3 .*, 100000 calibration samples' latents .*\) of .* available: lower "
                                        r"--num-calib or free memory$"):
        memory.plan_calibration(analysis, spec, 100_000, 300_000, available=200 << 20)
    assert memory.available_memory() > 0


def test_export_that_cannot_fit_is_refused_before_it_starts(dit, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 256 << 20)
    t0 = time.perf_counter()
    argv = [str(dit), "-o", str(tmp_path / "out"), "--scheduler", "ddim", "--steps", "3", "--num-calib", "100000",
            "-q"]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "the export does not fit in memory" in err and "100000 calibration samples' latents" in err
    assert time.perf_counter() - t0 < 10
    assert not [p for p in tmp_path.iterdir()]


def _rss_peak_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
def test_num_calib_100000_runs_in_bounded_memory(dit, tmp_path):
    """`--num-calib 100000` without --calib used to push every sample through the model at once
    (the OOM killer took a 23 GB machine). Now: batches of MAX_CALIB_BATCH, and the job's peak RSS,
    measured well into the reference run, stays under 1.5 GB. The run is then stopped (finishing
    100000 samples' calibration takes an hour on a CPU; the memory bound is what is tested)."""
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from omnicache_export.pipeline.job import ExportOptions, export
        export({str(dit)!r}, {str(tmp_path / 'out')!r},
               ExportOptions(scheduler="ddim", steps=3, num_calib=100000, progress=False))
    """)
    def cap_address_space():  # a regression fails in the child (MemoryError), never OOM-kills the machine
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            preexec_fn=cap_address_space)
    try:
        lines, deadline = [], time.monotonic() + 60
        for line in proc.stderr:  # until the reference run has started
            lines.append(line)
            if "pass 1: reference samples" in line or time.monotonic() > deadline:
                break
        assert any("pass 1" in line for line in lines), "".join(lines)
        plan = next(line for line in lines if line.startswith("memory: "))
        assert f"100000 calibration samples in batches of {memory.MAX_CALIB_BATCH}" in plan
        time.sleep(4)  # thousands of samples into the reference run
        assert proc.poll() is None, "the export ended early"
        peak = _rss_peak_kib(proc.pid)
        assert peak < 1.5 * 2**20, f"peak RSS {peak / 2**20:.2f} GB"
    finally:
        proc.kill()
        proc.wait()


def test_reference_run_in_batches_equals_one_batch(dit, tmp_path):
    """The reference run batch by batch: the same final latents and curvature as all rows at once;
    the records and the projections kept for the first batch alone."""
    from omnicache_export.calibration.calibrate import CalibrationSet, reference_run
    from omnicache_export.graph.split import write_graphs
    from omnicache_export.passes.cache_names import cache_name
    from omnicache_export.pipeline.job import UNCORRECTED, calibration_graphs, sampling_spec

    model = ir.load(dit)
    analysis = analyze(model)
    spec = sampling_spec(analysis, ExportOptions(scheduler="ddim", steps=4, guidance_scale=2.0))
    write_graphs(dit, model, analysis, tmp_path, cache_name=UNCORRECTED)
    graphs = calibration_graphs(tmp_path, analysis.io, spec, [cache_name(0)], None)
    cond = synthesize_conditioning(model, analysis.io, 5, seed=0)
    try:
        runs = {b: reference_run(graphs, CalibrationSet(spec, cond.cond, cond.uncond, 0, {"class_labels"}, 5,
                                                        batch_size=b), progress=False) for b in (None, 2)}
    finally:
        graphs.close()
    whole, batched = runs[None], runs[2]
    np.testing.assert_allclose(batched.final, whole.final, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched.curvature.mean, whole.curvature.mean, rtol=1e-4, equal_nan=True)
    assert batched.curvature.per_sample.shape == whole.curvature.per_sample.shape == (5, 5)
    assert batched.curvature.projections.shape == (2, 5, 3) and whole.curvature.projections.shape == (5, 5, 3)
    assert len(batched.records) == len(whole.records) == 4 and len(batched.records[0][1]) == 2 * 2  # cond + uncond
    np.testing.assert_array_equal(batched.x0, whole.x0)
