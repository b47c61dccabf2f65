"""Speed benchmark: OmniCache on a DiT-S/2-sized model, ONNX Runtime CPU.

    python tools/bench_speed.py [--steps 50] [--cache-ratio 0.55] [--repeats 5] [--threads N]
                                [--out docs/benchmarks.md] [--workdir DIR] [--reuse] [--no-profile]
                                [--compare LABEL=bench_speed.json ...]

1. builds a random-weight DiT-S/2-sized diffusers DiT (12 blocks, hidden 384 = 6 heads x 64,
   32x32x4 latent, patch 2, 1000 classes, learned sigma) and exports it with TorchScript (opset 17,
   dynamic batch; inputs hidden_states, timestep, class_labels);
2. runs the main job (`omnicache_export.pipeline.export`) with DDIM, K=2 calibration samples;
3. loads the export with `OmniCache.load` and times whole sampling loops (`OmniCache.run`: 1 sample,
   batch 1) with cache and with `no_cache=True`, interleaved (ABAB...) in one process after a
   warm-up, and reports medians and their ratio;
4. times the two graphs directly on the same step feeds (those `StepDispatch` builds at the first
   cached step; interleaved) for the cost ratio c, and compares the measured speedup with the ideal
   1 / (1 - f + f c) (f = cached share of the schedule);
5. splits the per-step time inside the loops into engine time (each runner's `infer` timed, through
   a `StepDispatch` over timing wrappers of the loaded engines) and host time, and, unless
   --no-profile, times each host piece of a step (scheduler step, feeds, guidance, IO binding) and
   profiles one cached loop;
6. prints a table and, with --out, writes the section "Speed: DiT-S/2-sized, ONNX Runtime CPU" of the
   given markdown file (other sections are kept); --compare puts other runs' results (the
   bench_speed.json each run leaves in its workdir, e.g. of an earlier version) next to this one.

Every step runs through the runtime's own dispatch (`OmniCache` -> `Generation` -> `StepDispatch`),
the one calibration and the CLI use too. Every number written is measured in this run (or, for
--compare, in the run whose json it is).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import io
import itertools
import json
import os
import platform
import pstats
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omnicache_export.engines.base import Engine, Runner

SECTION = "Speed: DiT-S/2-sized, ONNX Runtime CPU"
INPUT_NAMES = ["hidden_states", "timestep", "class_labels"]
OUTPUT_NAME = "out_sample"
DIT_S2 = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TARGET_EFFICIENCY = 0.97
TARGET_SPEEDUP = 2.0
K_CALIB = 2


# ------------------------------------------------------------------ model


def build_and_export(path: Path, seed: int = 0) -> Path:
    """The DiT-S/2-sized model, wrapped like the zoo's `dit` family (a subclass whose forward takes
    (hidden_states, timestep, class_labels) positionally and returns the sample), TorchScript-exported."""
    import onnx
    import torch
    from diffusers import DiTTransformer2DModel

    from omnicache_export.zoo.families import positional
    from omnicache_export.zoo.patches import export_friendly_tensor_ops

    torch.manual_seed(seed)
    model = positional(DiTTransformer2DModel, INPUT_NAMES)(**DIT_S2).eval()
    rng = np.random.default_rng(seed)
    args = (
        torch.from_numpy(rng.standard_normal((2, 4, 32, 32), dtype=np.float32)),
        torch.from_numpy(rng.uniform(0, 1000, (2,)).astype(np.float32)),
        torch.from_numpy(rng.integers(0, 1000, (2,), dtype=np.int64)),
    )
    buf = io.BytesIO()
    with torch.no_grad(), export_friendly_tensor_ops():
        torch.onnx.export(
            model, args, buf, input_names=INPUT_NAMES, output_names=[OUTPUT_NAME],
            dynamic_axes={n: {0: "batch"} for n in [*INPUT_NAMES, OUTPUT_NAME]},
            opset_version=17, dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, 10)  # what ONNX Runtime >= 1.16 reads
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path


def check_blocks(path: Path) -> dict:
    from omnicache_export.graph import modelio
    from omnicache_export.graph.analysis import analyze

    region = analyze(modelio.load_model(path)).to_json()["block_region"]
    if region["n_blocks"] != DIT_S2["num_layers"]:
        raise SystemExit(f"inspect found {region['n_blocks']} blocks in {path}, expected {DIT_S2['num_layers']}")
    return region


# ------------------------------------------------------------------ timing helpers


def median_ms(times: list[float]) -> float:
    return float(np.median(times)) * 1e3


def interleaved(fns: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each fn `warmup` times, then ABAB...: `repeats` rounds, one call of each fn per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


class TimedEngine(Engine):
    """An engine whose runners record the wall time of each `infer` call in `times` (about 1 µs a
    call). It wraps an engine of a loaded runtime, which stays that runtime's to close."""

    def __init__(self, engine: Engine):
        self.engine, self.times = engine, []
        self.backend, self.device = engine.backend, engine.device

    @property
    def inputs(self):
        return self.engine.inputs

    @property
    def outputs(self):
        return self.engine.outputs

    def runner(self) -> TimedRunner:
        return TimedRunner(self, self.engine.runner())


