"""Static HTML reports of an evaluation: one self-contained ``report.html``.

MLflow's artifact viewer shows an HTML artifact on its own (a sandboxed blob URL), so links to
files next to it show as empty frames. The page therefore references no file at all: images are
downscaled and inlined as ``data:`` URIs, style and the table sorting are inline. A size budget
keeps the page quick to open: when the images of every uid would exceed it, only the first uids
get images and the page says so. The per-uid table always lists every uid.

uids, errors and paths come from outside (folder names, exception text) and are always escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from know3d.evaluation.results import flat_metrics, order_metrics

THUMB = 256  # long side of an inlined image, px
BUDGET = 8_000_000  # bytes of one report.html, images included
_QUALITY = 82  # WebP quality of the inlined images
_DETAIL = ("precision@", "recall@", "accuracy", "completeness")  # in metrics.csv / JSON, not on the page
_ERROR_CHARS = 80  # shown in the table; the full text is in the cell's title and the uid's card

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}
td,th{border:1px solid #ddd;padding:3px 6px;font-size:12px;text-align:right;white-space:nowrap}
th{background:#f4f4f4} td.l,th.l{text-align:left}
.scroll{overflow-x:auto;max-width:100%}
table.sort th{cursor:pointer;user-select:none}
table.sort th[aria-sort=ascending]::after{content:" \\25B2"} table.sort th[aria-sort=descending]::after{content:" \\25BC"}
table.sort td.uid{max-width:22em;overflow:hidden;text-overflow:ellipsis}
.row{display:flex;gap:6px;align-items:flex-start;margin:10px 0;padding:8px;border:1px solid #eee}
.row figure{margin:0;text-align:center;font-size:12px}
.row img,.blank{width:180px;height:180px;object-fit:contain;background:#fff;border:1px solid #ddd}
.blank{border-style:dashed}
.err{color:#b00020}.meta{font-size:12px;color:#555;max-width:360px}.note{font-size:13px;color:#555}
"""

# Click a header to sort by it (again to reverse). Numeric columns sort by the full value in
# data-v; cells without a number (absent, nan) go last either way.
_SORT_JS = """
document.querySelectorAll('table.sort th').forEach(th => th.addEventListener('click', () => {
  const i = th.cellIndex, body = th.closest('table').tBodies[0], num = th.hasAttribute('data-num');
  const dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
  th.closest('tr').querySelectorAll('th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
  const key = r => { const c = r.cells[i], v = c.dataset.v ?? c.textContent;
    return num ? (v === '' ? NaN : Number(v)) : v; };
  const cmp = (a, b) => { if (!num) return a.localeCompare(b) * dir;
    if (isNaN(a) || isNaN(b)) return isNaN(a) - isNaN(b); return (a - b) * dir; };
  body.append(...[...body.rows].sort((a, b) => cmp(key(a), key(b))));
}));
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return html.escape(str(value))


def _sort_value(value: float) -> str:
    """The exact number for sorting, in a form JavaScript's Number() reads ('' for nan)."""
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


# --------------------------------------------------------------------------- images


def data_uri(src: str | Path | None, max_pixels: int) -> str | None:
    """A downscaled WebP ``data:`` URI of an image file, flattened on white (None if unusable).

    ``max_pixels`` bounds decoding (inputs come from outside); WebP keeps a 256 px render to a
    few KB, so a report holds hundreds of uids within the budget."""
    if not src:
        return None
    try:
        with Image.open(src) as img:
            if img.size[0] * img.size[1] > max_pixels:
                return None
            img.thumbnail((THUMB, THUMB))
            rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        buf = io.BytesIO()
        flat.save(buf, format="WEBP", quality=_QUALITY, method=4)
    except Exception:  # noqa: BLE001 - the report shows a blank frame instead
        return None
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def _inside(output: Path, rel: str | None) -> Path | None:
    """A render path stored in a result (relative to the output), if it stays inside it."""
    if not rel:
        return None
    path = (output / rel).resolve()
    return path if path.is_relative_to(output.resolve()) else None


def _figure(uri: str | None, caption: str) -> str:
    img = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else "<div class=blank></div>"
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


# --------------------------------------------------------------------------- tables


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


def table_columns(results: list[dict]) -> list[str]:
    """The metric columns of the per-uid table: every headline metric any uid has."""
    keys = {k for r in results for k in flat_metrics(r)}
    return [k for k in order_metrics(list(keys)) if not k.startswith(_DETAIL)]


def _error_text(result: dict) -> str:
    return str(result.get("error") or result.get("semantic_error") or result.get("render_error") or "")


