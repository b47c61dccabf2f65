"""Speed benchmark: OmniCache on a DiT-S/2-sized model, ONNX Runtime CPU.

    python tools/bench_speed.py [--steps 50] [--cache-ratio 0.55] [--repeats 5] [--threads N]
                                [--out docs/benchmarks.md] [--workdir DIR]

1. builds a random-weight DiT-S/2-sized diffusers DiT (12 blocks, hidden 384 = 6 heads x 64,
   32x32x4 latent, patch 2, 1000 classes, learned sigma) and exports it with TorchScript (opset 17,
   dynamic batch; inputs hidden_states, timestep, class_labels);
2. runs the main job (`omnicache_export.pipeline.export`) with DDIM, K=2 calibration samples;
3. times whole sampling loops (1 sample, batch 1) with cache and with `no_cache=True`, interleaved
   (ABAB...) in one process after a warm-up, and reports medians and their ratio;
4. times the two graphs directly on the same step feeds (interleaved) for the cost ratio c, and
   compares the measured speedup with the ideal 1 / (1 - f + f c) (f = cached share of the schedule);
5. splits the per-step time into engine time and host overhead (scheduler step, feeds, IO binding)
   and times a leaner loop prototyped here (`LeanGeneration`) against the runtime's own, to say what
   a runtime change would gain;
6. prints a table and, with --out, writes the section "Speed: DiT-S/2-sized, ONNX Runtime CPU" of the
   given markdown file (other sections are kept).

Every number written is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import io
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


def sample_loop(rt, cond, gen_cls=None, no_cache=False, seed=1):
    from omnicache_export.runtime.omnicache import Generation

    gen = (gen_cls or Generation)(rt, cond, {}, 1, seed, no_cache)
    while not gen.done:
        gen.step()
    return gen


class TimedEngine:
    """Wraps an engine and records the wall time of each `run` call (about 1 µs a call)."""

    def __init__(self, engine):
        self.engine, self.times = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feeds, output_names=None):
        t0 = time.perf_counter()
        out = self.engine.run(feeds, output_names)
        self.times.append(time.perf_counter() - t0)
        return out


def timed_loops(cond, variants: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Whole sampling loops (1 sample, batch 1), variants interleaved ABAB... after `warmup` rounds.
    variants: name -> (runtime, Generation class or None, no_cache). Per loop: wall time and each
    full.run / cache.run call's time (so host time = loop - engine calls), in ms."""
    rts = {id(v[0]): v[0] for v in variants.values()}
    saved = {k: (rt.full, rt.cache) for k, rt in rts.items()}
    out = {k: {"loop": [], "full": [], "cache": [], "full_steps": None} for k in variants}
    try:
        for rt in rts.values():
            rt.full, rt.cache = TimedEngine(rt.full), TimedEngine(rt.cache)
        for r in range(warmup + repeats):
            for name, (rt, cls, no_cache) in variants.items():
                rt.full.times, rt.cache.times = [], []
                t0 = time.perf_counter()
                sample_loop(rt, cond, gen_cls=cls, no_cache=no_cache)
                dt = time.perf_counter() - t0
                if r < warmup:
                    continue
                rec = out[name]
                rec["loop"].append(dt * 1e3)
                rec["full"].append([t * 1e3 for t in rt.full.times])
                rec["cache"].append([t * 1e3 for t in rt.cache.times])
                rec["full_steps"] = np.ones(rt.spec.n_steps, bool) if no_cache else rt.full_steps
    finally:
        for k, rt in rts.items():
            rt.full, rt.cache = saved[k]
    return out


def loop_summary(rec: dict) -> dict[str, float]:
    """Medians: loop; engine calls pooled over the loops; host time per step per loop."""
    full_steps = np.flatnonzero(rec["full_steps"])
    n = len(rec["full_steps"])
    after_cached = np.array([i > 0 and not rec["full_steps"][i - 1] for i in full_steps])
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


def no_spin_runtime(out_dir: Path, threads: int | None, roles=("cache",)):
    """The runtime with ONNX Runtime's intra-op spin-waiting turned off in the named sessions
    (`session.intra_op.allow_spinning = 0`): a prototype of an engine option."""
    import onnxruntime as ort

    rt = load_runtime(out_dir, threads)
    for role in roles:
        eng = getattr(rt, role)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = out_dir / rt.manifest["engines"]["onnxruntime"][role]
        eng.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return rt


