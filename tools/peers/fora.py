"""FORA-style reuse: the block stack's residual of the last full step reused as is, the cached steps
spread evenly (`schedule.alternating_schedule`, runs as long as the count demands), no correction;
through the same ONNX graphs as OmniCache."""

from __future__ import annotations

from omnicache_export.calibration.schedule import alternating_schedule

from ._onnx import OnnxCase, run_schedule
from ._torch import PeerRun

NAME = "uniform reuse (FORA-style)"


def schedule(n_steps: int, n_full: int):
    return alternating_schedule(n_steps, n_steps - n_full, max_consecutive=n_steps)


def run(case: OnnxCase) -> PeerRun:
    s = schedule(case.spec.n_steps, case.target_full)
    r = run_schedule(case, s.full, extrapolate=False)
    r.setting = s.pattern
    return r
