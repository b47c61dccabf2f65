"""TensorRT without TensorRT: build_engines.sh and the reference IO of a real export, the manifest's
plan records and the runtime's refusal before deserialization, and `build` / `--backend tensorrt`
refusing cleanly. What needs TensorRT and a GPU (building, running plans) is tools/check_tensorrt.py's,
and skips here with the reason."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.pipeline import build_script, reference_io
from omnicache_export.pipeline.job import ExportOptions, export
from omnicache_export.pipeline.tensorrt_build import tensorrt_available
from omnicache_export.runtime import manifest as mf
from omnicache_export.runtime.omnicache import OmniCache

from conftest import with_plans
from omnicache_export.zoo.export import write_inputs_npz

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HAVE_TENSORRT, NO_TENSORRT = tensorrt_available()
needs_no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT and a GPU are here: the refusal is not reached")
TYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "INT64": np.int64, "INT32": np.int32}


@pytest.fixture(scope="module")
def exports(zoo_export, tmp_path_factory):
    """DiT (class labels, guidance: model batch twice the samples) and PixArt (caption embeddings
    with a text length the manifest leaves open, flow matching), through the main job."""
    folder = tmp_path_factory.mktemp("build")
    calib = folder / "dit.npz"
    np.savez(calib, class_labels=np.array([1, 3], np.int64), **{"uncond/class_labels": np.full(2, 9, np.int64)})
    dit = folder / "dit"
    export(zoo_export("dit", "torchscript"), dit, ExportOptions(steps=8, calib=calib, num_calib=2, guidance_scale=2.0,
                                                                cache_ratio=0.5, progress=False))
    pixart = folder / "pixart"
    export(zoo_export("pixart", "torchscript"), pixart,
           ExportOptions(scheduler="flow-euler", steps=6, calib=write_inputs_npz("pixart", folder / "p.npz", batch=2,
                                                                               seed=3), num_calib=2, progress=False))
    return {"dit": dit, "pixart": pixart}


def trtexec_commands(script: str) -> dict[str, dict[str, str]]:
    """graph -> trtexec flag -> value, parsed from the script as bash would split it."""
    joined = script.replace("\\\n", " ")
    commands = {}
    for line in joined.splitlines():
        if line.startswith('"$TRTEXEC"'):
            args = shlex.split(line)[1:]
            flags = dict(a.removeprefix("--").partition("=")[::2] for a in args)
            commands[Path(flags["onnx"]).stem] = flags
    return commands


def parse_shapes(value: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in dims.split("x")) for name, _, dims in
            (item.rpartition(":") for item in value.split(","))}


def dynamic_inputs(session: ort.InferenceSession) -> set[str]:
    return {i.name for i in session.get_inputs() if any(not isinstance(d, int) for d in i.shape)}


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_build_script_covers_every_dynamic_input_and_ort_runs_its_shapes(exports, name):
    out = exports[name]
    m = mf.read_manifest(out)  # the script and the reference files are artifacts, hash-checked
    assert {build_script.FILENAME, *reference_io.files()} <= set(m.artifacts)
    script = (out / build_script.FILENAME).read_text()
    assert os.access(out / build_script.FILENAME, os.X_OK)
    assert subprocess.run(["bash", "-n", str(out / build_script.FILENAME)]).returncode == 0
    commands = trtexec_commands(script)
    assert set(commands) == {"full", "cache"}
    assert len({c["timingCacheFile"] for c in commands.values()}) == 1  # one cache shared by both builds
    batches = {"dit": (2, 2, 16), "pixart": (1, 1, 8)}[name]  # guidance: two model rows per sample
    for graph, flags in commands.items():
        assert flags["saveEngine"] == f"tensorrt/{graph}.plan" and "stronglyTyped" in flags
        assert flags["builderOptimizationLevel"] == "$OPT_LEVEL" and "fp16" not in flags and "bf16" not in flags
        session = ort.InferenceSession(str(out / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        shapes = [parse_shapes(flags[f"{k}Shapes"]) for k in ("min", "opt", "max")]
        assert set(shapes[0]) == set(shapes[1]) == set(shapes[2]) == dynamic_inputs(session)
        assert {s[0] for s in shapes[0].values()} | {s[0] for s in shapes[2].values()} <= {batches[0], batches[2]}
        reference = reference_io.load_inputs(out, graph)
        declared = {i.name: i for i in session.get_inputs()}
        for pick, at in ((0, batches[0]), (2, batches[2])):  # ONNX Runtime runs the profile's min and max shapes
            feeds = {}
            for n, i in declared.items():
                shape = shapes[pick].get(n, tuple(i.shape))
                dtype = TYPES[m.graphs[graph].inputs[[t.name for t in m.graphs[graph].inputs].index(n)].dtype]
                feeds[n] = np.resize(np.asarray(reference[n], dtype), shape)  # real values, tiled to the shape
            result = session.run(None, feeds)
            assert result[0].shape[0] == at and all(np.isfinite(r).all() for r in result)
        for n, value in reference.items():  # the reference inputs lie inside the profile
            if n in shapes[0]:
                assert all(lo <= d <= hi for lo, d, hi in zip(shapes[0][n], np.shape(value), shapes[2][n]))


def test_open_text_length_takes_the_size_calibration_ran(exports):
    """A text length the manifest cannot resolve (an export with a dynamic caption axis): the script
    fixes it to the reference inputs' size, and says so; without them, the one line names the dim."""
    from omnicache_export.runtime.graph_io import GraphIO

    out = exports["pixart"]
    m = mf.read_manifest(out)
    full = m.graphs["full"]
    text = tuple(dataclasses.replace(t, shape=(t.shape[0], "sequence", *t.shape[2:]))
                 if t.name == "encoder_hidden_states" else t for t in full.inputs)
    m = dataclasses.replace(m, graphs={**m.graphs, "full": GraphIO(text, full.outputs)})
    with pytest.raises(ValueError, match="'encoder_hidden_states' axis 1 is the symbolic dim 'sequence'"):
        build_script.dynamic_profiles(m)
    feeds = {g: reference_io.load_inputs(out, g) for g in mf.GRAPHS}
    length = feeds["full"]["encoder_hidden_states"].shape[1]
    assert build_script.open_dims(m, feeds) == {"sequence": length}
    script = build_script.script(m, dims=build_script.open_dims(m, feeds))
    assert f"--maxShapes=hidden_states:8x4x8x8,encoder_hidden_states:8x{length}x32" in script
    assert f"# Symbolic dims fixed to the sizes calibration ran: sequence={length}." in script


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_reference_outputs_reproduce_with_polygraphy_onnxrt(exports, name):
    """Polygraphy reads the files build_engines.sh gives `--trt`: here its ONNX Runtime runner
    reproduces the saved outputs from the saved inputs (what the device script does with the plans)."""
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    if polygraphy is None:
        pytest.skip("polygraphy's command is not installed")
    out = exports[name]
    script = (out / build_script.FILENAME).read_text()
    for graph in ("full", "cache"):
        inputs, outputs = reference_io.paths(graph)
        assert f"--load-inputs {inputs} --load-outputs {outputs}" in script  # what the device runs
        done = subprocess.run([polygraphy, "run", f"{graph}.onnx", "--onnxrt", "--load-inputs", inputs,
                               "--load-outputs", outputs, "--atol", "1e-5", "--rtol", "1e-5"],
                              cwd=out, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        expected = reference_io.load_outputs(out, graph)
        m = mf.read_manifest(out)
        assert set(expected) == {t.name for t in m.graphs[graph].outputs}
        assert re.search(r"PASSED \| simple \| All outputs matched", done.stdout + done.stderr)
    cache_feeds = reference_io.load_inputs(out, "cache")
    step = int(np.asarray(cache_feeds["omnicache_step"]).ravel()[0])
    assert not mf.read_manifest(out).schedule.full[step]  # a real cached step of the schedule


def test_script_without_trtexec_says_so(exports, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": "trtexec-not-here"}
    done = subprocess.run(["bash", str(out / build_script.FILENAME)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "trtexec not found: install TensorRT or set TRTEXEC"]
    assert not (out / "tensorrt").exists()


def snapshot(folder: Path, folder_times: bool = True) -> dict[str, tuple[bytes, int]]:
    """Every path under `folder`: its bytes and mtime (a folder's mtime moves when files are renamed through it)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else
            (b"", p.stat().st_mtime_ns if folder_times else 0) for p in sorted(folder.rglob("*"))}


@needs_no_tensorrt
def test_build_without_tensorrt_exits_2_and_changes_nothing(exports, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    before, siblings = snapshot(out), sorted(os.listdir(tmp_path))
    assert main(["build", str(out), "--batch", "1,2,4", "--opt-level", "5", "--refittable"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed:" in err[0]
    assert err[0].endswith(f"run {out}/build_engines.sh on the target")
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == siblings
    assert main(["build", str(out), "--batch", "4,2,1"]) == 2
    assert "1 <= MIN <= OPT <= MAX" in capsys.readouterr().err


@needs_no_tensorrt
def test_backend_tensorrt_without_tensorrt_writes_nothing(zoo_export, tmp_path, capsys):
    out = tmp_path / "out"
    model = zoo_export("dit", "torchscript")
    assert main([str(model), "-o", str(out), "--backend", "tensorrt", "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"omnicache-export: error: --backend tensorrt: {NO_TENSORRT}"]
    assert not out.exists() and os.listdir(tmp_path) == []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main([str(model), "-o", str(out), "--device", "cuda", "--steps", "6"]) == 2
        assert "--device cuda: this ONNX Runtime has no CUDAExecutionProvider" in capsys.readouterr().err
        assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ plan records in the manifest


def test_tensorrt_entry_validates_and_reads_back(exports, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    m = with_plans(out)
    mf.write_manifest(out, m)
    back = mf.read_manifest(out)
    entry = back.engine("tensorrt", "cuda")  # the device family finds the GPU-keyed entry
    assert entry.key == "tensorrt/cuda-sm90/fp32" and entry.plans["cache"].compute_capability == (9, 0)
    assert entry.plans["full"].profiles[0]["hidden_states"] == ((2, 4, 8, 8), (2, 4, 8, 8), (16, 4, 8, 8))
    raw = json.loads((out / mf.FILENAME).read_text())
    assert [("plans" in e) for e in raw["engines"]] == [False, True]  # other entries read as before
    assert raw["version"] == 2
    old = dict(raw, engines=raw["engines"][:1])  # a manifest without TensorRT entries still loads
    old["artifacts"] = {k: v for k, v in raw["artifacts"].items() if not k.startswith("tensorrt/")}
    assert mf.Manifest.from_json(old).engines[0].plans == {}


@pytest.mark.parametrize("changes, message", [
    ({"plans": {}}, r"engines\[1\]\.plans: needs one plan record per graph"),
    ({"device": "cuda"}, r"engines\[1\]\.device: 'cuda': plans for sm 9\.0 are device 'cuda-sm90'"),
    ({"backend": "onnxruntime"}, r"engines\[1\]\.plans: only tensorrt entries record plans"),
])
def test_bad_tensorrt_entry_is_refused(exports, tmp_path, changes, message):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    with pytest.raises(mf.SchemaError, match=message):
        mf.Manifest.from_json(with_plans(out, **changes).to_json())


def test_bad_profiles_are_refused(exports, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    m = with_plans(out)
    entry = m.engines[1]
    plan = entry.plans["cache"]
    dropped = {k: v for k, v in plan.profiles[0].items() if k != "omnicache_full_prev2"}
    inverted = dict(plan.profiles[0], hidden_states=((16, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)))
    for profile, message in ((dropped, "no range for the dynamic input 'omnicache_full_prev2'"),
                             (inverted, r"\['hidden_states'\]|hidden_states: axis 0: min 16, opt 2, max 2")):
        bad = dataclasses.replace(entry, plans={**entry.plans, "cache": dataclasses.replace(plan, profiles=(profile,))})
        with pytest.raises(mf.SchemaError, match=message):
            mf.Manifest.from_json(dataclasses.replace(m, engines=(m.engines[0], bad)).to_json())


def test_plan_from_another_tensorrt_or_gpu_is_refused_before_deserialization(exports, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    mf.write_manifest(out, with_plans(out))
    compat = pytest.importorskip("omnicache_export.engines.tensorrt_compat",
                                 reason="the TensorRT backend module is not in this tree")
    plan = mf.read_manifest(out).engine("tensorrt", "cuda").plans["full"]
    # the record as check_plan_compatible reads it, against another machine (PlanInfo of "here")
    built = compat.PlanInfo(plan.tensorrt_version, plan.gpu_name, compat.compute_capability_text(plan.compute_capability))
    assert built.mismatch(compat.PlanInfo("10.16.0.72", "NVIDIA H200", "9.0")) is None
    other_version = built.mismatch(compat.PlanInfo("10.3.0.30", "NVIDIA H200", "9.0"))
    assert other_version == ("built by TensorRT 10.16.0.72 for NVIDIA H200 (sm 9.0); this machine has TensorRT "
                             "10.3.0.30, NVIDIA H200 (sm 9.0): a plan loads only in the TensorRT version that built it")
    other_gpu = built.mismatch(compat.PlanInfo("10.16.0.72", "Orin", "8.7"))
    assert other_gpu.endswith("Orin (sm 8.7): a plan runs only on the GPU it was built for")
    # the placeholder plan files are not plans: the load refuses before it reads them
    with pytest.raises(UserError) as info:
        OmniCache.load(out, backend="tensorrt", device="cuda")
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{out}: tensorrt/cuda-sm90-fp32/full.plan: ")
    if not HAVE_TENSORRT:
        assert "TensorRT is not installed" in line


@pytest.mark.skipif(not HAVE_TENSORRT, reason=f"needs TensorRT and a CUDA GPU ({NO_TENSORRT}); "
                    "tools/check_tensorrt.py runs the build on a device")
def test_build_on_device(exports, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    assert main(["build", str(out)]) == 0
    entry = mf.read_manifest(out).engine("tensorrt", "cuda")
    assert set(entry.plans) == {"full", "cache"}


def test_plans_and_manifest_commit_together_or_not_at_all(exports, tmp_path):
    """`build`'s last step without the build: new plan files renamed into place (an earlier one
    replaced), then the manifest; a manifest that would be refused puts every file back."""
    from omnicache_export.pipeline.tensorrt_build import _commit, with_entry

    out = tmp_path / "copy"
    shutil.copytree(exports["dit"], out)
    mf.write_manifest(out, with_plans(out))  # an earlier build: its entry and plan files
    entry = mf.read_manifest(out).engine("tensorrt", "cuda")
    before = snapshot(out, folder_times=False)

    def staged(tag: str) -> tuple[Path, dict[str, Path]]:
        tmp = tmp_path / f"stage-{tag}"
        tmp.mkdir()
        files = {entry.full: tmp / "full.plan", entry.cache: tmp / "cache.plan", "tensorrt/timing.cache": tmp / "tc"}
        for name, path in files.items():
            path.write_bytes(f"{tag} {name}".encode())
        return tmp, files

    tmp, files = staged("refused")
    m = mf.read_manifest(out)
    bad = dataclasses.replace(m, engines=(*m.engines, dataclasses.replace(entry, device="cuda-sm80")))  # sm 9.0 plans
    with pytest.raises(UserError, match="manifest not written"):
        _commit(out, {out / k: v for k, v in files.items()}, bad, tmp)
    assert snapshot(out, folder_times=False) == before  # the earlier plans are back, no timing cache, the manifest unchanged

    tmp, files = staged("rebuilt")
    plans = {k: v for k, v in files.items() if k.endswith(".plan")}
    new = with_entry(m, entry, plans)
    _commit(out, {out / k: v for k, v in files.items()}, new, tmp)
    back = mf.read_manifest(out)  # every artifact's hash checks: the new plans are the ones recorded
    assert (out / entry.full).read_bytes() == f"rebuilt {entry.full}".encode()
    assert (out / "tensorrt/timing.cache").read_bytes() == b"rebuilt tensorrt/timing.cache"
    assert [e.key for e in back.engines] == [e.key for e in m.engines]  # replaced, not added twice
