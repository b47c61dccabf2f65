"""TensorRT readiness without TensorRT: the parser's operator matrix and restrictions per TensorRT
line (tables from onnx-tensorrt's docs/operators.md), and Polygraphy's lint and ONNX Runtime run
with its default data loader, on every graph the export emits.

What is verified here: each rule on a tiny graph that holds the pattern (run by ONNX Runtime where
it can run it, so the pattern is a real, valid graph); every zoo family's full graph and its
parametric cache graph (correction in the graph, tables as inputs) through `polygraphy check lint`
and `polygraphy run --onnxrt`; a main job's emitted graphs, its manifest record and the `check`
verb. What is not: a TensorRT build (no TensorRT here) — the check reads the documented parser
support, it does not run the parser.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as oh

from conftest import SLOW, family_cases
from omnicache_export.graph import modelio
from omnicache_export.graph.embed import build_cache_graph
from omnicache_export.graph.split import split
from omnicache_export.graph.tensorrt_check import MAX_ELEMENTS, Rule, check_model, check_path
from omnicache_export.graph.tensorrt_ops import LINES
from omnicache_export.passes.cache_names import cache_name
from omnicache_export.zoo.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def model(nodes, inputs, outputs, inits=(), opset=18) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 9  # what ORT 1.2x-1.3x loads
    return m


def vi(name, dtype, shape):
    return oh.make_tensor_value_info(name, dtype, shape)


def ints(name, values):
    return oh.make_tensor(name, T.INT64, [len(values)], values)


def findings(m: onnx.ModelProto, **kw) -> dict[str, list]:
    """line -> [(node, op, rule)] of a model proto."""
    return {r.line: [(f.node, f.op, f.rule) for f in r.findings]
            for r in check_model(ir.serde.deserialize_model(m), **kw)}


def ort_runs(m: onnx.ModelProto, feeds: dict) -> list:
    onnx.checker.check_model(m, full_check=True)
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


X4 = np.arange(8, dtype=np.float32).reshape(2, 4)


# ---------------------------------------------------------------- the operator matrix, as data

def test_each_line_cites_its_table():
    assert set(LINES) == {"10.3", "10.16", "11"}
    for line, data in LINES.items():
        assert data["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
        assert data["source"].endswith("/docs/operators.md") and data["table_version"]
        assert len(data["ops"]) > 150
    assert (LINES["10.3"]["max_opset"], LINES["10.16"]["max_opset"], LINES["11"]["max_opset"]) == (20, 24, 25)
    assert LINES["11"]["strongly_typed_only"] and not LINES["10.16"]["strongly_typed_only"]
    for line in LINES:
        for op in ("Unique", "Compress", "BitwiseAnd", "SequenceAt", "Optional", "OptionalHasElement"):
            assert LINES[line]["ops"][op]["supported"] is False, (line, op)
        assert "FP32" in LINES[line]["ops"]["MatMul"]["types"]
        assert "`Y`" in LINES[line]["ops"]["LayerNormalization"]["restrictions"]
        assert "initializer" in LINES[line]["ops"]["ReduceMean"]["restrictions"]
    assert LINES["10.3"]["ops"]["DFT"]["supported"] is False and LINES["10.16"]["ops"]["DFT"]["supported"] is False
    assert LINES["11"]["ops"]["DFT"]["supported"] == "plugin"
    assert "RMSNormalization" not in LINES["10.3"]["ops"] and LINES["10.16"]["ops"]["RMSNormalization"]["supported"]
    assert "INT64" not in LINES["10.3"]["ops"]["Pow"]["types"] and "INT64" in LINES["10.16"]["ops"]["Pow"]["types"]


def test_tool_regenerates_the_data_from_an_operators_md(tmp_path):
    md = tmp_path / "operators.md"
    md.write_text("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24.\n\n"
                  "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
                  "| Abs | Y | FP32, FP16 |\n| DFT | N |\n"
                  "| ReduceSum | Y | FP32, INT64 | `axes` must be an initializer |\n")
    out = tmp_path / "ops.py"
    subprocess.run([sys.executable, str(ROOT / "tools/tensorrt_ops.py"), "--table", f"10.16={md}",
                    "--table", f"11={md}", "-o", str(out)], check=True)
    data: dict = {}
    exec(out.read_text(), data)  # noqa: S102 - the module the tool just wrote
    lines = data["LINES"]
    assert lines["10.16"]["max_opset"] == 24 and lines["11"]["max_opset"] == 25
    assert lines["10.16"]["ops"]["Abs"] == {"supported": True, "types": ["FP32", "FP16"], "restrictions": ""}
    assert lines["10.16"]["ops"]["ReduceSum"]["restrictions"] == "`axes` must be an initializer"
    assert lines["10.16"]["ops"]["DFT"]["supported"] is False and lines["11"]["ops"]["DFT"]["supported"] == "plugin"


# ---------------------------------------------------------------- each rule on a graph that holds it

def test_dft_unsupported_on_10x_plugin_only_on_11():
    signal = np.random.default_rng(0).standard_normal((1, 8, 1)).astype(np.float32)
    m = model([oh.make_node("DFT", ["x"], ["y"], name="dft", axis=1)],
              [vi("x", T.FLOAT, [1, 8, 1])], [vi("y", T.FLOAT, [1, 8, 2])], opset=17)
    got = ort_runs(m, {"x": signal})[0]
    np.testing.assert_allclose(got[0, :, 0] + 1j * got[0, :, 1], np.fft.fft(signal[0, :, 0]), atol=1e-5)
    f = findings(m)
    assert f["10.3"] == f["10.16"] == [("dft", "DFT", Rule.UNSUPPORTED_OP)]
    assert f["11"] == [("dft", "DFT", Rule.PLUGIN_ONLY)]


@pytest.mark.parametrize("op,extra", [("Unique", {}), ("Compress", {"axis": 1}), ("BitwiseAnd", {})])
def test_unsupported_ops(op, extra):
    if op == "BitwiseAnd":
        nodes = [oh.make_node(op, ["a", "a"], ["y"], name="n")]
        ins, feeds = [vi("a", T.INT32, [4])], {"a": np.array([1, 2, 3, 4], np.int32)}
    elif op == "Compress":
        nodes = [oh.make_node(op, ["x", "c"], ["y"], name="n", **extra)]
        ins, feeds = [vi("x", T.FLOAT, [2, 4]), vi("c", T.BOOL, [4])], {"x": X4, "c": np.array([1, 0, 1, 0], bool)}
    else:
        nodes = [oh.make_node(op, ["x"], ["y"], name="n", sorted=1)]
        ins, feeds = [vi("x", T.FLOAT, [4])], {"x": np.array([3, 1, 3, 2], np.float32)}
    out = {"BitwiseAnd": vi("y", T.INT32, [4]), "Compress": vi("y", T.FLOAT, [2, "n"])}.get(op, vi("y", T.FLOAT, ["n"]))
    m = model(nodes, ins, [out])
    ort_runs(m, feeds)
    for line, got in findings(m).items():
        assert got == [("n", op, Rule.UNSUPPORTED_OP)], line


def test_sequence_ops_unsupported():
    nodes = [oh.make_node("SequenceConstruct", ["x", "x"], ["s"], name="seq"),
             oh.make_node("SequenceAt", ["s", "i"], ["y"], name="at")]
    m = model(nodes, [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2, 4])], [oh.make_tensor("i", T.INT64, [], [1])])
    np.testing.assert_array_equal(ort_runs(m, {"x": X4})[0], X4)
    for got in findings(m).values():
        assert [(n, r) for n, _, r in got] == [("seq", Rule.UNSUPPORTED_OP), ("at", Rule.UNSUPPORTED_OP)]


def test_reduce_axes_must_be_an_initializer():
    """ReduceMean-18 takes axes as an input: computed at run time it is refused, an initializer is fine."""
    computed = model([oh.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=0)],
                     [vi("x", T.FLOAT, [2, 4]), vi("axes", T.INT64, [1])], [vi("y", T.FLOAT, [2])])
    np.testing.assert_allclose(ort_runs(computed, {"x": X4, "axes": np.array([1])})[0], X4.mean(1))
    for got in findings(computed).values():
        assert got == [("mean", "ReduceMean", Rule.REDUCE_AXES)]
    constant = model([oh.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=0)],
                     [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2])], [ints("axes", [1])])
    assert all(r.ready for r in check_model(ir.serde.deserialize_model(constant)))


def test_unsqueeze_axes_must_be_constant():
    m = model([oh.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")],
              [vi("x", T.FLOAT, [2, 4]), vi("axes", T.INT64, [1])], [vi("y", T.FLOAT, [2, 1, 4])], opset=17)
    assert ort_runs(m, {"x": X4, "axes": np.array([1])})[0].shape == (2, 1, 4)
    for got in findings(m).values():
        assert got == [("unsq", "Unsqueeze", Rule.SQUEEZE_AXES)]
    through_constant = model([oh.make_node("Constant", [], ["axes"], value=ints("v", [1])),
                              oh.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")],
                             [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2, 1, 4])], opset=17)
    assert all(r.ready for r in check_model(ir.serde.deserialize_model(through_constant)))


def test_layernorm_only_output_y():
    scale, bias = oh.make_tensor("s", T.FLOAT, [4], [1] * 4), oh.make_tensor("b", T.FLOAT, [4], [0] * 4)
    m = model([oh.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean"], name="ln", axis=-1)],
              [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2, 4]), vi("mean", T.FLOAT, [2, 1])], [scale, bias])
    y, mean = ort_runs(m, {"x": X4})
    np.testing.assert_allclose(mean[:, 0], X4.mean(1), rtol=1e-6)
    for got in findings(m).values():
        assert got == [("ln", "LayerNormalization", Rule.LAYERNORM_OUTPUTS)]
    only_y = model([oh.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1)],
                   [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2, 4])], [scale, bias])
    assert all(r.ready for r in check_model(ir.serde.deserialize_model(only_y)))


def test_scatternd_reduction_must_be_none():
    m = model([oh.make_node("ScatterND", ["x", "idx", "u"], ["y"], name="scatter", reduction="add")],
              [vi("x", T.FLOAT, [2, 4]), vi("u", T.FLOAT, [1, 4])], [vi("y", T.FLOAT, [2, 4])],
              [oh.make_tensor("idx", T.INT64, [1, 1], [0])])
    got = ort_runs(m, {"x": X4, "u": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_allclose(got[0], X4[0] + 1)
    for lines in findings(m).values():
        assert lines == [("scatter", "ScatterND", Rule.SCATTERND_REDUCTION)]


def test_no_double_tensors():
    m = model([oh.make_node("Cast", ["x"], ["d"], name="to_double", to=T.DOUBLE),
               oh.make_node("Cast", ["d"], ["y"], name="back", to=T.FLOAT)],
              [vi("x", T.FLOAT, [2, 4])], [vi("y", T.FLOAT, [2, 4])])
    onnx.shape_inference.infer_shapes(m)
    m = onnx.shape_inference.infer_shapes(m)  # types the DOUBLE value the way an exporter would
    np.testing.assert_array_equal(ort_runs(m, {"x": X4})[0], X4)
    for got in findings(m).values():
        assert got == [("to_double", "Cast", Rule.DOUBLE)]


def test_tensor_of_2_31_elements():
    """From the shapes given (static shape inference at batch 1): not run, 8 GiB."""
    m = model([oh.make_node("Relu", ["x"], ["y"], name="relu")],
              [vi("x", T.FLOAT, ["batch", 1 << 15])], [vi("y", T.FLOAT, ["batch", 1 << 15])])
    assert all(r.ready for r in check_model(ir.serde.deserialize_model(m), shapes={"y": (1 << 15, 1 << 15)}))
    big = {"x": (1 << 16, 1 << 15), "y": (1 << 16, 1 << 15)}
    assert (1 << 16) * (1 << 15) == MAX_ELEMENTS
    for got in findings(m, shapes=big).values():
        assert got == [("(input)", "-", Rule.TOO_LARGE), ("relu", "Relu", Rule.TOO_LARGE)]


def test_opset_ranges_per_line():
    m = model([oh.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", T.FLOAT, [2, 4])],
              [vi("y", T.FLOAT, [2, 4])], opset=21)
    np.testing.assert_array_equal(ort_runs(m, {"x": X4})[0], X4)
    f = findings(m)
    assert f["10.3"] == [("(model)", "-", Rule.OPSET)] and f["10.16"] == [] and f["11"] == []
    m.opset_import[0].version = 25
    f = findings(m)
    assert f["10.3"] == f["10.16"] == [("(model)", "-", Rule.OPSET)] and f["11"] == []


def test_type_support_per_op_and_line():
    """Pow of INT64: not in the 10.1-based table, in 10.15's."""
    m = model([oh.make_node("Pow", ["x", "e"], ["y"], name="pow")], [vi("x", T.INT64, [3])],
              [vi("y", T.INT64, [3])], [oh.make_tensor("e", T.INT64, [], [2])])
    np.testing.assert_array_equal(ort_runs(m, {"x": np.array([1, 2, 3])})[0], [1, 4, 9])
    f = findings(m)
    assert f["10.3"] == [("pow", "Pow", Rule.TYPE)] and f["10.16"] == f["11"] == []


