"""The zoo's ONNX exports run in onnxruntime and match the torch models, with both exporters.

Dynamo exports cost ~8-15 s each on 2 CPU cores (torch.export + decompositions), TorchScript ~1 s.
Dynamo cases outside FAST_DYNAMO are marked `slow` and skipped unless OMNICACHE_SLOW=1
(select them with `-m slow`; the marker wants `markers = ["slow: ..."]` in pytest's config).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from omnicache_export.zoo import FAMILIES, OUTPUT_NAME, export_family, write_inputs_npz  # noqa: E402

from conftest import FAST_DYNAMO, SLOW  # noqa: E402
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
REQUIRED = {"dit", "pixart", "latte", "stdit", "sd3", "flux", "cogvideox"}


def _cases():
    for name, family in FAMILIES.items():
        for exporter in family.exporters:
            marks = SLOW if exporter == "dynamo" and name not in FAST_DYNAMO else []
            yield pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks)


@pytest.fixture
def exported(zoo_export):
    """The session's shared exports (conftest), so every test module exports each model once."""
    return zoo_export


def _reference(family, feeds):
    model = family.build(0)
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[n]) for n in family.input_names)).numpy()


@pytest.mark.parametrize("name,exporter", list(_cases()))
def test_export_matches_torch(name, exporter, exported):
    family = FAMILIES[name]
    path = exported(name, exporter)

    proto = onnx.load(str(path))
    assert proto.ir_version <= 10
    assert [i.name for i in proto.graph.input] == family.input_names
    assert [o.name for o in proto.graph.output] == [family.output_name]  # no extra outputs
    used = {i for n in proto.graph.node for i in n.input}
    assert set(family.input_names) <= used  # e.g. timestep not constant-folded away
    if exporter == "torchscript":  # module scopes live in node names: /transformer_blocks.0/attn1/to_q/MatMul
        assert any(n.name.startswith("/") and ".0/" in n.name for n in proto.graph.node)
    else:  # ... and in metadata for dynamo: ['', 'transformer_blocks.0', 'transformer_blocks.0.attn1', ...]
        scopes = [p.value for n in proto.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        assert any(".0'" in s for s in scopes)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # One session, several batches: the batch axis must really be dynamic where declared.
    for batch in (2, 1) if family.dynamic_batch else (2,):
        feeds = family.example_inputs(batch, seed=1)
        ref = _reference(family, feeds)
        (out,) = session.run([family.output_name], feeds)
        assert out.shape == ref.shape
        err, tol = float(np.abs(out - ref).max()), 1e-4 * (1 + float(np.abs(ref).max()))
        assert err <= tol, f"{name}/{exporter} batch {batch}: max abs err {err:.3g} > {tol:.3g}"


def test_registry_and_inputs():
    assert REQUIRED <= set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.output_name == OUTPUT_NAME and family.exporters
        feeds = family.example_inputs(3, seed=0)
        assert list(feeds) == family.input_names
        for key, value in feeds.items():
            assert value.dtype in (np.float32, np.int64), (name, key, value.dtype)
            if family.inputs[key].batched:
                assert value.shape[0] == 3, (name, key)
        assert all(family.dynamic_axes[k] == {0: "batch"} for k in family.dynamic_axes)
        again = family.example_inputs(3, seed=0)
        assert all(np.array_equal(feeds[k], again[k]) for k in feeds)  # deterministic


def test_dynamo_refuses_opset_17(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_family("dit", tmp_path / "m.onnx", exporter="dynamo", opset=17)
    with pytest.raises(ValueError):
        export_family("dit", tmp_path / "m.onnx", exporter="tensorrt")


def test_external_data(tmp_path):
    path = export_family("dit", tmp_path / "dit.onnx", external_data=True)
    data = tmp_path / "dit.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    feeds = FAMILIES["dit"].example_inputs(2, seed=0)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(out, _reference(FAMILIES["dit"], feeds), atol=1e-4)


def test_write_inputs_npz(tmp_path):
    path = write_inputs_npz("flux", tmp_path / "inputs.npz", batch=2, seed=3)
    with np.load(path) as npz:
        saved = dict(npz)
    expected = FAMILIES["flux"].example_inputs(2, seed=3)
    assert list(saved) == list(expected)
    assert all(np.array_equal(saved[k], expected[k]) for k in expected)
