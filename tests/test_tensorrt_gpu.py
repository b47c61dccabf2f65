"""The TensorRT backend on a device: a tiny ONNX graph built into a plan, run behind the engine
interface, compared with ONNX Runtime. Needs TensorRT and a CUDA GPU; skips elsewhere (CI, this
project's machines). tools/check_tensorrt.py runs the full export on a device."""

from __future__ import annotations

import numpy as np
import pytest


def _tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT is not installed ({str(exc).splitlines()[0]})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


WHY = _tensorrt_and_gpu()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"needs TensorRT and a CUDA GPU: {WHY}")

K, N = 16, 8


def _matmul_model(path, dtype=np.float32):
    """y = relu(x @ W + b), x: [batch, 4, K] with a dynamic batch; a second output z = y * 2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
         helper.make_node("Add", ["xw", "b"], ["pre"], name="add"),
         helper.make_node("Relu", ["pre"], ["y"], name="relu"),
         helper.make_node("Add", ["y", "y"], ["z"], name="double")],
        "tiny", [helper.make_tensor_value_info("x", elem, ["batch", 4, K])],
        [helper.make_tensor_value_info("y", elem, ["batch", 4, N]), helper.make_tensor_value_info("z", elem, ["batch", 4, N])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _ort(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from omnicache_export.engines.tensorrt import build_engine

    d = tmp_path_factory.mktemp("trt")
    model = _matmul_model(d / "tiny.onnx")
    cache = d / "timing.cache"
    info = build_engine(model, d / "tiny.plan", {"x": ((1, 4, K), (2, 4, K), (8, 4, K))}, timing_cache=cache,
                        opt_level=2, workspace_bytes=64 << 20)
    return model, d / "tiny.plan", info, cache


def test_build_records_the_plan(built):
    import tensorrt as trt
    import torch

    _, plan, info, cache = built
    assert info.tensorrt_version == trt.__version__
    major, minor = torch.cuda.get_device_capability()
    assert info.compute_capability == f"{major}.{minor}" and info.gpu_name == torch.cuda.get_device_name()
    assert info.profiles == [{"x": [[1, 4, K], [2, 4, K], [8, 4, K]]}]
    assert info.plan_bytes == plan.stat().st_size > 0
    assert cache.stat().st_size > 0


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_engine_agrees_with_onnxruntime(built, cuda_graphs):
    import torch

    from omnicache_export.engines import load_engine

    model, plan, info, _ = built
    engine = load_engine("tensorrt", plan, "cuda", plan_info=info, cuda_graphs=cuda_graphs)
    assert [(s.name, s.dtype, s.shape) for s in engine.inputs] == [("x", torch.float32, (None, 4, K))]
    assert [s.name for s in engine.outputs] == ["y", "z"]
    rng = np.random.default_rng(1)
    with engine.runner() as runner:
        for batch in (1, 3, 8, 3):  # shapes change and come back (a second graph key, then a replay)
            x = rng.standard_normal((batch, 4, K)).astype(np.float32)
            shapes = runner.output_shapes({"x": x.shape})
            assert shapes == {"y": (batch, 4, N), "z": (batch, 4, N)}
            out = {k: torch.empty(v, device="cuda") for k, v in shapes.items()}
            for _ in range(2):
                got = runner.infer({"x": torch.from_numpy(x).cuda()}, outputs=out)
            y, z = _ort(model, x)
            # TF32 may run the MatMul on Ampere and later: build_engines.sh's fp32 tolerance
            np.testing.assert_allclose(got["y"].cpu().numpy(), y, rtol=5e-3, atol=5e-3)
            np.testing.assert_allclose(got["z"].cpu().numpy(), z, rtol=5e-3, atol=5e-3)
            assert got["y"].data_ptr() == out["y"].data_ptr()  # written in place
        with pytest.raises(ValueError, match="fit none of the plan's optimization profiles"):
            runner.infer({"x": torch.zeros((9, 4, K), device="cuda")})


def test_two_runners_share_one_activation_buffer(built):
    import torch

    from omnicache_export.engines import load_engine
    from omnicache_export.engines.base import generation_runners
    from omnicache_export.engines.tensorrt import SharedActivations

    model, plan, info, _ = built
    a, b = (load_engine("tensorrt", plan, "cuda", plan_info=info) for _ in range(2))
    first, second = generation_runners(a, b)
    assert first.activations is second.activations and first.stream is second.stream
    assert first.activations.size == max(a.device_memory_bytes, b.device_memory_bytes)
    x = np.random.default_rng(2).standard_normal((2, 4, K)).astype(np.float32)
    feeds = {"x": torch.from_numpy(x).cuda()}
    y1 = first.infer(feeds, names=["y"])["y"]
    y2 = second.infer(feeds, names=["y"])["y"]
    torch.testing.assert_close(y1, y2)
    np.testing.assert_allclose(y2.cpu().numpy(), _ort(model, x)[0], rtol=5e-3, atol=5e-3)
    with pytest.raises(ValueError, match="at least one engine"):
        SharedActivations([])


def test_plan_from_another_tensorrt_is_refused_before_deserialization(built, tmp_path):
    import dataclasses

    from omnicache_export.engines import load_engine
    from omnicache_export.errors import UserError

    _, plan, info, _ = built
    other = dataclasses.replace(info, tensorrt_version="9.9.9")
    missing = tmp_path / "absent.plan"  # never opened: the check comes first
    with pytest.raises(UserError, match="a plan loads only in the TensorRT version that built it"):
        load_engine("tensorrt", missing, "cuda", plan_info=other)


def test_parser_error_names_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from omnicache_export.engines.tensorrt import build_engine
    from omnicache_export.errors import UserError

    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="the_unique")], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UserError) as err:
        build_engine(path, tmp_path / "bad.plan", {})
    assert "the_unique" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad.plan").exists()


def test_fp16_graph_builds_strongly_typed(tmp_path):
    import torch

    from omnicache_export.engines import load_engine
    from omnicache_export.engines.tensorrt import build_engine

    model = _matmul_model(tmp_path / "half.onnx", np.float16)
    info = build_engine(model, tmp_path / "half.plan", {"x": ((1, 4, K), (1, 4, K), (2, 4, K))})
    engine = load_engine("tensorrt", tmp_path / "half.plan", "cuda", plan_info=info)
    assert engine.inputs[0].dtype == torch.float16  # the graph's type, no precision flag
    x = np.random.default_rng(3).standard_normal((2, 4, K)).astype(np.float16)
    with engine.runner() as runner:
        got = runner.infer({"x": torch.from_numpy(x).cuda()})["y"].cpu().numpy()
    np.testing.assert_allclose(got.astype(np.float32), _ort(model, x)[0].astype(np.float32), rtol=2e-2, atol=2e-2)