def test_subgraphs_and_custom_domains_are_checked():
    branch = oh.make_graph([oh.make_node("Unique", ["x"], ["u"], name="inner_unique")], "then", [],
                           [vi("u", T.FLOAT, ["n"])])
    other = oh.make_graph([oh.make_node("Identity", ["x"], ["v"], name="inner_id")], "else", [],
                          [vi("v", T.FLOAT, ["n"])])
    m = model([oh.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=other),
               oh.make_node("Gelu", ["x"], ["z"], name="gelu", domain="com.microsoft")],
              [vi("c", T.BOOL, []), vi("x", T.FLOAT, [4])],
              [vi("y", T.FLOAT, ["n"]), vi("z", T.FLOAT, [4])])
    m.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    for got in findings(m).values():
        assert ("inner_unique", "Unique", Rule.UNSUPPORTED_OP) in got
        assert ("gelu", "Gelu", Rule.CUSTOM_DOMAIN) in got
        assert not any(n in ("if", "inner_id") for n, _, _ in got)


def test_finding_names_node_op_rule_line_and_table():
    m = model([oh.make_node("Unique", ["x"], ["y"], name="dedupe")], [vi("x", T.FLOAT, [4])],
              [vi("y", T.FLOAT, ["n"])])
    results = check_model(ir.serde.deserialize_model(m))
    text = results[0].findings[0].text()
    assert "'dedupe'" in text and "(Unique)" in text and Rule.UNSUPPORTED_OP.value in text
    assert "TensorRT 10.3" in text and LINES["10.3"]["table_version"] in text
    assert "NOT ready" in results[0].summary()


