"""`omnicache-export triton-repo`: the repository served by a real Triton server, and its configs.

The Python-backend repository (`--engines python-onnxruntime`) runs on PyTriton's bundled
`tritonserver` (Triton 2.51 with only the Python backend), launched the way PyTriton launches it;
tritonclient is the client. The `onnxruntime` and `tensorrt` repositories are checked statically
(that bundle has neither backend): configs parsed with Triton's own protobuf, against the manifest
and the graphs' IO as ONNX Runtime reads them, and every copied file's hash.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from omnicache_export.cli.main import main
from omnicache_export.hashing import sha256_file
from omnicache_export.runtime.manifest import load_uncond, read_manifest
from omnicache_export.serving.pytriton_model import stub_library_path
from processes import alive, descendants, free_ports

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STEPS = 6
MAX_BATCH = 4
TYPES = {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}


@pytest.fixture(scope="module")
def export_out(zoo_export, tmp_path_factory):
    """DiT (class labels, guidance 2): its export stores the uncond row (label 9) a request may omit."""
    from omnicache_export.pipeline.job import ExportOptions, export

    folder = tmp_path_factory.mktemp("triton")
    calib = folder / "calib.npz"
    np.savez(calib, class_labels=np.array([1, 3, 5], np.int64), **{"uncond/class_labels": np.full(3, 9, np.int64)})
    out = folder / "out"
    export(zoo_export("dit", "torchscript"), out,
           ExportOptions(steps=STEPS, calib=calib, num_calib=3, guidance_scale=2.0, cache_ratio=0.5, progress=False))
    return out


def _repo(export_out, tmp_path, engines: str) -> Path:
    repo = tmp_path / f"repo-{engines}"
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--engines", engines,
                 "--max-batch", str(MAX_BATCH)]) == 0
    return repo


def _config(path: Path):
    from google.protobuf import text_format

    pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(path.read_text(), pb2.ModelConfig()), pb2


def _params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


# ------------------------------------------------------------------ static checks


def _check_engine_model(repo: Path, name: str, graph: str, manifest, platform: str, session) -> object:
    config, pb2 = _config(repo / name / "config.pbtxt")
    assert config.name == name and config.platform == platform
    assert config.max_batch_size == 2 * MAX_BATCH  # guidance: two model rows per request
    assert config.HasField("dynamic_batching")
    io = manifest.graphs[graph]
    declared = {a.name: a for a in session.get_inputs()} | {a.name: a for a in session.get_outputs()}
    tensors = [*config.input, *config.output]
    assert [t.name for t in config.input] == [t.name for t in io.inputs] == [a.name for a in session.get_inputs()]
    assert [t.name for t in config.output] == [t.name for t in io.outputs]
    for t in tensors:
        spec = next(s for s in (*io.inputs, *io.outputs) if s.name == t.name)
        assert pb2.DataType.Name(t.data_type) == TYPES[spec.dtype]
        shape = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        graph_shape = declared[t.name].shape
        assert len(shape) + 1 == len(graph_shape)  # Triton's batch axis, then the per-row dims
        for d, g in zip(shape, graph_shape[1:]):
            assert d == g or not isinstance(g, int), (t.name, shape, graph_shape)
    # the config's shapes at its largest batch run the graph
    feeds = {}
    for t in config.input:
        shape = [config.max_batch_size, *(t.reshape.shape if t.HasField("reshape") else t.dims)]
        kind = np.float32 if t.data_type == pb2.TYPE_FP32 else np.int64
        feeds[t.name] = np.zeros(shape, kind) + (2 if t.name == "omnicache_step" else 0)
    out = session.run(None, feeds)
    expect = [config.max_batch_size, *config.output[0].dims]
    assert list(out[0].shape) == expect
    return config


def _check_loop_model(repo: Path, manifest, export_out: Path, gpu: bool) -> None:
    config, pb2 = _config(repo / "omnicache" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        ("class_labels", [1], False), ("uncond/class_labels", [1], True), ("seed", [1], False)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("latent", [1, *manifest.sampling.latent_shape])]
    groups = pb2.ModelInstanceGroup
    assert config.instance_group[0].kind == (groups.KIND_GPU if gpu else groups.KIND_CPU)
    params = _params(config)
    assert (params["full_model"], params["cache_model"], params["max_batch"]) == (
        "omnicache_full", "omnicache_cache", str(MAX_BATCH))
    export = repo / "omnicache" / "1" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["omnicache.json", "uncond.npz"]
    assert params["sha256:omnicache.json"] == sha256_file(export / "omnicache.json") == sha256_file(
        export_out / "omnicache.json")
    assert params["sha256:uncond.npz"] == sha256_file(export / "uncond.npz") == manifest.artifacts["uncond.npz"].sha256
    assert "OmniCacheModel as TritonPythonModel" in (repo / "omnicache" / "1" / "model.py").read_text()


def test_onnxruntime_repository(export_out, tmp_path):
    repo = _repo(export_out, tmp_path, "onnxruntime")
    manifest = read_manifest(export_out)
    assert sorted(p.name for p in repo.iterdir()) == ["omnicache", "omnicache_cache", "omnicache_full",
                                                      "omnicache_repository.json"]
    for graph in ("full", "cache"):
        model = repo / f"omnicache_{graph}" / "1" / "model.onnx"
        assert sha256_file(model) == manifest.artifacts[f"{graph}.onnx"].sha256
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        _check_engine_model(repo, f"omnicache_{graph}", graph, manifest, "onnxruntime_onnx", session)
    _check_loop_model(repo, manifest, export_out, gpu=False)


def test_external_data_graphs(zoo_export, tmp_path):
    """A graph with external data: Triton's ONNX Runtime backend takes model.onnx as a folder holding
    the graph and its data file (named as the graph names it); the Python-backend engines keep both
    beside model.py. Each copy is hashed, and ONNX Runtime loads it from there."""
    from omnicache_export.pipeline.job import ExportOptions, export

    out = tmp_path / "out"
    export(zoo_export("dit", "torchscript", external_data=True), out,
           ExportOptions(steps=4, num_calib=2, guidance_scale=1.0, cache_ratio=0.5, progress=False))
    manifest = read_manifest(out)
    assert "full.onnx.data" in manifest.artifacts
    for engines, graph_path in (("onnxruntime", "model.onnx/model.onnx"), ("python-onnxruntime", "full.onnx")):
        repo = _repo(out, tmp_path, engines)
        version = repo / "omnicache_full" / "1"
        graph = version / graph_path
        data = graph.parent / "full.onnx.data"
        assert sha256_file(graph) == manifest.artifacts["full.onnx"].sha256
        assert sha256_file(data) == manifest.artifacts["full.onnx.data"].sha256
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        assert [a.name for a in session.get_inputs()] == [t.name for t in manifest.graphs["full"].inputs]
        if engines == "python-onnxruntime":
            params = _params(_config(repo / "omnicache_full" / "config.pbtxt")[0])
            assert set(params) >= {"sha256:full.onnx", "sha256:full.onnx.data"}
        config, _ = _config(repo / "omnicache" / "config.pbtxt")  # no guidance: no uncond inputs
        assert [i.name for i in config.input] == ["class_labels", "seed"]


def test_tensorrt_repository_without_plans(export_out, tmp_path, capsys):
    """The export has no plans (no TensorRT here): configs and profiles from the manifest, one warning."""
    repo = _repo(export_out, tmp_path, "tensorrt")
    assert "no TensorRT plans" in capsys.readouterr().err
    manifest = read_manifest(export_out)
    for graph in ("full", "cache"):
        name = f"omnicache_{graph}"
        assert list((repo / name / "1").iterdir()) == []  # where model.plan goes
        session = ort.InferenceSession(str(export_out / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        config = _check_engine_model(repo, name, graph, manifest, "tensorrt_plan", session)
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        text = (repo / name / "config.pbtxt").read_text()  # the profile the plan must hold covers the batch
        top = 2 * MAX_BATCH
        assert f"# hidden_states: min [2, 4, 8, 8] opt [{top}, 4, 8, 8] max [{top}, 4, 8, 8]" in text
    _check_loop_model(repo, manifest, export_out, gpu=True)


def test_python_onnxruntime_repository_and_its_load_checks(export_out, tmp_path):
    """Python-backend engine models: the graph beside a model.py, its hash a config parameter that
    the model checks at load (a changed file refused in one line)."""
    from omnicache_export.errors import UserError
    from omnicache_export.serving.triton_model import check_files

    repo = _repo(export_out, tmp_path, "python-onnxruntime")
    manifest = read_manifest(export_out)
    for graph in ("full", "cache"):
        name = f"omnicache_{graph}"
        config, _ = _config(repo / name / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert [i.name for i in config.input] == [t.name for t in manifest.graphs[graph].inputs]
        assert list(config.input[0].dims) == [-1, 4, 8, 8]  # the batch axis is the model's, variable
        params = _params(config)
        version = repo / name / "1"
        assert params["graph_file"] == f"{graph}.onnx"
        assert params[f"sha256:{graph}.onnx"] == sha256_file(version / f"{graph}.onnx") == \
            manifest.artifacts[f"{graph}.onnx"].sha256
        assert "OnnxRuntimeGraphModel as TritonPythonModel" in (version / "model.py").read_text()
        check_files(version, params)
    _check_loop_model(repo, manifest, export_out, gpu=False)
    export = repo / "omnicache" / "1" / "export"
    params = _params(_config(repo / "omnicache" / "config.pbtxt")[0])
    with open(export / "uncond.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="uncond.npz: changed since the repository was written"):
        check_files(export, params)


def test_tensorrt_repository_copies_the_plans(export_out, tmp_path):
    """An export whose manifest lists TensorRT plans (stand-in bytes here: no TensorRT to build them):
    each is copied to model.plan with the manifest's hash; a plan changed since is refused."""
    from omnicache_export.runtime.manifest import write_manifest

    from conftest import with_plans

    out = tmp_path / "out"
    shutil.copytree(export_out, out)
    manifest = with_plans(out)  # placeholder plan files ("not a real full plan"), hashed, with their records
    write_manifest(out, manifest)
    plans = {g: (out / getattr(manifest.engines[-1], g)).read_bytes() for g in ("full", "cache")}
    repo = _repo(out, tmp_path, "tensorrt")
    for graph in ("full", "cache"):
        assert (repo / f"omnicache_{graph}" / "1" / "model.plan").read_bytes() == plans[graph]
    (out / manifest.engines[-1].cache).write_bytes(b"plan of cachE")
    assert main(["triton-repo", str(out), "-o", str(tmp_path / "again"), "--engines", "tensorrt"]) == 2
    assert not (tmp_path / "again").exists()


