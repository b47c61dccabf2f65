"""report.html: self-contained, escaped, robust to degenerate calibration data."""
from __future__ import annotations

import base64
import html
import re

import numpy as np

from omnicache_export.report.page import ReportData, predicted_speedup, write_report

PNG_RE = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def test_example_report(tmp_path):
    data = ReportData.example()
    out = write_report(tmp_path / "OUT" / "report.html", data)
    assert out.exists()
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.rstrip().endswith("</html>")
    images = PNG_RE.findall(text)
    assert len(images) >= 5
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for c in data.candidates:
        assert f"{c['psnr_db']:.2f}" in text
    assert html.escape(data.schedule_name) in text  # '<=' is escaped
    assert html.escape(data.correction_name) in text
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert "plot failed" not in text
    assert "class='chosen'" in text
    assert out.stat().st_size < 2 * 1024 * 1024


def test_candidates_sorted_by_psnr(tmp_path):
    data = ReportData.example(n_steps=12, k=2, seed=1)
    text = write_report(tmp_path / "r.html", data).read_text()
    table = text[text.index("6. Candidates"):text.index("7. Speed")]
    shown = [float(x) for x in re.findall(r"<td class='n'>(-?[0-9.]+)</td><td class='n'>[^<]*</td><td>", table)]
    assert shown == sorted(shown, reverse=True) and len(shown) == len(data.candidates)


def test_degenerate_report(tmp_path):
    n = 3
    data = ReportData(
        model_name="tiny",
        n_steps=n,
        timesteps=np.array([999.0, 500.0, 0.0]),
        schedule_full=np.ones(n, bool),
        schedule_name="all-full",
        correction_name="none",
        projections=np.zeros((1, n + 1, 3)),
        curvature_mean=np.full(n + 1, np.nan),
        curvature_std=np.full(n + 1, np.nan),
        coefficients=np.zeros(n),
        gammas=np.full(n, np.nan),
        stages=np.array(["all"] * n),
        filter_params={},
        filter_masks={},
        candidates=[],
        speed={"cost_ratio": 0.1, "predicted_speedup": 1.0, "measured_speedup": None, "full_ms": 1.0, "cache_ms": 0.1},
        quality={"psnr_db_mean": float("inf"), "psnr_db_min": float("nan"), "rmse_mean": 0.0, "n_samples": 1},
    )
    text = write_report(tmp_path / "r.html", data).read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "no frequency filter (all-pass)" in text
    assert "not measured" in text
    assert "plot failed" not in text


def test_int_stages_and_lists(tmp_path):
    d = ReportData.example(n_steps=6, k=1)
    d.stages = [0, 0, 0, 1, 1, 1]
    d.timesteps = list(d.timesteps)
    d.schedule_full = [bool(x) for x in d.schedule_full]
    d.speed = {"cost_ratio": 0.05, "predicted_speedup": 1.5, "measured_speedup": 1.4}
    text = write_report(tmp_path / "r.html", d).read_text()
    assert "plot failed" not in text


def test_html_escaped(tmp_path):
    d = ReportData.example(n_steps=5, k=1)
    d.model_name = "<script>alert(1)</script>"
    d.notes = ["a & b <b>"]
    d.candidates[0]["schedule"] = "<img src=x>"
    text = write_report(tmp_path / "r.html", d).read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &amp; b &lt;b&gt;" in text
    assert "<img src=x>" not in text


def test_predicted_speedup():
    assert predicted_speedup(0.0, 0.1) == 1.0
    assert abs(predicted_speedup(0.5, 0.0) - 2.0) < 1e-12
    assert abs(predicted_speedup(0.5, 0.2) - 1 / 0.6) < 1e-12


# ------------------------------------------------------------------ labels and the stated setup (issue 9, item 8)

LONG = ["corrected-error-dp (runs<=2, p=0.25, last step cacheable)", "corrected-error-dp (runs<=2, p=0.5, last step cacheable)",
        "curvature-dp (runs<=2, last step cacheable)", "staleness-dp (runs<=2)"]