# ---------------------------------------------------------------- Polygraphy, default data loader

def polygraphy(*args: str) -> tuple[int, str]:
    """A Polygraphy command in this interpreter (its console entry point), with its default data loader."""
    from polygraphy.tools._main import main

    argv, out = sys.argv, io.StringIO()
    sys.argv = ["polygraphy", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                status = main()
            except SystemExit as exc:
                status = exc.code
    finally:
        sys.argv = argv
    return int(status or 0), out.getvalue()


def polygraphy_ready(path: Path) -> None:
    for command in (("check", "lint"), ("run", "--onnxrt")):
        status, log = polygraphy(*command, str(path))
        assert status == 0 and "PASSED" in log, f"polygraphy {' '.join(command)} {path.name}:\n{log[-3000:]}"


def io_symbols(path: Path) -> set[str]:
    m = ir.load(path)
    return {d.value for v in (*m.graph.inputs, *m.graph.outputs) if not v.is_initializer() and v.shape is not None
            for d in v.shape.dims if not isinstance(d, int)}


def parametric_cache_graph(split_dir: Path, analysis, out: Path) -> Path:
    """The cache graph calibration runs: every correction part in the graph, tables as inputs."""
    output = analysis.role("output")[0].name
    shape = analysis.shapes_b1.get(output)
    hw = (shape[-2], shape[-1]) if shape and len(shape) >= 4 else None
    names = [cache_name(i) for i in range(len(analysis.region.streams))]
    model = build_cache_graph(modelio.load_model(split_dir / "cache.onnx"), output, names, 4, trend=True, blend=True,
                              filter_hw=hw)
    modelio.save_model(model, out)
    return out


EVERY_LINE = dict.fromkeys(LINES)
# Mochi's BOOL Pad and integer NonZero, Flux dynamo's float64 RoPE: fixed on load (graph/tensorrt_fixes.py)


FAST_FP16 = {"dit", "latte", "sd3"}  # image, video (batch × frames cache), two-stream; the rest: OMNICACHE_SLOW=1


def precision_cases():
    for case in family_cases(FAMILIES):
        family, exporter = case.values
        yield pytest.param(family, exporter, "fp32", id=f"{case.id}-fp32", marks=case.marks)
        slow = exporter == "dynamo" or family not in FAST_FP16
        yield pytest.param(family, exporter, "fp16", id=f"{case.id}-fp16", marks=SLOW if slow else case.marks)


def source_at(path: Path, precision: str, tmp_path: Path) -> Path:
    """The export, converted as the main job converts it (`--precision`)."""
    if precision == "fp32":
        return path
    from omnicache_export.graph.precision import convert_model

    converted = tmp_path / f"model.{precision}.onnx"
    modelio.save_model(convert_model(modelio.load_user_model(path), precision), converted)
    return converted


@pytest.mark.parametrize("family,exporter,precision", list(precision_cases()))
def test_zoo_graphs_pass_polygraphy_and_readiness(family, exporter, precision, zoo_export, tmp_path):
    src = source_at(zoo_export(family, exporter), precision, tmp_path)
    result = split(src, tmp_path / "out", numeric_check=False)
    graphs = [tmp_path / "out" / "full.onnx",
              parametric_cache_graph(tmp_path / "out", result.analysis, tmp_path / "cache.param.onnx")]
    latent = next(s for s in result.analysis.io if s.role == "latent")
    for graph, path in zip(("full", "cache"), graphs):
        # one symbol for the batch, every other dim static: what the default loader can fill
        assert io_symbols(path) == ({latent.shape[0]} if isinstance(latent.shape[0], str) else set()), path.name
        polygraphy_ready(path)
        for r in check_path(path):
            assert not r.findings, r.summary()


# ---------------------------------------------------------------- the main job and the check verb

@pytest.fixture(scope="module")
def dit_job(zoo_export, tmp_path_factory):
    from omnicache_export.pipeline.job import ExportOptions, export

    out = tmp_path_factory.mktemp("trt") / "out"
    export(zoo_export("dit", "torchscript"), out, ExportOptions(steps=4, num_calib=2, progress=False))
    return out


def test_main_job_graphs_are_ready_and_recorded(dit_job):
    for name in ("full.onnx", "cache.onnx"):
        assert io_symbols(dit_job / name) == {"batch"}
        polygraphy_ready(dit_job / name)
    from omnicache_export.runtime.manifest import read_manifest

    records = read_manifest(dit_job).tensorrt_readiness
    assert {(r.graph, r.line) for r in records} == {(g, line) for g in ("source", "full", "cache") for line in LINES}
    assert all(r.ready and r.first_finding is None for r in records)
    assert {r.table_version for r in records} == {d["table_version"] for d in LINES.values()}


def test_manifest_without_readiness_still_loads(dit_job, tmp_path):
    import shutil

    from omnicache_export.runtime.manifest import read_manifest

    folder = tmp_path / "old"
    shutil.copytree(dit_job, folder)
    data = json.loads((folder / "omnicache.json").read_text())
    del data["tensorrt_readiness"]
    (folder / "omnicache.json").write_text(json.dumps(data))
    assert read_manifest(folder).tensorrt_readiness == ()


def test_check_verb_on_an_export_and_on_a_model(dit_job, tmp_path, capsys):
    from omnicache_export.cli.main import main

    assert main(["check", str(dit_job)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and all(line.endswith("ready") for line in out)
    assert out[0].startswith("full.onnx: TensorRT 10.3") and out[-1].startswith("cache.onnx: TensorRT 11")

    bad = model([oh.make_node("Relu", ["x"], ["r"], name="relu"), oh.make_node("Unique", ["r"], ["y"], name="dedupe")],
                [vi("x", T.FLOAT, [4])], [vi("y", T.FLOAT, ["n"])])
    onnx.save(bad, tmp_path / "bad.onnx")
    assert main(["check", str(tmp_path / "bad.onnx"), "--tensorrt", "10.16,11"]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "'dedupe'" in err[0] and "unsupported op" in err[0] and "TensorRT 10.16" in err[0]

    assert main(["check", str(tmp_path / "bad.onnx"), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert [r["line"] for r in report[str(tmp_path / "bad.onnx")]] == list(LINES)
    assert report[str(tmp_path / "bad.onnx")][0]["findings"][0]["rule"] == "UNSUPPORTED_OP"

    assert main(["check", str(tmp_path), "--tensorrt", "10.16"]) == 2  # a folder that is no export
    assert "not an export folder" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "bad.onnx"), "--tensorrt", "9.0"]) == 2
    assert "supported TensorRT lines" in capsys.readouterr().err


def test_main_job_warns_and_records_a_not_ready_input(caplog):
    """An op TensorRT's parser lacks (Unique), which no fix rewrites: one warning, a record per line."""
    import logging

    from omnicache_export.pipeline.job import tensorrt_readiness

    source = ir.from_proto(model([oh.make_node("Unique", ["x"], ["y"], name="dedupe")], [vi("x", T.FLOAT, [4])],
                                 [vi("y", T.FLOAT, [None])]))
    with caplog.at_level(logging.WARNING):
        records = tensorrt_readiness("source", "model.onnx", source)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "TensorRT 10.3, 10.16, 11" in warnings[0] and "unsupported op" in warnings[0]
    assert [r.ready for r in records] == [False, False, False]
    assert all("'dedupe' (Unique)" in r.first_finding for r in records)


def test_batch_major_cache_and_static_io_dims_keep_the_numbers(zoo_split):
    """Latte's cache has batch × frames rows: it crosses both graph boundaries as [batch, frames, ...]
    (BatchMajorCachePass), the output's exporter-named dims become numbers (StaticIODimsPass), and
    the cache graph fed the full graph's cache still reproduces the model output."""
    from conftest import max_rel_err, run_ort

    fam = FAMILIES["latte"]
    folder = zoo_split("latte")
    full_model, cache_model = ir.load(folder / "full.onnx"), ir.load(folder / "cache.onnx")
    frames = fam.inputs["hidden_states"].shape[1]  # [C, F, H, W]: the blocks run on batch × frames rows
    cache_out = next(v for v in full_model.graph.outputs if v.name == cache_name(0))
    cache_in = next(v for v in cache_model.graph.inputs if v.name == cache_name(0))
    assert list(cache_out.shape.dims)[:2] == list(cache_in.shape.dims)[:2] == [ir.SymbolicDim("batch"), frames]
    out = next(v for v in full_model.graph.outputs if v.name == fam.output_name)
    assert all(isinstance(d, int) for d in list(out.shape.dims)[1:])

    feeds = fam.example_inputs(2, 3)
    full = run_ort(folder / "full.onnx", feeds)
    assert full[cache_name(0)].shape[:2] == (2, frames)
    cached = run_ort(folder / "cache.onnx", {**feeds, cache_name(0): full[cache_name(0)]})[fam.output_name]
    assert max_rel_err(cached, full[fam.output_name]) <= 1e-4
