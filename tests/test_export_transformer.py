"""`export_transformer` on every zoo family as a user calls it: the plain diffusers model (its own
forward, keywords, Transformer2DModelOutput), either exporter. Each export loads in ONNX Runtime,
matches the torch model at two batch sizes, carries the diffusers config, and goes through the split;
its calibration npz round-trips through `load_conditioning`. Plus the fixes one by one and the CLI verb."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import SLOW, family_cases, max_rel_err, run_ort
from omnicache_export.cli.main import main
from omnicache_export.errors import UserError
from omnicache_export.graph.split import split
from omnicache_export.integrations import export_transformer as et
from omnicache_export.integrations.calib_npz import calib_path_for
from omnicache_export.runtime.conditioning import UNCOND, load_conditioning
from omnicache_export.zoo.families import FAMILIES

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _cases():
    for p in family_cases(FAMILIES):
        name, exporter = p.values
        yield pytest.param(name, exporter, id=p.id, marks=SLOW if exporter == "dynamo" else [])


def plain_model(family, seed: int = 0):
    """The family's model as diffusers ships it (its own forward), and the keywords the zoo adds."""
    model = family.build(seed)
    api = getattr(type(model), "keyword_api", None)
    if api is None:  # the custom STDiT: its forward takes the inputs by name already
        return model, {}
    cls, fixed, extra = api
    kwargs = {**(fixed or {}), **(extra(model) if extra else {})}
    model.__class__ = cls
    return model, kwargs


def torch_output(model, feeds, fixed) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, **fixed)
    return et._sample_of(out).numpy()


def family_calib(family, n: int = 3) -> dict[str, np.ndarray]:
    """The user's conditioning: the family's conditioning inputs (n samples) and zeros as uncond."""
    feeds = family.example_inputs(n, seed=5)
    cond = {k: v for k, v in feeds.items() if k not in ("hidden_states", "timestep")}
    uncond = {UNCOND + k: np.zeros_like(v) for k, v in cond.items() if family.inputs[k].batched}
    return {**cond, **uncond}


@pytest.mark.parametrize("name,exporter", list(_cases()))
def test_export_every_family(name, exporter, tmp_path):
    family = FAMILIES[name]
    model, fixed = plain_model(family)
    feeds = family.example_inputs(2, seed=0)
    path = et.export_transformer(model, {**feeds, **fixed}, tmp_path / "model.onnx", exporter=exporter,
                                 dynamic_batch=family.dynamic_batch, calib=family_calib(family))
    assert type(model).__name__ == family.build(0).__class__.__name__  # its class back after the export

    proto = onnx.load(str(path))
    assert proto.ir_version <= et.MAX_IR_VERSION
    assert proto.opset_import[0].version >= (18 if exporter == "dynamo" else 17)
    assert [i.name for i in proto.graph.input] == family.input_names
    meta = et.read_metadata(path)
    assert meta["inputs"] == family.input_names
    if hasattr(model, "to_json_string"):
        assert meta["config"]["_class_name"] == type(model).__name__
        assert meta["config"]["num_layers"] == model.config.num_layers

    for batch in (2, 1) if family.dynamic_batch else (2,):  # the batch axis really dynamic
        run = family.example_inputs(batch, seed=1)
        ref = torch_output(model, run, fixed)
        out = run_ort(path, run)[et.OUTPUT_NAME]
        assert out.shape == ref.shape
        assert max_rel_err(out, ref) <= 1e-4, f"{name}/{exporter} batch {batch}"

    result = split(path, tmp_path / "split", numeric_check=False)
    assert result.analysis.region.n_blocks >= 2

    calib = load_conditioning(calib_path_for(path), result.analysis.io, guidance=True)
    expected = family_calib(family)
    assert set(calib.cond) | {UNCOND + k for k in calib.uncond} == set(expected)
    for key, value in expected.items():
        got = calib.uncond[key[len(UNCOND):]] if key.startswith(UNCOND) else calib.cond[key]
        assert got.dtype == value.dtype and np.array_equal(got, value), key


