"""The correction graph on real splits: the parametric graph fed tables computes what the frozen graph
computes; zero tables keep the cache graph's numbers; otherwise the output is
õ + λ (prev − õ) + coef * F(prev − prev2) as numpy.fft computes it; only TensorRT-friendly ops are
added; the passes refuse the wrong order."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import max_rel_err, run_ort
from omnicache_export.calibration.filters import butterworth_mask
from omnicache_export.graph.embed import build_cache_graph, freeze_cache_graph
from omnicache_export.passes.cache_names import (
    BLEND, COEFFICIENTS, FULL_PREV, FULL_PREV2, MASKS, STEP, TREND, prev_cache_name, uncorrected_name,
)
from omnicache_export.passes.embed_correction import EmbedCorrectionPass
from omnicache_export.passes.extrapolate_cache import ExtrapolateCachePass
from omnicache_export.passes.freeze_tables import FreezeTablesPass
from omnicache_export.zoo.families import FAMILIES

ALLOWED = {"MatMul", "Mul", "Add", "Sub", "Gather", "Cast", "Reshape", "Shape", "Concat", "Constant"}
FILTERED = ["dit", "latte"]  # [B, C, h, w] and video [B, C, F, h, w]: the filter runs over (h, w)
ALL = FILTERED + ["flux"]  # packed [B, L, C]: no spatial axes, so no filter
UNCORRECTED = uncorrected_name("out_sample")


def correction_reference(out_tilde, full_prev, full_prev2, coef: float, mask: np.ndarray | None, blend: float = 0.0):
    """numpy oracle: õ + blend (prev − õ) + coef * Re(ifft2(mask * fft2(prev − prev2))) over the last two axes.

    mask None means no filter. Computed in float64, returned in out_tilde's dtype.
    """
    d = np.asarray(full_prev, np.float64) - np.asarray(full_prev2, np.float64)
    if mask is not None:
        d = np.real(np.fft.ifft2(np.asarray(mask, np.float64) * np.fft.fft2(d, axes=(-2, -1)), axes=(-2, -1)))
    out_tilde = np.asarray(out_tilde)
    base = out_tilde.astype(np.float64)
    base = base + float(blend) * (np.asarray(full_prev, np.float64) - base)
    return (base + float(coef) * d).astype(out_tilde.dtype)


@pytest.fixture(scope="module")
def split_case(zoo_step):
    """split_case(family) -> (cache.onnx, feeds with this step's caches and an older step's as
    `<cache>_prev`, the full graph's output, the cache names)."""

    def get(family: str):
        folder, feeds, full = zoo_step(family)
        _, older, _ = zoo_step(family, seed=7)
        names = [v.name for v in ir.load(folder / "cache.onnx").graph.inputs if v.name.startswith("omnicache_cache")]
        feeds = {**feeds, **{prev_cache_name(k): older[k] for k in names}}
        return folder / "cache.onnx", feeds, full[FAMILIES[family].output_name], names

    return get


def tables_of(coefficients, masks=None, blend=None, trend=None) -> dict[str, np.ndarray]:
    """Table inputs by name, as calibration feeds them (float32, masks scaled by 1/(h w))."""
    out = {COEFFICIENTS: np.asarray(coefficients, np.float32)}
    if blend is not None:
        out[BLEND] = np.asarray(blend, np.float32)
    if trend is not None:
        out[TREND] = np.asarray(trend, np.float32)
    if masks is not None:
        h, w = masks.shape[1:]
        out[MASKS] = (np.asarray(masks) / (h * w)).astype(np.float32)
    return out


def save(model: ir.Model, path):
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def graphs(src, tmp_path, tables, names=(), expose=False, output="out_sample"):
    """(parametric, frozen) cache graphs with the parts the tables name, as the pipeline builds them."""
    filter_hw = tables[MASKS].shape[1:] if MASKS in tables else None
    model = build_cache_graph(ir.load(src), output, list(names), len(tables[COEFFICIENTS]), trend=TREND in tables,
                              blend=BLEND in tables, filter_hw=filter_hw, expose_uncorrected=expose)
    parametric = save(model, tmp_path / "parametric.onnx")
    return parametric, save(freeze_cache_graph(model, tables), tmp_path / "frozen.onnx")


def history(shape, rng, dtype=np.float32):
    return {FULL_PREV: rng.standard_normal(shape).astype(dtype), FULL_PREV2: rng.standard_normal(shape).astype(dtype)}


def at(step: int, hist: dict | None = None) -> dict:
    """The step index fed: one per row of the last full output in `hist` (a [1] step where none, or
    where the output has no batch axis: a rank-2 [h, w] output)."""
    rows = len(hist[FULL_PREV]) if hist and hist[FULL_PREV].ndim > 2 else 1
    return {STEP: np.full(rows, step, np.int64)}


def step_masks(n, h, w):
    """A different kind per step: all, low, high, low (order 1), all, high, ..."""
    kinds = [("all", 1.0, 2), ("low", 0.5, 2), ("high", 0.25, 2), ("low", 0.3, 1), ("all", 1.0, 2), ("high", 0.5, 3)]
    return np.stack([butterworth_mask(h, w, rho, order, kind) for kind, rho, order in (kinds * n)[:n]])


def random_tables(family, n, h, w, rng):
    """Random trend, blend, coefficients and (for spatial outputs) masks: every part of the graph."""
    masks = step_masks(n, h, w) if family in FILTERED else None
    return tables_of(rng.uniform(-1.5, 1.5, n), masks, rng.uniform(0, 1, n), rng.uniform(-1, 1, n))


@pytest.mark.parametrize("family", ALL)
def test_parametric_graph_fed_tables_equals_the_frozen_graph(family, split_case, tmp_path):
    cache, feeds, full_out, names = split_case(family)
    rng = np.random.default_rng(0)
    tables = random_tables(family, 4, *full_out.shape[-2:], rng)
    parametric, frozen = graphs(cache, tmp_path, tables, names)
    assert {v.name for v in ir.load(parametric).graph.inputs} >= set(tables)
    hist = history(full_out.shape, rng)
    for step in range(4):
        fed = run_ort(parametric, {**feeds, **hist, **tables, **at(step, hist)})["out_sample"]
        out = run_ort(frozen, {**feeds, **hist, **at(step, hist)})["out_sample"]
        assert max_rel_err(out, fed) <= 1e-6, step
        assert max_rel_err(out, run_ort(cache, feeds)["out_sample"]) > 1e-3  # the correction really is applied


@pytest.mark.parametrize("family", ALL)
def test_zero_tables_keep_the_cache_output(family, split_case, tmp_path):
    """coef = λ = ρ = 0: fed (masks arbitrary) or frozen, the output is the uncorrected graph's, bit for bit."""
    cache, feeds, full_out, names = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    h, w = full_out.shape[-2:]
    masks = step_masks(5, h, w) if family in FILTERED else None
    tables = tables_of(np.zeros(5), masks, np.zeros(5), np.zeros(5))
    parametric, frozen = graphs(cache, tmp_path, tables, names)
    hist = history(full_out.shape, np.random.default_rng(0))
    for step in (0, 2, 4):
        for path in (parametric, frozen):
            out = run_ort(path, {**feeds, **hist, **tables, **at(step, hist)})["out_sample"]
            assert np.array_equal(out, uncorrected)  # õ + 0
        assert max_rel_err(out, full_out) <= 1e-4


@pytest.mark.parametrize("family", ALL)
def test_exposed_uncorrected_output_is_the_cache_graph_output(family, split_case, tmp_path):
    """`<output>_uncorrected` is õ: the uncorrected graph's output (fed R̂ where ρ != 0); the output is
    the oracle's correction of it."""
    cache, feeds, full_out, names = split_case(family)
    plain = run_ort(cache, feeds)["out_sample"]
    rng = np.random.default_rng(1)
    tables = random_tables(family, 3, *full_out.shape[-2:], rng)
    tables[TREND][1] = 0.0
    parametric, _ = graphs(cache, tmp_path, tables, names, expose=True)
    assert [v.name for v in ir.load(parametric).graph.outputs] == ["out_sample", UNCORRECTED]
    hist = history(full_out.shape, rng)
    for step in (1, 2):
        run = run_ort(parametric, {**feeds, **hist, **tables, **at(step, hist)})
        rho = tables[TREND][step]
        if rho == 0:
            assert np.array_equal(run[UNCORRECTED], plain)
        else:
            hat = {k: feeds[k] + rho * (feeds[k] - feeds[prev_cache_name(k)]) for k in names}
            assert max_rel_err(run[UNCORRECTED], run_ort(cache, {**feeds, **hat})["out_sample"]) <= 1e-5
        mask = None if MASKS not in tables else tables[MASKS][step] * np.prod(tables[MASKS].shape[1:])
        ref = correction_reference(run[UNCORRECTED], hist[FULL_PREV], hist[FULL_PREV2], tables[COEFFICIENTS][step],
                                   mask, tables[BLEND][step])
        assert max_rel_err(run["out_sample"], ref) <= 1e-5, step


@pytest.mark.parametrize("family", FILTERED)
def test_filtered_correction_matches_numpy_fft(family, split_case, tmp_path):
    cache, feeds, full_out, _ = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    h, w = full_out.shape[-2:]
    rng = np.random.default_rng(1)
    coefficients = rng.uniform(-1.5, 1.5, 6)
    coefficients[0] = 0.0  # a full step
    masks = step_masks(6, h, w)
    _, frozen = graphs(cache, tmp_path, tables_of(coefficients, masks))
    hist = history(full_out.shape, rng)
    for step in range(6):
        out = run_ort(frozen, {**feeds, **hist, **at(step, hist)})["out_sample"]
        ref = correction_reference(uncorrected, hist[FULL_PREV], hist[FULL_PREV2], coefficients[step], masks[step])
        if coefficients[step] == 0:
            assert np.array_equal(out, uncorrected)
        else:
            assert max_rel_err(out - uncorrected, ref - uncorrected) <= 1e-4, step
            assert np.abs(out - uncorrected).max() > 1e-3  # the correction really is applied


def test_reference_is_the_fft_filter():
    """correction_reference against a direct 2-D DFT sum, one [h, w] slice."""
    rng = np.random.default_rng(2)
    d = rng.standard_normal((5, 6))
    mask = butterworth_mask(5, 6, 0.4, 2, "low")
    k, m = np.arange(5), np.arange(6)
    fh, fw = np.exp(-2j * np.pi * np.outer(k, k) / 5), np.exp(-2j * np.pi * np.outer(m, m) / 6)
    direct = np.real(fh.conj() @ (mask * (fh @ d @ fw)) @ fw.conj()) / 30
    ref = correction_reference(np.zeros_like(d), d, np.zeros_like(d), 1.0, mask)
    np.testing.assert_allclose(ref, direct, atol=1e-12)


@pytest.mark.parametrize("family", ALL)
def test_unfiltered_correction_is_plain_extrapolation(family, split_case, tmp_path):
    cache, feeds, full_out, _ = split_case(family)
    uncorrected = run_ort(cache, feeds)["out_sample"]
    coefficients = np.array([0.0, 0.0, 1.0, -0.5, 2.25], np.float32)
    _, frozen = graphs(cache, tmp_path, tables_of(coefficients))
    added = [n.op_type for n in ir.load(frozen).graph if n.name.startswith("omnicache/correction")]
    # Sub, Gather, Mul, Add, and the per-row factor's Shape/Concat/Reshape (its shapes as Constants)
    assert set(added) - {"Shape", "Concat", "Reshape", "Constant"} == {"Add", "Gather", "Mul", "Sub"}
    assert added.count("Mul") == 1 and added.count("Gather") == 1
    hist = history(full_out.shape, np.random.default_rng(3))
    for step in (1, 3, 4):
        out = run_ort(frozen, {**feeds, **hist, **at(step, hist)})["out_sample"]
        expected = uncorrected + coefficients[step] * (hist[FULL_PREV] - hist[FULL_PREV2])
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("family", ALL)
def test_graph_layout(family, split_case, tmp_path):
    cache, _, full_out, _ = split_case(family)
    h, w = full_out.shape[-2:]
    masks = step_masks(4, h, w) if family in FILTERED else None
    before = ir.load(cache)
    tables = tables_of(np.array([0.0, 0.0, 1.0, 1.0]), masks, blend=np.array([0.0, 0.5, 0.0, 1.0]))
    parametric, frozen = graphs(cache, tmp_path, tables)

    inputs = {v.name: v for v in ir.load(parametric).graph.inputs}
    for name, table in tables.items():  # table inputs: [N, ...], float32 (the output's dtype here)
        assert inputs[name].dtype == ir.DataType.FLOAT and tuple(inputs[name].shape) == table.shape

    model = ir.load(frozen)
    added = [n for n in model.graph if n.name.startswith("omnicache/correction")]
    assert {n.op_type for n in model.graph}.isdisjoint({"DFT", "STFT"})
    assert {n.op_type for n in added} <= ALLOWED
    assert len(model.graph) == len(before.graph) + len(added)
    assert [n.op_type for n in added].count("MatMul") == (4 if masks is not None else 0)
    # The runtime's graph: the uncorrected graph's inputs, then the step and the last two full outputs.
    assert [v.name for v in model.graph.inputs] == [v.name for v in before.graph.inputs] + [STEP, FULL_PREV, FULL_PREV2]
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs[STEP].dtype == ir.DataType.INT64 and [isinstance(d, int) for d in inputs[STEP].shape] == [False]  # [B]
    out = model.graph.outputs[0]
    assert [v.name for v in model.graph.outputs] == ["out_sample"] and out.shape == before.graph.outputs[0].shape
    for name in (FULL_PREV, FULL_PREV2):
        assert inputs[name].dtype == out.dtype and inputs[name].shape == out.shape
    inits = model.graph.initializers
    assert inits[COEFFICIENTS].shape == ir.Shape([4]) and inits[BLEND].shape == ir.Shape([4])
    if masks is not None:  # h == w: one Hartley matrix serves both sides
        assert [k for k in inits if k.startswith("omnicache_hartley")] == [f"omnicache_hartley_{h}"]
        assert inits[MASKS].shape == ir.Shape([4, h, w])
        np.testing.assert_allclose(inits[MASKS].const_value.numpy(), masks / (h * w), rtol=1e-6)


def test_build_and_freeze_leave_their_input_alone(split_case):
    cache, _, full_out, names = split_case("dit")
    model = ir.load(cache)
    before = ir.serde.serialize_model(model).SerializeToString()
    tables = random_tables("dit", 3, *full_out.shape[-2:], np.random.default_rng(0))
    parametric = build_cache_graph(model, "out_sample", names, 3, trend=True, blend=True,
                                   filter_hw=full_out.shape[-2:], expose_uncorrected=True)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    params = ir.serde.serialize_model(parametric).SerializeToString()
    freeze_cache_graph(parametric, tables)
    assert ir.serde.serialize_model(parametric).SerializeToString() == params


def test_embed_requires_rejects_bad_arguments(split_case):
    cache, _, _, _ = split_case("dit")
    model = ir.load(cache)
    model.graph.outputs[0].shape = ir.Shape(["batch", 8, 8, 8])  # the exporter left the batch symbolic
    fails = ir.passes.PreconditionError
    with pytest.raises(fails, match="does not match the output's last two dims"):
        EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=(8, 6))(model)
    with pytest.raises(fails, match="two positive sizes"):
        EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=(8, 0))(model)
    with pytest.raises(fails, match="N >= 1"):
        EmbedCorrectionPass("out_sample", 0, blend=False, filter_hw=None)(model)
    with pytest.raises(fails, match="no output named"):
        EmbedCorrectionPass("nope", 3, blend=False, filter_hw=None)(model)
    EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=None)(model)
    with pytest.raises(fails, match="already has tensors named"):  # applied twice
        EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=None)(model)


