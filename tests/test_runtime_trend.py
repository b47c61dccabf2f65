"""The cache-trend predictor end to end: graphs with the trend and correction embedded, run by the
runtime, reproduce calibration's numpy sampling with the same schedule and correction."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from omnicache_export.graph import modelio
from omnicache_export.graph.analysis import analyze
from omnicache_export.calibration.calibrate import Correction, extrapolation_ratios, run_cached
from omnicache_export.passes.cache_names import cache_name, prev_cache_name
from omnicache_export.pipeline.job import UNCORRECTED, ExportOptions, _embed, _Engines, sampling_spec
from omnicache_export.runtime.omnicache import OmniCache
from omnicache_export.runtime.sampler import timesteps_of
from omnicache_export.graph.split import write_graphs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_runtime_with_cache_trend_matches_calibration(zoo_export, tmp_path, mix):
    path = zoo_export("dit", "torchscript")
    source = modelio.load_model(path)
    analysis = analyze(source, None, None, None, None, {})
    spec = sampling_spec(analysis, ExportOptions(steps=8))
    write_graphs(path, source, analysis, tmp_path, cache_name=UNCORRECTED)
    n_caches = len(analysis.region.streams)
    cond, uncond = {"class_labels": np.array([1, 3, 5], np.int64)}, {}
    full = np.array([c == "F" for c in "FFCFCCFC"])
    corr = Correction.mixed(mix, 8, 1.1)
    ratios = extrapolation_ratios(full, timesteps_of(spec))
    coefficients, blends, trends = corr.coefficients(ratios), corr.blends(ratios), corr.trends(ratios)
    engines = _Engines(tmp_path, spec, n_caches)
    try:
        expected = run_cached(spec, engines.full_fn, engines.cache_fn, cond, uncond, 3, 0, full, coefficients, None,
                              blends=blends, trends=trends).final
        plain = run_cached(spec, engines.full_fn, engines.cache_fn, cond, uncond, 3, 0, full,
                           np.zeros(8, np.float32), None).final
    finally:
        engines.close()
    _embed(tmp_path, spec.output, coefficients, None, blends, trends, n_caches)
    inputs = {v.name for v in ir.load(tmp_path / "cache.onnx").graph.inputs}
    assert prev_cache_name(cache_name(0)) in inputs
    names = [cache_name(i) for i in range(n_caches)]
    rt = OmniCache(tmp_path, spec, full, names, {"full": "full.onnx", "cache": "cache.onnx"})
    try:
        got = rt.sample(cond, uncond, 3, 0)
    finally:
        rt.close()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale <= 1e-4
    assert np.abs(plain - expected).max() / scale > 1e-3  # the trend and correction really act
