"""The exporter-trap repairs (graph/repair.py; passes/fold_squeeze_if.py, passes/drop_noop_squeeze.py).

Stock `torch.onnx.export` of diffusers' PixArtTransformer2DModel (no zoo patches) does not load in
ONNX Runtime, by either exporter: `proj_out(x).squeeze(1)` on [B, 16, C] is a no-op in torch, but
TorchScript writes `If(dim(x, 1) == 1, Squeeze, Identity)` and dynamo a plain `Squeeze(x, [1])`,
and ONNX Runtime refuses "Dimension of input 1 must be 1 instead of 16". Each pass repairs its trap;
the repaired model equals the torch model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from omnicache_export.errors import UserError
from omnicache_export.graph import modelio
from omnicache_export.graph.repair import describe_refusal, repairs_of
from omnicache_export.passes.drop_noop_squeeze import DropNoopSqueezePass
from omnicache_export.passes.fold_squeeze_if import FoldSqueezeIfPass
from omnicache_export.passes.static_shapes import symbolic_static_dims
from omnicache_export.zoo.families import FAMILIES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning")
TRAP = "Dimension of input 1 must be 1 instead of 16"


# ------------------------------------------------------------------ stock exports, as a user makes them


class _FloatIO(torch.nn.Module):
    """fp16 weights with float32 inputs and outputs: Casts at the graph's IO."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*(a.half() if a.is_floating_point() else a for a in args)).float()


def stock_inputs(family: str, batch: int, seed: int, precision: str = "fp32") -> dict[str, np.ndarray]:
    feeds = FAMILIES[family].example_inputs(batch, seed)
    if precision == "fp16":
        feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


def stock_export(family: str, exporter: str, folder: Path, precision: str = "fp32") -> Path:
    """`torch.onnx.export` of the zoo's diffusers model (random weights, seed 0) the way a user calls
    it: no export_friendly_tensor_ops, dynamic batch. precision: fp32, fp16 (`model.half()`: fp16
    inputs and outputs) or fp16-io32 (fp16 weights, float32 IO). Made once per file name."""
    path = Path(folder) / f"{family}-{exporter}-{precision}.onnx"
    if path.is_file():
        return path
    fam = FAMILIES[family]
    model = fam.build(0).eval()
    if precision != "fp32":
        model = model.half()
    module = _FloatIO(model) if precision == "fp16-io32" else model
    feeds = stock_inputs(family, 2, 0, "fp16" if precision == "fp16" else "fp32")
    args = tuple(torch.from_numpy(feeds[n]) for n in fam.input_names)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(tmp), input_names=fam.input_names, output_names=[fam.output_name],
                              dynamic_axes=fam.dynamic_axes, opset_version=17, dynamo=False)
        else:
            batch = torch.export.Dim("batch")
            shapes = (tuple({0: batch} for _ in fam.input_names),)  # forward(*args): one tuple of args
            program = torch.onnx.export(module, args, input_names=fam.input_names, output_names=[fam.output_name],
                                        dynamic_shapes=shapes, opset_version=18, dynamo=True)
            program.save(str(tmp))
    tmp.rename(path)
    return path


