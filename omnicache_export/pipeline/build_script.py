"""`OUT/build_engines.sh`: the exact `trtexec` commands that build both TensorRT plans on the
target, then a check of each plan against the outputs ONNX Runtime computed at export.

Everything comes from the manifest: the optimization profiles (`runtime.deploy.tensorrt_profiles`,
every dynamic input of both graphs, the cache graph's extra inputs included), the graphs'
precision (the networks are strongly typed: precision lives in the graph, no precision flag is
set, which is what TensorRT 10.x and 11.x alike accept), and the reference IO files
(`pipeline.reference_io`). The plans it writes are for `trtexec`/Triton; `omnicache-export build
OUT` builds the same plans and records them in the manifest for `OmniCache.load(backend="tensorrt")`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from omnicache_export import __version__
from omnicache_export.pipeline import reference_io
from omnicache_export.runtime.deploy import tensorrt_profiles
from omnicache_export.runtime.manifest import GRAPHS, Manifest, Precision

FILENAME = "build_engines.sh"
PLAN_DIR = "tensorrt"  # the script's plans and timing cache (not artifacts: the script writes them on the target)
DEFAULT_BATCHES = (1, 1, 8)  # sample batches min, opt, max
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level
# Polygraphy's element-wise check (a value fails when both its absolute and its relative error exceed
# these), by the graphs' precision. fp32 layers run as TF32 in TensorRT's default config (10 mantissa
# bits, like fp16's), hence 5e-3 rather than fp32's 1e-5; fp16 and bf16: a few units in their last place.
TOLERANCES: dict[Precision, tuple[float, float]] = {  # precision -> (atol, rtol)
    Precision.FP32: (5e-3, 5e-3),
    Precision.FP16: (2e-2, 2e-2),
    Precision.BF16: (1e-1, 5e-2),
}


def dynamic_profiles(manifest: Manifest, batches=DEFAULT_BATCHES, dims: Mapping[str, int] | None = None):
    """graph -> input -> (min, opt, max) shapes, for the inputs with a dynamic dim only (the shapes
    TensorRT needs; a static input's shape is the graph's). Raises ValueError naming a symbolic dim
    the manifest cannot resolve (give it in `dims`)."""
    profiles = tensorrt_profiles(manifest, *batches, dims=dims)
    dynamic = {g: {t.name for t in manifest.graphs[g].inputs if any(isinstance(d, str) for d in t.shape)}
               for g in GRAPHS}
    return {g: {name: r for name, r in profiles[g].items() if name in dynamic[g]} for g in GRAPHS}


def open_dims(manifest: Manifest, feeds: Mapping[str, Mapping[str, object]]) -> dict[str, int]:
    """Sizes of the symbolic dims the manifest cannot resolve (a text length ...), read off `feeds`
    (graph -> input -> array: the reference inputs, the sizes calibration ran)."""
    from omnicache_export.runtime.deploy import _symbol_table

    known = _symbol_table(manifest)
    dims: dict[str, int] = {}
    for graph in GRAPHS:
        for t in manifest.graphs[graph].inputs:
            feed = feeds.get(graph, {}).get(t.name)
            if feed is None:
                continue
            for axis, d in enumerate(t.shape):
                if isinstance(d, str) and d not in known and axis < len(feed.shape):
                    dims.setdefault(d, int(feed.shape[axis]))
    return dims


def graphs_precision(manifest: Manifest) -> Precision:
    """The precision the graphs hold: that of the export's ONNX Runtime entry."""
    entries = [e for e in manifest.engines if e.backend == "onnxruntime"]
    return entries[0].precision if entries else Precision.FP32


def _tensor_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_./-]+", name) else f"'{name}'"  # trtexec's quoting


def shapes_flag(flag: str, ranges: Mapping[str, tuple], pick: int) -> str:
    """`--minShapes=a:2x4x8x8,b:2x7` (pick 0, 1, 2: min, opt, max)."""
    return f"--{flag}=" + ",".join(f"{_tensor_name(n)}:{'x'.join(map(str, r[pick]))}" for n, r in ranges.items())