def test_freeze_requires_valid_tables_for_every_table_input(split_case):
    cache, _, _, _ = split_case("dit")
    model = ir.load(cache)
    EmbedCorrectionPass("out_sample", 3, blend=True, filter_hw=(8, 8))(model)
    good = tables_of(np.zeros(3), np.stack([butterworth_mask(8, 8)] * 3), blend=np.zeros(3))
    fails = ir.passes.PreconditionError
    cases = [
        ({**good, "omnicache_gamma": np.zeros(3)}, "no table names"),
        ({**good, TREND: np.zeros(3)}, r"no table inputs \['omnicache_cache_trend'\]"),
        ({k: v for k, v in good.items() if k != BLEND}, r"no values given for the table inputs \['omnicache_blend'\]"),
        ({**good, COEFFICIENTS: np.zeros(4)}, r"has shape \[4\], the graph declares \[3\]"),
        ({**good, MASKS: good[MASKS][:, :, :6]}, r"has shape \[3, 8, 6\], the graph declares \[3, 8, 8\]"),
        ({**good, BLEND: np.array([0.0, np.nan, 0.0])}, "not finite"),
        ({**good, BLEND: np.array([0.0, 1e39, 0.0])}, "beyond the range of its dtype FLOAT"),
        ({**good, COEFFICIENTS: np.zeros(3, complex)}, "real numbers"),
        ({**good, MASKS: np.arange(192.0).reshape(3, 8, 8)}, "mask of step 0: .*even along each axis"),
    ]
    for tables, message in cases:
        with pytest.raises(fails, match=message):
            FreezeTablesPass(tables)(model)
    FreezeTablesPass(good)(model)
    assert not any(v.name in good for v in model.graph.inputs)


