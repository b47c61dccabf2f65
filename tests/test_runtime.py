"""The runtime on torch tensors against a plain numpy loop, its batching and seeding, the CLI's
`run` against the API, and the runtime's imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from omnicache_export.cli.main import main
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.runtime.sampler import make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS = 8
LABELS = np.array([1, 3, 5, 7], np.int64)


@pytest.fixture(scope="module")
def dit_out(zoo_export, tmp_path_factory):
    """DiT (class labels, learned sigma, DDIM, guidance), calibrated on real labels."""
    folder = tmp_path_factory.mktemp("runtime")
    calib = folder / "calib.npz"
    np.savez(calib, class_labels=LABELS, **{"uncond/class_labels": np.full(len(LABELS), 9, np.int64)})
    out = folder / "out"
    opts = ExportOptions(steps=STEPS, calib=calib, num_calib=2, guidance_scale=2.0, cache_ratio=0.5, progress=False)
    export(zoo_export("dit", "torchscript"), out, opts)
    return out, calib


def numpy_reference(folder, labels: np.ndarray, null: int, seed: int) -> np.ndarray:
    """The exported graphs sampled by a plain loop written from the file formats alone: ONNX Runtime
    sessions on numpy arrays, the cache graph's inputs fed by name, diffusers' scheduler."""
    m = json.loads((folder / "omnicache.json").read_text())
    s = m["sampling"]
    full_sess = ort.InferenceSession(str(folder / "full.onnx"), providers=["CPUExecutionProvider"])
    cache_sess = ort.InferenceSession(str(folder / "cache.onnx"), providers=["CPUExecutionProvider"])
    full_names = [o.name for o in full_sess.get_outputs()]
    caches = [n for n in full_names if n.startswith("omnicache_cache")]
    scheduler = make_scheduler(s["scheduler"])
    scheduler.set_timesteps(s["n_steps"])
    n = len(labels)
    x = np.stack([np.random.default_rng([seed, r]).standard_normal(s["latent_shape"], dtype=np.float32)
                  for r in range(n)]) * float(scheduler.init_noise_sigma)
    cond = {"class_labels": np.concatenate([labels, np.full(n, null, np.int64)])}
    state = {"prev": None, "prev2": None, "caches": {}, "caches_prev": {}}
    schedule = [e["full"] if isinstance(e, dict) else e for e in m["schedule"]["full"]]
    for i, t in enumerate(scheduler.timesteps):
        latent = scheduler.scale_model_input(torch.from_numpy(x), t).numpy()
        feeds = {s["latent"]: np.concatenate([latent, latent]), s["timestep"]: np.full(2 * n, float(t), np.float32),
                 **cond}
        if schedule[i]:
            outs = dict(zip(full_names, full_sess.run(full_names, feeds)))
            raw = outs[s["output"]]
            state["caches_prev"], state["caches"] = state["caches"], {k: outs[k] for k in caches}
            state["prev2"], state["prev"] = state["prev"], raw
        else:
            prev2 = state["prev2"] if state["prev2"] is not None else np.zeros_like(state["prev"])
            extra = {"omnicache_step": np.array([i], np.int64), "omnicache_full_prev": state["prev"],
                     "omnicache_full_prev2": prev2, **state["caches"]}
            for k in caches:
                extra[f"{k}_prev"] = state["caches_prev"].get(k, state["caches"][k])
            wanted = {a.name: extra[a.name] if a.name in extra else feeds[a.name] for a in cache_sess.get_inputs()}
            raw = cache_sess.run([s["output"]], wanted)[0]
        pred = raw[:, : s["latent_shape"][0]]
        c, u = np.split(pred, 2)
        guided = u + s["guidance_scale"] * (c - u)
        x = scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(x), return_dict=False)[0].numpy()
    return x


def test_torch_generation_equals_numpy_reference(dit_out):
    out, _ = dit_out
    rt = OmniCache.load(out)
    try:
        got = rt.sample({"class_labels": LABELS}, {"class_labels": np.full(len(LABELS), 9, np.int64)}, seed=3)
        counts = rt.run({"class_labels": LABELS[:1]}, {"class_labels": np.full(1, 9, np.int64)}, seed=3)
    finally:
        rt.close()
    expected = numpy_reference(out, LABELS, 9, seed=3)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    n_cached = int((~np.array(rt.full_steps)).sum())
    assert (counts.full_steps, counts.cached_steps) == (STEPS - n_cached, n_cached) and n_cached > 0


def test_noise_is_a_function_of_seed_and_row(dit_out):
    out, _ = dit_out
    cond, uncond = {"class_labels": LABELS}, {"class_labels": np.full(len(LABELS), 9, np.int64)}
    rt = OmniCache.load(out)
    try:
        whole = rt.sample(cond, uncond, seed=5)
        ones = rt.sample(cond, uncond, seed=5, batch_size=1)
        pairs = rt.sample(cond, uncond, seed=5, batch_size=3)  # a batch of 3 and one of 1
        third = rt.sample({"class_labels": LABELS[2:3]}, {"class_labels": np.full(1, 9, np.int64)}, seed=5, rows=[2])
        other = rt.sample(cond, uncond, seed=6)
    finally:
        rt.close()
    scale = np.abs(whole).max()
    for result in (ones, pairs):
        assert np.abs(result - whole).max() <= 1e-5 * scale  # the batch size only changes float rounding
    assert np.abs(third[0] - whole[2]).max() <= 1e-5 * scale
    assert np.abs(other - whole).max() > 0.1 * scale


def test_run_cli_equals_api(dit_out, tmp_path, capsys):
    out, calib = dit_out
    result = tmp_path / "r.npz"
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(result), "--seed", "2", "-q"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rt = OmniCache.load(out)
    try:
        api = rt.sample({"class_labels": LABELS}, {"class_labels": np.full(len(LABELS), 9, np.int64)}, seed=2)
    finally:
        rt.close()
    with np.load(result) as data:
        np.testing.assert_array_equal(data["latent"], api)  # same batching (all rows): bit for bit
    n_cached = int((~np.array(rt.full_steps)).sum())
    assert printed["cached_steps"] == n_cached and printed["full_steps"] == STEPS - n_cached
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(result), "--seed", "-1", "--force"]) == 2
    assert main(["run", str(out), "--inputs", str(calib), "--out", str(result), "--batch-size", "0",
                 "--force"]) == 2


def test_verification_bounds_runtime_against_calibration(dit_out):
    out, _ = dit_out
    v = json.loads((out / "omnicache.json").read_text())["verification"]
    # the same dispatch and graph, tables fed in calibration and frozen in the export
    assert v["runtime_vs_calibration_max_rel_err"] <= 1e-5 <= v["tolerance"]


def test_runtime_imports_no_graph_tooling():
    code = ("import sys, omnicache_export.runtime, omnicache_export.runtime.manifest, "
            "omnicache_export.runtime.conditioning, omnicache_export.runtime.deploy, "
            "omnicache_export.runtime.graph_check, omnicache_export.engines; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnx_ir', 'onnxscript') or "
            "m.startswith(('omnicache_export.passes', 'omnicache_export.graph', 'omnicache_export.calibration')));"
            "print(','.join(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_tensorrt_profile_and_triton_config_from_a_real_manifest(dit_out):
    """From the manifest alone: the profile's min and max shapes run both exported graphs (ONNX
    Runtime, zeros), and the Triton configs name every graph input and output with its type."""
    from google.protobuf import text_format

    from omnicache_export.runtime.deploy import tensorrt_profiles, triton_model_config
    from omnicache_export.runtime.manifest import read_manifest

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    out, _ = dit_out
    m = read_manifest(out)
    profiles = tensorrt_profiles(m, min_batch=1, opt_batch=2, max_batch=3)
    types = {"FLOAT": np.float32, "INT64": np.int64}
    for graph in ("full", "cache"):
        session = ort.InferenceSession(str(out / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        declared = {a.name: a for a in session.get_inputs()}
        io = m.graphs[graph]
        assert set(profiles[graph]) == set(declared) == {t.name for t in io.inputs}
        for pick in (0, 2):  # min, max
            feeds = {t.name: np.zeros(profiles[graph][t.name][pick], types[t.dtype]) for t in io.inputs}
            if "omnicache_step" in feeds:
                feeds["omnicache_step"][:] = 2
            outputs = session.run(None, feeds)
            assert outputs[0].shape[0] == 2 * (1 if pick == 0 else 3)  # guidance: two model rows a sample
        config = text_format.Parse(triton_model_config(m, graph, "onnxruntime_onnx", 0),
                                   model_config_pb2.ModelConfig())
        assert {i.name for i in config.input} == set(declared)
        assert {o.name for o in config.output} == {t.name for t in io.outputs}
        for i in config.input:
            assert model_config_pb2.DataType.Name(i.data_type) == {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}[
                next(t.dtype for t in io.inputs if t.name == i.name)]
