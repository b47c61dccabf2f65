"""The ONNX Runtime engine: IO description, IO-bound runs equal to a plain session, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_ort
from omnicache_export.engines.onnxruntime import OnnxRuntimeEngine, available_devices
from omnicache_export.zoo.families import FAMILIES


def test_engine_matches_plain_session(zoo_export):
    fam = FAMILIES["dit"]
    src = zoo_export("dit", "torchscript")
    feeds = fam.example_inputs(2, 0)
    with OnnxRuntimeEngine(src) as engine:
        assert [s.name for s in engine.inputs] == fam.input_names
        assert engine.outputs[0].name == fam.output_name
        engine.check_feeds(feeds)
        out = engine.run(feeds)
        again = engine.run(feeds)  # a second run through fresh bindings
    ref = run_ort(src, feeds)[fam.output_name]
    np.testing.assert_array_equal(out[fam.output_name], ref)
    np.testing.assert_array_equal(again[fam.output_name], ref)


def test_engine_feed_errors(zoo_export):
    fam = FAMILIES["dit"]
    feeds = fam.example_inputs(1, 0)
    with OnnxRuntimeEngine(zoo_export("dit", "torchscript")) as engine:
        with pytest.raises(ValueError, match="missing input 'timestep'"):
            engine.check_feeds({k: v for k, v in feeds.items() if k != "timestep"})
        bad = dict(feeds, hidden_states=feeds["hidden_states"].astype(np.float64))
        with pytest.raises(ValueError, match="dtype float64"):
            engine.check_feeds(bad)
        bad = dict(feeds, hidden_states=feeds["hidden_states"][..., :3])
        with pytest.raises(ValueError, match="shape"):
            engine.check_feeds(bad)


def test_engine_devices():
    assert "cpu" in available_devices()
    if "cuda" not in available_devices():
        with pytest.raises(ValueError, match="no CUDAExecutionProvider"):
            OnnxRuntimeEngine("unused.onnx", device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        OnnxRuntimeEngine("unused.onnx", device="tpu")
