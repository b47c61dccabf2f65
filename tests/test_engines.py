"""The ONNX Runtime engine on torch tensors: IO specs, runs bound by pointer equal to a plain
session bit for bit, into the caller's buffers, output shapes, clear errors, concurrent runners."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from omnicache_export.engines import load_engine
from omnicache_export.engines.base import TensorSpec
from omnicache_export.engines.onnxruntime import OnnxRuntimeEngine, OnnxRuntimeLoader, available_devices

CUDA = torch.cuda.is_available() and "cuda" in available_devices()


def _save(path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def _matmul_add(path):
    """y = x @ W + B and z = y * float(t): a dynamic batch, an int64 input, two outputs whose
    dims are named apart from the inputs' (as exporters name them), so their shapes need a probe."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"]),
             helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["y", "tf"], ["z"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch", 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["y_dim0", 4]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["z_dim0", 4])]
    return _save(path, nodes, inputs, outputs, weights)


def _fp16(path):
    """A static float16 MatMul+Add: its declared output shape answers `output_shapes`."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "W"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "B")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])], weights)


def _bf16(path):
    """bfloat16 in and out (numpy has no bfloat16: it binds by its ONNX type code)."""
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["x"], ["same"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 3])],
                 [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["n", 3]),
                  helper.make_tensor_value_info("same", TensorProto.BFLOAT16, ["n", 3])])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    return {name: make(folder / f"{name}.onnx") for name, make in
            {"matmul_add": _matmul_add, "fp16": _fp16, "bf16": _bf16}.items()}


@pytest.fixture(scope="module")
def engine(models):
    with OnnxRuntimeLoader(models["matmul_add"], threads=1)() as engine:
        yield engine


def _feeds(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 8, generator=gen), "t": torch.randint(-3, 4, (batch, 1), generator=gen)}


def _session_run(path, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v.numpy() for k, v in feeds.items()})
    return {name: torch.from_numpy(value) for name, value in zip(names, values)}


def _equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


def test_specs(engine):
    assert engine.backend == "onnxruntime" and engine.device == torch.device("cpu")
    assert engine.inputs == [TensorSpec("x", torch.float32, ("batch", 8)), TensorSpec("t", torch.int64, ("batch", 1))]
    assert engine.outputs == [TensorSpec("y", torch.float32, ("y_dim0", 4)),
                              TensorSpec("z", torch.float32, ("z_dim0", 4))]


def test_matches_session_bit_for_bit(engine, models):
    with engine.runner() as runner:
        for batch in (3, 1):  # one runner, rebinding to other shapes
            feeds = _feeds(batch, seed=batch)
            assert _equal(runner.infer(feeds), _session_run(models["matmul_add"], feeds))
    feeds = {"x": torch.randn(2, 8).half()}
    with load_engine("onnxruntime", models["fp16"]) as fp16, fp16.runner() as runner:
        assert _equal(runner.infer(feeds), _session_run(models["fp16"], feeds))


def test_writes_into_the_callers_buffers(engine, models):
    runner = engine.runner()
    out = {name: torch.empty(shape) for name, shape in runner.output_shapes({"x": (4, 8), "t": (4, 1)}).items()}
    pointers = {name: t.data_ptr() for name, t in out.items()}
    for seed in (0, 1):  # the second run overwrites the first one's outputs in the same buffers
        feeds = _feeds(4, seed)
        result = runner.infer(feeds, outputs=out)
        assert all(result[name] is out[name] and out[name].data_ptr() == pointers[name] for name in out)
        assert _equal(out, _session_run(models["matmul_add"], feeds))
    feeds["x"].mul_(2)  # same pointers and shapes, new values: the binding kept from the last call reads them
    runner.infer(feeds, outputs=out)
    expected = _session_run(models["matmul_add"], feeds)
    assert _equal(out, expected)
    z = runner.infer(feeds, outputs={"z": torch.empty(4, 4)}, names=["z"])
    assert list(z) == ["z"] and torch.equal(z["z"], expected["z"])


def test_output_shapes(engine, models):
    runner = engine.runner()
    assert runner.output_shapes({"x": (2, 8), "t": (2, 1)}) == {"y": (2, 4), "z": (2, 4)}
    assert runner.output_shapes({"x": (5, 8), "t": (5, 1)}) == {"y": (5, 4), "z": (5, 4)}
    cached = runner.output_shapes({"x": (5, 8), "t": (5, 1)})
    assert engine.runner().output_shapes({"x": [5, 8], "t": [5, 1]}) is cached  # probed once per input shapes
    with load_engine("onnxruntime", models["fp16"]) as fp16:
        assert fp16.runner().output_shapes({"x": (2, 8)}) == {"y": (2, 4)}


def test_bfloat16_binds_by_pointer(models):
    x = torch.randn(2, 3).bfloat16()
    with load_engine("onnxruntime", models["bf16"]) as engine:
        out = engine.runner().infer({"x": x})
    assert torch.equal(out["f"], x.float()) and torch.equal(out["same"], x)


T = torch.ones(2, 1, dtype=torch.int64)


@pytest.mark.parametrize("feeds, message", [
    ({"x": torch.randn(2, 8)}, "missing input 't'"),
    ({"x": torch.randn(2, 8).double(), "t": T}, "input 'x' has dtype float64, expected float32"),
    ({"x": torch.randn(2, 3), "t": T}, r"input 'x' has shape \(2, 3\), expected \('batch', 8\)"),
    ({"x": torch.randn(2, 8), "t": T[:, 0]}, r"input 't' has shape \(2,\), expected \('batch', 1\)"),
    ({"x": torch.randn(8, 2).T, "t": T}, "input 'x' is not contiguous"),
    ({"x": torch.empty(2, 8, device="meta"), "t": T}, "input 'x' is on meta, expected cpu"),
    ({"x": np.zeros((2, 8), np.float32), "t": T}, "input 'x' is a ndarray, not a torch.Tensor"),
])
def test_feed_errors(engine, feeds, message):
    """One ValueError of one line, naming the input, before anything is bound."""
    with pytest.raises(ValueError, match=message) as error:
        engine.runner().infer(feeds)
    assert "\n" not in str(error.value)


def test_output_errors(engine):
    runner, feeds = engine.runner(), _feeds(2)
    with pytest.raises(ValueError, match=r"output 'y' has shape \(3, 4\), expected \(2, 4\)"):
        runner.infer(feeds, outputs={"y": torch.empty(3, 4)})
    with pytest.raises(ValueError, match="output 'z' has dtype float16"):
        runner.infer(feeds, outputs={"z": torch.empty(2, 4, dtype=torch.float16)})
    with pytest.raises(ValueError, match="unknown output 'w'"):
        runner.infer(feeds, names=["w"])
    with pytest.raises(ValueError, match="missing input 't'"):
        runner.output_shapes({"x": (2, 8)})


def test_runners_in_threads(engine):
    """Two runners on one session, run at once, give what they give one after the other."""
    feeds = {worker: [_feeds(2 + worker, seed) for seed in range(40)] for worker in (0, 1)}
    with engine.runner() as runner:
        expected = {worker: [runner.infer(f) for f in feeds[worker]] for worker in feeds}
    got, start = {}, threading.Barrier(2)

    def work(worker: int):
        with engine.runner() as runner:
            out = {name: torch.empty(shape) for name, shape in
                   runner.output_shapes({k: v.shape for k, v in feeds[worker][0].items()}).items()}
            start.wait()
            got[worker] = [{k: v.clone() for k, v in runner.infer(f, outputs=out).items()} for f in feeds[worker]]

    threads = [threading.Thread(target=work, args=(worker,)) for worker in feeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(_equal(g, e) for worker in feeds for g, e in zip(got[worker], expected[worker], strict=True))


def test_loader_builds_once_and_lazily(tmp_path, models):
    path = tmp_path / "later.onnx"
    loader = OnnxRuntimeLoader(path, spinning=True)  # the file need not exist until the first call
    path.write_bytes(models["matmul_add"].read_bytes())
    engine = loader()
    assert isinstance(engine, OnnxRuntimeEngine) and loader() is engine


def test_devices_and_backends():
    assert "cpu" in available_devices()
    if "cuda" not in available_devices():
        with pytest.raises(ValueError, match="needs CUDAExecutionProvider, which this ONNX Runtime lacks"):
            OnnxRuntimeLoader("unused.onnx", device="cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        OnnxRuntimeLoader("unused.onnx", device="tpu")
    with pytest.raises(ValueError, match="unknown engine backend 'openvino' \\(known: onnxruntime, tensorrt\\)"):
        load_engine("openvino", "unused.onnx")


def test_registry_imports_no_backend():
    code = "import sys, omnicache_export.engines; print(sorted({'onnx', 'onnx_ir', 'onnxruntime'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


@pytest.mark.skipif(not CUDA, reason="needs CUDA torch and ONNX Runtime's CUDA provider")
def test_cuda_matches_session(models):
    feeds = _feeds(3)
    session = ort.InferenceSession(str(models["matmul_add"]), providers=["CUDAExecutionProvider"])
    expected = dict(zip(["y", "z"], session.run(["y", "z"], {k: v.numpy() for k, v in feeds.items()})))
    with load_engine("onnxruntime", models["matmul_add"], "cuda") as engine:
        assert engine.device == torch.device("cuda", 0)
        out = engine.runner().infer({k: v.cuda() for k, v in feeds.items()})
    assert all(out[k].is_cuda and torch.equal(out[k].cpu(), torch.from_numpy(expected[k])) for k in expected)
