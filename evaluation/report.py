"""Static HTML reports of an evaluation (self-contained folder: report.html + renders/)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from know3d.evaluation.results import flat_metrics, order_metrics, uid_filename

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
.row{display:flex;gap:6px;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #eee}
.row figure{margin:0;text-align:center;font-size:12px}
.row img{width:180px;height:180px;object-fit:contain;background:#fff;border:1px solid #ddd}
.err{color:#b00020}.meta{font-size:12px;color:#555;max-width:360px}
"""

_THUMB = 256


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return html.escape(str(value))


def _thumbnail(src: str | None, dest: Path, max_pixels: int) -> str | None:
    """Copy a bounded, downsized copy of an input image next to the report (None if unusable)."""
    if not src:
        return None
    try:
        with Image.open(src) as img:
            if img.size[0] * img.size[1] > max_pixels:
                return None
            img.thumbnail((_THUMB, _THUMB))
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.convert("RGBA").save(dest)
    except Exception:  # noqa: BLE001 - the report shows a blank cell instead
        return None
    return f"renders/{dest.name}"


def _summary_tables(summary: Any) -> list[str]:
    out = ["<h2>Summary</h2><table>"]
    for key in ("total", "ok", "errors", "missing"):
        out.append(f"<tr><th class=l>{key}</th><td>{getattr(summary, key)}</td></tr>")
    out.append(f"<tr><th class=l>seconds</th><td>{summary.seconds:.1f}</td></tr></table>")
    out.append(
        "<h2>Metrics (mean over evaluated uids)</h2><table><tr><th class=l>metric</th><th>mean</th><th>std</th><th>n</th></tr>"
    )
    for key in order_metrics(list(summary.table)):
        t = summary.table[key]
        out.append(
            f"<tr><td class=l>{html.escape(key)}</td><td>{_fmt(t['mean'])}</td><td>{_fmt(t['std'])}</td><td>{t['count']}</td></tr>"
        )
    out.append("</table>")
    if summary.skipped:
        out.append("<h3>Skipped metrics</h3><ul>")
        out.extend(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in summary.skipped.items())
        out.append("</ul>")
    if any(summary.unmatched.values()):
        out.append("<h3>Unmatched uids</h3><ul>")
        for kind, uids in summary.unmatched.items():
            if uids:
                shown = ", ".join(html.escape(u) for u in uids[:50])
                out.append(f"<li>{html.escape(kind.replace('_', ' '))} ({len(uids)}): {shown}</li>")
        out.append("</ul>")
    return out


def _figure(src: str | None, caption: str) -> str:
    img = (
        f'<img src="{html.escape(quote(src))}">'
        if src
        else '<div style="width:180px;height:180px;border:1px dashed #ccc"></div>'
    )
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _metrics_block(result: dict) -> str:
    if result.get("status") != "ok":
        return f"<div class='meta err'>{html.escape(result.get('status', ''))}: {html.escape(str(result.get('error', '')))}</div>"
    flat = flat_metrics(result)
    detail = ("precision@", "recall@", "accuracy", "completeness")  # in the JSON / CSV, not here
    keys = [k for k in order_metrics(list(flat)) if not k.startswith(detail)]
    rows = "".join(f"<tr><td class=l>{html.escape(k)}</td><td>{_fmt(flat[k])}</td></tr>" for k in keys)
    note = ""
    if result.get("semantic_error"):
        note += f"<div class=err>no ULIP/Uni3D score: {html.escape(result['semantic_error'])}</div>"
    if result.get("render_error"):
        note += f"<div class=err>no renders: {html.escape(result['render_error'])}</div>"
    return f"<div class=meta><table>{rows}</table>{note}</div>"


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_shapes_report(output: Path, results: list[dict], summary: Any, cfg: Any) -> Path:
    body = [
        f"<h1>Shape evaluation</h1><p class=meta>seed {cfg.seed}; {cfg.points.surface_samples} surface samples, "
        f"FPS to {cfg.points.fps_points} (fpsample bucket kd-line, h={cfg.points.fps_h}); geometry on "
        f"{cfg.geometry.samples} samples, ICP {'on' if cfg.geometry.icp else 'off'}</p>"
    ]
    body += _summary_tables(summary)
    body.append(
        "<h2>Per uid</h2><p class=meta>condition image | prediction front / back (normal-shaded) | ground truth front / back</p>"
    )
    for result in results[: cfg.report.max_rows]:
        uid = result["uid"]
        renders = result.get("renders", {})
        cond = _thumbnail(
            result.get("image"), output / "renders" / f"{uid_filename(uid)}_condition.png", cfg.images.max_pixels
        )
        figures = [
            _figure(cond, "condition"),
            _figure(renders.get("pred_front"), "pred front"),
            _figure(renders.get("pred_back"), "pred back"),
        ]
        if result.get("ground_truth"):
            figures += [_figure(renders.get("gt_front"), "GT front"), _figure(renders.get("gt_back"), "GT back")]
        body.append(f"<h3>{html.escape(uid)}</h3><div class=row>{''.join(figures)}{_metrics_block(result)}</div>")
    path = output / "report.html"
    path.write_text(_page("Know3D shape evaluation", body))
    return path


def write_backviews_report(output: Path, results: list[dict], summary: Any, cfg: Any) -> Path:
    body = [
        f"<h1>Back-view evaluation</h1><p class=meta>background {cfg.images.background}; SSIM Gaussian σ=1.5, data range 1</p>"
    ]
    body += _summary_tables(summary)
    body.append("<h2>Per uid</h2><p class=meta>condition (front) | generated back view | true back view</p>")
    for result in results[: cfg.report.max_rows]:
        uid = result["uid"]
        renders = output / "renders"
        name = uid_filename(uid)
        cond = _thumbnail(result.get("condition"), renders / f"{name}_condition.png", cfg.images.max_pixels)
        pred = _thumbnail(result.get("prediction"), renders / f"{name}_pred.png", cfg.images.max_pixels)
        gt = _thumbnail(result.get("ground_truth"), renders / f"{name}_gt.png", cfg.images.max_pixels)
        figures = [_figure(cond, "condition"), _figure(pred, "generated back"), _figure(gt, "true back")]
        body.append(f"<h3>{html.escape(uid)}</h3><div class=row>{''.join(figures)}{_metrics_block(result)}</div>")
    path = output / "report.html"
    path.write_text(_page("Know3D back-view evaluation", body))
    return path
