"""The fixes made on load for TensorRT's parser (graph/tensorrt_fixes.py; passes/demote_double.py,
passes/cast_unsupported_types.py): each keeps the model's numbers, and the fixed graph passes the
readiness check the unfixed one fails."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

from conftest import run_ort
from omnicache_export.graph import modelio
from omnicache_export.graph.tensorrt_check import Rule, check_model
from omnicache_export.graph.tensorrt_fixes import fixes_of
from omnicache_export.passes.cast_unsupported_types import CastUnsupportedTypesPass
from omnicache_export.passes.demote_double import DemoteDoublePass
from omnicache_export.passes.static_shapes import infer_elem_types

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning")


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    m = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[oh.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _rules(model: ir.Model) -> set:
    return {f.rule for r in check_model(model) for f in r.findings}


def _rope_like() -> onnx.ModelProto:
    """Flux's RoPE path as dynamo writes it: positions cast to DOUBLE, float64 frequencies, Sin/Cos,
    a float64 ConstantOfShape, cast back to FLOAT."""
    freqs = numpy_helper.from_array(np.geomspace(1.0, 1e-4, 8).astype(np.float64), "freqs")
    nodes = [
        oh.make_node("Cast", ["pos"], ["pos64"], to=T.DOUBLE),
        oh.make_node("Unsqueeze", ["pos64", "axis"], ["col"]),
        oh.make_node("Mul", ["col", "freqs"], ["angles"]),
        oh.make_node("Sin", ["angles"], ["s"]),
        oh.make_node("Cos", ["angles"], ["c"]),
        oh.make_node("Shape", ["s"], ["shape"]),
        oh.make_node("ConstantOfShape", ["shape"], ["half"], value=numpy_helper.from_array(np.array([0.5]))),
        oh.make_node("Mul", ["c", "half"], ["ch"]),
        oh.make_node("Add", ["s", "ch"], ["t"]),
        oh.make_node("Cast", ["t"], ["y"], to=T.FLOAT),
    ]
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    return _model(nodes, [oh.make_tensor_value_info("pos", T.INT64, [16])],
                  [oh.make_tensor_value_info("y", T.FLOAT, [16, 8])], [freqs, axis])


def test_demote_double_keeps_the_numbers_to_float32_rounding():
    proto = _rope_like()
    pos = np.arange(0, 4096, 256, dtype=np.int64)
    before = _run(proto, {"pos": pos})[0]
    model = ir.from_proto(proto)
    assert Rule.DOUBLE in _rules(model)
    p = DemoteDoublePass(infer_elem_types(model))
    assert p(model).modified and set(p.demoted) >= {"freqs"}
    assert Rule.DOUBLE not in _rules(model)
    after = _run(ir.to_proto(model), {"pos": pos})[0]
    exact = np.sin(pos[:, None] * np.geomspace(1.0, 1e-4, 8)) + 0.5 * np.cos(pos[:, None] * np.geomspace(1.0, 1e-4, 8))
    # float32 angles up to 4096 rad: |error| <= |angle| * 2^-24 plus the sin/cos rounding
    assert np.abs(after - before).max() <= 4096 * 2.0 ** -24 * 2 + 1e-6
    assert np.abs(after - exact).max() <= 4096 * 2.0 ** -24 * 2 + 1e-6


def test_demote_double_leaves_a_double_interface():
    proto = _model([oh.make_node("Relu", ["x"], ["y"])], [oh.make_tensor_value_info("x", T.DOUBLE, [2])],
                   [oh.make_tensor_value_info("y", T.DOUBLE, [2])])
    model = ir.from_proto(proto)
    with pytest.raises(ir.passes.PreconditionError, match="interface"):
        DemoteDoublePass()(model)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_bool_pad_and_integer_nonzero_are_bit_exact(mode):
    """A BOOL mask padded with True (Mochi's pooler) and the NonZero of an INT64 mask (its attention)."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 2], np.int64), "pads")
    fill = numpy_helper.from_array(np.array(True), "fill")
    nodes = [oh.make_node("Pad", ["mask", "pads", *(["fill"] if mode == "constant" else [])], ["padded"],
                          name="pool_pad", mode=mode),
             oh.make_node("Cast", ["padded"], ["as_int"], to=T.INT64),
             oh.make_node("NonZero", ["as_int"], ["where"], name="gather_nz")]
    proto = _model(nodes, [oh.make_tensor_value_info("mask", T.BOOL, [2, 5])],
                   [oh.make_tensor_value_info("padded", T.BOOL, [2, 8]),
                    oh.make_tensor_value_info("where", T.INT64, [2, None])], [pads, fill])
    mask = np.random.default_rng(0).random((2, 5)) > 0.5
    before = _run(proto, {"mask": mask})
    model = ir.from_proto(proto)
    assert Rule.TYPE in _rules(model)
    p = CastUnsupportedTypesPass(infer_elem_types(model))
    p(model)
    assert p.cast == ["Pad 'pool_pad' (BOOL as INT32)", "NonZero 'gather_nz' (INT64 as FLOAT)"]
    assert not _rules(model)
    after = ir.to_proto(model)
    assert [o.name for o in after.graph.output] == ["padded", "where"]
    assert after.graph.output[0].type.tensor_type.elem_type == T.BOOL
    for a, b in zip(before, _run(after, {"mask": mask})):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def _as_exported_and_fixed(path, model: ir.Model, family: str) -> tuple[dict, dict]:
    """The zoo export's outputs as exported and as loaded (fixed), on the family's sample inputs."""
    from omnicache_export.zoo.families import FAMILIES

    fixed = path.with_name("model.fixed.onnx")
    modelio.save_model(model, fixed)
    rng = np.random.default_rng(0)
    feeds = {k: v.make(2, rng) for k, v in FAMILIES[family].inputs.items()}
    return run_ort(path, feeds), run_ort(fixed, feeds)


def test_mochi_is_fixed_on_load_and_computes_the_same(zoo_export, caplog):
    """The zoo's Mochi (diffusers' MochiTransformer3DModel, TorchScript): ready on every line after
    the fixes, its output bit-equal to the file as exported."""
    from omnicache_export.graph.tensorrt_check import check_path
    path = zoo_export("mochi", "torchscript")
    assert not all(r.ready for r in check_path(path))  # as exported
    with caplog.at_level(logging.WARNING):
        model = modelio.load_user_model(path)
    notes = fixes_of(model)
    assert len(notes) == 1 and "Pad" in notes[0] and "NonZero" in notes[0]
    assert sum("changed for TensorRT" in r.getMessage() for r in caplog.records) == 1
    assert all(r.ready for r in check_model(model))
    a, b = _as_exported_and_fixed(path, model, "mochi")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_model_without_fixes_is_untouched(zoo_export):
    model = modelio.load_user_model(zoo_export("dit", "torchscript"))
    assert fixes_of(model) == []


def test_flux_dynamo_rope_in_float32(zoo_export):
    """The zoo's Flux (diffusers' FluxTransformer2DModel) under the dynamo exporter computes its RoPE
    tables in float64: computed in float32 after the fix, ready on every line, the output within
    float32 rounding of the file as exported."""
    from conftest import max_rel_err
    from omnicache_export.graph.tensorrt_check import check_path
    path = zoo_export("flux", "dynamo")
    assert any(f.rule is Rule.DOUBLE for r in check_path(path) for f in r.findings)
    model = modelio.load_user_model(path)
    assert any("DOUBLE" in note for note in fixes_of(model))
    assert all(r.ready for r in check_model(model))
    a, b = _as_exported_and_fixed(path, model, "flux")
    assert all(max_rel_err(b[k], a[k]) <= 1e-5 for k in a)