CORRECTIONS = ["cache trend, mix 0.5", "cache trend, mix 0.5, gamma=1.1", "gamma=1 + filters low0.25/high0.5 @8", "none"]


def _long_candidates() -> list[dict]:
    return [{"schedule": s, "correction": c, "n_full": 10, "n_cached": 10, "psnr_db": 30.0 + 0.37 * j, "rmse": 0.01,
             "chosen": j == 5} for j, (s, c) in enumerate((s, c) for s in LONG for c in CORRECTIONS)]


def test_candidate_labels_are_short_ids_the_table_explains(tmp_path):
    from omnicache_export.report.page import _plot_candidates, _sorted_candidates, cand_id

    data = ReportData.example()
    data.candidates = _long_candidates()
    cands = _sorted_candidates(data.candidates)
    fig = _plot_candidates(cands)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [cand_id(j) + (" ★" if c["chosen"] else "") for j, c in enumerate(cands)]
    assert all(len(label) <= 6 for label in labels)  # nothing to cut
    text = write_report(tmp_path / "r.html", data).read_text()
    assert "…" not in text
    table = text[text.index("6. Candidates"):text.index("7. Speed")]
    for j, c in enumerate(cands):  # the legend: each id with the whole schedule and correction name
        assert (f"<td class='n'>{cand_id(j)}</td><td>{html.escape(c['schedule'])}</td>"
                f"<td>{html.escape(c['correction'])}</td>") in table


def test_report_states_the_setup(tmp_path):
    data = ReportData.example(n_steps=12)
    text = write_report(tmp_path / "r.html", data).read_text()
    setup = text[text.index("<h2>Export</h2>"):text.index("1. Trajectory")]
    assert "<code>DDIMScheduler</code>" in setup and "steps_offset=1" in setup
    assert "<tr><th>steps</th><td>12</td></tr>" in setup
    assert "<tr><th>guidance scale</th><td>4</td></tr>" in setup
    assert "<th>precision</th><td>fp32" in setup and "onnxruntime/any/fp32" in setup
    stream = data.cut["streams"][0]
    for name in (stream["cache"], stream["entry"], stream["exit"]):
        assert f"<code>{html.escape(name)}</code>" in setup
    assert "[batch, 256, 1152]" in setup
    assert f"measured ({data.speed_method})" in text


def test_real_export_report(zoo_export, tmp_path):
    from omnicache_export.pipeline.job import SPEED_METHOD, ExportOptions, export
    from omnicache_export.runtime.manifest import read_manifest

    out = tmp_path / "out"
    export(zoo_export("dit", "torchscript"), out, ExportOptions(steps=6, num_calib=2, guidance_scale=1.5, progress=False))
    m = read_manifest(out)
    text = (out / "report.html").read_text()
    assert f"RMSE</div><div class='v'>{m.calibration.quality.rmse:.3g}<" in text  # the record's field, not "–"
    setup = text[text.index("<h2>Export</h2>"):text.index("1. Trajectory")]
    assert f"<code>{m.sampling.scheduler['_class_name']}</code>" in setup
    assert "<tr><th>steps</th><td>6</td></tr>" in setup and "<tr><th>guidance scale</th><td>1.5</td></tr>" in setup
    assert "<th>precision</th><td>fp32" in setup
    for tensor, stream in zip(m.model_io.cache_tensors, m.model_io.block_region.streams):
        assert f"<code>{html.escape(tensor.name)}</code>" in setup
        assert f"<code>{html.escape(stream.exit)}</code>" in setup
    assert f"measured ({html.escape(SPEED_METHOD)})" in text
    ideal = m.sampling.n_steps / m.schedule.n_full
    assert 0 < m.speed.measured_speedup <= ideal * 1.15  # medians of interleaved runs, not one noisy shot