def _table_row(index: int, result: dict, columns: list[str], linked: bool) -> str:
    uid = html.escape(result["uid"])
    name = f'<a href="#u{index}">{uid}</a>' if linked else uid
    flat = flat_metrics(result)
    cells = [f'<td class="l uid" title="{uid}">{name}</td>', f"<td class=l>{html.escape(str(result['status']))}</td>"]
    for key in columns:
        value = flat.get(key)
        cells.append(
            "<td data-v=''></td>" if value is None else f'<td data-v="{_sort_value(value)}">{_fmt(value)}</td>'
        )
    error = _error_text(result)
    short = error if len(error) <= _ERROR_CHARS else error[: _ERROR_CHARS - 1] + "…"
    cells.append(f'<td class="l err" title="{html.escape(error[:1000])}">{html.escape(short)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def uid_table(results: list[dict], linked: int) -> str:
    """One row per uid, sortable by any column; the first ``linked`` uids link to their images."""
    columns = table_columns(results)
    head = "<th class=l>uid</th><th class=l>status</th>"
    head += "".join(f"<th data-num>{html.escape(k)}</th>" for k in columns) + "<th class=l>error</th>"
    rows = "".join(_table_row(i, r, columns, i < linked) for i, r in enumerate(results))
    return (
        "<h2>Per uid</h2><p class=note>Click a column to sort (values to 4 significant digits; "
        "metrics.csv has them in full).</p>"
        f"<div class=scroll><table class=sort id=uids><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


# --------------------------------------------------------------------------- cards


def _metrics_block(result: dict) -> str:
    if result.get("status") != "ok":
        return f"<div class='meta err'>{html.escape(result.get('status', ''))}: {html.escape(str(result.get('error', '')))}</div>"
    flat = flat_metrics(result)
    keys = [k for k in order_metrics(list(flat)) if not k.startswith(_DETAIL)]
    rows = "".join(f"<tr><td class=l>{html.escape(k)}</td><td>{_fmt(flat[k])}</td></tr>" for k in keys)
    note = ""
    if result.get("semantic_error"):
        note += f"<div class=err>no ULIP/Uni3D score: {html.escape(result['semantic_error'])}</div>"
    if result.get("render_error"):
        note += f"<div class=err>no renders: {html.escape(result['render_error'])}</div>"
    return f"<div class=meta><table>{rows}</table>{note}</div>"


Figures = Callable[[dict], list[tuple[str | None, str]]]  # result -> [(data URI or None, caption)]


def _card(index: int, result: dict, figures: Figures) -> str:
    shown = "".join(_figure(uri, caption) for uri, caption in figures(result))
    return f"<h3 id=u{index}>{html.escape(result['uid'])}</h3><div class=row>{shown}{_metrics_block(result)}</div>"


def _cards(results: list[dict], figures: Figures, room: int) -> list[str]:
    """Cards of the first uids, as many as fit in ``room`` bytes (images are encoded lazily, so
    a large evaluation stops encoding at the budget)."""
    out: list[str] = []
    used = 0
    for i, result in enumerate(results):
        card = _card(i, result, figures)
        size = len(card.encode()) + 1  # and the newline that joins it
        if used + size > room:
            break
        out.append(card)
        used += size
    return out


def _images_note(shown: int, total: int, max_rows: int, budget: int) -> str:
    if shown == total:
        return f"<p class=note>Images for all {total} uids.</p>"
    why = f"report.max_rows = {max_rows}" if shown == max_rows else f"the report's {budget / 1e6:.0f} MB size budget"
    return f"<p class=note><b>Images for the first {shown} of {total} uids</b> ({why}); the table above lists all.</p>"


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + f"<script>{_SORT_JS}</script></body></html>\n"
    )


def _write_report(
    output: Path, title: str, head: list[str], legend: str, results: list[dict], figures: Figures, cfg: Any, budget: int
) -> Path:
    """Head, the per-uid table, then image cards for as many uids as the budget leaves room for.

    The table is never cut: with tens of thousands of uids it alone may pass the budget (then no
    uid has images)."""
    max_rows = cfg.report.max_rows
    candidates = results[:max_rows]
    legend = f"<h2>Images</h2><p class=meta>{legend}</p>"
    frame = _page(title, [*head, uid_table(results, len(candidates)), legend])
    room = budget - len(frame.encode()) - 512  # 512: the note on how many uids have images
    cards = _cards(candidates, figures, room)
    note = _images_note(len(cards), len(results), max_rows, budget)
    path = output / "report.html"
    path.write_text(_page(title, [*head, uid_table(results, len(cards)), legend, note, *cards]), encoding="utf-8")
    return path


def _render_uri(output: Path, result: dict, key: str, max_pixels: int) -> str | None:
    return data_uri(_inside(output, (result.get("renders") or {}).get(key)), max_pixels)


def write_shapes_report(output: Path, results: list[dict], summary: Any, cfg: Any, budget: int = BUDGET) -> Path:
    head = [
        f"<h1>Shape evaluation</h1><p class=meta>seed {cfg.seed}; {cfg.points.surface_samples} surface samples, "
        f"FPS to {cfg.points.fps_points} (fpsample bucket kd-line, h={cfg.points.fps_h}); geometry on "
        f"{cfg.geometry.samples} samples, ICP {'on' if cfg.geometry.icp else 'off'}</p>",
        *_summary_tables(summary),
    ]
    max_pixels = cfg.images.max_pixels

    def figures(result: dict) -> list[tuple[str | None, str]]:
        shown = [(data_uri(result.get("image"), max_pixels), "condition")]
        views = [("pred_front", "pred front"), ("pred_back", "pred back")]
        if result.get("ground_truth"):
            views += [("gt_front", "GT front"), ("gt_back", "GT back")]
        return shown + [(_render_uri(output, result, key, max_pixels), caption) for key, caption in views]

    legend = "condition image | prediction front / back (normal-shaded) | ground truth front / back"
    return _write_report(output, "Know3D shape evaluation", head, legend, results, figures, cfg, budget)


def write_backviews_report(output: Path, results: list[dict], summary: Any, cfg: Any, budget: int = BUDGET) -> Path:
    head = [
        f"<h1>Back-view evaluation</h1><p class=meta>background {cfg.images.background}; SSIM Gaussian σ=1.5, data range 1</p>",
        *_summary_tables(summary),
    ]
    inputs = (("condition", "condition"), ("prediction", "generated back"), ("ground_truth", "true back"))

    def figures(result: dict) -> list[tuple[str | None, str]]:
        return [(data_uri(result.get(key), cfg.images.max_pixels), caption) for key, caption in inputs]

    legend = "condition (front) | generated back view | true back view"
    return _write_report(output, "Know3D back-view evaluation", head, legend, results, figures, cfg, budget)
