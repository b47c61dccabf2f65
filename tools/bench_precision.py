"""fp16 in the graph: does caching still set the quality? Measured on the trained reference DiTs.

    python tools/bench_precision.py [--models dit-digits,pixart-digits,latte-digits] [--steps 50,20,10]
                                    [--samples-per-class 1] [--num-calib 10] [--workdir DIR] [--out docs/benchmarks.md]
                                    [--ablation-steps 20] [--cache-runs dit-digits:20]

For each reference model and step count N, two main-job exports (`--precision fp32`, `--precision
fp16`; calibrated each on its own graphs, one sample per class, seed 0, default cache ratio) are
sampled on held-out noise (seed 1234, `--samples-per-class` samples of every class):

- a = PSNR of fp16 no-cache against fp32 no-cache, b = fp32 cached against fp32 no-cache,
  c = fp16 cached against fp32 no-cache (dB, mean over samples);
- the target: c ≥ −10·log10(10^(−a/10) + 10^(−b/10)) − 1 dB (the two errors added as independent);
- each fp16 figure twice: under ONNX Runtime's CPU provider (which computes most fp16 ops in fp32
  inside) and under the per-op emulation (`passes.emulate_low_precision`: every op in fp32 on
  rounded inputs, its 16-bit result rounded, as a GPU kernel does), the honest GPU proxy.

Ablation (`--ablation-steps`): fp16 and bf16 no-cache sampling (emulated) of the source converted
with each fp32 keep switched off, against fp32: what keeping the timestep path, the normalizations
and softmax in fp32 buys. Cache runs (`--cache-runs MODEL:N`): the fp16 penalty on cached sampling
(combined(a, b) − c) as the longest run of cached steps grows from 1 to 4: whether the fp16 cache
tensor's error grows over a run. With --out, the section "Precision" of the markdown file is written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Precision"
EVAL_SEED = 1234
REUSED: list[str] = []  # exports found in --workdir rather than made by this run
CALIB_SEED = 0


def combined(a: float, b: float) -> float:
    """PSNR of two independent errors of PSNR a and b added."""
    return -10 * math.log10(10 ** (-a / 10) + 10 ** (-b / 10))


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    from omnicache_export.calibration.calibrate import psnr as _psnr

    return float(np.mean(_psnr(np.asarray(x, np.float64), np.asarray(ref, np.float64))))


def emulated(src: Path, dst: Path) -> Path:
    """`src` with every 16-bit result rounded after an fp32 op (`EmulateLowPrecisionPass`)."""
    from omnicache_export.graph import modelio
    from omnicache_export.passes.emulate_low_precision import EmulateLowPrecisionPass

    model = modelio.load_model(src)
    EmulateLowPrecisionPass()(model)
    modelio.save_model(model, dst)
    return dst


def _no_opt() -> dict:
    import onnxruntime as ort

    return {"optimization": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}  # keeps the rounding pairs


def runtime(folder: Path, emulate: bool):
    """The export's OmniCache, on its own graphs or on their per-op fp16 emulation."""
    from omnicache_export.engines import load_engine
    from omnicache_export.runtime.dispatch import StepDispatch
    from omnicache_export.runtime.manifest import read_manifest
    from omnicache_export.runtime.omnicache import OmniCache

    if not emulate:
        return OmniCache.load(folder)
    m = read_manifest(folder)
    full = emulated(folder / "full.onnx", folder.parent / f"{folder.name}.emul.full.onnx")
    cache = emulated(folder / "cache.onnx", folder.parent / f"{folder.name}.emul.cache.onnx")
    dispatch = StepDispatch(load_engine("onnxruntime", full, **_no_opt()), load_engine("onnxruntime", cache, **_no_opt()),
                            m.graphs["full"], m.graphs["cache"])
    return OmniCache(dispatch, m.sampling_spec(), np.array(m.schedule.full))


