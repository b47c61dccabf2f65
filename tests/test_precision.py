"""Precision in the graph: passes/convert_precision.py (fp16 / bf16 mixed precision), its fp32 keeps
(passes/precision_policy.py), the per-op emulation (passes/emulate_low_precision.py) and the main
job's --precision / --io-precision, fp16 input models included."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from omnicache_export.cli.main import main
from omnicache_export.graph import modelio
from omnicache_export.graph.roles import guess_roles
from omnicache_export.passes.convert_precision import ConvertPrecisionPass
from omnicache_export.passes.emulate_low_precision import EmulateLowPrecisionPass
from omnicache_export.passes.precision_policy import KeepFp32
from omnicache_export.zoo.families import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning", "ignore::UserWarning")
# fp16 graph vs fp32 graph on one call, max |diff| / max |fp32|: fp16 has 11 significant bits
# (2^-11 = 4.9e-4 relative per rounding); a dozen layers of tiny random DiTs stay within 1e-2.
FP16_TOL = 1e-2
F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def session(model: ir.Model | Path, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # the emulation's rounding pairs must survive
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    s = session(model, optimize)
    return s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def timestep_of(model: ir.Model) -> str | None:
    return next((s.name for s in guess_roles(model) if s.role == "timestep"), None)


def converted(path: Path, precision: str = "fp16", **kw) -> tuple[ir.Model, ConvertPrecisionPass]:
    model = modelio.load_model(path)
    conversion = ConvertPrecisionPass(precision, timestep=timestep_of(model), **kw)
    conversion(model)
    return model, conversion


def check_full(model: ir.Model) -> None:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)  # strict type and shape inference
    assert not [v for v in ir.serde.deserialize_model(proto).graph.initializers.values()
                if v.dtype == ir.DataType.DOUBLE]


# ------------------------------------------------------------------ the pass


@pytest.mark.parametrize("family,exporter", [("dit", "torchscript"), ("pixart", "torchscript"), ("sd3", "torchscript"),
                                             ("flux", "torchscript"), ("latte", "torchscript"), ("ltx", "torchscript"),
                                             ("mochi", "torchscript"), ("dit", "dynamo")])
def test_fp16_graph_matches_fp32(zoo_export, family, exporter):
    path = zoo_export(family, exporter)
    source = modelio.load_model(path)
    model, conversion = converted(path)
    check_full(model)
    # IO kept as the model has them: names, types, shapes
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [(v.name, v.dtype) for v in source.graph.inputs]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [(v.name, v.dtype) for v in source.graph.outputs]
    # the weights went to fp16 (what is left in fp32 is the kept path's)
    floats = [v for v in model.graph.initializers.values() if v.dtype in (F16, F32)]
    f16_bytes = sum(v.const_value.nbytes for v in floats if v.dtype == F16)
    assert f16_bytes > 0.5 * sum(v.const_value.nbytes for v in floats)
    feeds = FAMILIES[family].example_inputs(2, 0)
    expected = run(path, feeds)
    assert rel_err(run(model, feeds), expected) < FP16_TOL
    assert rel_err(run(model, feeds), expected) > 0  # it did convert
    assert KeepFp32.SOFTMAX in conversion.kept.values() or KeepFp32.NORMS in conversion.kept.values()


def test_kept_nodes_compute_in_fp32(zoo_export):
    path = zoo_export("dit", "torchscript")
    model, conversion = converted(path)
    by_name = {n.name: n for n in model.graph}
    reasons = set(conversion.kept.values())
    assert reasons == set(KeepFp32)
    for name, reason in conversion.kept.items():
        node = by_name[name]
        floats = [v for v in [*node.inputs, *node.outputs] if v is not None and v.dtype in (F16, F32)]
        assert all(v.dtype == F32 for v in floats), (name, reason)
    ops = {by_name[n].op_type for n in conversion.kept}
    assert {"Sin", "Cos", "LayerNormalization", "Softmax"} <= ops  # the sinusoidal embedding, the norms, softmax
    # the timestep path: t ~ 999 goes into Sin/Cos in fp32 (fp16 would round it by up to 0.25)
    sin = next(n for n in model.graph if n.op_type == "Sin")
    assert conversion.kept[sin.name] == KeepFp32.TIMESTEP
    # everything else with a float output that the schema lets go to fp16 did
    matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.name not in conversion.kept]
    assert matmuls and all(n.outputs[0].dtype == F16 for n in matmuls)


def test_timestep_path_in_fp32_is_closer(zoo_export):
    """Near t = 1000 the timestep path is the one fp16 hurts most: keeping it fp32 must not lose, and
    the timestep embedding itself must be fp32-exact."""
    path = zoo_export("dit", "torchscript")
    feeds = FAMILIES["dit"].example_inputs(2, 0)
    feeds = {**feeds, "timestep": np.array([999.0, 997.0], feeds["timestep"].dtype)}
    expected = run(path, feeds)
    keep, drop = converted(path)[0], converted(path, keep=frozenset({KeepFp32.NORMS, KeepFp32.SOFTMAX}))[0]
    assert rel_err(run(keep, feeds), expected) <= rel_err(run(drop, feeds), expected)


def test_position_tables_in_fp32_keep_ltx_finite(zoo_export):
    """LTX's rotary table multiplies frequencies by positions (15704 x 5 > 65504): computed in fp16 it
    overflows and the output is NaN; kept in fp32 (KeepFp32.POSITIONS) it is within FP16_TOL."""
    from omnicache_export.passes.precision_policy import ALL_KEEPS

    path = zoo_export("ltx", "torchscript")
    feeds = FAMILIES["ltx"].example_inputs(2, 0)
    expected = run(path, feeds)
    assert rel_err(run(converted(path)[0], feeds), expected) < FP16_TOL
    assert not np.isfinite(run(converted(path, keep=ALL_KEEPS - {KeepFp32.POSITIONS})[0], feeds)).all()


def test_io_precision_fp16(zoo_export):
    path = zoo_export("dit", "torchscript")
    model, _ = converted(path, io="fp16")
    check_full(model)
    source = modelio.load_model(path)
    for old, new in zip(source.graph.inputs, model.graph.inputs):
        assert new.dtype == (F16 if old.dtype == F32 else old.dtype)
    assert model.graph.outputs[0].dtype == F16
    feeds = FAMILIES["dit"].example_inputs(2, 0)
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    out = run(model, half)
    assert out.dtype == np.float16 and rel_err(out, run(path, feeds)) < FP16_TOL


def test_bf16_verified_where_it_can_be(zoo_export):
    """bf16: the graph type-checks (checker, strict shape inference) and its per-op emulation runs close
    to fp32; ONNX Runtime's CPU provider refuses it (no bfloat16 Add kernel): what cannot run here."""
    path = zoo_export("dit", "torchscript")
    model, _ = converted(path, "bf16")
    check_full(model)
    onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), check_type=True, strict_mode=True)
    assert any(v.dtype == ir.DataType.BFLOAT16 for v in model.graph.initializers.values())
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        session(model)
    feeds = FAMILIES["dit"].example_inputs(2, 0)
    EmulateLowPrecisionPass()(model)
    err = rel_err(run(model, feeds, optimize=False), run(path, feeds))
    assert 0 < err < 0.1  # bf16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding)


