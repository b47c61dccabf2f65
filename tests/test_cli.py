"""The CLI as a user meets it: inspect and split on an export, and one clear error (exit 2, nothing
left behind) for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import max_rel_err, run_ort
from omnicache_export.cli.main import main
from omnicache_export.zoo.families import FAMILIES


def test_inspect_reports_roles_and_region(zoo_export, tmp_path, capsys):
    src = zoo_export("pixart", "torchscript")
    assert main(["inspect", str(src), "--json", str(tmp_path / "a.json")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    roles = {i["name"]: i["role"] for i in report["inputs"]}
    assert roles["hidden_states"] == "latent"
    assert roles["timestep"] == "timestep"
    assert roles["encoder_hidden_states"] == "conditioning"
    region = report["block_region"]
    assert region["method"] == "module scopes (torchscript names)"
    assert region["n_blocks"] == sum(region["block_lists"].values()) >= 2
    assert region["entry"] and region["exit"]
    assert 0.5 < region["flop_share"] <= 1.0
    assert 0.5 < region["node_share"] < 1.0
    assert "block stack" in capsys.readouterr().out


def test_inspect_overrides_roles(zoo_export, capsys, tmp_path):
    src = zoo_export("dit", "torchscript")
    assert main(["inspect", str(src), "--timestep", "class_labels", "--json", str(tmp_path / "a.json")]) == 0
    roles = {i["name"]: i["role"] for i in json.loads((tmp_path / "a.json").read_text())["inputs"]}
    assert roles["class_labels"] == "timestep" and roles["timestep"] == "conditioning"


def test_manual_region_override(zoo_export, tmp_path):
    src = zoo_export("dit", "torchscript")
    auto = tmp_path / "auto.json"
    assert main(["inspect", str(src), "--json", str(auto)]) == 0
    region = json.loads(auto.read_text())["block_region"]
    out = tmp_path / "manual"
    assert main(["split", str(src), "-o", str(out), "--region-start", region["entry"], "--region-end", region["exit"]]) == 0
    report = json.loads((out / "split.json").read_text())
    assert report["analysis"]["block_region"]["method"].startswith("manual")
    assert report["verification"]["cache_vs_source_max_rel_err"] <= 1e-4
    fam = FAMILIES["dit"]
    feeds = fam.example_inputs(1, 5)
    full = run_ort(out / "full.onnx", feeds)
    cached = run_ort(out / "cache.onnx", {**feeds, "omnicache_cache": full["omnicache_cache"]})
    assert max_rel_err(cached[fam.output_name], full[fam.output_name]) <= 1e-4


def test_external_data_model_splits_to_external_data(zoo_export, tmp_path):
    src = zoo_export("pixart", "torchscript", external_data=True)
    assert any(p.suffix == ".data" for p in src.parent.iterdir())
    out = tmp_path / "out"
    assert main(["split", str(src), "-o", str(out)]) == 0
    for name in ("full.onnx", "cache.onnx"):
        proto = onnx.load(out / name, load_external_data=False)
        big = [t for t in proto.graph.initializer if np.prod(t.dims) > 1024]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
        assert (out / f"{name}.data").is_file()
    fam = FAMILIES["pixart"]
    feeds = fam.example_inputs(2, 2)
    ref = run_ort(src, feeds)[fam.output_name]
    full = run_ort(out / "full.onnx", feeds)
    assert max_rel_err(full[fam.output_name], ref) <= 1e-5
    cached = run_ort(out / "cache.onnx", {**feeds, "omnicache_cache": full["omnicache_cache"]})
    assert max_rel_err(cached[fam.output_name], ref) <= 1e-4


def test_external_data_outside_folder_is_refused(zoo_export, tmp_path, capsys):
    src = zoo_export("dit", "torchscript", external_data=True)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    data = next(p for p in src.parent.iterdir() if p.suffix == ".data")
    shutil.copy(data, tmp_path / "weights.bin")
    proto = onnx.load(src, load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(proto, model_dir / "model.onnx")
    out = tmp_path / "out"
    assert main(["split", str(model_dir / "model.onnx"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "outside the model's folder" in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _no_stack_model(path):
    """A valid ONNX graph with no transformer: a small MLP."""
    x = ir.Value(name="x", shape=ir.Shape([1, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 8), np.float32)))
    mm = ir.node("MatMul", [x, w])
    relu = ir.node("Relu", [mm.outputs[0]])
    relu.outputs[0].name = "y"
    graph = ir.Graph([x], relu.outputs, nodes=[mm, relu], initializers=[w], opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), path)


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "no_stack", "missing_tensor", "missing_file"])
def test_bad_input_exit_2_nothing_left(case, zoo_export, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    extra = []
    if case == "not_onnx":
        model.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        data = zoo_export("dit", "torchscript").read_bytes()
        model.write_bytes(data[: len(data) // 3])
    elif case == "no_stack":
        _no_stack_model(model)
    elif case == "missing_tensor":
        shutil.copy(zoo_export("dit", "torchscript"), model)
        extra = ["--region-start", "no_such_tensor", "--region-end", "out_sample"]
    out = tmp_path / "out"
    for argv in (["inspect", str(model), *extra], ["split", str(model), "-o", str(out), *extra]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("omnicache-export: error: ") and err.count("\n") == 1
        expected = {
            "not_onnx": "not a readable ONNX model",
            "truncated": "not a readable ONNX model",
            "no_stack": "no transformer block stack found",
            "missing_tensor": "no_such_tensor",
            "missing_file": "no such file",
        }[case]
        assert expected in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.onnx"] if case != "missing_file" else [])


def test_split_refuses_existing_output(zoo_export, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["split", str(zoo_export("dit", "torchscript")), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["split", str(zoo_export("dit", "torchscript")), "-o", str(out), "--force"]) == 0
    assert (out / "cache.onnx").is_file()


def test_example_reference_writes_model_conditioning_and_scheduler(tmp_path, capsys):
    out = tmp_path / "dit.onnx"
    assert main(["example", "dit-digits", "-o", str(out)]) == 0
    assert out.is_file() and (tmp_path / "dit.inputs.npz").is_file() and (tmp_path / "dit.scheduler.json").is_file()
    labels = np.load(tmp_path / "dit.inputs.npz")["class_labels"]
    assert labels.tolist() == list(range(10))
    assert "omnicache-export" in capsys.readouterr().out
    assert main(["example", "nope", "-o", str(tmp_path / "x.onnx")]) == 2


def test_export_summary_prints_the_held_out_figure(zoo_export, tmp_path, capsys):
    """The summary leads with the quality on samples that played no part in the choice, as the
    manifest records it; auto run limits reach 6 of 8 steps cached (past the runs-of-2 cap of 5)."""
    import re

    from omnicache_export.runtime.manifest import read_manifest

    out = tmp_path / "exp"
    assert main([str(zoo_export("dit", "torchscript")), "-o", str(out), "--steps", "8", "--cache-ratio", "0.75",
                 "--num-calib", "4", "--no-filters", "-q"]) == 0
    text = capsys.readouterr().out
    m = read_manifest(out)
    q = m.calibration.quality
    assert q.validation == "split" and q.validation_samples == 2 * 3 and q.validation_psnr_db is not None  # 2 rows, 3 seeds
    line = next(x for x in text.splitlines() if x.startswith("quality vs no cache"))
    assert f"{q.validation_psnr_db:.2f} dB PSNR on 6 held-out calibration samples" in line
    assert f"({q.psnr_db_mean:.2f} dB on the samples that chose it)" in line
    cost = m.calibration.cost
    assert re.search(rf"scoring: {cost.scoring_evaluations} model evaluations \(successive halving; "
                     rf"{cost.exhaustive_evaluations} exhaustive\)", line)
    assert m.schedule.n_cached == 6 and m.schedule.max_consecutive_auto and m.schedule.max_run in (3, 4)
    assert "runs <= " in text and ", auto)" in text


@pytest.mark.parametrize("value", ["0", "two"])
def test_max_consecutive_must_be_auto_or_positive(zoo_export, tmp_path, capsys, value):
    assert main([str(zoo_export("dit", "torchscript")), "-o", str(tmp_path / "x"), "--max-consecutive", value]) == 2
    assert "--max-consecutive" in capsys.readouterr().err


def test_validation_seeds_must_be_positive(zoo_export, tmp_path, capsys):
    out = tmp_path / "x"
    assert main([str(zoo_export("dit", "torchscript")), "-o", str(out), "--validation-seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--validation-seeds 0: must be at least 1" in err[0] and not out.exists()
