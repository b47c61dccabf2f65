"""Serving: the step batcher (in process) and `omnicache-export serve` (PyTriton, tritonclient on
loopback) on the trained dit-digits reference exported with guidance. Every served latent is
bit-identical to the same request sent alone and to `omnicache-export run` on that row and seed;
malformed requests get one clear error each and the server keeps serving; SIGTERM stops it leaving
no process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from omnicache_export.errors import UserError
from omnicache_export.runtime.manifest import UNCOND_FILE, load_uncond, read_manifest
from omnicache_export.serving.batcher import StepBatcher
from omnicache_export.serving.requests import RequestError
from processes import alive, descendants, free_ports

CLI = [sys.executable, "-m", "omnicache_export.cli"]
STEPS = 6


def cli(*args, **kwargs):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A guided dit-digits export (6 steps) and its example conditioning (one row per class)."""
    root = tmp_path_factory.mktemp("serve")
    done = cli("example", "dit-digits", "-o", root / "dit.onnx", "-q")
    assert done.returncode == 0, done.stderr
    done = cli(root / "dit.onnx", "-o", root / "out", "--calib", root / "dit.inputs.npz", "--scheduler",
               root / "dit.scheduler.json", "--guidance-scale", 2, "--steps", STEPS, "--num-calib", 2, "-q")
    assert done.returncode == 0, done.stderr
    return root / "out", dict(np.load(root / "dit.inputs.npz"))


def request(inputs: dict, row: int, seed: int, uncond: bool = False) -> dict:
    out = {"class_labels": inputs["class_labels"][row:row + 1], "seed": np.array([seed], np.int64)}
    if uncond:
        out["uncond/class_labels"] = inputs["uncond/class_labels"][row:row + 1]
    return out


def run_cli(folder: Path, inputs: dict, row: int, seed: int, tmp_path: Path) -> np.ndarray:
    """`omnicache-export run` on one row (its uncond: the export's stored one) with `seed`."""
    stored = load_uncond(read_manifest(folder))
    np.savez(tmp_path / "row.npz", class_labels=inputs["class_labels"][row:row + 1],
             **{"uncond/class_labels": stored["class_labels"]})
    done = cli("run", folder, "--inputs", tmp_path / "row.npz", "-o", tmp_path / "res.npz", "--seed", seed, "--force")
    assert done.returncode == 0, done.stderr
    return np.load(tmp_path / "res.npz")["latent"]


# ------------------------------------------------------------------ the core, in process


def test_stored_uncond_is_the_first_calibration_row(export):
    folder, inputs = export
    m = read_manifest(folder)
    assert m.uncond == UNCOND_FILE and UNCOND_FILE in m.artifacts
    stored = load_uncond(m)
    np.testing.assert_array_equal(stored["class_labels"], inputs["uncond/class_labels"][:1])


def test_rows_at_different_steps_share_calls_and_match_alone_and_run(export, tmp_path):
    folder, inputs = export
    batcher = StepBatcher.load(folder, max_batch=16)
    try:
        rows = [(r % 10, 50 + r) for r in range(16)]
        alone = []
        for row, seed in rows:
            future = batcher.submit(request(inputs, row, seed))
            batcher.run_until_idle()
            alone.append(future.result()["latent"])
        calls_alone = dict(batcher.calls)
        futures = []
        for k, (row, seed) in enumerate(rows):  # staggered: requests join mid-flight, at other steps
            futures.append(batcher.submit(request(inputs, row, seed)))
            if k % 3 == 0:
                batcher.tick()
        batcher.run_until_idle()
        together = [f.result()["latent"] for f in futures]
        calls = {g: batcher.calls[g] - calls_alone[g] for g in batcher.calls}
    finally:
        batcher.close()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    assert sum(calls.values()) < 16 * STEPS // 2  # shared calls: far fewer than one per request-step
    assert calls["cache"] > 0 and calls["full"] > 0
    assert len({a.tobytes() for a in alone}) == 16
    for k in (0, 5):
        np.testing.assert_array_equal(alone[k], run_cli(folder, inputs, *rows[k], tmp_path))


def test_an_export_with_one_step_for_all_rows_groups_cached_rows_by_step(export):
    """A cache graph from before per-row steps (omnicache_step int64 [1]): cached rows share a call
    only with rows at the same step, and give the same latents."""
    folder, inputs = export
    latents = {}
    for per_row in (True, False):
        batcher = StepBatcher.load(folder, max_batch=8)
        batcher.dispatch.step_per_row = per_row
        batcher.shared_step = not per_row
        try:
            futures = []
            for k in range(6):
                futures.append(batcher.submit(request(inputs, k, 300 + k)))
                batcher.tick()
            batcher.run_until_idle()
            latents[per_row] = [f.result()["latent"] for f in futures]
            calls = batcher.calls["cache"]
        finally:
            batcher.close()
        full = read_manifest(folder).schedule.full  # request k runs step t - k at tick t
        cached_at = [{t - k for k in range(6) if 0 <= t - k < STEPS and not full[t - k]} for t in range(6 + STEPS)]
        assert calls == (sum(map(bool, cached_at)) if per_row else sum(map(len, cached_at)))
    for a, b in zip(*latents.values()):
        np.testing.assert_array_equal(a, b)


