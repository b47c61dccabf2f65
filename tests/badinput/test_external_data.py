"""External data that points outside the model's folder is refused, wherever the tensor sits: the
main graph, a Constant, or an If branch's own initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.graph import modelio


def _external(name: str, location: str) -> TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [4], np.zeros(4, np.float32))
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model(where: str, location: str) -> onnx.ModelProto:
    """y = If(c, x + w, x), with w external: a main-graph initializer, a Constant, or an initializer
    of the then-branch itself."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
    w = _external("w", location)
    then_nodes = [helper.make_node("Add", ["x", "w"], ["b"])]
    if where == "constant":
        then_nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
    then_branch = helper.make_graph(then_nodes, "then", [], [b], [w] if where == "branch" else [])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "else", [], [b])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph([node], "g", [x, c], [y], [w] if where == "main" else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("where", ["main", "constant", "branch"])
def test_external_data_outside_the_folder_is_refused(where, tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(_model(where, "../secret.bin"), str(path))
    with pytest.raises(UserError, match="points outside the model's folder"):
        modelio.load_model(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "points outside the model's folder" in err and "Traceback" not in err
