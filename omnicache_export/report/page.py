"""OUT/report.html: one self-contained page showing what calibration decided and why.

Everything is inline: CSS in a <style> block, plots as PNG data URIs, no JavaScript, no
external assets, so the file can be mailed or opened offline. Every piece of text that comes
from the data is passed through html.escape.

Plots are drawn with matplotlib's object API (matplotlib.figure.Figure rendered by the Agg
canvas), never through pyplot: no display is needed and the process-wide backend is left
alone (a caller in a notebook keeps its own). If matplotlib is not installed the page is still
written, with the tables and a note in place of the pictures.

Sections: header (model, steps, chosen schedule and correction, speedup, quality); the export
(scheduler, steps, guidance, precision, the block stack and the cut tensors); 1 trajectory projection; 2 curvature; 3 schedule strip; 4 gammas and coefficients with the
stages; 5 filter masks; 6 candidates; 7 speed; 8 notes.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from omnicache_export.runtime.manifest import Quality

__all__ = ["ReportData", "write_report", "predicted_speedup", "render_html"]

FIG_W, FIG_H, DPI = 6.0, 3.5, 100
FULL_COLOR = "#1f4e79"  # full step
CACHED_COLOR = "#f0a04b"  # cached step
CHOSEN_COLOR = "#d1495b"
STAGE_COLORS = {"low": "#dbe9f6", "high": "#fbe3d0", "all": "#eeeeee"}
STAGE_DESCR = {"low": "early stage (low-pass)", "high": "late stage (high-pass)", "all": "all-pass"}


@dataclasses.dataclass
class ReportData:
    """What the report shows. Arrays may be lists; lengths are checked when plotting.

    Step i = 0 .. N-1 in sampling order; trajectory points x_0 .. x_N (x_i enters step i).
    """

    model_name: str
    n_steps: int
    timesteps: np.ndarray  # [N]
    schedule_full: np.ndarray  # [N] bool, True = full step
    schedule_name: str
    correction_name: str
    projections: np.ndarray  # [K, N+1, 3]
    curvature_mean: np.ndarray  # [N+1], NaN at the endpoints
    curvature_std: np.ndarray  # [N+1]
    coefficients: np.ndarray  # [N], 0 at full steps
    gammas: np.ndarray  # [N], NaN where no correction
    stages: np.ndarray  # [N] "low" | "high" | "all" (or 0 = low, 1 = high)
    filter_params: dict
    filter_masks: dict  # name -> [h, w] mask in np.fft.fft2 layout (DC at [0, 0])
    candidates: list  # of {"schedule","correction","n_full","n_cached","psnr_db","rmse","chosen"}
    speed: dict  # {"cost_ratio","predicted_speedup","measured_speedup"|None,"full_ms","cache_ms"}
    # The manifest's quality record. A mapping is read by the record's field names (its other keys
    # are listed under "Quality, more"), so the page and the manifest cannot name a field differently.
    quality: Quality | Mapping[str, Any]
    notes: list = dataclasses.field(default_factory=list)
    n_samples: int | None = None  # calibration samples the quality was measured on
    # What was exported, as the manifest states it (empty: not shown). sampling: the manifest's
    # `sampling` record (scheduler config, n_steps, guidance_scale ...); engines: engine keys
    # ("onnxruntime/any/fp32"); cut: {"method", "n_blocks", "streams": [{"cache", "dtype", "shape",
    # "entry", "exit"}]} from `model_io.block_region` and `model_io.cache_tensors`.
    sampling: dict = dataclasses.field(default_factory=dict)
    engines: list = dataclasses.field(default_factory=list)
    cut: dict = dataclasses.field(default_factory=dict)
    speed_method: str | None = None  # how measured_speedup was measured ("median of 3 interleaved runs")
    # The manifest's `calibration.cost` record as JSON (None: not recorded), and the run limit
    # ("2", "3 (auto)").
    cost: Mapping[str, Any] | None = None
    max_consecutive: str = ""

    @classmethod
    def example(cls, n_steps: int = 20, k: int = 3, seed: int = 0) -> "ReportData":
        """EXAMPLE data, fabricated for tests and previews; not a calibration result."""
        from omnicache_export.calibration.filters import butterworth_mask

        rng = np.random.default_rng(seed)
        n = int(n_steps)
        timesteps = np.linspace(999, 0, n).round()
        s = np.linspace(0.0, 1.0, n + 1)
        proj = []
        for _ in range(k):
            a = 2.5 + 0.3 * rng.standard_normal()
            p = np.stack([(1 - s) * np.cos(a * s), (1 - s) * np.sin(a * s), 0.6 * s**2], axis=1)
            p += 0.01 * rng.standard_normal(p.shape)
            proj.append(p - p.mean(axis=0))
        projections = np.array(proj)
        kappa = np.array([_menger(p) for p in projections])
        kmean, kstd = np.full(n + 1, np.nan), np.full(n + 1, np.nan)
        kmean[1:-1], kstd[1:-1] = kappa[:, 1:-1].mean(axis=0), kappa[:, 1:-1].std(axis=0)
        # schedule: full at 0, at every third step, and at the last step (runs of <= 2 cached)
        full = np.array([i % 3 == 0 for i in range(n)])
        full[0] = full[-1] = True
        boundary = max(1, int(round(0.75 * n)))
        stages = np.array(["low" if i < boundary else "high" for i in range(n)])
        gammas = np.where(full, np.nan, 1.0 + 0.05 * rng.standard_normal(n))
        coefficients = np.where(full, 0.0, gammas * (0.4 + 0.2 * rng.random(n)))
        n_cached = int((~full).sum())
        full_ms, cache_ms = 12.0, 0.7
        c = cache_ms / full_ms
        pred = predicted_speedup(n_cached / n, c)
        names = [
            ("curvature-dp (runs<=2)", "gamma=1"),
            ("curvature-dp (runs<=2)", "fitted gamma x0.9"),
            ("curvature-dp (runs<=2)", f"gamma=1 + filters low0.25/high0.5 @{boundary}"),
            ("alternating", "gamma=1"),
            ("uniform (FORA)", "gamma=1"),
            ("curvature-dp (runs<=3)", "gamma=1"),
        ]
        psnrs = [44.1, 43.2, 45.3, 41.8, 38.9, 40.2]
        candidates = [
            {
                "schedule": sc,
                "correction": co,
                "n_full": n - n_cached,
                "n_cached": n_cached,
                "psnr_db": p + 0.1 * rng.standard_normal(),
                "rmse": 10 ** (-p / 20) * 2,
                "chosen": j == 2,
            }
            for j, ((sc, co), p) in enumerate(zip(names, psnrs))
        ]
        return cls(
            model_name="EXAMPLE dit-s2 (fabricated)",
            n_steps=n,
            timesteps=timesteps,
            schedule_full=full,
            schedule_name=names[2][0],
            correction_name=names[2][1],
            projections=projections,
            curvature_mean=kmean,
            curvature_std=kstd,
            coefficients=coefficients,
            gammas=gammas,
            stages=stages,
            filter_params={"boundary": boundary, "low_rho": 0.25, "high_rho": 0.5, "order": 2},
            filter_masks={
                "early: low-pass rho=0.25": butterworth_mask(16, 16, 0.25, 2, "low"),
                "late: high-pass rho=0.5": butterworth_mask(16, 16, 0.5, 2, "high"),
            },
            candidates=candidates,
            speed={
                "cost_ratio": c,
                "predicted_speedup": pred,
                "measured_speedup": pred * 0.93,
                "full_ms": full_ms,
                "cache_ms": cache_ms,
            },
            quality=Quality(psnr_db_mean=45.3, psnr_db_min=41.7, rmse=0.011),
            notes=["EXAMPLE report: all numbers were fabricated by ReportData.example()."],
            n_samples=k,
            sampling={"scheduler": {"_class_name": "DDIMScheduler", "steps_offset": 1, "clip_sample": False},
                      "n_steps": n, "guidance_scale": 4.0, "timestep_scale": 1.0, "latent": "hidden_states",
                      "latent_shape": [4, 32, 32], "latent_dtype": "float32", "learned_sigma": True},
            engines=["onnxruntime/any/fp32"],
            cut={"method": "module scopes (torchscript)", "n_blocks": 28,
                 "streams": [{"cache": "omnicache_cache", "dtype": "FLOAT", "shape": ["batch", 256, 1152],
                              "entry": "/pos_embed/Add_output_0", "exit": "/transformer_blocks.27/Add_3_output_0"}]},
            speed_method="median of 3 interleaved runs (EXAMPLE)",
        )


def _menger(p: np.ndarray) -> np.ndarray:
    """Menger curvature at the interior points of a polyline p [M, 3]; NaN at the ends."""
    out = np.full(len(p), np.nan)
    if len(p) < 3:
        return out
    a, b, c = p[:-2], p[1:-1], p[2:]
    area2 = np.linalg.norm(np.cross(b - a, c - b), axis=1)  # twice the triangle area
    den = np.linalg.norm(b - a, axis=1) * np.linalg.norm(c - b, axis=1) * np.linalg.norm(c - a, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[1:-1] = np.where(den > 0, 2 * area2 / den, 0.0)
    return out


def predicted_speedup(cached_fraction: float, cost_ratio: float) -> float:
    """1 / (1 - f + f c): f = share of cached steps, c = cache step cost / full step cost."""
    f, c = float(cached_fraction), float(cost_ratio)
    den = 1.0 - f + f * c
    return 1.0 / den if den > 0 else math.inf


# ----------------------------------------------------------------------------- formatting

def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def _fmt(x: Any, spec: str = ".4g", suffix: str = "") -> str:
    """A number for the page (already escaped); '–' for None/NaN, the escaped text for others."""
    if x is None:
        return "&ndash;"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x)}{_esc(suffix)}"
    v = _num(x)
    if v is None:
        return _esc(x)
    if math.isnan(v):
        return "&ndash;"
    if math.isinf(v):
        return ("&infin;" if v > 0 else "&minus;&infin;") + _esc(suffix)
    return f"{v:{spec}}{_esc(suffix)}"


def _arr(x: Any, dtype=float) -> np.ndarray:
    if x is None:
        return np.zeros(0, dtype=dtype)
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        return np.zeros(0, dtype=dtype)


def _stage_labels(stages: Any, n: int) -> list[str]:
    """Normalise stage labels to 'low' | 'high' | 'all' (ints: 0 = low/early, 1 = high/late)."""
    out = []
    raw = list(np.asarray(stages).ravel()) if stages is not None else []
    for i in range(n):
        v = raw[i] if i < len(raw) else "all"
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            out.append({0: "low", 1: "high"}.get(int(v), "all"))
        else:
            sv = str(v).strip().lower()
            out.append(sv if sv in STAGE_COLORS else "all")
    return out


def _quality(d: ReportData) -> tuple[Quality, int | None, dict]:
    """(quality record, samples, other keys of a quality mapping)."""
    if isinstance(d.quality, Quality):
        return d.quality, d.n_samples, {}
    given = dict(d.quality or {})
    fields = dataclasses.fields(Quality)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    optional = [f.name for f in fields if f.default is not dataclasses.MISSING]
    n_samples = given.pop("n_samples", d.n_samples)
    values = {k: given.pop(k, None) for k in required} | {k: given.pop(k) for k in optional if k in given}
    return Quality(**values), n_samples, given


def _kv_table(d: dict, cls: str = "kv") -> str:
    if not d:
        return "<p class='muted'>(none)</p>"
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f"<table class='{cls}'>{rows}</table>"


# ----------------------------------------------------------------------------- plotting

def _new_figure(w: float = FIG_W, h: float = FIG_H):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f"<img src='{uri}' alt='{_esc(alt)}'>"


def _plot_trajectory(d: ReportData, full: np.ndarray):
    proj = _arr(d.projections)
    if proj.ndim == 2:
        proj = proj[None]
    if proj.ndim != 3 or proj.shape[0] == 0 or proj.shape[1] < 2 or proj.shape[2] < 2:
        return None
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)
    from matplotlib.lines import Line2D

    if proj.shape[2] == 2:
        proj = np.concatenate([proj, np.zeros(proj.shape[:2] + (1,))], axis=2)
    fig = _new_figure(FIG_W, 4.5)
    ax = fig.add_subplot(projection="3d")
    m = proj.shape[1]  # N + 1 points
    steps = np.arange(m - 1)
    is_full = np.array([bool(full[i]) if i < len(full) else True for i in steps])
    colors = [f"C{j % 10}" for j in range(proj.shape[0])]
    for j, p in enumerate(proj):
        ax.plot(p[:, 0], p[:, 1], p[:, 2], color=colors[j], lw=1.2, alpha=0.8)
        pf, pc = p[:-1][is_full], p[:-1][~is_full]
        ax.scatter(pf[:, 0], pf[:, 1], pf[:, 2], marker="o", s=18, color=FULL_COLOR, depthshade=False)
        ax.scatter(pc[:, 0], pc[:, 1], pc[:, 2], marker="x", s=22, color=CACHED_COLOR, depthshade=False)
        ax.scatter(*p[-1], marker="*", s=70, color="black", depthshade=False)
        if j == 0:
            ax.text(*p[0], "  start x0", fontsize=8)
            ax.text(*p[-1], "  end xN", fontsize=8)
    ax.set_xlabel("PC1", fontsize=8)
    ax.set_ylabel("PC2", fontsize=8)
    ax.set_zlabel("PC3", fontsize=8)
    ax.tick_params(labelsize=6)
    handles = [
        Line2D([], [], marker="o", ls="", color=FULL_COLOR, label="full step"),
        Line2D([], [], marker="x", ls="", color=CACHED_COLOR, label="cached step"),
        Line2D([], [], marker="*", ls="", color="black", ms=9, label="end x_N"),
    ]
    handles += [Line2D([], [], color=c, label=f"sample {j}") for j, c in enumerate(colors[:6])]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title("trajectory x_0..x_N, 3-D PCA per sample", fontsize=9)
    return fig


def _shade_cached(ax, full: np.ndarray, label: bool = True):
    first = True
    for i, f in enumerate(full):
        if not f:
            ax.axvspan(i - 0.5, i + 0.5, color=CACHED_COLOR, alpha=0.25, lw=0,
                       label="cached step" if (first and label) else None)
            first = False


def _plot_curvature(d: ReportData, full: np.ndarray):
    mean = _arr(d.curvature_mean).ravel()
    if mean.size == 0 or not np.isfinite(mean).any():
        return None
    std = _arr(d.curvature_std).ravel()
    if std.shape != mean.shape:
        std = np.full_like(mean, np.nan)
    from matplotlib.ticker import MaxNLocator

    x = np.arange(mean.size)
    fig = _new_figure()
    ax = fig.add_subplot()
    _shade_cached(ax, full)
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.25, lw=0, label="mean ± std")
    ax.plot(x, mean, "o-", color="C0", ms=3, lw=1.2, label="mean curvature")
    ax.set_xlim(-0.6, mean.size - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("point / step i", fontsize=8)
    ax.set_ylabel("Menger curvature κ_i", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("curvature of the 3-D trajectory (over samples)", fontsize=9)
    return fig


def _sparse_ticks(n: int, max_labels: int = 10) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, dtype=int)
    stride = max(1, int(math.ceil(n / max_labels)))
    ticks = list(range(0, n, stride))
    if ticks[-1] != n - 1 and (n - 1 - ticks[-1]) >= stride / 2:
        ticks.append(n - 1)
    return np.array(ticks)


def _tick_label(i: int, ts: np.ndarray) -> str:
    if i < len(ts) and np.isfinite(ts[i]):
        return f"{i}\n{ts[i]:.4g}"
    return f"{i}"


def _plot_schedule(d: ReportData, full: np.ndarray):
    n = len(full)
    if n == 0:
        return None
    from matplotlib.patches import Patch

    ts = _arr(d.timesteps).ravel()
    fig = _new_figure(FIG_W, 1.7)
    ax = fig.add_subplot()
    for i, f in enumerate(full):
        ax.bar(i, 1.0, width=1.0, bottom=0.0, color=FULL_COLOR if f else CACHED_COLOR,
               edgecolor="white", lw=0.8)
        if n <= 60:
            ax.text(i, 0.5, "F" if f else "C", ha="center", va="center", fontsize=7 if n > 30 else 8,
                    color="white" if f else "black")
    ticks = _sparse_ticks(n)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_tick_label(int(i), ts) for i in ticks], fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step i / timestep t_i", fontsize=8)
    ax.legend(handles=[Patch(color=FULL_COLOR, label="F full"), Patch(color=CACHED_COLOR, label="C cached")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"schedule: {int(full.sum())} full, {int((~full).sum())} cached of {n}", fontsize=9)
    return fig


def _plot_corrections(d: ReportData, full: np.ndarray, stages: list[str]):
    n = len(full)
    if n == 0:
        return None
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    coef = _arr(d.coefficients).ravel()
    gam = _arr(d.gammas).ravel()
    fig = _new_figure(FIG_W, 4.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for ax in (ax1, ax2):
        for i, st in enumerate(stages):
            ax.axvspan(i - 0.5, i + 0.5, color=STAGE_COLORS[st], lw=0, zorder=0)
        ax.grid(alpha=0.3, zorder=1)
        ax.tick_params(labelsize=7)
    x = np.arange(n)
    if coef.size:
        m = min(n, coef.size)
        cols = [FULL_COLOR if full[i] else CACHED_COLOR for i in range(m)]
        ax1.bar(x[:m], np.nan_to_num(coef[:m]), color=cols, width=0.7, zorder=2)
    ax1.axhline(0, color="black", lw=0.6)
    ax1.set_ylabel("coefficient", fontsize=8)
    ax1.set_title("correction per step (background: stage)", fontsize=9)
    if gam.size and np.isfinite(gam).any():
        m = min(n, gam.size)
        ok = np.isfinite(gam[:m])
        xs, ys = x[:m][ok], gam[:m][ok]
        ax2.vlines(xs, 1.0, ys, color="C3", lw=1.2, zorder=2)
        ax2.plot(xs, ys, "o", color="C3", ms=4, zorder=3)
        ax2.axhline(1.0, color="black", lw=0.6, ls="--")
    else:
        ax2.text(0.5, 0.5, "no gamma (no correction at any step)", transform=ax2.transAxes,
                 ha="center", va="center", fontsize=8, color="gray")
    ax2.set_ylabel("gamma", fontsize=8)
    ax2.set_xlabel("step i", fontsize=8)
    ax2.set_xlim(-0.5, n - 0.5)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    present = [s for s in ("low", "high", "all") if s in stages]
    handles = [Patch(color=STAGE_COLORS[s], label=STAGE_DESCR[s]) for s in present]
    handles += [Patch(color=FULL_COLOR, label="full step"), Patch(color=CACHED_COLOR, label="cached step")]
    ax1.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _plot_masks(d: ReportData):
    masks = [(str(k), _arr(v)) for k, v in (d.filter_masks or {}).items()]
    masks = [(k, v) for k, v in masks if v.ndim == 2 and v.size > 0]
    if not masks:
        return None
    nm = len(masks)
    fig = _new_figure(min(2.6 * nm, 12.0) + 0.6, 2.8)
    axes = fig.subplots(1, nm, squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, masks):
        h, w = m.shape
        # fftshift puts frequency bin -(n // 2) first and DC at index n // 2
        im = ax.imshow(np.fft.fftshift(m), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower",
                       extent=(-(w // 2) - 0.5, (w - 1) // 2 + 0.5, -(h // 2) - 0.5, (h - 1) // 2 + 0.5))
        ax.set_title(name if len(name) <= 32 else name[:30] + "…", fontsize=8)
        ax.set_xlabel(f"fx bin ({h}x{w}, DC at centre)", fontsize=7)
        ax.set_ylabel("fy bin", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=list(axes), fraction=0.046 / max(1, nm) * 2, pad=0.04).ax.tick_params(labelsize=6)
    return fig


def _sorted_candidates(cands: list) -> list[dict]:
    def key(c):
        v = _num(c.get("psnr_db"))
        return (0 if v is not None and not math.isnan(v) else 1, -(v if v is not None and not math.isnan(v) else 0))

    return sorted([c for c in (cands or []) if isinstance(c, dict)], key=key)


def cand_id(index: int) -> str:
    """The short id of the candidate in row `index` (0-based) of the report's candidate table: the
    bar chart is labelled with it, and the table is its legend (full names are too long for a label)."""
    return f"#{index + 1}"


def _plot_candidates(cands: list[dict], max_rows: int = 30):
    rows = [(cand_id(j), c, _num(c.get("psnr_db"))) for j, c in enumerate(cands)]
    rows = [(k, c, v) for k, c, v in rows if v is not None and math.isfinite(v)][:max_rows]
    if not rows:
        return None
    nr = len(rows)
    fig = _new_figure(FIG_W, max(1.6, 0.22 * nr + 0.9))
    ax = fig.add_subplot()
    y = np.arange(nr)
    vals = np.array([v for _, _, v in rows])
    cols = [CHOSEN_COLOR if c.get("chosen") else "#7a9cc6" for _, c, _ in rows]
    ax.barh(y, vals, color=cols)
    ax.set_yticks(y)
    ax.set_yticklabels([k + (" ★" if c.get("chosen") else "") for k, c, _ in rows], fontsize=7)
    ax.set_ylabel("candidate (# in the table)", fontsize=8)
    rows = [(c, v) for _, c, v in rows]
    ax.invert_yaxis()
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(1.0, 0.15 * (hi - lo))
    ax.set_xlim(max(0.0, lo - pad) if lo > 0 else lo - pad, hi + 2.5 * pad)  # room for the value labels
    counts = len({(c.get("n_full"), c.get("n_cached")) for c, _ in rows}) > 1  # the step counts, where they differ
    for yi, (c, v) in zip(y, rows):
        steps = f"  {c.get('n_full', '?')}F/{c.get('n_cached', '?')}C" if counts else ""
        ax.text(v, yi, f" {v:.2f}{steps}", va="center", fontsize=7)
    ax.set_xlabel("PSNR vs full sampling (dB), higher is better", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("calibration candidates (chosen in red)", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:980px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:.4em 0 .2em} h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #ccd;padding-bottom:3px}
section{background:#fff;border:1px solid #e0e3e8;border-radius:6px;padding:8px 16px 14px;margin:14px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #e0e3e8;border-radius:6px;padding:8px 12px;min-width:140px}
.card .v{font-size:1.25em;font-weight:600} .card .k{font-size:.8em;color:#667}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:.9em;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left} th{background:#f0f2f6}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#fde2e4;font-weight:600}
.muted{color:#778} .caption{font-size:.85em;color:#556;margin:2px 0 8px}
.warn{background:#fff6d8;border-left:4px solid #e0b000;padding:4px 10px;margin:4px 0;list-style:none}
code{background:#eef;padding:0 3px;border-radius:3px}
"""