def test_force_replaces_only_a_repository_it_wrote(export_out, tmp_path, capsys):
    """The marker lists the models triton-repo wrote: --force replaces those, never a file it did not write."""
    import json

    repo = _repo(export_out, tmp_path, "onnxruntime")
    assert json.loads((repo / "omnicache_repository.json").read_text())["models"] == [
        "omnicache", "omnicache_full", "omnicache_cache"]
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--engines", "python-onnxruntime"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--engines", "python-onnxruntime", "--force",
                 "--name", "loop"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["loop", "loop_cache", "loop_full", "omnicache_repository.json"]
    assert (repo / "loop_full" / "1" / "model.py").exists()  # the python-onnxruntime engines replaced the others
    (repo / "mine").mkdir()
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--force"]) == 2
    assert "did not write (mine)" in capsys.readouterr().err and (repo / "loop").is_dir()


def test_bad_input_exit_2_nothing_written(export_out, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tmp_path / "missing"), "-o", str(repo)]) == 2
    assert "no omnicache.json" in capsys.readouterr().err and not repo.exists()
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err and not repo.exists()
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--name", "a/b"]) == 2
    assert "--name" in capsys.readouterr().err and not repo.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]
    repo.mkdir()
    (repo / "mine.txt").write_text("x")
    assert main(["triton-repo", str(export_out), "-o", str(repo), "--force"]) == 2
    assert (repo / "mine.txt").read_text() == "x"


