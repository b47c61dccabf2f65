"""The TensorRT backend checked without TensorRT: every TensorRT name engines/tensorrt*.py uses
against the compiled bindings of TensorRT 10.3, 10.16 and 11.4 (read from the wheels' bytes,
tools/tensorrt_bindings.py), mypy against tensorrt-stubs 10.13, and the backend's behaviour where
TensorRT is absent. The wheels and the stubs download from PyPI once into ~/.cache/omnicache-export;
a test skips (with pip's reason) only where that download fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import tensorrt_bindings as tb  # noqa: E402

SOURCES = sorted((ROOT / "engines").glob("tensorrt*.py"))


@pytest.fixture(scope="module", params=tb.VERSIONS)
def names(request) -> tb.BindingNames:
    try:
        return tb.names_of_version(request.param)
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def all_names() -> dict[str, tb.BindingNames]:
    try:
        return {v: tb.names_of_version(v) for v in tb.VERSIONS}
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_extraction_finds_known_names_and_not_a_made_up_one(names):
    for name in ("Builder", "OnnxParser", "execute_async_v3", "set_tensor_address", "STRONGLY_TYPED",
                 "USER_MANAGED", "get_tensor_profile_shape", "set_memory_pool_limit", "create_timing_cache",
                 "device_memory_size_v2", "set_device_memory", "__version__"):
        assert name in names, (names.version, name)
    for made_up in ("execute_async_v9", "frobnicate_engine", "STRONGLY_TYPED_V2", "set_tensor_adress"):
        assert made_up not in names, (names.version, made_up)
    assert len(names.strings) > 5000  # the whole string table, not a few names


def test_extraction_sees_what_tensorrt_11_removed(all_names):
    """NVIDIA's 10.x -> 11.x migration guide lists these as removed: the bytes agree."""
    removed = ("FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "platform_has_fast_fp16",
               "EXPLICIT_BATCH", "device_memory_size")
    for name in removed:
        assert name in all_names["10.3.0"] and name in all_names["10.16.1.11"], name
        assert name not in all_names["11.4.0.106"], name
    # kept in 11: the types strongly typed networks use, the flag this backend sets
    for name in ("BF16", "HALF", "STRONGLY_TYPED", "REFIT", "device_memory_size_v2"):
        assert name in all_names["11.4.0.106"], name


def test_collector_reads_trt_chains_typed_objects_and_hasattr_branches(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "def f(ctx: trt.IExecutionContext, x):\n"
        "    import tensorrt as trt\n"
        "    engine: trt.ICudaEngine = x.engine\n"
        "    flag = trt.BuilderFlag.REFIT\n"
        "    ctx.execute_async_v3(0)\n"
        "    x.not_tensorrt()\n"
        "    if hasattr(engine, 'new_api'):\n"
        "        return engine.new_api\n"
        "    return engine.old_api\n"
        "class C:\n"
        "    def __init__(self, e):\n"
        "        self.plan: trt.ICudaEngine = e\n"
        "    def g(self):\n"
        "        return self.plan.num_io_tensors\n")
    uses = {(u.owner, u.name): u for u in tb.tensorrt_uses([source])}
    assert set(uses) == {("trt", "IExecutionContext"), ("trt", "ICudaEngine"), ("trt", "BuilderFlag"),
                         ("BuilderFlag", "REFIT"), ("IExecutionContext", "execute_async_v3"),
                         ("ICudaEngine", "new_api"), ("ICudaEngine", "old_api"), ("ICudaEngine", "num_io_tensors")}
    assert uses["ICudaEngine", "new_api"].needs == ("new_api",)
    assert uses["ICudaEngine", "old_api"].lacks == ("new_api",)  # the fall-through after a returning branch


def test_every_tensorrt_name_the_backend_uses_exists_in_each_version(names):
    uses = tb.tensorrt_uses(SOURCES)
    assert len(SOURCES) >= 3 and len(uses) > 80  # the collector saw the backend
    owners = {u.owner for u in uses}
    assert {"trt", "ICudaEngine", "IExecutionContext", "IBuilderConfig", "OnnxParser"} <= owners
    gaps = tb.missing(uses, names)
    assert not gaps, f"TensorRT {names.version} lacks: " + "; ".join(map(str, gaps))