def test_uncond_given_equals_stored_when_the_same(export):
    folder, inputs = export
    batcher = StepBatcher.load(folder, max_batch=4)
    try:
        same = request(inputs, 3, 7) | {"uncond/class_labels": load_uncond(batcher._owned.manifest)["class_labels"]}
        other = request(inputs, 3, 7) | {"uncond/class_labels": np.array([3], np.int64)}
        futures = [batcher.submit(r) for r in (request(inputs, 3, 7), same, other)]
        batcher.run_until_idle()
        a, b, c = (f.result()["latent"] for f in futures)
    finally:
        batcher.close()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("arrays, message", [
    ({"class_labels": np.array([1, 2], np.int64), "seed": np.array([0], np.int64)}, "has shape \\[2\\]"),
    ({"class_labels": np.array([1], np.int32), "seed": np.array([0], np.int64)}, "has dtype int32"),
    ({"seed": np.array([0], np.int64)}, "missing input 'class_labels'"),
    ({"class_labels": np.array([1], np.int64), "seed": np.array([0], np.int64), "x": np.zeros(1)}, "unknown input 'x'"),
    ({"class_labels": np.array([11], np.int64), "seed": np.array([0], np.int64)}, "outside the embedding table"),
    ({"class_labels": np.array([1], np.int64), "seed": np.array([-1], np.int64)}, "must be >= 0"),
])
def test_contract_refuses_with_one_line(export, arrays, message):
    batcher = StepBatcher.load(export[0], max_batch=2)
    try:
        with pytest.raises(RequestError, match=message):
            batcher.submit(arrays)
        assert batcher.idle
    finally:
        batcher.close()


def test_nan_conditioning_is_refused():
    from omnicache_export.serving.requests import InputSpec, RequestContract

    contract = RequestContract.__new__(RequestContract)
    contract.inputs = [InputSpec("emb", np.dtype(np.float32), (1, 4)), InputSpec("seed", np.dtype(np.int64), (1,))]
    with pytest.raises(RequestError, match="'emb' holds NaN"):
        contract.parse({"emb": np.array([[0, np.nan, 0, 0]], np.float32), "seed": np.array([0], np.int64)})


def test_changed_uncond_is_refused(export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(export[0], copy)
    np.savez(copy / UNCOND_FILE, class_labels=np.array([3], np.int64))
    with pytest.raises(UserError, match="changed since export"):
        StepBatcher.load(copy)


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(export):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([*CLI, "serve", export[0], "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--max-batch", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"localhost:{grpc}"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            with grpcclient.InferenceServerClient(url) as client:
                if client.is_model_ready("omnicache"):
                    break
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"serve did not come up: {proc.communicate()[0][-3000:]}")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def infer(url: str, arrays: dict) -> np.ndarray:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    with grpcclient.InferenceServerClient(url) as client:
        tensors = []
        for name, value in arrays.items():
            t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            t.set_data_from_numpy(value)
            tensors.append(t)
        return client.infer("omnicache", tensors).as_numpy("latent")


def test_concurrent_requests_are_bit_identical_to_alone_and_to_run(server, export, tmp_path):
    _, url = server
    folder, inputs = export
    rows = [(r % 10, 1000 + r) for r in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda rs: infer(url, request(inputs, *rs)), rows))
    alone = [infer(url, request(inputs, *rs)) for rs in rows]
    for a, b in zip(alone, together):
        assert a.shape == (1, 1, 8, 8) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in alone}) == 16
    np.testing.assert_array_equal(alone[3], run_cli(folder, inputs, *rows[3], tmp_path))
    with_uncond = infer(url, request(inputs, *rows[3], uncond=True))  # the calibration set's own uncond row
    np.testing.assert_array_equal(with_uncond, alone[3])  # dit-digits' uncond rows are all the null class


@pytest.mark.parametrize("arrays, message", [
    ({"class_labels": np.array([1, 2], np.int64), "seed": np.array([0], np.int64)}, "unexpected shape"),
    ({"class_labels": np.array([1], np.int32), "seed": np.array([0], np.int64)}, "expects 'INT64'"),
    ({"seed": np.array([0], np.int64)}, "missing required input"),
    ({"class_labels": np.array([1], np.int64), "seed": np.array([0], np.int64), "x": np.zeros(1, np.float32)},
     "unexpected inference input 'x'"),
    ({"class_labels": np.array([99], np.int64), "seed": np.array([0], np.int64)}, "outside the embedding table"),
])
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(server, export, arrays, message):
    from tritonclient.utils import InferenceServerException

    _, url = server
    with pytest.raises(InferenceServerException, match=message):
        infer(url, arrays)
    assert infer(url, request(export[1], 2, 5)).shape == (1, 1, 8, 8)


def test_nan_request_gets_an_error(server, export):
    """dit-digits takes only integer conditioning: a float NaN cannot reach it through Triton's own
    dtype check; NaN refusal of float conditioning is checked on the contract (test_nan_conditioning_is_refused)."""
    from tritonclient.utils import InferenceServerException

    _, url = server
    with pytest.raises(InferenceServerException, match="expects 'INT64'"):
        infer(url, {"class_labels": np.array([np.nan], np.float32), "seed": np.array([0], np.int64)})


def test_zz_sigterm_stops_cleanly_with_no_stray_process(server):
    proc, _ = server
    children = descendants(proc.pid)
    assert children  # tritonserver and its stubs
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: stopping the server" in out
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if alive(p)]


def test_bad_folder_is_one_line_exit_2(tmp_path):
    done = cli("serve", tmp_path / "nope", "--http-port", 1, "--grpc-port", 2, "--metrics-port", 3)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "omnicache.json" in done.stderr, done.stderr