def test_cogvideox_frames_need_the_table_fix(tmp_path, monkeypatch):
    """A CogVideoX whose sample_frames (49, the default) does not match the sample's 3 latent frames:
    the export with the fix matches torch; without it the output is silently off."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=32, text_embed_dim=32, num_layers=1, sample_width=8,
                                        sample_height=8, patch_size=2, max_text_seq_length=8).eval()
    assert model.config.sample_frames == 49
    feeds = FAMILIES["cogvideox"].example_inputs(2, seed=0)
    ref = torch_output(model, feeds, {})
    fixed = et.export_transformer(model, feeds, tmp_path / "fixed.onnx")
    assert max_rel_err(run_ort(fixed, feeds)[et.OUTPUT_NAME], ref) <= 1e-4
    assert model.patch_embed.sample_frames == 49  # restored

    monkeypatch.setattr(et, "sample_sized_patch_embeds", lambda model, latent: contextlib.nullcontext())
    stock = et.export_transformer(model, feeds, tmp_path / "stock.onnx")
    assert max_rel_err(run_ort(stock, feeds)[et.OUTPUT_NAME], ref) > 1e-2


def test_external_data_past_the_limit(tmp_path, monkeypatch):
    family = FAMILIES["dit"]
    model, _ = plain_model(family)
    feeds = family.example_inputs(2, seed=0)
    monkeypatch.setattr(et, "PROTOBUF_LIMIT", et.weight_bytes(model))  # this model is "past 2 GB"
    path = et.export_transformer(model, feeds, tmp_path / "dit.onnx")
    data = tmp_path / "dit.onnx.data"
    assert data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert max_rel_err(run_ort(path, feeds)[et.OUTPUT_NAME], torch_output(model, feeds, {})) <= 1e-4
    small = et.export_transformer(model, feeds, tmp_path / "small.onnx", external_data=False)
    assert not (tmp_path / "small.onnx.data").exists() and small.stat().st_size > data.stat().st_size


def test_bad_input_is_refused_and_nothing_written(tmp_path):
    model, _ = plain_model(FAMILIES["dit"])
    feeds = FAMILIES["dit"].example_inputs(2, seed=0)
    with pytest.raises(UserError, match="opset >= 18"):
        et.export_transformer(model, feeds, tmp_path / "a.onnx", exporter="dynamo", opset=17)
    with pytest.raises(UserError, match="takes no argument 'prompt'"):
        et.export_transformer(model, {**feeds, "prompt": np.zeros(2, np.float32)}, tmp_path / "a.onnx")
    with pytest.raises(UserError, match="not a graph input"):
        et.export_transformer(model, feeds, tmp_path / "a.onnx", calib={"pooled_projections": np.zeros((2, 4))})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a.onnx").write_text("mine")
    with pytest.raises(UserError):
        et.export_transformer(model, feeds, tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").read_text() == "mine"


@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory):
    """A tiny DiT saved as a pipeline folder's transformer/ (save_pretrained)."""
    model, _ = plain_model(FAMILIES["dit"])
    folder = tmp_path_factory.mktemp("pipe")
    model.save_pretrained(folder / "transformer")
    return folder, model


def test_cli_exports_a_saved_transformer(saved_dit, tmp_path):
    folder, model = saved_dit
    out = tmp_path / "dit.onnx"
    assert main(["export-model", str(folder), "--subfolder", "transformer", "-o", str(out), "-q"]) == 0
    feeds = FAMILIES["dit"].example_inputs(3, seed=2)
    assert max_rel_err(run_ort(out, feeds)[et.OUTPUT_NAME], torch_output(model, feeds, {})) <= 1e-4
    assert et.read_metadata(out)["config"]["_class_name"] == "DiTTransformer2DModel"
    assert main(["export-model", str(folder), "--subfolder", "transformer", "-o", str(out), "-q"]) == 2  # exists
    assert main(["export-model", str(folder), "--subfolder", "transformer", "-o", str(out), "--force", "-q"]) == 0


def test_cli_sample_inputs_file(saved_dit, tmp_path):
    """Any class: sample inputs from an npz keyed by forward-argument name."""
    folder, model = saved_dit
    inputs = tmp_path / "sample.npz"
    np.savez(inputs, **FAMILIES["dit"].example_inputs(2, seed=0))
    out = tmp_path / "dit.onnx"
    assert main(["export-model", str(folder / "transformer"), "--sample-inputs", str(inputs), "-o", str(out),
                 "-q"]) == 0
    feeds = FAMILIES["dit"].example_inputs(2, seed=4)
    assert max_rel_err(run_ort(out, feeds)[et.OUTPUT_NAME], torch_output(model, feeds, {})) <= 1e-4


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "bad-json", "not-diffusers", "bad-subfolder",
                                  "bad-inputs"])
def test_cli_bad_input_exits_2(case, saved_dit, tmp_path, capsys):
    folder, _ = saved_dit
    args = {"missing": [str(tmp_path / "nope")], "bad-subfolder": [str(folder), "--subfolder", "unet"],
            "bad-inputs": [str(folder / "transformer"), "--sample-inputs", str(tmp_path / "none.npz")]}.get(case)
    if args is None:
        target = tmp_path / "model"
        if case == "file":
            target.write_text("x")
        else:
            target.mkdir()
            text = {"bad-json": "{", "not-diffusers": json.dumps({"_class_name": "NoSuchModel"})}.get(case)
            if text is not None:
                (target / "config.json").write_text(text)
        args = [str(target)]
    out = tmp_path / "out.onnx"
    assert main(["export-model", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("omnicache-export: "), err
    assert not out.exists()
