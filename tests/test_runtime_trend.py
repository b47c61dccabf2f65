"""The cache-trend predictor end to end: the exported cache graph (tables frozen) run by the runtime
reproduces calibration's sampling through the parametric graph (tables fed) with the same schedule
and correction."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from omnicache_export.calibration.calibrate import CalibrationSet
from omnicache_export.calibration.correction import Correction, CorrectionTables
from omnicache_export.graph import modelio
from omnicache_export.graph.analysis import analyze
from omnicache_export.graph.split import write_graphs
from omnicache_export.passes.cache_names import cache_name, prev_cache_name
from omnicache_export.pipeline.job import (
    UNCORRECTED,
    ExportOptions,
    _write_cache_graph,
    calibration_graphs,
    sampling_spec,
)
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.runtime.sampler import timesteps_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_runtime_with_cache_trend_matches_calibration(zoo_export, tmp_path, mix):
    path = zoo_export("dit", "torchscript")
    source = modelio.load_model(path)
    analysis = analyze(source, None, None, None, None, {})
    spec = sampling_spec(analysis, ExportOptions(steps=8))
    write_graphs(path, source, analysis, tmp_path, cache_name=UNCORRECTED)
    names = [cache_name(i) for i in range(len(analysis.region.streams))]
    cond = {"class_labels": np.array([1, 3, 5], np.int64)}
    data = CalibrationSet(spec, cond, {}, 0, {"class_labels"}, 3)
    full = np.array([c == "F" for c in "FFCFCCFC"])
    t = timesteps_of(spec)
    tables = CorrectionTables.build(Correction.mixed(mix, 8, 1.1), full, t, None)
    graphs = calibration_graphs(tmp_path, analysis.io, spec, names, None)
    try:
        expected = data.sample(graphs.plain, full, tables).final
        plain = data.sample(graphs.plain, full, CorrectionTables.build(Correction.none(8), full, t, None)).final
    finally:
        graphs.close()
    full_io, cache_io = _write_cache_graph(tmp_path, analysis, spec, names, tables, None, full)
    inputs = {v.name for v in ir.load(tmp_path / "cache.onnx").graph.inputs}
    assert prev_cache_name(cache_name(0)) in inputs and "omnicache_coefficients" not in inputs
    rt = OmniCache.from_files(tmp_path / "full.onnx", tmp_path / "cache.onnx", full_io, cache_io, spec, full)
    try:
        got = rt.sample(cond, {}, 0, batched={"class_labels"})
    finally:
        rt.close()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale <= 1e-5
    assert np.abs(plain - expected).max() / scale > 1e-3  # the trend and correction really act