def load_runtime(out_dir: Path, threads: int | None):
    from omnicache_export.engines.onnxruntime import OnnxRuntimeEngine
    from omnicache_export.runtime.omnicache import OmniCache

    rt = OmniCache.load(out_dir)
    if threads:
        for role in ("full", "cache"):
            path = out_dir / rt.manifest["engines"]["onnxruntime"][role]
            getattr(rt, role).close()
            setattr(rt, role, OnnxRuntimeEngine(path, threads=threads, spinning=False))
        rt._cache_inputs = [s.name for s in rt.cache.inputs]
    return rt


def step_feeds(rt, cond) -> tuple[dict, dict, int]:
    """Real feeds of both graphs at the first cached step (and after its two preceding full steps)."""
    from omnicache_export.runtime.omnicache import Generation

    gen = Generation(rt, cond, {}, 1, 0, False)
    first_cached = int(np.flatnonzero(~rt.full_steps)[0])
    while gen.i < first_cached:
        gen.step()
    feeds = gen._feeds()
    full_feeds = {s.name: feeds[s.name] for s in rt.full.inputs}
    extra = gen.cache_extras()
    cache_feeds = {n: extra[n] if n in extra else feeds[n] for n in rt._cache_inputs}
    return full_feeds, cache_feeds, gen.i


# ------------------------------------------------------------------ host-overhead breakdown


def host_overhead(rt, cond, reps: int = 200) -> dict[str, float]:
    """Median microseconds of each non-engine piece of one runtime step, on real tensors."""
    from omnicache_export.runtime.omnicache import Generation

    gen = Generation(rt, cond, {}, 1, 0, False)
    gen.step()
    gen.step()
    den, x, i = gen.den, gen.x, 2
    raw = gen.prev
    full_feeds, cache_feeds, _ = step_feeds(rt, cond)
    eng = rt.cache
    sess = eng.session

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e6

    def binding_only():
        b = sess.io_binding()
        for spec in eng.inputs:
            b.bind_cpu_input(spec.name, np.ascontiguousarray(cache_feeds[spec.name]))
        for o in eng.outputs:
            b.bind_output(o.name, "cpu")

    prebound = sess.io_binding()
    for spec in eng.inputs:
        prebound.bind_cpu_input(spec.name, cache_feeds[spec.name])
    for o in eng.outputs:
        prebound.bind_output(o.name, "cpu")

    pred = den.guided(raw)
    return {
        "scheduler.step (diffusers DDIM, torch)": timed(lambda: den.step(i, pred, x)),
        "scale_model_input (torch)": timed(lambda: den.model_input(i, x)),
        "feeds dict + timestep feed": timed(lambda: gen._feeds()),
        "guided (slice + astype)": timed(lambda: den.guided(raw)),
        "zeros_like(prev) (cached step)": timed(lambda: np.zeros_like(raw)),
        "io_binding build (cache graph)": timed(binding_only),
        "cache graph: engine.run (binding + run + copy)": timed(lambda: eng.run(cache_feeds)),
        "cache graph: run_with_iobinding only": timed(lambda: sess.run_with_iobinding(prebound)),
        "cache graph: session.run (no binding)": timed(lambda: sess.run(None, cache_feeds)),
        "full graph: engine.run": timed(lambda: rt.full.run(full_feeds)) if reps <= 50 else float("nan"),
    }