def torch_output(family: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    fam = FAMILIES[family]
    with torch.no_grad():
        return fam.build(0).eval()(*(torch.from_numpy(feeds[n]) for n in fam.input_names)).numpy()


def run_model(model: ir.Model | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    data = ir.serde.serialize_model(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="session")
def stock(tmp_path_factory):
    """stock(family, exporter, precision="fp32") -> a stock export, made once per session."""
    folder = tmp_path_factory.getbasetemp() / "stock-exports"
    folder.mkdir(exist_ok=True)
    return lambda family, exporter, precision="fp32": stock_export(family, exporter, folder, precision)


def unrepairable_pixart(stock, folder: Path) -> Path:
    """The TorchScript trap with its condition in a form no repair decides (a Slice of the shape, not
    a Gather): the Squeeze branch still cannot type-check, and ONNX Runtime still refuses it."""
    model = modelio.load_model(stock("pixart", "torchscript"))
    node = next(n for n in model.graph if n.op_type == "If")
    gather = node.inputs[0].producer().inputs[0].producer()  # Equal(Gather(Shape(x), 1), 1)
    shape = gather.inputs[0]
    const = lambda name, v: ir.node("Constant", [], {"value": ir.tensor(np.array(v, np.int64), name=name)})  # noqa: E731
    starts, ends = const("starts", [1]), const("ends", [2])
    sliced = ir.node("Slice", [shape, starts.outputs[0], ends.outputs[0]], name="/trap/Slice")
    model.graph.insert_before(gather, [starts, ends, sliced])
    ir.convenience.replace_all_uses_with(gather.outputs[0], sliced.outputs[0])
    path = folder / "pixart-unrepairable.onnx"
    ir.save(model, path)
    return path


# ------------------------------------------------------------------ the traps, and each pass on its own


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stock_pixart_does_not_load_as_exported(stock, exporter):
    with pytest.raises(Exception, match=TRAP):
        ort.InferenceSession(str(stock("pixart", exporter)), providers=["CPUExecutionProvider"])


def test_fold_squeeze_if_repairs_the_torchscript_export(stock):
    model = modelio.load_model(stock("pixart", "torchscript"))
    n_before = len(model.graph)
    dims = symbolic_static_dims(model)
    fold = FoldSqueezeIfPass(dims)
    assert fold(model).modified
    assert len(fold.folded) == 1 and fold.folded[0].startswith("'/If'") and "is 16" in fold.folded[0]
    assert not [n for n in model.graph if n.op_type == "If"]
    # The If went, its Identity branch came in, its Shape -> Gather -> Equal condition went too.
    assert len(model.graph) < n_before
    drop = DropNoopSqueezePass(symbolic_static_dims(model))
    assert not drop(model).modified and drop.dropped == []
    for batch, seed in ((2, 1), (3, 2)):
        feeds = stock_inputs("pixart", batch, seed)
        assert rel_err(run_model(model, feeds), torch_output("pixart", feeds)) <= 1e-5


def test_drop_noop_squeeze_repairs_the_dynamo_export(stock):
    model = modelio.load_model(stock("pixart", "dynamo"))
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze" and n.name == "node_squeeze")
    name, out_name, meta = squeeze.name, squeeze.outputs[0].name, dict(squeeze.metadata_props)
    dims = symbolic_static_dims(model)
    assert not FoldSqueezeIfPass(dims)(model).modified  # no If in a dynamo export
    drop = DropNoopSqueezePass(dims)
    assert drop(model).modified
    assert drop.dropped == ["'node_squeeze' (Squeeze of axes [1] of size 16 != 1: is an Identity)"]
    identity = next(n for n in model.graph if n.name == name)
    # the same node name, output name and name scopes (the block search reads them)
    assert identity.op_type == "Identity" and identity.outputs[0].name == out_name and dict(identity.metadata_props) == meta
    for batch, seed in ((2, 1), (3, 2)):
        feeds = stock_inputs("pixart", batch, seed)
        assert rel_err(run_model(model, feeds), torch_output("pixart", feeds)) <= 1e-5


def _squeeze_model(axes: list[int], opset: int, shape=("batch", 1, 16, 1)) -> ir.Model:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    if opset >= 13:
        nodes = [helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [len(axes)], axes)),
                 helper.make_node("Squeeze", ["x", "axes"], ["s"], name="sq"), helper.make_node("Relu", ["s"], ["y"])]
    else:
        nodes = [helper.make_node("Squeeze", ["x"], ["s"], name="sq", axes=axes), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


@pytest.mark.parametrize("opset", [11, 17])
def test_drop_noop_squeeze_keeps_the_unit_axes(opset):
    """torch's x.squeeze((1, 2, 3)) squeezes the size-1 axes 1 and 3 and leaves 16 alone."""
    model = _squeeze_model([1, 2, -1], opset)
    drop = DropNoopSqueezePass(symbolic_static_dims(model))
    assert drop(model).modified and "squeezes only axes [1, 3]" in drop.dropped[0]
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 1)).astype(np.float32)
    expected = torch.relu(torch.from_numpy(x).squeeze((1, 2, 3))).numpy()
    np.testing.assert_array_equal(run_model(model, {"x": x}), expected)


def test_drop_noop_squeeze_leaves_valid_squeezes():
    for axes, shape in (([1], ("batch", 1, 16, 1)), ([0], ("batch", 1, 16, 1)), ([1], ("batch", "n", 4))):
        model = _squeeze_model(axes, 17, shape)  # size 1, the batch, a dim nobody knows: all left as they are
        assert not DropNoopSqueezePass(symbolic_static_dims(model))(model).modified