# ------------------------------------------------------------------ the bundled server


class BundledServer:
    """PyTriton's tritonserver on a repository, started as PyTriton starts it: the distribution copied
    without the stubs, this Python's stub put in the Python backend, the package's own libraries and
    this interpreter's libpython directory on LD_LIBRARY_PATH, this environment's bin first on PATH
    (so the stub's Python sees this environment's packages, omnicache-export among them)."""

    def __init__(self, repo: Path, work: Path):
        pytriton = pytest.importorskip("pytriton", reason="needs nvidia-pytriton (its bundled tritonserver)")
        dist = Path(pytriton.__file__).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            pytest.skip(f"PyTriton ships no Python-backend stub for Python {version}")
        self.root = work / "tritonserver"
        shutil.copytree(dist, self.root, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(stub, self.root / "backends" / "python" / "triton_python_backend_stub")
        libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = f"{stub_library_path()}:{libs}"  # libpython's folder first (serve's own fix)
        env["PATH"] = f"{Path(sys.exec_prefix) / 'bin'}:{env.get('PATH', '')}"
        binary = self.root / "bin" / "tritonserver"
        try:
            probe = subprocess.run([binary, "--help"], env=env, capture_output=True, text=True, timeout=60)
        except OSError as exc:
            pytest.skip(f"the bundled tritonserver cannot run here: {exc}")
        if "--model-repository" not in probe.stdout + probe.stderr:
            pytest.skip(f"the bundled tritonserver cannot run here: {(probe.stderr or probe.stdout).strip()[-300:]}")
        self.http, self.grpc, metrics = free_ports(3)
        self.log = work / "tritonserver.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [binary, "--model-repository", str(repo), "--backend-directory", str(self.root / "backends"),
             "--cache-directory", str(self.root / "caches"), "--http-port", str(self.http), "--grpc-port",
             str(self.grpc), "--metrics-port", str(metrics), "--exit-timeout-secs", "20"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout=240)
        self.stubs = descendants(self.proc.pid)  # the Python stubs, one per model instance

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(f"127.0.0.1:{self.http}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    client.close()
                    return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"tritonserver not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(export_out, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc")
    work = tmp_path_factory.mktemp("server")
    assert main(["triton-repo", str(export_out), "-o", str(work / "repo"), "--engines", "python-onnxruntime",
                 "--max-batch", str(MAX_BATCH)]) == 0
    srv = BundledServer(work / "repo", work)
    yield srv
    srv.stop()