class TimedRunner(Runner):
    engine: TimedEngine

    def __init__(self, engine: TimedEngine, runner: Runner):
        super().__init__(engine)
        self.runner = runner

    def output_shapes(self, input_shapes):
        return self.runner.output_shapes(input_shapes)

    def infer(self, feeds, outputs=None, names=None):
        t0 = time.perf_counter()
        out = self.runner.infer(feeds, outputs, names)
        self.engine.times.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.runner.close()


def load_runtime(out_dir: Path, threads: int | None):
    """`OmniCache.load` with ONNX Runtime's loader settings: `threads` intra-op threads (None: ORT's
    default); spinning stays off, the loader's default."""
    from omnicache_export.runtime.omnicache import OmniCache

    return OmniCache.load(out_dir, "onnxruntime", "cpu", threads=threads)


def timed_runtime(rt):
    """The same runtime (its engines, IO, schedule and manifest) with every engine call timed: a
    `StepDispatch` over `TimedEngine`s of the loaded engines."""
    from omnicache_export.runtime.dispatch import StepDispatch
    from omnicache_export.runtime.omnicache import OmniCache

    d = rt.dispatch
    dispatch = StepDispatch(TimedEngine(d.full), TimedEngine(d.cache), d.full_io, d.cache_io)
    return OmniCache(dispatch, rt.spec, rt.full_steps, rt.manifest)


def sample_loop(rt, cond, no_cache=False, seed=1):
    """One whole sampling loop of one sample (batch 1): `OmniCache.run`, i.e. `sample_rows` ->
    `Generation` -> `StepDispatch`, final latents back on the host."""
    return rt.run(cond, {}, seed, no_cache=no_cache)