def _if_model(x_shape, cond_from: str = "shape", output_is_if: bool = False) -> ir.Model:
    """y = If(dim(x, 1) == 1, Squeeze(x, [1]), Identity(x)) -> Relu, TorchScript's form; cond_from
    "input": the condition is a graph input (nothing static decides it)."""
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["ax"], value=one), helper.make_node("Squeeze", ["x", "ax"], ["t"], name="/Squeeze")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    nodes = []
    if cond_from == "shape":
        nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Constant", [], ["idx"], value=helper.make_tensor("i", TensorProto.INT64, [], [1])),
                  helper.make_node("Gather", ["shape", "idx"], ["dim"], axis=0),
                  helper.make_node("Constant", [], ["c1"], value=helper.make_tensor("c", TensorProto.INT64, [], [1])),
                  helper.make_node("Equal", ["dim", "c1"], ["cond"])]
    else:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    out = "y" if output_is_if else "z"
    nodes.append(helper.make_node("If", ["cond"], [out], name="/If", then_branch=then, else_branch=other))
    if not output_is_if:
        nodes.append(helper.make_node("Relu", ["z"], ["y"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@pytest.mark.parametrize("output_is_if", [False, True])
def test_fold_squeeze_if_folds_the_trap_and_keeps_output_names(output_is_if):
    model = _if_model(("batch", 16, 4), output_is_if=output_is_if)
    fold = FoldSqueezeIfPass(symbolic_static_dims(model))
    assert fold(model).modified and fold.folded[0].startswith("'/If' (dim of 'x' is 16")
    assert [n.op_type for n in model.graph] == ["Identity"] + ([] if output_is_if else ["Relu"])  # condition removed
    assert [v.name for v in model.graph.outputs] == ["y"]
    x = np.random.default_rng(1).standard_normal((3, 16, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x}), x if output_is_if else np.maximum(x, 0))


def test_fold_squeeze_if_leaves_ifs_that_load():
    for shape, cond_from in ((("batch", 1, 4), "shape"), (("batch", "n", 4), "shape"), (("batch", 16, 4), "input")):
        # dim 1 is 1 (the Squeeze is valid), nobody knows it, or nothing static decides the condition
        model = _if_model(shape, cond_from)
        assert not FoldSqueezeIfPass(symbolic_static_dims(model))(model).modified


# ------------------------------------------------------------------ on load: repair, note, or refuse


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_load_user_model_repairs_and_says_so(stock, exporter, caplog):
    path = stock("pixart", exporter)
    with caplog.at_level(logging.WARNING, logger="omnicache_export.graph.repair"):
        model = modelio.load_user_model(path)
    node = "'/If'" if exporter == "torchscript" else "'node_squeeze'"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and path.name in notes[0] and node in notes[0] and "repaired" in notes[0]
    assert len(repairs_of(model)) == 1 and node in repairs_of(model)[0]
    feeds = stock_inputs("pixart", 2, 3)
    assert rel_err(run_model(model, feeds), torch_output("pixart", feeds)) <= 1e-5


def test_models_that_load_are_left_alone(zoo_export, stock, caplog):
    paths = [zoo_export("pixart", "torchscript"), zoo_export("pixart", "dynamo"), stock("dit", "torchscript")]
    for path in paths:
        before = ir.serde.serialize_model(modelio.load_model(path)).SerializeToString()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="omnicache_export"):
            model = modelio.load_user_model(path)
        assert repairs_of(model) == [] and not [r for r in caplog.records if r.name.startswith("omnicache_export")]
        assert ir.serde.serialize_model(model).SerializeToString() == before


def test_a_trap_no_repair_applies_to_is_refused_naming_the_node(stock, tmp_path):
    path = unrepairable_pixart(stock, tmp_path)
    with pytest.raises(UserError) as info:
        modelio.load_user_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "node '/Squeeze' (Squeeze) in node '/If' (If)" in message and TRAP in message
    assert "polygraphy surgeon sanitize pixart-unrepairable.onnx --fold-constants" in message


def test_describe_refusal():
    assert describe_refusal(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /a/b.onnx failed:Node (/If) Op (If) [TypeInferenceError] "
        "Graph attribute inferencing failed: Node (/Squeeze) Op (Squeeze) [ShapeInferenceError] " + TRAP
    ) == f"node '/Squeeze' (Squeeze) in node '/If' (If): {TRAP}"
    assert describe_refusal("[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model.\nmore") == \
        "This is an invalid model"