def _reference(export_out: Path, tmp_path: Path, label: int, uncond: int, seed: int) -> np.ndarray:
    """`omnicache-export run` on that one row with that seed."""
    inputs, result = tmp_path / f"in-{label}-{uncond}-{seed}.npz", tmp_path / f"out-{label}-{uncond}-{seed}.npz"
    np.savez(inputs, class_labels=np.array([label], np.int64), **{"uncond/class_labels": np.array([uncond], np.int64)})
    assert main(["run", str(export_out), "--inputs", str(inputs), "-o", str(result), "--seed", str(seed)]) == 0
    return np.load(result)["latent"]


def _infer(server: BundledServer, arrays: dict[str, np.ndarray], protocol: str = "http") -> np.ndarray:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    module, url = (http, server.http) if protocol == "http" else (grpc, server.grpc)
    inputs = []
    for name, array in arrays.items():
        dtype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}[array.dtype]
        t = module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    client = module.InferenceServerClient(f"127.0.0.1:{url}")
    try:
        return client.infer("omnicache", inputs).as_numpy("latent")
    finally:
        client.close()  # an open connection would hold the server's shutdown until its exit timeout


def _request(label: int, seed: int, uncond: int | None = None) -> dict[str, np.ndarray]:
    arrays = {"class_labels": np.array([label], np.int64), "seed": np.array([seed], np.int64)}
    if uncond is not None:
        arrays["uncond/class_labels"] = np.array([uncond], np.int64)
    return arrays