# ------------------------------------------------------------------ the emulation


def rounding_reference(proto16: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """onnx's ReferenceEvaluator on a 16-bit graph, one node at a time: each node in float32 on its
    (already rounded) inputs, its float16 results rounded: what EmulateLowPrecisionPass must reproduce."""
    inferred = onnx.shape_inference.infer_shapes(proto16)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    results = dict(feeds)
    results.update({t.name: onnx.numpy_helper.to_array(t) for t in proto16.graph.initializer})
    h = onnx.helper
    for node in proto16.graph.node:
        inputs = [results[i].astype(np.float32) if results[i].dtype == np.float16 else results[i] for i in node.input]
        one = h.make_node(node.op_type, [f"i{k}" for k in range(len(inputs))], [f"o{k}" for k in range(len(node.output))])
        one.attribute.extend(node.attribute)
        for attr in one.attribute:
            if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT16:
                attr.i = onnx.TensorProto.FLOAT  # computed in float32, rounded below
        graph = h.make_graph([one], "one", [h.make_tensor_value_info(f"i{k}", 0, None) for k in range(len(inputs))],
                             [h.make_tensor_value_info(f"o{k}", 0, None) for k in range(len(node.output))])
        outs = onnx.reference.ReferenceEvaluator(h.make_model(graph, opset_imports=proto16.opset_import)).run(
            None, {f"i{k}": v for k, v in enumerate(inputs)})
        for name, value in zip(node.output, outs):
            results[name] = value.astype(np.float16) if types.get(name) == onnx.TensorProto.FLOAT16 else value
    return results[proto16.graph.output[0].name]


def test_emulation_rounds_each_op_as_a_reference_evaluator_does():
    """A small fp16 graph (MatMul, Add, Softmax kept fp32 behind Casts, Mul): the emulated graph on ONNX
    Runtime equals a per-node rounding reference evaluator, and differs from ONNX Runtime's own fp16 run."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    tp = onnx.TensorProto
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Add", ["h", "b"], ["h2"]),
         onnx.helper.make_node("Softmax", ["h2"], ["s"], axis=-1), onnx.helper.make_node("Mul", ["s", "h2"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", tp.FLOAT, [4, 64])],
        [onnx.helper.make_tensor_value_info("y", tp.FLOAT, [4, 64])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    fp32, model = ir.serde.deserialize_model(proto), ir.serde.deserialize_model(proto)
    ConvertPrecisionPass("fp16")(model)
    proto16 = ir.serde.serialize_model(model)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    expected = rounding_reference(proto16, {"x": x})
    EmulateLowPrecisionPass()(model)
    emulated = run(model, {"x": x}, optimize=False)
    np.testing.assert_array_equal(emulated, expected)
    assert not np.array_equal(emulated, run(fp32, {"x": x}))


# ------------------------------------------------------------------ the main job


def _reference_export(tmp: Path, precision: str) -> Path:
    """dit-digits exported by TorchScript: fp32, all-fp16 (`model.half()`) or fp16 weights with fp32 IO."""
    from omnicache_export.zoo.patches import export_friendly_tensor_ops
    from omnicache_export.zoo.reference import load_reference

    ref = load_reference("dit-digits")
    model = copy.deepcopy(ref.model).eval()
    feeds = ref.example_inputs()
    names = ref.input_names
    if precision != "fp32":
        model = model.half()
    half = precision == "fp16"
    args = tuple(torch.from_numpy(feeds[n]).half() if half and feeds[n].dtype == np.float32
                 else torch.from_numpy(feeds[n]) for n in names)

    class FloatIO(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return self.inner(*(t.half() if t.is_floating_point() else t for t in a)).float()

    module = FloatIO(model) if precision == "fp16-io32" else model
    path = tmp / f"dit-{precision}.onnx"
    with torch.no_grad(), export_friendly_tensor_ops():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=[ref.output_name],
                          dynamic_axes={n: {0: "batch"} for n in [*names, ref.output_name]}, opset_version=17,
                          dynamo=False)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from omnicache_export.zoo.reference import scheduler_json, write_calib_npz

    tmp = tmp_path_factory.mktemp("precision-digits")
    made = {p: _reference_export(tmp, p) for p in ("fp32", "fp16", "fp16-io32")}
    made["calib"] = write_calib_npz("dit-digits", np.arange(3), tmp / "calib.npz")
    made["scheduler"] = scheduler_json("dit-digits", tmp / "scheduler.json")
    return made


def _job(digits, model: Path, out: Path, *extra: str) -> int:
    return main([str(model), "-o", str(out), "--calib", str(digits["calib"]), "--scheduler", str(digits["scheduler"]),
                 "--guidance-scale", "2", "--steps", "6", "--num-calib", "3", "-q", *extra])


def _sample(out: Path, precision: str | None = None, no_cache: bool = False) -> np.ndarray:
    from omnicache_export.runtime.omnicache import OmniCache
    from omnicache_export.zoo.reference import load_reference

    cond, uncond = load_reference("dit-digits").conditioning([0, 4, 9])
    rt = OmniCache.load(out, precision=precision)
    try:
        return rt.sample(cond, uncond, seed=5, no_cache=no_cache).astype(np.float64)
    finally:
        rt.close()


def test_main_job_fp16_end_to_end(digits, tmp_path):
    from omnicache_export.calibration.calibrate import psnr

    out16, out32 = tmp_path / "fp16", tmp_path / "fp32"
    assert _job(digits, digits["fp32"], out16, "--precision", "fp16") == 0
    assert _job(digits, digits["fp32"], out32) == 0
    m16 = json.loads((out16 / "omnicache.json").read_text())
    assert [e["precision"] for e in m16["engines"]] == ["fp16"]
    assert json.loads((out32 / "omnicache.json").read_text())["engines"][0]["precision"] == "fp32"
    names = {p.name for p in out16.iterdir()}
    assert {"cache.onnx", "full.onnx", "omnicache.json"} <= names
    assert not [n for n in names if n.startswith(("source.converted", "calibration.", "cache.uncorrected"))]
    full = modelio.load_model(out16 / "full.onnx")
    assert {v.name: v.dtype for v in full.graph.inputs}["hidden_states"] == F32  # IO as the model has them
    assert any(v.dtype == F16 for v in full.graph.initializers.values())
    cache = modelio.load_model(out16 / "cache.onnx")
    tables = [v for v in cache.graph.initializers.values() if v.name.startswith("omnicache_")]
    assert tables and all(v.dtype == F32 for v in tables if v.dtype.is_floating_point())  # the correction stays fp32
    reference = _sample(out32, no_cache=True)
    cached16 = _sample(out16, precision="fp16")
    assert np.isfinite(cached16).all()
    # fp16 cached vs fp32 no-cache: within a dB of the fp32 export's own cached figure (caching dominates)
    cached32 = _sample(out32)
    assert psnr(cached16, reference).mean() > psnr(cached32, reference).mean() - 1.0
    assert psnr(_sample(out16, no_cache=True), reference).mean() > 55  # fp16 alone costs far less
    with pytest.raises(Exception, match="no engine onnxruntime/cpu/fp32"):
        _sample(out16, precision="fp32")


@pytest.mark.parametrize("kind", ["fp16", "fp16-io32"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp16_input_models_through_the_main_job(digits, tmp_path, kind, precision):
    out = tmp_path / "out"
    assert _job(digits, digits[kind], out, "--precision", precision) == 0
    manifest = json.loads((out / "omnicache.json").read_text())
    assert manifest["engines"][0]["precision"] == "fp16"  # what the graphs hold
    inputs = {i["name"]: i["dtype"] for i in manifest["model_io"]["inputs"]}
    assert inputs["hidden_states"] == ("FLOAT16" if kind == "fp16" else "FLOAT")
    assert np.isfinite(_sample(out)).all()


def test_bf16_main_job_refused_in_one_line_on_cpu(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert _job(digits, digits["fp32"], out, "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision bf16" in err[0] and "ONNX Runtime" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("args,code,text", [(["--precision", "fp8"], 2, "invalid choice"),
                                             (["--io-precision", "int8"], 2, "invalid choice"),
                                             (["--io-precision", "fp16"], 2, "needs --precision fp16 or bf16")])
def test_bad_precision_values(digits, tmp_path, capsys, args, code, text):
    with pytest.raises(SystemExit) if "invalid" in text else _nothing() as exc:
        rc = _job(digits, digits["fp32"], tmp_path / "out", *args)
    rc = exc.value.code if "invalid" in text else rc
    assert rc == code and text in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