def timed_loops(trt, cond, variants: dict[str, bool], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Whole sampling loops (1 sample, batch 1) of the timed runtime `trt`, variants interleaved
    ABAB... after `warmup` rounds. variants: name -> no_cache. Per loop: wall time and each full /
    cache graph call's time (so host time = loop - engine calls), in ms."""
    full, cache = trt.dispatch.full, trt.dispatch.cache
    n = len(trt.full_steps)
    out = {k: {"loop": [], "full": [], "cache": [],
               "full_steps": [True] * n if no_cache else [bool(s) for s in trt.full_steps]}
           for k, no_cache in variants.items()}
    for r in range(warmup + repeats):
        for name, no_cache in variants.items():
            full.times, cache.times = [], []
            t0 = time.perf_counter()
            sample_loop(trt, cond, no_cache=no_cache)
            dt = time.perf_counter() - t0
            if r < warmup:
                continue
            rec = out[name]
            rec["loop"].append(dt * 1e3)
            rec["full"].append([t * 1e3 for t in full.times])
            rec["cache"].append([t * 1e3 for t in cache.times])
    return out


def loop_summary(rec: dict) -> dict[str, float]:
    """Medians: loop; engine calls pooled over the loops; host time per step per loop."""
    schedule = np.asarray(rec["full_steps"], bool)
    full_steps = np.flatnonzero(schedule)
    n = len(schedule)
    after_cached = np.array([i > 0 and not schedule[i - 1] for i in full_steps], bool)
    fulls = np.array(rec["full"])  # [loops, n_full]
    caches = np.array(rec["cache"]) if rec["cache"] and rec["cache"][0] else np.zeros((len(rec["loop"]), 0))
    host = [(lp - f.sum() - c.sum()) / n for lp, f, c in zip(rec["loop"], fulls, caches)]
    med = lambda a: float(np.median(a)) if np.size(a) else float("nan")  # noqa: E731
    return {
        "loop_ms": med(rec["loop"]),
        "engines_ms": med(fulls.sum(1) + caches.sum(1)),
        "full_step_ms": med(fulls),
        "full_after_full_ms": med(fulls[:, ~after_cached]),
        "full_after_cached_ms": med(fulls[:, after_cached]),
        "cache_step_ms": med(caches),
        "host_per_step_ms": med(host),
        "n_full": int(fulls.shape[1]), "n_cache": int(caches.shape[1]),
    }


class StepFeeds:
    """A generation stepped up to its first cached step, and both graphs' feeds there as the
    dispatch builds them (`StepDispatch.full_feeds` / `cache_feeds`), with output buffers of their
    own, so timing the graphs on them leaves the generation's cache state as it was."""

    def __init__(self, rt, cond, seed: int = 0):
        d = rt.dispatch
        self.gen = gen = rt.generation(cond, {}, [0], seed)
        first_cached = int(np.flatnonzero(~rt.full_steps)[0])
        while gen.i < first_cached:
            gen.step()
        self.i = i = gen.i
        self.model_feeds = gen.den.feeds(i, gen.x, gen.static)
        self.full_feeds = d.full_feeds(self.model_feeds)
        self.cache_feeds = d.cache_feeds(i, self.model_feeds, gen.state, gen.tables, gen.steps)
        self.full_out = {k: torch.empty_like(v) for k, v in gen.state.targets().items()}
        self.cache_out = {d.output: torch.empty_like(gen.state.prev)}

    def close(self) -> None:
        self.gen.close()


def time_graphs(rt, sf: StepFeeds, reps: int) -> dict[str, list[float]]:
    """Both graphs on the same step's feeds, interleaved, each through a runner of its own (the call
    `StepDispatch.run_full` makes, without advancing a cache state, and `run_cached`)."""
    d = rt.dispatch
    full_runner, cache_runner = d.runners()
    try:
        return interleaved({"full": lambda: full_runner.infer(sf.full_feeds, outputs=sf.full_out),
                            "cache": lambda: d.run_cached(cache_runner, sf.cache_feeds, sf.cache_out)},
                           reps, warmup=3)
    finally:
        full_runner.close()
        cache_runner.close()


# ------------------------------------------------------------------ host-overhead breakdown


def host_overhead(rt, sf: StepFeeds, reps: int = 200) -> dict[str, float]:
    """Median microseconds of each non-engine piece of one runtime step, on the step's real tensors
    (batch 1), with the graph calls for scale."""
    d, gen, i = rt.dispatch, sf.gen, sf.i
    den, x, state, spec = gen.den, gen.x, gen.state, rt.spec
    raw = state.prev
    pred = den.guided(raw)
    out = sf.cache_out
    # the same cache feeds with another latent tensor: in the loop the latent is a new tensor at
    # every step, so the runner rebinds; alternating the two makes it rebind at every call here too
    other = dict(sf.model_feeds)
    other[spec.latent] = sf.model_feeds[spec.latent].clone()
    feeds_b = d.cache_feeds(i, other, state, gen.tables, gen.steps)
    flip = itertools.cycle([sf.cache_feeds, feeds_b])
    # ONNX Runtime's own binding of the same tensors, by pointer (CPU), as the runner binds them
    session = d.cache.session
    binding = session.io_binding()

    def bind():
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for s in d.cache.inputs:
            t = sf.cache_feeds[s.name]
            binding.bind_input(s.name, "cpu", 0, _np_dtype(t), tuple(t.shape), t.data_ptr())
        for s in d.cache.outputs:
            if s.name in out:
                t = out[s.name]
                binding.bind_output(s.name, "cpu", 0, _np_dtype(t), tuple(t.shape), t.data_ptr())
            else:
                binding.bind_output(s.name, "cpu")

    bind()
    full_runner, cache_runner = d.runners()

    def timed(fn, n=reps) -> float:
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e6

    try:
        return {
            "scheduler.step (diffusers DDIM, torch): `Denoiser.step`": timed(lambda: den.step(i, pred, x)),
            "scale_model_input (torch): `Denoiser.model_input`": timed(lambda: den.model_input(i, x)),
            "model feeds (dict, latent, timestep): `Denoiser.feeds`": timed(lambda: den.feeds(i, x, gen.static)),
            "guidance / learned-sigma slice: `Denoiser.guided`": timed(lambda: den.guided(raw)),
            "full graph's feed dict: `StepDispatch.full_feeds`": timed(lambda: d.full_feeds(sf.model_feeds)),
            "cache graph's feed dict: `StepDispatch.cache_feeds`":
                timed(lambda: d.cache_feeds(i, sf.model_feeds, state, gen.tables, gen.steps)),
            "IO binding rebuilt alone (clear, bind every input and output by pointer), cache graph": timed(bind),
            "cache graph: `session.run_with_iobinding` alone": timed(lambda: session.run_with_iobinding(binding)),
            "cache graph: `StepDispatch.run_cached`, same tensors as the call before (binding kept)":
                timed(lambda: d.run_cached(cache_runner, sf.cache_feeds, out)),
            "cache graph: `StepDispatch.run_cached`, a new latent tensor each call (rebinds, as in the loop)":
                timed(lambda: d.run_cached(cache_runner, next(flip), out)),
            "full graph: runner `infer` (the call `StepDispatch.run_full` makes)":
                timed(lambda: full_runner.infer(sf.full_feeds, outputs=sf.full_out), n=min(reps, 20)),
        }
    finally:
        full_runner.close()
        cache_runner.close()


def _np_dtype(t: torch.Tensor) -> np.dtype:
    return torch.empty(0, dtype=t.dtype).numpy().dtype


def profile_cached_loop(rt, cond, top: int = 14) -> tuple[str, list[tuple[str, float, float]]]:
    """cProfile one cached sampling loop; (text, [(function, tottime ms, cumtime ms)]) by tottime."""
    prof = cProfile.Profile()
    prof.enable()
    sample_loop(rt, cond)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append((f"{Path(file).name}:{line}({func})", tt * 1e3, ct * 1e3))
    return out.getvalue(), rows


# ------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cache-ratio", type=float, default=0.55)
    p.add_argument("--repeats", type=int, default=5, help="interleaved sampling-loop pairs (after a warm-up)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write/update the section in")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model and the export here")
    p.add_argument("--filters", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate the stage-aware filter candidates too (slower)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the model and the export already in --workdir (to iterate on the timing only)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: re-render --out from the bench_speed.json an earlier run left in its workdir")
    p.add_argument("--no-profile", action="store_true", help="skip the overhead breakdown and the profile")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=JSON",
                   help="show the results of another run (the bench_speed.json it left in its workdir, e.g. of "
                        "an earlier version of the runtime) next to this one's; repeatable")
    p.add_argument("--compare-note", default=None, metavar="TEXT",
                   help="a sentence rendered with the --compare table (where the compared runs came from)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/bench_speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    compare = load_compare(args.compare)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        if compare:
            res["compare"] = compare
            res["compare_note"] = args.compare_note
        print(render(res, console=True))
        if args.out:
            update_markdown(args.out, render(res), section_title(res["threads"]))
        return 0
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_speed_")))
        work.mkdir(parents=True, exist_ok=True)
        return run(args, work, command, compare)


def load_compare(specs: list[str]) -> list[dict]:
    """--compare LABEL=PATH: the figures of that run's bench_speed.json (this tool's, of any version)."""
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--compare {spec!r}: expected LABEL=PATH")
        r = json.loads(Path(path).read_text())
        lc, ln = r["in_loop"]["cached"], r["in_loop"]["no_cache"]
        runs.append({
            "label": label, "command": r["command"], "date": r["date"], "machine": r["machine"],
            "t_no_cache_ms": r["t_no_cache_ms"], "t_cached_ms": r["t_cached_ms"], "measured": r["measured"],
            "full_graph_ms": r["full_graph_ms"], "cache_graph_ms": r["cache_graph_ms"], "c": r["c"],
            "ideal": r["ideal"], "efficiency": r["efficiency"], "pattern": r["pattern"],
            "host_no_cache_ms": ln["host_per_step_ms"], "host_cached_ms": lc["host_per_step_ms"],
            "full_call_no_cache_ms": ln["full_step_ms"], "cache_call_ms": lc["cache_step_ms"],
            "load": r.get("load"),
        })
    return runs


def run(args, work: Path, command: str, compare: list[dict]) -> int:
    import onnxruntime as ort

    from omnicache_export.pipeline.job import ExportOptions, export

    model_path = work / "dit_s2.onnx"
    calib = work / "calib.npz"
    out_dir = work / "omnicache"
    labels = np.random.default_rng(0).integers(0, 1000, (K_CALIB,), dtype=np.int64)
    reuse = args.reuse and (out_dir / "omnicache.json").exists()
    if args.reuse and not reuse:
        print(f"--reuse: no export in {work}; building it", flush=True)
    if not reuse:
        t0 = time.perf_counter()
        build_and_export(model_path)
        region = check_blocks(model_path)
        print(f"model: {model_path} ({model_path.stat().st_size / 2**20:.1f} MiB), {region['n_blocks']} blocks "
              f"({region['method']}), block FLOP share {region['flop_share']}, built in {time.perf_counter() - t0:.1f} s",
              flush=True)
        np.savez(calib, class_labels=labels)
        opts = ExportOptions(scheduler="ddim", steps=args.steps, calib=calib, num_calib=K_CALIB,
                             cache_ratio=args.cache_ratio, progress=False, force=True, filters=args.filters)
        t0 = time.perf_counter()
        export(model_path, out_dir, opts)
        t_export = time.perf_counter() - t0
        (work / "bench_export.json").write_text(json.dumps(
            {"steps": args.steps, "cache_ratio": args.cache_ratio, "filters": args.filters, "export_s": t_export}))
        print(f"export (analysis, split, calibration K={K_CALIB}, correction, verification): {t_export:.1f} s", flush=True)
    else:
        meta = json.loads((work / "bench_export.json").read_text())
        args.steps, args.cache_ratio, args.filters, t_export = meta["steps"], meta["cache_ratio"], meta["filters"], None
        print(f"reusing {out_dir}: {meta}", flush=True)

    rt = load_runtime(out_dir, args.threads)
    trt = timed_runtime(rt)
    m = rt.manifest
    cond = {"class_labels": labels[:1]}
    n, n_cached = len(rt.full_steps), int((~rt.full_steps).sum())
    f = n_cached / n
    pattern = m.schedule.pattern
    load_before = os.getloadavg()

    # 3. whole loops, interleaved (engine time inside each loop recorded too)
    main_loops = timed_loops(trt, cond, {"cached": False, "no_cache": True}, args.repeats)
    lc, ln = loop_summary(main_loops["cached"]), loop_summary(main_loops["no_cache"])
    measured = ln["loop_ms"] / lc["loop_ms"]
    per_round = [a / b for a, b in zip(main_loops["no_cache"]["loop"], main_loops["cached"]["loop"])]

    # 4. the two graphs on the same step feeds, interleaved
    sf = StepFeeds(rt, cond)
    try:
        graph_reps = max(20, 4 * args.repeats)
        graphs = time_graphs(rt, sf, graph_reps)
        g_full, g_cache = median_ms(graphs["full"]), median_ms(graphs["cache"])
        c = g_cache / g_full
        ideal = 1 / (1 - f + f * c)
        efficiency = measured / ideal
        load_after = os.getloadavg()

        res = {
            "steps": n, "n_cached": n_cached, "f": f, "pattern": pattern, "cache_ratio_asked": args.cache_ratio,
            "t_cached_ms": lc["loop_ms"], "t_no_cache_ms": ln["loop_ms"], "measured": measured,
            "loops_cached_ms": main_loops["cached"]["loop"], "loops_no_cache_ms": main_loops["no_cache"]["loop"],
            "in_loop": {"cached": lc, "no_cache": ln}, "per_round_speedup": per_round,
            "engine_only_speedup": ln["engines_ms"] / lc["engines_ms"],
            "in_loop_c": lc["cache_step_ms"] / ln["full_step_ms"],
            "with_host_model": _with_host(n, n_cached, g_full, g_cache, lc["host_per_step_ms"], ln["host_per_step_ms"]),
            "full_graph_ms": g_full, "cache_graph_ms": g_cache, "c": c, "ideal": ideal, "efficiency": efficiency,
            "flop_share": m.model_io.block_region.flop_share, "graph_reps": graph_reps, "graph_step": sf.i,
            "psnr": m.calibration.quality.psnr_db_mean, "correction": m.correction.name,
            "schedule_name": m.schedule.name, "export_s": t_export, "filters": args.filters,
            "threads": args.threads, "repeats": args.repeats,
            "runtime_psnr_vs_no_cache": m.verification.runtime_psnr_db_vs_no_cache,
            "manifest_speed": m.speed.to_json(),
            "load": {"before": list(load_before), "after": list(load_after)},
        }
        print(f"loops: cached {lc['loop_ms']:.0f} ms, no cache {ln['loop_ms']:.0f} ms, speedup {measured:.3f}x; "
              f"c = {c:.4f}, ideal {ideal:.3f}x, efficiency {efficiency:.3f}", flush=True)

        # 5. where the host time goes
        if not args.no_profile:
            res["overhead_us"] = host_overhead(rt, sf, reps=200)
    finally:
        sf.close()
    if not args.no_profile:
        text, rows = profile_cached_loop(rt, cond)
        res["profile"] = rows
        res["profile_text"] = text
    rt.close()

    res["machine"] = {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_model(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
        "torch": _version("torch"), "diffusers": _version("diffusers"),
    }
    res["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["command"] = command
    if compare:
        res["compare"] = compare
        res["compare_note"] = args.compare_note
    print(render(res, console=True))
    if "profile_text" in res:
        print(res["profile_text"])
    (work / "bench_speed.json").write_text(json.dumps({k: v for k, v in res.items() if k not in ("profile_text", "compare", "compare_note")},
                                                      indent=1))
    if args.out:
        title = section_title(args.threads)
        update_markdown(args.out, render(res), title)
        print(f"wrote section {title!r} of {args.out}")
    return 0


def _with_host(n: int, n_cached: int, tf: float, tc: float, host_cached: float, host_full: float) -> float:
    """Speedup predicted from the graph times measured directly plus the host time per step measured
    inside the loops: n (tf + host_full) / ((n - n_cached) tf + n_cached tc + n host_cached)."""
    return n * (tf + host_full) / ((n - n_cached) * tf + n_cached * tc + n * host_cached)


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "n/a"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------ report


def _ok(value: float, target: float) -> str:
    return "met" if value >= target else "**not met**"


def _db(value) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"


def _load(r: dict) -> str:
    load = r.get("load")
    if not load:
        return ""
    return (f"; load average (1 / 5 / 15 min) before the timing {' / '.join(f'{x:.2f}' for x in load['before'])}, "
            f"after it {' / '.join(f'{x:.2f}' for x in load['after'])}")


def render(r: dict, console: bool = False) -> str:
    mc = r["machine"]
    lc, ln = r["in_loop"]["cached"], r["in_loop"]["no_cache"]
    L = []
    if not console:
        L += [f"## {section_title(r['threads'])}", "",
              "Generated by `tools/bench_speed.py`; every number below was measured in the run it describes "
              "(re-run the command to refresh this section).", ""]
    L += [
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {mc['cpu_count']} CPUs ({mc['processor']}), {mc['platform']}; Python {mc['python']}, "
        f"onnxruntime {mc['onnxruntime']}, numpy {mc['numpy']}, torch {mc['torch']}, diffusers {mc['diffusers']}; "
        f"ORT intra-op threads: {r['threads'] or 'ORT default'}, intra-op spin-waiting off (the engine loader's "
        "default, `OnnxRuntimeLoader(spinning=False)`: measured earlier with this tool, a spinning idle session "
        "made the full step after each cached step 14 % slower); the machine is shared, hence interleaved runs "
        "and medians" + _load(r),
        "- model: random-weight diffusers `DiTTransformer2DModel`, DiT-S/2 size (12 blocks, hidden 384 = 6 heads x 64, "
        "32x32x4 latent, patch 2, 1000 classes, learned sigma), TorchScript export, opset 17, dynamic batch",
        f"- export: DDIM, {r['steps']} steps, cache ratio {r['cache_ratio_asked']}, K={K_CALIB} calibration samples "
        f"(class labels from an npz), filter candidates {'on' if r['filters'] else 'off (`--no-filters`, to keep the run short)'}; "
        + (f"took {r['export_s']:.0f} s" if r['export_s'] is not None else "reused from an earlier run (`--reuse`)"),
        f"- schedule ({r['schedule_name']}; F = full, C = cached): `{r['pattern']}` — "
        f"{r['n_cached']}/{r['steps']} cached, f = {r['f']:.3f}; correction: {r['correction']}; "
        f"PSNR vs no cache: calibration {_db(r['psnr'])}, runtime {_db(r['runtime_psnr_vs_no_cache'])}",
        "- loops: `OmniCache.run` of one sample (batch 1), i.e. the runtime's `Generation` stepping through its "
        "`StepDispatch`, the dispatch calibration runs too; engine calls timed by a wrapper around each runner's `infer`",
        "",
        "| quantity | value | target |",
        "|---|---|---|",
        f"| sampling loop, no cache (median of {r['repeats']}, 1 sample, batch 1) | {r['t_no_cache_ms']:.0f} ms | |",
        f"| sampling loop, OmniCache (median of {r['repeats']}, interleaved with the above) | {r['t_cached_ms']:.0f} ms | |",
        f"| **measured speedup** (median no-cache / median cached) | **{r['measured']:.3f}x** | "
        f">= {TARGET_SPEEDUP:g}x at cache ratio 0.55: {_ok(r['measured'], TARGET_SPEEDUP)} |",
        f"| full.onnx, one step (median of {r['graph_reps']}, step-{r['graph_step']} feeds) | {r['full_graph_ms']:.2f} ms | |",
        f"| cache.onnx, one step (same feeds, interleaved with full.onnx) | {r['cache_graph_ms']:.3f} ms | |",
        f"| cost ratio c = cache / full | {r['c']:.4f} | |",
        f"| cost ratio inside the loops (cache.onnx call / no-cache full.onnx call, medians) | {r['in_loop_c']:.4f} "
        f"(ideal {1 / (1 - r['f'] + r['f'] * r['in_loop_c']):.3f}x) | |",
        f"| cached share f | {r['f']:.3f} | |",
        f"| ideal speedup 1 / (1 − f + f·c) | {r['ideal']:.3f}x | |",
        f"| **efficiency** = measured / ideal | **{r['efficiency']:.3f}** | >= {TARGET_EFFICIENCY}: "
        f"{_ok(r['efficiency'], TARGET_EFFICIENCY)} |",
        f"| block-stack FLOP share (analysis, manifest `model_io.block_region.flop_share`) | {r['flop_share']} | |",
        "",
        "Inside the same loops (each engine call timed in place; host = loop − engine calls):",
        "",
        "| median | no cache | OmniCache |",
        "|---|---|---|",
        f"| full.onnx call | {ln['full_step_ms']:.2f} ms | {lc['full_step_ms']:.2f} ms |",
        f"| full.onnx call, other (first step or after a full step) | {ln['full_after_full_ms']:.2f} ms | "
        f"{lc['full_after_full_ms']:.2f} ms |",
        f"| full.onnx call right after a cached step | — | {lc['full_after_cached_ms']:.2f} ms |",
        f"| cache.onnx call | — | {lc['cache_step_ms']:.3f} ms |",
        f"| host time per step (scheduler, feeds, dispatch, outside `infer`) | {ln['host_per_step_ms']:.3f} ms | "
        f"{lc['host_per_step_ms']:.3f} ms |",
        f"| engine time per loop | {ln['engines_ms']:.0f} ms | {lc['engines_ms']:.0f} ms |",
        "",
        f"Engine-only speedup inside the loops: {r['engine_only_speedup']:.3f}x. Speedup predicted from the direct graph "
        f"times plus the in-loop host time per step: {r['with_host_model']:.3f}x ({r['with_host_model'] / r['ideal']:.3f} of "
        "ideal): the part of the gap to ideal that host overhead explains. " + _penalty_sentence(r),
        "",
        "Loop times (ms), in run order — OmniCache: " + ", ".join(f"{x:.0f}" for x in r["loops_cached_ms"])
        + "; no cache: " + ", ".join(f"{x:.0f}" for x in r["loops_no_cache_ms"]) + "; per-round speedup: "
        + ", ".join(f"{x:.3f}" for x in r["per_round_speedup"])
        + f" (median {float(np.median(r['per_round_speedup'])):.3f}x).",
    ]
    if r.get("compare"):
        L += _render_compare(r)
    if "overhead_us" in r:
        o = r["overhead_us"]
        L += ["", "### Where the host time goes", "",
              "Median µs per call of each piece of `Generation.step()` outside the graphs, on the real tensors of "
              f"step {r['graph_step']} (batch 1), with the graph calls for scale:", "", "| piece | µs |", "|---|---|"]
        L += [f"| {k} | {v:.0f} |" for k, v in o.items()]
        L += ["", "Top of a cProfile of one OmniCache loop (by own time):", "",
              "| function | own ms | cumulative ms |", "|---|---|---|"]
        L += [f"| `{name}` | {tt:.1f} | {ct:.1f} |" for name, tt, ct in r["profile"]]
    return "\n".join(L) + "\n"


def _render_compare(r: dict) -> list[str]:
    """Other runs (--compare) next to this one: their figures as their own runs measured them."""
    this = {"label": "this run", "command": r["command"], "date": r["date"],
            "t_no_cache_ms": r["t_no_cache_ms"], "t_cached_ms": r["t_cached_ms"], "measured": r["measured"],
            "full_graph_ms": r["full_graph_ms"], "cache_graph_ms": r["cache_graph_ms"], "c": r["c"],
            "ideal": r["ideal"], "efficiency": r["efficiency"], "pattern": r["pattern"],
            "host_no_cache_ms": r["in_loop"]["no_cache"]["host_per_step_ms"],
            "host_cached_ms": r["in_loop"]["cached"]["host_per_step_ms"],
            "full_call_no_cache_ms": r["in_loop"]["no_cache"]["full_step_ms"],
            "cache_call_ms": r["in_loop"]["cached"]["cache_step_ms"], "load": r.get("load")}
    runs = [*r["compare"], this]
    L = ["", "### Side by side with other runs", "",
         "Runs given with `--compare`, each as its own run measured it (its `bench_speed.json`, written by the "
         "version of this tool that ran it), and this run; same machine unless the list below says otherwise. "
         "Loop and graph times of separate runs move with the machine's load (listed where the run recorded it): "
         "compare the ratios within each run (speedup, c, efficiency) more than the times across runs. Host / step "
         "is the loop minus the engine calls as each run's tool timed them: in the numpy runtime before 8ca4331 an "
         "engine call also built a fresh IO binding and copied the outputs to the host, since then a runner's "
         "`infer` checks and binds the tensors and ONNX Runtime writes into the caller's buffers."
         + (f" {r['compare_note']}" if r.get("compare_note") else ""), "",
         "| run | loop no cache | loop OmniCache | measured speedup | full.onnx | cache.onnx | c | ideal | efficiency "
         "| host / step, no cache | host / step, OmniCache |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in runs:
        L.append(f"| {q['label']} | {q['t_no_cache_ms']:.0f} ms | {q['t_cached_ms']:.0f} ms | {q['measured']:.3f}x | "
                 f"{q['full_graph_ms']:.2f} ms | {q['cache_graph_ms']:.3f} ms | {q['c']:.4f} | {q['ideal']:.3f}x | "
                 f"{q['efficiency']:.3f} | {q['host_no_cache_ms']:.3f} ms | {q['host_cached_ms']:.3f} ms |")
    L.append("")
    for q in runs:
        mc = q.get("machine") or r["machine"]
        load = q.get("load")
        extra = (f", load average {load['before'][0]:.2f} before / {load['after'][0]:.2f} after the timing"
                 if load else "")
        L.append(f"- {q['label']}: `{q['command']}` ({q['date']}; {mc['cpu_count']} CPUs, torch {mc['torch']}, "
                 f"onnxruntime {mc['onnxruntime']}{extra}; schedule `{q['pattern']}`)")
    return L


def _penalty_sentence(r: dict) -> str:
    lc = r["in_loop"]["cached"]
    k = r["pattern"].count("CF")
    extra = lc["full_after_cached_ms"] - lc["full_after_full_ms"]
    if not k or not np.isfinite(extra):
        return ""
    adjusted = r["t_no_cache_ms"] / (r["t_cached_ms"] - k * extra)
    return (f"The {k} full steps that follow a cached step took {100 * extra / lc['full_after_full_ms']:+.0f}% "
            f"against the loop's other full steps ({lc['full_after_cached_ms']:.1f} vs {lc['full_after_full_ms']:.1f} ms); "
            f"at the other full steps' median the OmniCache loop would take {abs(k * extra):.0f} ms "
            f"{'less' if extra > 0 else 'more'}: "
            f"{adjusted:.3f}x, {adjusted / r['ideal']:.3f} of ideal.")


def section_title(threads: int | None) -> str:
    return SECTION if not threads else f"{SECTION}, {threads} intra-op thread{'s' if threads > 1 else ''}"


def update_markdown(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the section (from its `## ` heading to the next `## ` heading) or append it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