def lean_generation_cls():
    """A prototype of a leaner runtime step: the DDIM update in numpy from precomputed alphas (no
    torch round trip), no scale_model_input call where the scheduler's is the identity, no zeros_like
    per cached step, and the feeds built once per step without copying the static dict."""
    from omnicache_export.runtime.omnicache import Generation

    class LeanGeneration(Generation):
        def __init__(self, rt, cond, uncond, n, seed, no_cache):
            super().__init__(rt, cond, uncond, n, seed, no_cache)
            s = self.den.scheduler
            self._ddim = type(s).__name__ == "DDIMScheduler" and s.config.prediction_type == "epsilon" \
                and not s.config.thresholding and not s.config.clip_sample and not rt.spec.cfg
            ts = self.den.timesteps.numpy()
            ac = s.alphas_cumprod.numpy().astype(np.float64)
            step = s.config.num_train_timesteps // s.num_inference_steps
            prev_t = ts - step
            a_t = ac[ts]
            a_prev = np.where(prev_t >= 0, ac[np.clip(prev_t, 0, None)], float(s.final_alpha_cumprod))
            # x_prev = sqrt(a_prev) * (x - sqrt(1-a_t) e)/sqrt(a_t) + sqrt(1-a_prev) e   (eta = 0)
            self._cx = (np.sqrt(a_prev) / np.sqrt(a_t)).astype(np.float32)
            self._ce = (np.sqrt(1 - a_prev) - np.sqrt(a_prev) * np.sqrt(1 - a_t) / np.sqrt(a_t)).astype(np.float32)
            self._t_feeds = [self.den.timestep_feed(i, n) for i in range(rt.spec.n_steps)]

        def step(self):
            if not self._ddim:
                return super().step()
            spec, rt, i = self.rt.spec, self.rt, self.i
            feeds = self.static.copy()
            feeds[spec.latent] = self.x
            if spec.timestep:
                feeds[spec.timestep] = self._t_feeds[i]
            if self.no_cache or rt.full_steps[i]:
                out = rt.full.run(feeds)
                raw = out[spec.output]
                self.caches_prev, self.caches = self.caches, {k: out[k] for k in rt.cache_names}
                self.prev2, self.prev = self.prev, raw
                self.full_steps += 1
            else:
                feeds.update(self.cache_extras())
                raw = rt.cache.run(feeds)[spec.output]
                self.cached_steps += 1
            c = spec.latent_shape[0]
            eps = raw[:, :c] if spec.learned_sigma else raw
            self.x = self._cx[i] * self.x + self._ce[i] * eps
            self.i += 1
            return self.x

    return LeanGeneration


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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python tools/bench_speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        print(render(res, console=True))
        if args.out:
            update_markdown(args.out, render(res), section_title(res["threads"]))
        return 0
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_speed_")))
        work.mkdir(parents=True, exist_ok=True)
        return run(args, work, command)