def _statistics(server: BundledServer) -> dict[str, int]:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{server.http}")
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    return {s["name"]: int(s["inference_stats"]["success"]["count"]) for s in stats}


def test_concurrent_requests_bit_identical_to_run(server, export_out, tmp_path):
    """Six requests at once (HTTP and gRPC, own seeds, stored or given uncond rows): each latent equals
    `omnicache-export run` on that row and seed bit for bit, and in-flight requests shared engine calls."""
    stored = int(load_uncond(read_manifest(export_out))["class_labels"][0])
    cases = [(1, 0, None), (3, 7, None), (5, 11, 9), (2, 3, 4), (8, 123, None), (0, 5, 10)]
    before = _statistics(server)
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(_infer, server, _request(label, seed, uncond), "grpc" if k % 2 else "http")
                   for k, (label, seed, uncond) in enumerate(cases)]
        latents = [f.result(timeout=300) for f in futures]
    after = _statistics(server)
    for (label, seed, uncond), latent in zip(cases, latents):
        expected = _reference(export_out, tmp_path, label, stored if uncond is None else uncond, seed)
        assert latent.shape == expected.shape == (1, 4, 8, 8)
        assert latent.dtype == np.float32 and np.array_equal(latent, expected), (label, seed)
    assert len({latent.tobytes() for latent in latents}) == len(cases)
    manifest = read_manifest(export_out)
    n_full = sum(manifest.schedule.full)
    calls = {g: after[f"omnicache_{g}"] - before.get(f"omnicache_{g}", 0) for g in ("full", "cache")}
    assert after["omnicache"] - before.get("omnicache", 0) == len(cases)
    assert calls["full"] + calls["cache"] < len(cases) * STEPS  # requests in flight shared engine calls
    assert 1 <= calls["full"] <= len(cases) * n_full


@pytest.mark.parametrize("arrays, message", [
    ({"class_labels": np.array([1, 2], np.int64), "seed": np.array([0], np.int64)}, "class_labels"),
    ({"class_labels": np.array([1], np.int32), "seed": np.array([0], np.int64)}, "class_labels"),
    ({"class_labels": np.array([1], np.int64)}, "seed"),
    ({"class_labels": np.array([1], np.int64), "seed": np.array([0], np.int64), "prompt": np.zeros(1, np.float32)},
     "prompt"),
    ({"class_labels": np.array([11], np.int64), "seed": np.array([0], np.int64)}, "outside the embedding table"),
    ({"class_labels": np.array([1], np.int64), "seed": np.array([-1], np.int64)}, "must be >= 0"),
], ids=["wrong-shape", "wrong-dtype", "missing-input", "unknown-input", "label-out-of-range", "negative-seed"])
def test_malformed_request_gets_a_clear_error(server, arrays, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        _infer(server, arrays)
    text = str(caught.value)
    assert message in text and "Traceback" not in text and len(text.splitlines()) == 1, text
    assert _infer(server, _request(4, 2)).shape == (1, 4, 8, 8)  # still serving


def test_server_stops_cleanly(server):
    assert server.stubs and all(alive(pid) for pid in server.stubs)  # three models, one stub each
    assert len(server.stubs) >= 3
    assert server.stop() == 0
    assert not [pid for pid in server.stubs if alive(pid)]
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    for model in ("omnicache", "omnicache_full", "omnicache_cache"):
        assert f"successfully unloaded '{model}'" in log