def trtexec_args(graph: str, ranges: Mapping[str, tuple], plan: str, timing_cache: str, opt_level: int,
                 workspace_mib: int | None = None, refittable: bool = False) -> list[str]:
    args = [f"--onnx={graph}.onnx", f"--saveEngine={plan}", "--stronglyTyped"]
    if ranges:
        args += [shapes_flag(f, ranges, i) for i, f in enumerate(("minShapes", "optShapes", "maxShapes"))]
    args += [f"--timingCacheFile={timing_cache}", f"--builderOptimizationLevel={opt_level}"]
    if workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{workspace_mib}M")
    if refittable:
        args.append("--refit")
    return args


def polygraphy_args(graph: str, plan: str, precision: Precision) -> list[str]:
    inputs, outputs = reference_io.paths(graph)
    atol, rtol = TOLERANCES.get(precision, TOLERANCES[Precision.FP16])
    return ["run", plan, "--model-type", "engine", "--trt", "--load-inputs", inputs, "--load-outputs", outputs,
            "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]


def script(manifest: Manifest, batches=DEFAULT_BATCHES, dims: Mapping[str, int] | None = None,
           opt_level: int = DEFAULT_OPT_LEVEL) -> str:
    """The text of build_engines.sh for this export (raises ValueError for an unresolvable dim)."""
    profiles = dynamic_profiles(manifest, batches, dims)
    precision = graphs_precision(manifest)
    s = manifest.sampling
    rows = f"{s.static_batch} model rows, fixed by the export" if s.static_batch is not None else \
        ", ".join(map(str, batches)) + " samples" + (" (model batches twice that: guidance runs cond and uncond "
                                                     "rows together)" if s.cfg else "")
    given = ", ".join(f"{k}={v}" for k, v in sorted((dims or {}).items()))
    lines = [
        "#!/usr/bin/env bash",
        f"# TensorRT engines of this export, written by omnicache-export {__version__}. Run it on the target:",
        "# a GPU, TensorRT's trtexec and Polygraphy (pip install polygraphy). It builds both plans (strongly",
        f"# typed: the graphs hold their precision, {precision.value}; no precision flag is set), sharing one timing",
        "# cache, then runs each plan on the reference inputs saved at export and compares it with ONNX Runtime's",
        "# outputs (reference/).",
        "#",
        f"# Optimization profiles from omnicache.json: batch min, opt, max = {rows}.",
        *([f"# Symbolic dims fixed to the sizes calibration ran: {given}."] if given else []),
        "# Other batches or sizes: `omnicache-export build OUT --batch MIN,OPT,MAX [--dims NAME=SIZE]` builds the",
        "# same plans and records them in omnicache.json (OmniCache.load(..., backend=\"tensorrt\") runs them); or",
        "# edit a copy of this script (axis 0 is the model batch): omnicache.json hashes this one, and the runtime",
        "# refuses an export whose files changed. OPT_LEVEL, TRTEXEC, POLYGRAPHY: from the environment.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'POLYGRAPHY="${POLYGRAPHY:-polygraphy}"',
        f'OPT_LEVEL="${{OPT_LEVEL:-{opt_level}}}"',
        'command -v "$TRTEXEC" >/dev/null || { echo "trtexec not found: install TensorRT or set TRTEXEC" >&2; exit 2; }',
        f"mkdir -p {PLAN_DIR}",
    ]
    cache = f"{PLAN_DIR}/timing.cache"
    for graph in GRAPHS:
        args = trtexec_args(graph, profiles[graph], f"{PLAN_DIR}/{graph}.plan", cache, 0)
        args = [a if not a.startswith("--builderOptimizationLevel=") else "--builderOptimizationLevel=$OPT_LEVEL"
                for a in args]
        lines.append('"$TRTEXEC" ' + " \\\n  ".join(_quote(a) for a in args))
    lines.append(f"# the check: a value fails where both |a - b| > atol and |a - b| > rtol * |b| ({precision.value} graphs)")
    for graph in GRAPHS:
        lines.append('"$POLYGRAPHY" ' + " ".join(shlex.quote(a) for a in polygraphy_args(
            graph, f"{PLAN_DIR}/{graph}.plan", precision)))
    lines.append(f'echo "built and checked {PLAN_DIR}/full.plan and {PLAN_DIR}/cache.plan"')
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    """shlex quoting, except the one variable the script substitutes."""
    return f'"{arg}"' if "$OPT_LEVEL" in arg else shlex.quote(arg)