def test_wrong_order_fails_with_what_is_missing(split_case):
    """trend -> correction -> freeze is the one order; any other is refused before the graph changes."""
    cache, _, _, names = split_case("dit")
    fails = ir.passes.PreconditionError
    with pytest.raises(fails, match="no table inputs: FreezeTablesPass runs last"):
        FreezeTablesPass(tables_of(np.zeros(3)))(ir.load(cache))

    model = ir.load(cache)
    EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=None)(model)
    with pytest.raises(fails, match="ExtrapolateCachePass must run before EmbedCorrectionPass"):
        ExtrapolateCachePass(names, 3)(model)

    model = ir.load(cache)
    ExtrapolateCachePass(names, 3)(model)
    with pytest.raises(fails, match="tables gathered by one step need one length"):
        EmbedCorrectionPass("out_sample", 4, blend=False, filter_hw=None)(model)
    FreezeTablesPass({TREND: np.zeros(3)})(model)
    with pytest.raises(fails, match="frozen already: FreezeTablesPass runs after EmbedCorrectionPass"):
        EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=None)(model)

    reverse = ir.passes.Sequential(EmbedCorrectionPass("out_sample", 3, blend=False, filter_hw=None),
                                   ExtrapolateCachePass(names, 3))
    with pytest.raises(ir.passes.PassError, match="ExtrapolateCachePass") as info:
        reverse(ir.load(cache))
    assert isinstance(info.value.__cause__, fails) and "must run before" in str(info.value.__cause__)