def run(args, work: Path, command: str) -> int:
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
    m = rt.manifest
    cond = {"class_labels": labels[:1]}
    n, n_cached = len(rt.full_steps), int((~rt.full_steps).sum())
    f = n_cached / n
    pattern = m["schedule"]["pattern"]

    # 3. whole loops, interleaved (engine time inside each loop recorded too)
    main_loops = timed_loops(cond, {"cached": (rt, None, False), "no_cache": (rt, None, True)}, args.repeats)
    lc, ln = loop_summary(main_loops["cached"]), loop_summary(main_loops["no_cache"])
    measured = ln["loop_ms"] / lc["loop_ms"]
    per_round = [a / b for a, b in zip(main_loops["no_cache"]["loop"], main_loops["cached"]["loop"])]

    # 4. the two graphs on the same step feeds, interleaved
    full_feeds, cache_feeds, at_step = step_feeds(rt, cond)
    graph_reps = max(20, 4 * args.repeats)
    graphs = interleaved({"full": lambda: rt.full.run(full_feeds), "cache": lambda: rt.cache.run(cache_feeds)},
                         graph_reps, warmup=3)
    g_full, g_cache = median_ms(graphs["full"]), median_ms(graphs["cache"])
    c = g_cache / g_full
    ideal = 1 / (1 - f + f * c)
    efficiency = measured / ideal

    res = {
        "steps": n, "n_cached": n_cached, "f": f, "pattern": pattern, "cache_ratio_asked": args.cache_ratio,
        "t_cached_ms": lc["loop_ms"], "t_no_cache_ms": ln["loop_ms"], "measured": measured,
        "loops_cached_ms": main_loops["cached"]["loop"], "loops_no_cache_ms": main_loops["no_cache"]["loop"],
        "in_loop": {"cached": lc, "no_cache": ln}, "per_round_speedup": per_round,
        "engine_only_speedup": ln["engines_ms"] / lc["engines_ms"],
        "in_loop_c": lc["cache_step_ms"] / ln["full_step_ms"],
        "with_host_model": _with_host(n, n_cached, g_full, g_cache, lc["host_per_step_ms"], ln["host_per_step_ms"]),
        "full_graph_ms": g_full, "cache_graph_ms": g_cache, "c": c, "ideal": ideal, "efficiency": efficiency,
        "flop_share": m["io"]["block_region"]["flop_share"], "graph_reps": graph_reps, "graph_step": at_step,
        "psnr": m["calibration"]["quality"]["psnr_db_mean"], "correction": m["correction"]["name"],
        "schedule_name": m["schedule"]["name"], "export_s": t_export, "filters": args.filters,
        "threads": args.threads, "repeats": args.repeats,
        "runtime_psnr_vs_no_cache": m["verification"]["runtime_psnr_db_vs_no_cache"],
        "manifest_speed": m["speed"],
    }
    print(f"loops: cached {lc['loop_ms']:.0f} ms, no cache {ln['loop_ms']:.0f} ms, speedup {measured:.3f}x; "
          f"c = {c:.4f}, ideal {ideal:.3f}x, efficiency {efficiency:.3f}", flush=True)

    # 5. where the host time goes, and what a leaner step would give
    if not args.no_profile:
        res["overhead_us"] = host_overhead(rt, cond, reps=50)
        lean = lean_generation_cls()
        ref = sample_loop(rt, cond, seed=3).x
        got = sample_loop(rt, cond, gen_cls=lean, seed=3).x
        res["lean_max_abs_diff"] = float(np.abs(ref - got).max())
        res["lean_max_abs_x"] = float(np.abs(ref).max())
        rt_ns = no_spin_runtime(out_dir, args.threads)
        rt_nsb = no_spin_runtime(out_dir, args.threads, roles=("full", "cache"))
        variants = {
            "cached": (rt, None, False), "no_cache": (rt, None, True),
            "nospin_cached": (rt_ns, None, False),
            "nospin_both_cached": (rt_nsb, None, False), "nospin_both_no_cache": (rt_nsb, None, True),
            "lean_cached": (rt, lean, False), "lean_no_cache": (rt, lean, True),
            "nospin_lean_cached": (rt_ns, lean, False),
        }
        lt = timed_loops(cond, variants, args.repeats)
        rt_ns.close()
        rt_nsb.close()
        P = res["proto"] = {k: loop_summary(v) for k, v in lt.items()}
        base_nc, lean_nc = P["no_cache"]["loop_ms"], P["lean_no_cache"]["loop_ms"]
        res["proto_speedup"] = {
            "runtime": base_nc / P["cached"]["loop_ms"],
            "nospin": base_nc / P["nospin_cached"]["loop_ms"],
            "nospin_both": P["nospin_both_no_cache"]["loop_ms"] / P["nospin_both_cached"]["loop_ms"],
            "lean": lean_nc / P["lean_cached"]["loop_ms"],
            "nospin_lean": lean_nc / P["nospin_lean_cached"]["loop_ms"],
        }
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
    print(render(res, console=True))
    (work / "bench_speed.json").write_text(json.dumps({k: v for k, v in res.items() if k != "profile_text"}, indent=1))
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
        f"ORT intra-op threads: {r['threads'] or 'ORT default'}; the machine is shared, hence interleaved runs and medians",
        "- model: random-weight diffusers `DiTTransformer2DModel`, DiT-S/2 size (12 blocks, hidden 384 = 6 heads x 64, "
        "32x32x4 latent, patch 2, 1000 classes, learned sigma), TorchScript export, opset 17, dynamic batch",
        f"- export: DDIM, {r['steps']} steps, cache ratio {r['cache_ratio_asked']}, K={K_CALIB} calibration samples "
        f"(class labels from an npz), filter candidates {'on' if r['filters'] else 'off (`--no-filters`, to keep the run short)'}; "
        + (f"took {r['export_s']:.0f} s" if r['export_s'] is not None else "reused from an earlier run (`--reuse`)"),
        f"- schedule ({r['schedule_name']}; F = full, C = cached): `{r['pattern']}` — "
        f"{r['n_cached']}/{r['steps']} cached, f = {r['f']:.3f}; correction: {r['correction']}; "
        f"PSNR vs no cache: calibration {r['psnr']:.1f} dB, runtime {r['runtime_psnr_vs_no_cache']:.1f} dB",
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
        f"| block-stack FLOP share (analysis, manifest `io.block_region.flop_share`) | {r['flop_share']} | |",
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
        f"| host time per step (scheduler, feeds, outside `run`) | {ln['host_per_step_ms']:.3f} ms | "
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
    if "overhead_us" in r:
        P, S = r["proto"], r["proto_speedup"]
        L += ["", "### Where the gap to ideal goes", "",
              "Median µs per call of each piece of `Generation.step()` outside the graphs, on real tensors (batch 1), "
              "with the graph calls for scale:", "", "| piece | µs |", "|---|---|"]
        L += [f"| {k} | {v:.0f} |" for k, v in r["overhead_us"].items()]
        L += ["", "Runtime changes prototyped in the tool, timed against the runtime as it is, eight loops interleaved per round, "
              f"medians of {r['repeats']}:", "",
              "- **no spin**: the cache graph's ONNX Runtime session with `session.intra_op.allow_spinning = 0`. Each "
              "session has its own intra-op thread pool, whose workers spin-wait after a run; after a cached step the "
              "cache session's spinning worker competes with the next full step for the cores;",
              "- **no spin, both**: the same for the full graph's session too;",
              "- **lean**: `LeanGeneration`, the DDIM update in numpy from coefficients precomputed per step instead of "
              "`scheduler.step` through torch, no `scale_model_input` (identity for DDIM), no `zeros_like` and no "
              f"feed-dict rebuild per step (max |Δx| vs the runtime {r['lean_max_abs_diff']:.1e} on |x| <= "
              f"{r['lean_max_abs_x']:.1f}, float32 rounding).",
              "", "| OmniCache loop | loop | full.onnx after a cached step | other full.onnx calls | cache.onnx | "
              "host / step | speedup | of ideal |", "|---|---|---|---|---|---|---|---|"]
        for key, label, sp in (("cached", "runtime as is", "runtime"), ("nospin_cached", "no spin", "nospin"),
                               ("nospin_both_cached", "no spin, both", "nospin_both"),
                               ("lean_cached", "lean", "lean"), ("nospin_lean_cached", "no spin + lean", "nospin_lean")):
            q = P[key]
            L.append(f"| {label} | {q['loop_ms']:.0f} ms | {q['full_after_cached_ms']:.2f} ms | "
                     f"{q['full_after_full_ms']:.2f} ms | {q['cache_step_ms']:.3f} ms | {q['host_per_step_ms']:.3f} ms | "
                     f"{S[sp]:.3f}x | {S[sp] / r['ideal']:.3f} |")
        L += ["", f"No-cache loops in the same rounds: runtime {P['no_cache']['loop_ms']:.0f} ms (full.onnx "
              f"{P['no_cache']['full_step_ms']:.2f} ms, host {P['no_cache']['host_per_step_ms']:.3f} ms/step), lean "
              f"{P['lean_no_cache']['loop_ms']:.0f} ms (host {P['lean_no_cache']['host_per_step_ms']:.3f} ms/step), "
              f"no spin both {P['nospin_both_no_cache']['loop_ms']:.0f} ms (full.onnx "
              f"{P['nospin_both_no_cache']['full_step_ms']:.2f} ms); each variant's speedup is against the no-cache loop "
              "it would have (runtime's for no spin, lean's for the lean ones, its own for no spin both).",
              "", "Top of a cProfile of one OmniCache loop (by own time):", "",
              "| function | own ms | cumulative ms |", "|---|---|---|"]
        L += [f"| `{name}` | {tt:.1f} | {ct:.1f} |" for name, tt, ct in r["profile"]]
    return "\n".join(L) + "\n"


def _penalty_sentence(r: dict) -> str:
    lc = r["in_loop"]["cached"]
    k = r["pattern"].count("CF")
    extra = lc["full_after_cached_ms"] - lc["full_after_full_ms"]
    if not k or not np.isfinite(extra):
        return ""
    adjusted = r["t_no_cache_ms"] / (r["t_cached_ms"] - k * extra)
    return (f"The {k} full steps that follow a cached step took {100 * extra / lc['full_after_full_ms']:+.0f}% "
            f"against the loop's other full steps ({lc['full_after_cached_ms']:.1f} vs {lc['full_after_full_ms']:.1f} ms); "
            f"at the other full steps' median the OmniCache loop would take {k * extra:.0f} ms less: "
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