def test_version_branches_are_exercised_both_ways(all_names):
    """The device-memory names differ across the versions, and each sits in a hasattr branch."""
    uses = {(u.owner, u.name): u for u in tb.tensorrt_uses(SOURCES)}
    old = uses["ICudaEngine", "device_memory_size"]
    assert old.lacks == ("device_memory_size_v2",)
    assert not old.runs_in(all_names["11.4.0.106"]) and old.name not in all_names["11.4.0.106"]
    # the same use outside its branch would fail the 11.4 check
    unguarded = tb.Use(old.path, old.line, old.owner, old.name)
    assert tb.missing([unguarded], all_names["11.4.0.106"]) == [unguarded]
    assert uses["IExecutionContext", "set_device_memory"].needs == ("set_device_memory",)
    # no precision flag anywhere: TensorRT 11 removed them, and the graph carries its precision
    flags = {u.name for u in tb.tensorrt_uses(SOURCES) if u.owner == "BuilderFlag"}
    assert flags == {"REFIT"}


@pytest.fixture(scope="module")
def stubs() -> Path:
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    try:
        return tb.stubs_dir()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_mypy_passes_against_tensorrt_stubs(stubs, tmp_path):
    rc, report = tb.run_mypy(ROOT, stubs, tmp_path)
    assert rc == 0, report


def test_mypy_sees_the_stubs(stubs, tmp_path):
    """The same run flags a misspelt TensorRT method and a wrong argument type: the stubs are in use."""
    probe = tmp_path / "tree" / "trt_probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import tensorrt as trt\n\n\n"
                     "def f(context: trt.IExecutionContext) -> None:\n"
                     "    context.execute_async_v9(0)\n"
                     "    context.set_tensor_address(1, 2)\n")
    rc, report = tb.run_mypy(ROOT, stubs, tmp_path, modules=("trt_probe",))
    assert rc == 1
    assert '"IExecutionContext" has no attribute "execute_async_v9"' in report
    assert 'Argument 1 to "set_tensor_address" of "IExecutionContext" has incompatible type "int"' in report


def test_stub_repair_makes_generated_stubs_parse():
    broken = ("class P:\n"
              "    def configure(self, in: list[int], out: list[int]) -> None: ...\n"
              "    def add(self, a: int, b: dict[str, int] = None, c: int, *args) -> int: ...\n")
    fixed = tb._repair_stub(broken)
    compile(fixed, "stub.pyi", "exec")
    assert "in_: list[int]" in fixed and "c: int = ..." in fixed and "b: dict[str, int] = None" in fixed


# ------------------------------------------------------------------ the backend where TensorRT is absent


def _no_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return True
    return False


needs_no_tensorrt = pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT is installed here")


def test_backend_modules_import_without_tensorrt_or_graph_tooling():
    code = ("import sys\n"
            "import omnicache_export.engines.tensorrt as t\n"
            "from omnicache_export.engines import _BACKENDS\n"
            "assert _BACKENDS['tensorrt'] == 'omnicache_export.engines.tensorrt:TensorRtLoader'\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'onnx', 'onnx_ir', 'onnxruntime'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


@needs_no_tensorrt
def test_using_the_backend_without_tensorrt_is_one_user_error(tmp_path):
    from omnicache_export.engines import load_engine
    from omnicache_export.engines.tensorrt import PlanInfo, build_engine, check_plan_compatible
    from omnicache_export.errors import UserError

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read")
    calls = [lambda: build_engine(onnx, tmp_path / "m.plan", {"x": ((1,), (1,), (2,))}),
             lambda: load_engine("tensorrt", tmp_path / "m.plan", "cuda"),
             lambda: check_plan_compatible(PlanInfo("10.16.1.11", "NVIDIA H200", "9.0"))]
    for call in calls:
        with pytest.raises(UserError) as info:
            call()
        line = str(info.value)
        assert line.startswith("TensorRT is not installed: ") and "\n" not in line
    assert not (tmp_path / "m.plan").exists()


def test_tensorrt_loader_refuses_a_cpu_device():
    from omnicache_export.engines.tensorrt import TensorRtLoader

    with pytest.raises(ValueError, match="TensorRT runs on a CUDA device"):
        TensorRtLoader("m.plan", device="cpu")


def test_plan_info_mismatch_lines():
    from omnicache_export.engines.tensorrt import PlanInfo

    built = PlanInfo("10.16.1.11", "NVIDIA H200", "9.0", [{"x": [[1, 4], [2, 4], [8, 4]]}], 1234)
    assert PlanInfo.from_json(built.to_json()) == built
    assert built.mismatch(PlanInfo("10.16.1.11", "NVIDIA H200", "9.0")) is None
    other_version = built.mismatch(PlanInfo("10.3.0", "NVIDIA H200", "9.0"))
    assert other_version == ("built by TensorRT 10.16.1.11 for NVIDIA H200 (sm 9.0); this machine has TensorRT "
                             "10.3.0, NVIDIA H200 (sm 9.0): a plan loads only in the TensorRT version that built it")
    other_gpu = built.mismatch(PlanInfo("10.16.1.11", "Orin", "8.7"))
    assert other_gpu.endswith("Orin (sm 8.7): a plan runs only on the GPU it was built for")
