"""The main job's memory: what an export needs, the calibration batch that fits, and a refusal
before any work where even one sample cannot.

Calibration samples its K conditions many times (the reference run, then every candidate). Each
pass goes through the model in batches (`CalibrationSet.batch_size`); what stays in memory for the
whole calibration is per sample only a few latents (the reference's and the best candidate's final
latents, the one being scored) and its curvature, so memory no longer grows with the model's
activations times K. The model's activations per sample are not known before running it: they are
estimated from the graphs' per-sample input, output and cache bytes times ACTIVATION_FACTOR (and
never below LIVE_TENSORS times the largest per-sample intermediate shape inference found, which
catches attention score matrices that the IO sizes miss).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import numpy as np

from omnicache_export.calibration.calibrate import RECORD_BUDGET_BYTES
from omnicache_export.errors import UserError
from omnicache_export.io_spec import NUMPY_DTYPES
from omnicache_export.runtime.conditioning import batched_inputs
from omnicache_export.runtime.sampler import SamplingSpec

logger = logging.getLogger(__name__)

# A sample's activations inside the model ≈ this × its IO bytes (latent, timestep, conditioning,
# output and cache tensors). Measured on the zoo's tiny DiT: 2000 samples in one batch took
# 0.23 MB each, 48× its 4.9 KB of IO (ORT's arena, the block's Q/K/V and MLP tensors, and
# calibration's own per-sample buffers included); 64 leaves a margin.
ACTIVATION_FACTOR = 64
# ... and at least this × the largest per-sample intermediate tensor (the scores, the softmax and
# the tensors around them are alive together).
LIVE_TENSORS = 4
# ONNX Runtime sessions alive at once during calibration: the full graph and the two cache graphs
# (plain and filtering), each holding at most the model's weights.
WEIGHT_COPIES = 3
# Final latents kept per calibration sample: the reference's, the best candidate's, the one being
# scored (its batches and their concatenation) and the two temporaries of its PSNR.
FINAL_COPIES = 6
# The trajectory of a sample while its batch runs: the step list, its stack and the host copy.
TRAJECTORY_COPIES = 3
# Share of the available memory an export plans to use (the rest: the interpreter, libraries, slack).
USABLE_SHARE = 0.8
# Rows per calibration generation at most: beyond this a CPU gains no throughput, and an
# underestimated activation size costs less.
MAX_CALIB_BATCH = 64


def available_memory() -> int:
    """Bytes this process can still allocate: the kernel's MemAvailable (free pages plus reclaimable
    cache; `os.sysconf('SC_AVPHYS_PAGES')` counts free pages only and is the fallback), capped by a
    cgroup v2 memory limit where one applies."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # no way to tell: no limit
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return int(math.prod(shape))


def _per_sample(b1, b2) -> int | None:
    """Elements per sample of a value: what doubling the batch adds (else its size at batch 1)."""
    one, two = _numel(b1), _numel(b2)
    if one is not None and two is not None and two >= one:
        return two - one
    return one


def _itemsize(dtype: str) -> int:
    return np.dtype(NUMPY_DTYPES.get(dtype, np.float32)).itemsize


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MB"


@dataclasses.dataclass
class MemoryPlan:
    """What calibration holds, in bytes: `fixed` (the weights' sessions), `kept` per calibration
    sample for the whole run, `per_sample` per row of a running batch; the batch chosen and the
    reference run's record budget."""

    available: int
    fixed: int
    kept: int
    per_sample: int
    n_samples: int
    batch_size: int
    record_budget: int

    @property
    def needed(self) -> int:
        return self.fixed + self.n_samples * self.kept + self.batch_size * self.per_sample

    def summary(self) -> str:
        return (f"{self.n_samples} calibration samples in batches of {self.batch_size}: about {gb(self.needed)} of "
                f"{gb(self.available)} available (weights {gb(self.fixed)}, kept {gb(self.n_samples * self.kept)}, "
                f"{gb(self.per_sample)} a sample in a batch)")


def io_bytes_per_sample(analysis, spec: SamplingSpec) -> tuple[int, int]:
    """(the graphs' IO bytes per sample: batched inputs, the output, the cache tensors; the largest
    per-sample intermediate in bytes, 0 where shape inference found none)."""
    b1, b2 = analysis.shapes_b1, analysis.shapes_b2
    batched = batched_inputs(analysis.io)
    io = 0
    for s in analysis.io:
        if s.role != "output" and s.name not in batched:
            continue
        dims = b1.get(s.name) or analysis.shapes_at.get(s.name) or (1, *spec.latent_shape)
        io += (_per_sample(dims, b2.get(s.name)) or 0) * _itemsize(s.dtype)
    for stream in analysis.region.streams:
        n = _per_sample(b1.get(stream.exit), b2.get(stream.exit))
        io += (n if n is not None else int(math.prod(spec.latent_shape))) * _itemsize(stream.dtype or "FLOAT")
    io = max(io, 3 * 4 * int(math.prod(spec.latent_shape)))  # at least latent, output and cache
    largest = max((_per_sample(shape, b2[name]) or 0 for name, shape in b1.items() if name in b2), default=0) * 4
    return io, largest


def plan_calibration(analysis, spec: SamplingSpec, n_samples: int, weight_bytes: int,
                     available: int | None = None) -> MemoryPlan:
    """The calibration batch that fits in memory, or UserError (one line, before any work) where
    the weights, the K samples' kept latents and one batch cannot fit."""
    available = available_memory() if available is None else available
    io, largest = io_bytes_per_sample(analysis, spec)
    copies = 2 if spec.cfg else 1  # cond and uncond in one model batch
    latent = 4 * int(math.prod(spec.latent_shape))  # float32 on the host
    n = spec.n_steps
    per_sample = copies * max(ACTIVATION_FACTOR * io, LIVE_TENSORS * largest) + TRAJECTORY_COPIES * (n + 1) * latent
    kept = FINAL_COPIES * latent + 8 * (n + 1)  # final latents, curvature per point (float64)
    fixed = WEIGHT_COPIES * weight_bytes
    usable = int(USABLE_SHARE * available)
    rows = spec.chunk or 1  # the smallest batch sampling can run
    room = usable - fixed - n_samples * kept
    if room < rows * per_sample:
        need = fixed + n_samples * kept + rows * per_sample
        raise UserError(
            f"the export does not fit in memory: it needs about {gb(need)} (the model's weights ×{WEIGHT_COPIES} "
            f"{gb(fixed)}, {n_samples} calibration samples' latents {gb(n_samples * kept)}, one batch's activations "
            f"{gb(rows * per_sample)}) of {gb(available)} available: lower --num-calib or free memory")
    batch = spec.chunk or max(1, min(n_samples, MAX_CALIB_BATCH, room // per_sample))
    record_budget = max(0, min(RECORD_BUDGET_BYTES, room - batch * per_sample))
    plan = MemoryPlan(available, fixed, kept, per_sample, n_samples, batch, record_budget)
    logger.info("memory: %s", plan.summary())
    return plan