def _figure_html(make: Callable[[], Any], alt: str, caption: str, empty: str, state: dict) -> str:
    """Render one plot (or say why there is none); a failing plot never fails the report."""
    if not state["mpl"]:
        return f"<p class='muted'>(plot omitted: matplotlib is not available)</p><p class='caption'>{_esc(caption)}</p>"
    try:
        fig = make()
    except Exception as exc:  # keep the rest of the report
        return f"<p class='warn'>plot failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"
    if fig is None:
        return f"<p class='muted'>{_esc(empty)}</p>"
    try:
        uri = _png_uri(fig)
    except Exception as exc:
        return f"<p class='warn'>plot failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"
    return _img(uri, alt) + f"<p class='caption'>{_esc(caption)}</p>"


def _scheduler_text(config: Any) -> tuple[str, str]:
    """(class name, its other settings as `key=value, ...`) of a diffusers scheduler config."""
    if not isinstance(config, Mapping):
        return str(config) if config else "–", ""
    name = str(config.get("_class_name", "?"))
    rest = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in config.items() if not str(k).startswith("_"))
    return name, rest


def _setup_html(d: ReportData) -> str:
    """What was exported and sampled: scheduler, steps, guidance, precision, the cut tensors."""
    s, cut = dict(d.sampling or {}), dict(d.cut or {})
    if not s and not cut and not d.engines:
        return ""
    rows = []

    def row(k: str, v_html: str) -> None:
        rows.append(f"<tr><th>{_esc(k)}</th><td>{v_html}</td></tr>")

    if s:
        name, rest = _scheduler_text(s.get("scheduler"))
        row("scheduler", f"<code>{_esc(name)}</code>" + (f" <span class='muted'>({_esc(rest)})</span>" if rest else ""))
        row("steps", _fmt(s.get("n_steps", d.n_steps)))
        g = _num(s.get("guidance_scale"))
        row("guidance scale", _fmt(g, ".4g") + ("" if g is None or g != 1.0 else " (no guidance)"))
        if _num(s.get("timestep_scale")) not in (None, 1.0):
            row("timestep scale", _fmt(s.get("timestep_scale"), ".4g"))
        latent = s.get("latent")
        if latent is not None:
            shape = "×".join(str(x) for x in s.get("latent_shape") or [])
            row("latent", f"<code>{_esc(latent)}</code> {_esc(shape)} {_esc(s.get('latent_dtype', ''))}"
                + (", learned sigma" if s.get("learned_sigma") else ""))
    if d.engines:
        precisions = sorted({str(k).rsplit("/", 1)[-1] for k in d.engines})
        row("precision", _esc(", ".join(precisions))
            + f" <span class='muted'>(engines: {_esc(', '.join(str(k) for k in d.engines))})</span>")
    if cut:
        blocks = cut.get("n_blocks")
        row("block stack", _esc(cut.get("method", "?")) + (f", {_fmt(blocks)} blocks" if blocks is not None else ""))
    out = "<section><h2>Export</h2><table class='kv'>" + "".join(rows) + "</table>"
    streams = list(cut.get("streams") or [])
    if streams:
        out += ("<p>cut tensors: the cache graph skips the block stack between each stream's entry h_0 and "
                "exit h_L and reads the cache tensor instead</p><table><tr><th>cache tensor</th><th>dtype</th>"
                "<th>shape</th><th>stack entry (h_0)</th><th>stack exit (h_L)</th></tr>")
        for st in streams:
            shape = "[" + ", ".join(str(x) for x in st.get("shape") or []) + "]"
            entry = st.get("entry")
            out += (f"<tr><td><code>{_esc(st.get('cache', ''))}</code></td><td>{_esc(st.get('dtype', ''))}</td>"
                    f"<td>{_esc(shape)}</td><td>{'<code>' + _esc(entry) + '</code>' if entry else '(none: h_L itself is cached)'}"
                    f"</td><td><code>{_esc(st.get('exit', ''))}</code></td></tr>")
        out += "</table>"
    return out + "</section>"


