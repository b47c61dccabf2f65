"""TensorRT on a device: both engines built, checked against ONNX Runtime, sampled with and without cache.

    python tools/check_tensorrt.py [OUT] [--workdir DIR] [--batch 1,1,8] [--samples 4] [--repeats 3]

For a machine with TensorRT and a CUDA GPU; what CI cannot run. Without OUT it makes its own
export first (the trained reference DiT `dit-digits`, the README's main-job command, 25 DDIM steps,
in --workdir or a temporary folder), so it is self-contained; the whole run takes a few minutes on
one GPU (the 8-minute budget is for an export of DiT-digits' size).

1. `omnicache-export build OUT` (pipeline.tensorrt_build.build): both plans, one timing cache, the
   manifest updated;
2. each plan against ONNX Runtime on the reference inputs saved at export (OUT/reference/), with
   Polygraphy's element-wise rule and build_engines.sh's tolerances (a value fails where both its
   absolute and relative error exceed them);
3. `OmniCache.load(OUT, backend="tensorrt", device="cuda")` samples cached and uncached (the
   reference conditioning repeated over --samples rows, rows' noise from (seed, row)), interleaved,
   --repeats times each; prints the speedup ratio (median uncached / median cached wall time) and the
   PSNR of cached against uncached sampling on TensorRT (and ONNX Runtime's, from the manifest).

Exit 0 when every check passes, 1 when a comparison fails, 2 (one line) where TensorRT or a GPU is
missing or the export is unusable.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?", help="an export folder (default: export dit-digits first)")
    p.add_argument("--workdir", type=Path, help="where the self-made export goes (default: a temporary folder)")
    p.add_argument("--batch", default="1,1,8", help="sample batches MIN,OPT,MAX of the profiles (default: 1,1,8)")
    p.add_argument("--samples", type=int, default=4, help="rows sampled (default: 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs each, cached and uncached (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_export(workdir: Path) -> Path:
    """The README's commands: the trained reference DiT, exported, through the main job."""
    from omnicache_export.cli.main import main

    model, out = workdir / "dit.onnx", workdir / "dit-omnicache"
    for argv in (["example", "dit-digits", "-o", str(model), "--force", "-q"],
                 [str(model), "-o", str(out), "--calib", str(workdir / "dit.inputs.npz"), "--scheduler",
                  str(workdir / "dit.scheduler.json"), "--guidance-scale", "2", "--steps", "25", "--force", "-q"]):
        if main(argv) != 0:
            raise SystemExit(2)
    return out


def compare(name: str, got: dict, expected: dict, atol: float, rtol: float) -> bool:
    """Polygraphy's element-wise rule on every output both hold; prints one line per output."""
    ok = True
    for key in sorted(set(got) & set(expected)):
        a, b = _f64(got[key]), _f64(expected[key])
        absdiff = np.abs(a - b)
        reldiff = absdiff / np.maximum(np.abs(b), 1e-30)
        bad = (absdiff > atol) & (reldiff > rtol) | np.isnan(absdiff)
        ok &= not bad.any()
        print(f"{name} {key}: max |diff| {absdiff.max():.3g}, max rel {reldiff.max():.3g}, "
              f"{int(bad.sum())} of {bad.size} values outside atol {atol:g} / rtol {rtol:g}: "
              f"{'PASSED' if not bad.any() else 'FAILED'}")
    return ok


def _f64(x) -> np.ndarray:
    """float64 of a numpy array or a torch tensor (bfloat16 references are saved as torch tensors)."""
    return x.double().numpy() if hasattr(x, "double") else np.asarray(x, np.float64)