def sample_both(folder: Path, cond, uncond, n: int, emulate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rt = runtime(folder, emulate)
    try:
        kw = {"rows": range(n)}
        return (rt.sample(cond, uncond, EVAL_SEED, no_cache=True, **kw).astype(np.float32),
                rt.sample(cond, uncond, EVAL_SEED, **kw).astype(np.float32))
    finally:
        rt.close()


def export(onnx: Path, out: Path, ref, steps: int, calib: Path, sched: Path, precision: str, num_calib: int,
           max_consecutive: int = 2) -> Path:
    from omnicache_export.pipeline.job import ExportOptions
    from omnicache_export.pipeline.job import export as run_export

    if (out / "omnicache.json").exists():
        REUSED.append(out.name)  # from an earlier run with the same --workdir
    else:
        run_export(onnx, out, ExportOptions(
            scheduler=str(sched), steps=steps, calib=calib, num_calib=num_calib, seed=CALIB_SEED,
            guidance_scale=ref.guidance_scale, max_consecutive=max_consecutive, precision=precision,
            progress=False, force=True))
    return out


def cell(wd: Path, onnx: Path, ref, steps: int, spc: int, num_calib: int, log, max_consecutive: int = 2) -> dict:
    from omnicache_export.runtime.manifest import read_manifest
    from omnicache_export.zoo.reference import scheduler_json, write_calib_npz

    calib = write_calib_npz(ref.name, np.arange(10), wd / "calib.npz")
    sched = scheduler_json(ref.name, wd / "scheduler.json")
    cond, uncond = ref.conditioning(np.tile(np.arange(10), spc))
    n = 10 * spc
    t0 = time.perf_counter()
    e32 = export(onnx, wd / f"fp32-n{steps}-m{max_consecutive}", ref, steps, calib, sched, "fp32", num_calib, max_consecutive)
    e16 = export(onnx, wd / f"fp16-n{steps}-m{max_consecutive}", ref, steps, calib, sched, "fp16", num_calib, max_consecutive)
    t_export = time.perf_counter() - t0
    nc32, c32 = sample_both(e32, cond, uncond, n)
    nc16, c16 = sample_both(e16, cond, uncond, n)
    enc16, ec16 = sample_both(e16, cond, uncond, n, emulate=True)
    m32, m16 = read_manifest(e32), read_manifest(e16)
    b = psnr(c32, nc32)
    row = {"model": ref.name, "steps": steps, "max_consecutive": max_consecutive, "b": b,
           "sched32": m32.schedule.pattern, "sched16": m16.schedule.pattern,
           "cached32": m32.schedule.n_cached, "cached16": m16.schedule.n_cached,
           "cache_dtype": m16.model_io.cache_tensors[0].dtype, "precision": m16.engines[0].precision.value,
           "export_s": t_export}
    for key, nc, c in (("ort", nc16, c16), ("emul", enc16, ec16)):
        a, cc = psnr(nc, nc32), psnr(c, nc32)
        row[key] = {"a": a, "c": cc, "target": combined(a, b) - 1.0, "ok": cc >= combined(a, b) - 1.0}
    log(f"  {ref.name} N={steps} m={max_consecutive}: b={b:.2f} ort a={row['ort']['a']:.2f} c={row['ort']['c']:.2f} "
        f"emul a={row['emul']['a']:.2f} c={row['emul']['c']:.2f} ({t_export:.0f}s export)")
    return row


def _sampled(path: Path, ref, steps: int, spc: int, optimize: bool) -> np.ndarray:
    import onnxruntime as ort

    from omnicache_export.runtime.sampler import sample

    cond, uncond = ref.conditioning(np.tile(np.arange(10), spc))
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    fn = lambda i, feeds: session.run(None, {k: feeds[k] for k in names})[0].astype(np.float32)  # noqa: E731
    return sample(ref.sampling_spec(steps), fn, cond, uncond, 10 * spc, EVAL_SEED)[0]


def ablation_psnr(base: Path, path: Path, ref, steps: int, spc: int, optimize: bool) -> float:
    """No-cache sampling PSNR of the graph at `path` against the fp32 graph at `base`."""
    return psnr(_sampled(path, ref, steps, spc, optimize), _sampled(base, ref, steps, spc, True))


def ablation(wd: Path, onnx: Path, ref, steps: int, spc: int, log) -> list[dict]:
    """No-cache sampling of the converted source (emulated) per keep set, against the fp32 source."""
    from omnicache_export.graph import modelio
    from omnicache_export.passes.convert_precision import ConvertPrecisionPass
    from omnicache_export.passes.emulate_low_precision import EmulateLowPrecisionPass
    from omnicache_export.passes.precision_policy import ALL_KEEPS, KeepFp32

    base = _sampled(onnx, ref, steps, spc, True)
    variants = {"all kept (default)": ALL_KEEPS, "none kept": frozenset()}
    for k in KeepFp32:
        variants[f"without {k.value}"] = ALL_KEEPS - {k}
    rows = []
    for precision in ("fp16", "bf16"):
        for label, keep in variants.items():
            model = modelio.load_model(onnx)
            ConvertPrecisionPass(precision, timestep="timestep", keep=keep)(model)
            EmulateLowPrecisionPass()(model)
            path = wd / f"ablation-{precision}.onnx"
            modelio.save_model(model, path)
            rows.append({"model": ref.name, "steps": steps, "precision": precision, "variant": label,
                         "psnr": psnr(_sampled(path, ref, steps, spc, False), base)})
            log(f"  ablation {ref.name} {precision} {label}: {rows[-1]['psnr']:.2f} dB")
    return rows


def converters(wd: Path, onnx: Path, ref, steps: int, spc: int, log) -> list[dict]:
    """This project's pass against onnxconverter-common's float16 converter (keep_io_types=True, its
    defaults), no-cache sampling against fp32, under ONNX Runtime and emulated. onnxconverter-common
    1.16 leaves Cast(to=FLOAT) nodes whose outputs it retyped fp16 (its issue #320): those are counted,
    set to FLOAT16 so the graph loads, then measured."""
    import onnx as onnx_lib

    from onnxconverter_common import float16

    from omnicache_export.graph import modelio
    from omnicache_export.passes.convert_precision import ConvertPrecisionPass
    from omnicache_export.passes.emulate_low_precision import EmulateLowPrecisionPass
    from omnicache_export.graph.repair import ort_load_error

    proto = float16.convert_float_to_float16(onnx_lib.load(str(onnx)), keep_io_types=True)
    refused = ort_load_error(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    bad = [a for n in proto.graph.node if n.op_type == "Cast" and types.get(n.output[0]) == onnx_lib.TensorProto.FLOAT16
           for a in n.attribute if a.name == "to" and a.i == onnx_lib.TensorProto.FLOAT]
    for attr in bad:
        attr.i = onnx_lib.TensorProto.FLOAT16
    occ = wd / "onnxconverter.onnx"
    onnx_lib.save(proto, str(occ))
    ours = modelio.load_model(onnx)
    ConvertPrecisionPass("fp16", timestep="timestep")(ours)
    own = wd / "own-fp16.onnx"
    modelio.save_model(ours, own)
    rows = []
    for label, path in (("this project's pass", own), ("onnxconverter-common 1.16 (Casts repaired)", occ)):
        model = modelio.load_model(path)
        n_cast = sum(1 for n in model.graph if n.op_type == "Cast")
        EmulateLowPrecisionPass()(model)
        emul = wd / f"{path.stem}.emul.onnx"
        modelio.save_model(model, emul)
        row = {"model": ref.name, "steps": steps, "converter": label, "casts": n_cast,
               "ort": ablation_psnr(onnx, path, ref, steps, spc, True), "emul": ablation_psnr(onnx, emul, ref, steps, spc, False),
               "as_shipped": "loads" if path == own else (f"refused by ONNX Runtime ({len(bad)} bad Casts)" if refused else "loads")}
        rows.append(row)
        log(f"  converter {ref.name} {label}: ORT {row['ort']:.2f} dB, emulated {row['emul']:.2f} dB, {n_cast} Casts")
    return rows


def bf16_kernels(onnx: Path) -> list[dict]:
    """Each op of the bf16-converted graph that carries bfloat16, run alone (its types, its attributes)
    through ONNX Runtime's CPU provider: which it has a kernel for."""
    import onnx as onnx_lib
    import onnx_ir as ir

    from omnicache_export.graph import modelio
    from omnicache_export.graph.repair import ort_load_error
    from omnicache_export.passes.convert_precision import ConvertPrecisionPass

    model = modelio.load_model(onnx)
    ConvertPrecisionPass("bf16", timestep="timestep")(model)
    h, seen, rows = onnx_lib.helper, set(), []
    for node in model.graph:
        values = [v for v in [*node.inputs, *node.outputs] if v is not None]
        if not any(v.dtype == ir.DataType.BFLOAT16 for v in values):
            continue
        if any(attr.type == ir.AttributeType.TENSOR for attr in node.attributes.values()):
            continue  # Constant, ConstantOfShape: no kernel question
        key = (node.op_type, tuple(int(v.dtype) for v in values))
        if key in seen:
            continue
        seen.add(key)
        ins = [f"i{k}" if v is not None else "" for k, v in enumerate(node.inputs)]
        one = h.make_node(node.op_type, ins, [f"o{k}" for k in range(len(node.outputs))],
                          **{a.name: a.value for a in node.attributes.values() if a.type != ir.AttributeType.TENSOR})
        graph = h.make_graph([one], "one", [h.make_tensor_value_info(f"i{k}", int(v.dtype), None)
                                            for k, v in enumerate(node.inputs) if v is not None],
                             [h.make_tensor_value_info(f"o{k}", int(v.dtype), None) for k, v in enumerate(node.outputs)])
        error = ort_load_error(h.make_model(graph, opset_imports=[h.make_opsetid("", model.opset_imports[""])]))
        rows.append({"op": node.op_type, "ok": error is None or "NOT_IMPLEMENTED" not in error})
    return rows


def render(cells: list[dict], abl: list[dict], runs: list[dict], meta: dict, conv: list[dict] = (),
           kernels: dict | None = None) -> str:
    reused = (f" {meta['reused']} of the exports were found in `--workdir`, made by an earlier run or earlier in "
              "this one (the seconds exclude their calibration)." if meta["reused"] else "")
    out = [f"Regenerated by `{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['seconds']:.0f} s). "
           f"Every number comes from that run.{reused}", "",
           "Two main-job exports per cell (`--precision fp32`, `--precision fp16`), each calibrated on its own graphs "
           f"(one sample per class, seed {CALIB_SEED}, default cache ratio, `--max-consecutive 2`); sampled on held-out "
           f"noise (seed {EVAL_SEED}, {meta['spc']} sample(s) per class). a = fp16 no-cache vs fp32 no-cache, "
           "b = fp32 cached vs fp32 no-cache, c = fp16 cached vs fp32 no-cache (PSNR, dB); target: "
           "c ≥ −10·log10(10^(−a/10) + 10^(−b/10)) − 1. *ORT*: ONNX Runtime's CPU provider on the fp16 graphs; "
           "*emulated*: the same graphs with every op in fp32 on rounded inputs and its fp16 result rounded "
           "(`passes/emulate_low_precision.py`), the GPU proxy.", "",
           "| model | N | schedule fp32 / fp16 | b | a (ORT) | c (ORT) | target | ok | a (emul) | c (emul) | target | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cells:
        o, e = r["ort"], r["emul"]
        out.append(f"| {r['model']} | {r['steps']} | {r['sched32']} / {r['sched16']} | {r['b']:.2f} | {o['a']:.2f} | "
                   f"{o['c']:.2f} | {o['target']:.2f} | {'yes' if o['ok'] else '**no**'} | {e['a']:.2f} | {e['c']:.2f} | "
                   f"{e['target']:.2f} | {'yes' if e['ok'] else '**no**'} |")
    if cells:
        out += ["", f"The fp16 exports' cache tensor: {', '.join(sorted({r['cache_dtype'] for r in cells}))}; "
                f"manifest engine precision: {', '.join(sorted({r['precision'] for r in cells}))}."]
    if abl:
        out += ["", "### What the fp32 keeps buy", "",
                "No-cache sampling of the converted source model under the per-op emulation, against the fp32 "
                "model (PSNR, dB), with each keep of `passes/precision_policy.py` switched off:", "",
                "| model | N | precision | variant | PSNR vs fp32 |", "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['steps']} | {r['precision']} | {r['variant']} | {r['psnr']:.2f} |" for r in abl]
    if conv:
        out += ["", "### This pass against onnxconverter-common", "",
                "No-cache sampling of the model converted to fp16 by each tool, against fp32 (PSNR, dB); the Cast "
                "count is the converted graph's.", "",
                "| model | N | converter | as shipped | Casts | PSNR (ORT) | PSNR (emulated) |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['steps']} | {r['converter']} | {r['as_shipped']} | {r['casts']} | {r['ort']:.2f} | "
                f"{r['emul']:.2f} |" for r in conv]
    if kernels:
        for name, rows in kernels.items():
            ok = sorted({r["op"] for r in rows if r["ok"]})
            refused = sorted({r["op"] for r in rows if not r["ok"]})
            out += ["", f"bf16 on ONNX Runtime's CPU provider ({name}, each bf16-typed op of the converted graph run "
                    f"alone): kernels for {', '.join(ok) or 'none'}; no kernel for {', '.join(refused) or 'none'}."]
    if runs:
        out += ["", "### The fp16 cache tensor over longer cached runs", "",
                "The fp16 penalty on cached sampling, combined(a, b) − c (dB, emulated), as `--max-consecutive` "
                "grows: were the fp16 cache tensor's error to grow over a run of cached steps, the penalty would "
                "grow with the run length.", "",
                "| model | N | max consecutive | schedule (fp16) | b | a | c | combined(a, b) − c |",
                "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            e = r["emul"]
            out.append(f"| {r['model']} | {r['steps']} | {r['max_consecutive']} | {r['sched16']} | {r['b']:.2f} | "
                       f"{e['a']:.2f} | {e['c']:.2f} | {combined(e['a'], r['b']) - e['c']:.2f} |")
    return "\n".join(out)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = f"## {SECTION}"
    pattern = re.compile(rf"^{re.escape(heading)}\s*$.*?(?=^## |\Z)", re.M | re.S)
    new = f"{heading}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: new, text) if pattern.search(text) else text.rstrip() + "\n\n" + new
    path.write_text(text.rstrip() + "\n")


def reference_model(work: Path, name: str):
    """(the reference, its work folder, its TorchScript export there, made once)."""
    from omnicache_export.zoo.reference import export_reference, load_reference

    wd = work / name
    wd.mkdir(parents=True, exist_ok=True)
    onnx = wd / "model.onnx"
    if not onnx.exists():
        export_reference(name, onnx)
    return load_reference(name), wd, onnx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dit-digits,pixart-digits,latte-digits")
    p.add_argument("--steps", default="50,20,10")
    p.add_argument("--samples-per-class", type=int, default=1)
    p.add_argument("--num-calib", type=int, default=10)
    p.add_argument("--ablation-steps", type=int, default=20, help="0: no ablation")
    p.add_argument("--cache-runs", default="", metavar="MODEL:N", help="the run-length study (default: none)")
    p.add_argument("--converters", action="store_true",
                   help="also compare with onnxconverter-common's float16 converter at --ablation-steps")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-precision-"))
    cells, abl, runs, conv, kernels = [], [], [], [], {}
    models = [m for m in a.models.split(",") if m]
    for name in models:
        ref, wd, onnx = reference_model(work, name)
        for steps in [int(s) for s in a.steps.split(",") if s]:
            cells.append(cell(wd, onnx, ref, steps, a.samples_per_class, a.num_calib, log))
        if a.ablation_steps:
            abl += ablation(wd, onnx, ref, a.ablation_steps, a.samples_per_class, log)
        kernels[name] = bf16_kernels(onnx)
        if a.converters:
            conv += converters(wd, onnx, ref, a.ablation_steps or 20, a.samples_per_class, log)
    if a.cache_runs:
        name, steps = a.cache_runs.split(":")
        ref, wd, onnx = reference_model(work, name)
        for m in (1, 2, 3, 4):
            runs.append(cell(wd, onnx, ref, int(steps), a.samples_per_class, a.num_calib, log, max_consecutive=m))
    meta = {"command": "python tools/bench_precision.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {platform.system()}",
            "seconds": time.perf_counter() - t0, "spc": a.samples_per_class, "reused": len(REUSED)}
    body = render(cells, abl, runs, meta, conv, kernels)
    print(body)
    if a.out:
        write_section(a.out, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
