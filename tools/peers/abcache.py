"""AB-Cache-style: the cached residual extrapolated Adams–Bashforth-like from the last two full
steps, R̂_i = R_j + a_i (R_j − R_j'), a_i = (t_i − t_j)/(t_j − t_j'); the same evenly spread schedule
as the uniform peer, the same ONNX graphs as OmniCache."""

from __future__ import annotations

from ._onnx import OnnxCase, run_schedule
from ._torch import PeerRun
from .fora import schedule

NAME = "AB-Cache (residual extrapolation)"


def run(case: OnnxCase) -> PeerRun:
    s = schedule(case.spec.n_steps, case.target_full)
    r = run_schedule(case, s.full, extrapolate=True)
    r.setting = s.pattern
    return r