def conditioning(manifest, feeds: dict) -> tuple[dict, dict]:
    """cond / uncond of one sample from the full graph's reference feeds (under guidance the model
    batch holds the cond rows, then the uncond rows)."""
    from omnicache_export.runtime.conditioning import batched_inputs

    io = list(manifest.model_io.inputs)
    batched = batched_inputs(io)
    sources = {t.source: t.name for t in manifest.graphs["full"].inputs}
    cond, uncond = {}, {}
    for spec in io:
        if spec.role != "conditioning" or spec.name not in sources:
            continue
        value = np.asarray(feeds[sources[spec.name]])
        if spec.name not in batched:
            cond[spec.name] = value
            continue
        half = len(value) // 2 if manifest.sampling.cfg else len(value)
        cond[spec.name] = value[:1]
        if manifest.sampling.cfg:
            uncond[spec.name] = value[half:half + 1]
    return cond, uncond


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    from omnicache_export.errors import UserError
    from omnicache_export.pipeline.tensorrt_build import require_tensorrt

    try:
        require_tensorrt()
    except UserError as exc:
        print(f"check_tensorrt: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        out = a.out or make_export(a.workdir or Path(scratch))
        try:
            return check(out, a, t_start)
        except UserError as exc:
            print(f"check_tensorrt: {exc}", file=sys.stderr)
            return 2


def check(out: Path, a, t_start: float) -> int:
    from omnicache_export.calibration.calibrate import psnr
    from omnicache_export.cli.build import parse_batches
    from omnicache_export.engines import load_engine
    from omnicache_export.engines.base import infer_numpy
    from omnicache_export.pipeline import build_script, reference_io
    from omnicache_export.pipeline.tensorrt_build import BuildSettings, build
    from omnicache_export.runtime.conditioning import batched_inputs
    from omnicache_export.runtime.manifest import GRAPHS, read_manifest
    from omnicache_export.runtime.omnicache import OmniCache

    t0 = time.perf_counter()
    entry = build(out, BuildSettings(batches=parse_batches(a.batch)))
    print(f"built {entry.full}, {entry.cache} ({entry.key}) in {time.perf_counter() - t0:.1f} s")
    manifest = read_manifest(out)
    atol, rtol = build_script.TOLERANCES[build_script.graphs_precision(manifest)]
    ok = True
    for graph in GRAPHS:
        feeds = reference_io.load_inputs(out, graph)
        expected = reference_io.load_outputs(out, graph)
        with load_engine("tensorrt", out / getattr(entry, graph), "cuda") as engine:
            got = infer_numpy(engine, feeds)
        ok &= compare(f"{graph} plan vs ONNX Runtime", got, expected, atol, rtol)

    cond1, uncond1 = conditioning(manifest, reference_io.load_inputs(out, "full"))
    batched = batched_inputs(list(manifest.model_io.inputs))
    rep = lambda d: {k: (np.repeat(v, a.samples, axis=0) if k in batched else v) for k, v in d.items()}  # noqa: E731
    cond, uncond = rep(cond1), rep(uncond1)
    rt = OmniCache.load(out, backend="tensorrt", device="cuda")
    try:
        kw = {"batched": batched, "rows": range(a.samples)}
        cached = rt.sample(cond, uncond, a.seed, **kw)  # warm-up of both engines
        reference = rt.sample(cond, uncond, a.seed, no_cache=True, **kw)
        times = {False: [], True: []}
        for r in range(a.repeats):  # interleaved, order alternating: drift hits both
            for no_cache in ((False, True) if r % 2 == 0 else (True, False)):
                t = time.perf_counter()
                rt.sample(cond, uncond, a.seed, no_cache=no_cache, **kw)
                times[no_cache].append(time.perf_counter() - t)
    finally:
        rt.close()
    t_cached, t_full = float(np.median(times[False])), float(np.median(times[True]))
    quality = float(psnr(cached, reference).mean())
    s = manifest.schedule
    print(f"sampling on TensorRT ({a.samples} rows, {len(s.full)} steps, {s.n_cached} cached): uncached "
          f"{t_full * 1e3:.1f} ms, cached {t_cached * 1e3:.1f} ms, speedup {t_full / t_cached:.2f}x")
    ort = manifest.verification.runtime_psnr_db_vs_no_cache
    print(f"PSNR cached vs uncached on TensorRT: {quality:.2f} dB"
          + (f" (ONNX Runtime at export: {ort:.2f} dB)" if ort is not None else ""))
    print(f"{'PASSED' if ok else 'FAILED'} in {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