def _card(k: str, v_html: str) -> str:
    return f"<div class='card'><div class='k'>{_esc(k)}</div><div class='v'>{v_html}</div></div>"


def render_html(data: ReportData) -> str:
    """The whole page as a string."""
    d = data
    try:
        import matplotlib  # noqa: F401

        state = {"mpl": True}
    except ImportError:
        state = {"mpl": False}

    full = _arr(d.schedule_full, dtype=bool).ravel()
    n = len(full)
    stages = _stage_labels(d.stages, n)
    n_full, n_cached = int(full.sum()), int((~full).sum())
    speed = dict(d.speed or {})
    quality, n_samples, q_extra = _quality(d)
    c = _num(speed.get("cost_ratio"))
    f = n_cached / n if n else 0.0
    pred_formula = predicted_speedup(f, c) if c is not None and not math.isnan(c) else None
    pred = speed.get("predicted_speedup", pred_formula)
    measured = speed.get("measured_speedup")
    cands = _sorted_candidates(d.candidates)

    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>")
    add("<meta name='viewport' content='width=device-width, initial-scale=1'>")
    add(f"<title>OmniCache report: {_esc(d.model_name)}</title><style>{_CSS}</style></head><body><main>")

    # header
    add(f"<h1>OmniCache calibration report</h1><p>model <code>{_esc(d.model_name)}</code>, "
        f"{_fmt(int(d.n_steps) if _num(d.n_steps) is not None else d.n_steps)} sampling steps</p>")
    add("<div class='cards'>")
    add(_card("schedule", _esc(d.schedule_name)))
    add(_card("correction", _esc(d.correction_name)))
    add(_card("full / cached steps", f"{n_full} / {n_cached}"))
    add(_card("predicted speedup", _fmt(pred, ".2f", "×")))
    add(_card("measured speedup", _fmt(measured, ".2f", "×") if measured is not None else "not measured"))
    if quality.validation:
        held = "held-out samples" if quality.validation == "split" else "fresh seeds"
        add(_card(f"PSNR on {held} (expect this)",
                  f"{_fmt(quality.validation_psnr_db, '.2f')} / {_fmt(quality.validation_psnr_min_db, '.2f')} dB "
                  f"({quality.validation_samples} samples)"))
    add(_card("PSNR mean / min, samples that chose", f"{_fmt(quality.psnr_db_mean, '.2f')} / {_fmt(quality.psnr_db_min, '.2f')} dB"))
    add(_card("RMSE", _fmt(quality.rmse, ".3g")))
    add(_card("samples", _fmt(n_samples)))
    if d.max_consecutive:
        add(_card("longest run limit", _esc(d.max_consecutive)))
    if d.cost:
        c = d.cost
        how = "successive halving" if c.get("halving") else "exhaustive"
        add(_card(f"scoring cost ({how})", f"{_fmt(c.get('scoring_evaluations'))} of {_fmt(c.get('exhaustive_evaluations'))} "
                  f"evaluations, {_fmt(c.get('scoring_seconds'), '.1f')} s"))
    add("</div>")
    if d.notes:
        add(f"<p class='warn'>{len(d.notes)} note(s), see <a href='#notes'>Notes</a>.</p>")
    add(_setup_html(d))

    # 1 trajectory
    add("<section><h2>1. Trajectory (3-D PCA projection)</h2>")
    add(_figure_html(lambda: _plot_trajectory(d, full), "trajectory projection",
                     "Each calibration trajectory x_0..x_N projected on its own first three principal "
                     "components. A point x_i is marked by the step taken from it: circle = full step, "
                     "cross = cached step; the star is the final latent x_N.",
                     "no trajectory data", state))
    add("</section>")

    # 2 curvature
    add("<section><h2>2. Curvature per step</h2>")
    add(_figure_html(lambda: _plot_curvature(d, full), "curvature per step",
                     "Menger curvature of the projected trajectory at each interior point (how much the "
                     "sampling direction turns at step i), mean ± std over samples; undefined at the "
                     "endpoints. Shaded steps are cached: the schedule caches where the turn is small.",
                     "no curvature data", state))
    add("</section>")

    # 3 schedule
    add("<section><h2>3. Schedule</h2>")
    add(_figure_html(lambda: _plot_schedule(d, full), "schedule strip",
                     "F = full step (runs the whole model, refreshes the cache), C = cached step (reuses the "
                     "last full step's block residual). Tick labels: step index over timestep.",
                     "empty schedule", state))
    pattern = "".join("F" if x else "C" for x in full)
    add(f"<p>pattern <code>{_esc(pattern)}</code> ({_esc(d.schedule_name)})</p>")
    add("</section>")

    # 4 corrections
    add("<section><h2>4. Correction: gammas and coefficients</h2>")
    add(f"<p>chosen correction: <b>{_esc(d.correction_name)}</b></p>")
    add(_figure_html(lambda: _plot_corrections(d, full, stages), "gammas and coefficients",
                     "Top: correction coefficient per step (0 at full steps). Bottom: gamma per step "
                     "(absent where no correction applies; dashed line gamma = 1). Background colour: "
                     "the stage of each step.",
                     "no steps", state))
    add("</section>")

    # 5 filters
    add("<section><h2>5. Frequency filter</h2>")
    add(_kv_table(dict(d.filter_params or {})) if d.filter_params else "")
    has_masks = any(_arr(v).ndim == 2 and _arr(v).size for v in (d.filter_masks or {}).values())
    if has_masks:
        add(_figure_html(lambda: _plot_masks(d), "filter masks",
                         "Filter masks M (gain per spatial frequency, 0..1), shown fftshifted so the low "
                         "frequencies (DC) are at the centre and the highest at the edges.",
                         "no frequency filter (all-pass)", state))
    else:
        add("<p>no frequency filter (all-pass)</p>")
    add("</section>")

    # 6 candidates
    add("<section><h2>6. Candidates</h2>")
    if cands:
        add("<table><tr><th>#</th><th>schedule</th><th>correction</th><th>full</th><th>cached</th>"
            "<th>PSNR (dB)</th><th>RMSE</th><th>chosen</th></tr>")
        for j, cd in enumerate(cands):
            cls = " class='chosen'" if cd.get("chosen") else ""
            add(f"<tr{cls}><td class='n'>{cand_id(j)}</td><td>{_esc(cd.get('schedule', ''))}</td>"
                f"<td>{_esc(cd.get('correction', ''))}</td><td class='n'>{_fmt(cd.get('n_full'))}</td>"
                f"<td class='n'>{_fmt(cd.get('n_cached'))}</td><td class='n'>{_fmt(cd.get('psnr_db'), '.2f')}</td>"
                f"<td class='n'>{_fmt(cd.get('rmse'), '.3g')}</td><td>{'✔' if cd.get('chosen') else ''}</td></tr>")
        add("</table><p class='caption'>Sorted by PSNR against full sampling on the calibration samples; "
            "the chosen row is highlighted.</p>")
        add(_figure_html(lambda: _plot_candidates(cands), "candidate PSNR",
                         "PSNR per candidate (at most 30 shown), labelled by its # in the table above "
                         "(and its full / cached step counts where they differ); chosen candidate in red (★).",
                         "no finite PSNR to plot", state))
    else:
        add("<p class='muted'>no candidates were recorded</p>")
    add("</section>")

    # 7 speed
    add("<section><h2>7. Speed</h2><table>")
    add(f"<tr><th>full step</th><td class='n'>{_fmt(speed.get('full_ms'), '.3g', ' ms')}</td></tr>")
    add(f"<tr><th>cached step</th><td class='n'>{_fmt(speed.get('cache_ms'), '.3g', ' ms')}</td></tr>")
    add(f"<tr><th>cost ratio c (cached / full)</th><td class='n'>{_fmt(c, '.3f')}</td></tr>")
    add(f"<tr><th>cached fraction f</th><td class='n'>{n_cached}/{n} = {_fmt(f, '.3f')}</td></tr>")
    add(f"<tr><th>predicted 1 / (1 &minus; f + f&middot;c)</th><td class='n'>{_fmt(pred_formula, '.2f', '×')}</td></tr>")
    if pred is not None and pred_formula is not None and _num(pred) is not None and \
            abs(float(_num(pred)) - pred_formula) > 5e-3 * max(1.0, pred_formula):
        add(f"<tr><th>predicted (as reported by calibration)</th><td class='n'>{_fmt(pred, '.2f', '×')}</td></tr>")
    how = f" ({_esc(d.speed_method)})" if d.speed_method and measured is not None else ""
    add(f"<tr><th>measured{how}</th><td class='n'>{_fmt(measured, '.2f', '×') if measured is not None else 'not measured'}</td></tr>")
    if n:
        add(f"<tr><th>ideal (cached steps free)</th><td class='n'>{_fmt(predicted_speedup(f, 0.0), '.2f', '×')}</td></tr>")
    add("</table>")
    extra = {k: v for k, v in speed.items()
             if k not in ("cost_ratio", "predicted_speedup", "measured_speedup", "full_ms", "cache_ms")}
    if extra:
        add(_kv_table(extra))
    add("</section>")

    # 8 notes
    add("<section id='notes'><h2>8. Notes</h2>")
    if d.notes:
        add("<ul style='padding-left:0'>" + "".join(f"<li class='warn'>{_esc(x)}</li>" for x in d.notes) + "</ul>")
    else:
        add("<p class='muted'>no warnings</p>")
    if not state["mpl"]:
        add("<p class='warn'>matplotlib is not installed: plots were omitted.</p>")
    add("</section>")
    if q_extra:
        add("<section><h2>Quality, more</h2>" + _kv_table(q_extra) + "</section>")
    add("<p class='caption'>Generated by omnicache-export.</p></main></body></html>\n")
    return "".join(parts)


def write_report(path: str | os.PathLike, data: ReportData) -> Path:
    """Write the page to path (parents created, replaced atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