def tiny_model(path, dtype, shape):
    """y = Relu(x): a stand-in for a cache graph with a given output dtype and (static) shape."""
    elem = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}[dtype]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", elem, shape)], [helper.make_tensor_value_info("y", elem, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "dtype,shape",
    [(np.float16, [2, 3, 6, 10]), (np.float32, [6, 10]), (np.float32, [2, 2, 3, 10, 6])],
    ids=["fp16-nchw", "fp32-rank2", "fp32-video"],
)
def test_dtypes_ranks_and_rectangular_masks(dtype, shape, tmp_path):
    h, w = shape[-2:]
    src = tiny_model(tmp_path / "tiny.onnx", dtype, shape)
    coefficients = np.array([0.0, 0.8, -1.2])
    masks = np.stack([butterworth_mask(h, w, 0.4, 2, k) for k in ("all", "low", "high")])
    tables = tables_of(coefficients, masks)
    parametric, frozen = graphs(src, tmp_path, tables, output="y")
    for name in tables:  # 16-bit outputs: the tables are float32, as the correction is computed
        assert next(v for v in ir.load(parametric).graph.inputs if v.name == name).dtype == ir.DataType.FLOAT
    model = ir.load(frozen)
    assert {k for k in model.graph.initializers if k.startswith("omnicache_hartley")} == {
        f"omnicache_hartley_{h}", f"omnicache_hartley_{w}"}
    assert all(v.dtype == ir.DataType.FLOAT for k, v in model.graph.initializers.items() )
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    hist = history(shape, rng, dtype)
    for step in range(3):
        out = run_ort(frozen, {"x": x, **hist, **at(step, hist)})["y"]
        assert out.dtype == dtype and list(out.shape) == shape
        ref = correction_reference(np.maximum(x, 0), hist[FULL_PREV], hist[FULL_PREV2], coefficients[step], masks[step])
        tol = 2e-3 if dtype == np.float16 else 1e-5  # fp16: the final Add rounds to half precision
        assert max_rel_err(out.astype(np.float64), ref.astype(np.float64)) <= tol, step
        fed = run_ort(parametric, {"x": x, **hist, **tables, **at(step, hist)})["y"]
        assert max_rel_err(out.astype(np.float64), fed.astype(np.float64)) <= 1e-6, step


def test_blend_moves_the_base_to_the_last_full_output(split_case, tmp_path):
    """λ = 1: the output extrapolates the last full output (õ unused); λ = 0: the cache output is corrected."""
    cache, feeds, full_out, _ = split_case("dit")
    uncorrected = run_ort(cache, feeds)["out_sample"]
    _, frozen = graphs(cache, tmp_path, tables_of([0.0, 0.5, 1.0], blend=[0.0, 1.0, 0.0]))
    hist = history(full_out.shape, np.random.default_rng(5))
    d = hist[FULL_PREV] - hist[FULL_PREV2]
    out1 = run_ort(frozen, {**feeds, **hist, **at(1, hist)})["out_sample"]
    np.testing.assert_allclose(out1, hist[FULL_PREV] + 0.5 * d, rtol=0, atol=1e-5)
    out2 = run_ort(frozen, {**feeds, **hist, **at(2)})["out_sample"]
    np.testing.assert_allclose(out2, uncorrected + d, rtol=0, atol=1e-5)
