"""Every HTML report the product writes is one self-contained file (MLflow's artifact viewer shows
it without the files next to it): no reference to any file, images inlined and downscaled, a size
budget that holds, untrusted text escaped. The report functions are driven directly (fast, CPU)."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from know3d.annotation.review import write_gallery
from know3d.core.shards import write_tar
from know3d.evaluation.config import EvalConfig
from know3d.evaluation.report import BUDGET, THUMB, write_backviews_report, write_shapes_report
from know3d.evaluation.summary import summarize

HOSTILE = "<img src=x onerror=alert(1)> \"q\" 'a' & #1"  # uids and descriptions come from the internet


class Page(HTMLParser):
    """What a page references and shows: every tag with its attributes, the text of each
    <style>/<script>, the per-uid table (``#uids``) as rows of (data-v, text) cells."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.blocks: list[tuple[str, str]] = []
        self.headers: list[str] = []
        self.rows: list[list[tuple[str | None, str]]] = []
        self.text: list[str] = []
        self._open: list[str] = []
        self._in_table = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in ("img", "meta", "br", "link", "input", "hr"):  # void elements never close
            self._open.append(tag)
        if tag == "table" and a.get("id") == "uids":
            self._in_table = True
        elif self._in_table and tag == "tr" and "thead" not in self._open:
            self.rows.append([])
        elif self._in_table and tag == "th":
            self.headers.append("")
        elif self._in_table and tag == "td":
            self.rows[-1].append((a.get("data-v"), ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        while self._open and self._open.pop() != tag:
            pass

    def handle_data(self, data):
        current = self._open[-1] if self._open else ""
        if current in ("style", "script"):
            self.blocks.append((current, data))
            return
        self.text.append(data)
        if not self._in_table:
            return
        if "th" in self._open:
            self.headers[-1] += data
        elif "td" in self._open:
            value, text = self.rows[-1][-1]
            self.rows[-1][-1] = (value, text + data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())

    def images(self) -> list[Image.Image]:
        out = []
        for tag, a in self.tags:
            if tag == "img":
                head, _, payload = a["src"].partition(",")
                assert head.startswith("data:image/") and head.endswith(";base64"), head
                img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
                img.load()
                out.append(img)
        return out


def assert_self_contained(page: Page) -> None:
    """No src/href (or any other URL attribute) but data: URIs and #fragments; no stylesheet
    links, no script src, no url()/@import in the inline CSS."""
    for tag, a in page.tags:
        for key in ("src", "href", "srcset", "poster", "data", "action", "background", "xlink:href"):
            if key in a:
                value = a[key] or ""
                assert value.startswith(("data:", "#")), f"<{tag} {key}={value!r}>"
        assert tag != "link", a
        assert not (tag == "script" and "src" in a), a
        assert not (tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh"), a
    for kind, text in page.blocks:
        assert "url(" not in text and "@import" not in text and "http" not in text, kind


def assert_thumbnails(page: Page, count: int, limit: int = THUMB) -> None:
    images = page.images()
    assert len(images) == count
    assert all(max(img.size) <= limit for img in images), [img.size for img in images]


def png(path: Path, size: tuple[int, int], seed: int = 0, noise: bool = False) -> Path:
    """An RGBA image: random noise (incompressible, for the budget) or a disc on transparency."""
    rng = np.random.default_rng(seed)
    if noise:
        array = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
        array[..., 3] = 255
    else:
        yy, xx = np.mgrid[: size[1], : size[0]]
        disc = (yy - size[1] / 2) ** 2 + (xx - size[0] / 2) ** 2 < (min(size) / 3) ** 2
        array = np.zeros((size[1], size[0], 4), np.uint8)
        array[disc] = (*rng.integers(0, 255, 3), 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, "RGBA").save(path)
    return path


def shape_result(uid: str, chamfer: float, out: Path, condition: Path) -> dict:
    renders = {}
    for view in ("pred_front", "pred_back", "gt_front", "gt_back"):
        png(out / "renders" / f"{chamfer}_{view}.png", (96, 96))
        renders[view] = f"renders/{chamfer}_{view}.png"
    geometry = {"chamfer_l1": chamfer, "chamfer_l2": chamfer**2, "fscore@0.01": 1 - chamfer, "accuracy": 0.1}
    return {
        "uid": uid,
        "status": "ok",
        "image": str(condition),
        "ground_truth": "gt.glb",
        "geometry": geometry,
        "renders": renders,
    }


@pytest.fixture()
def shapes(tmp_path: Path) -> tuple[Path, list[dict]]:
    out = tmp_path / "out"
    condition = png(tmp_path / "inputs" / "cond.png", (900, 600))  # larger than a thumbnail
    outside = png(tmp_path / "secret.png", (32, 32))
    results = [
        shape_result("b", 0.25, out, condition),
        shape_result("a", 0.125, out, condition),
        shape_result(HOSTILE, 3e-5, out, condition),
        {**shape_result("c", float("inf"), out, condition), "semantic_error": "cannot decode <b>x</b>"},
        {"uid": "bunny", "status": "error", "error": "non-manifold <mesh> " + "y" * 300},
        {"uid": "gone", "status": "missing", "error": "no prediction"},
    ]
    results[1]["renders"]["gt_back"] = f"../{outside.name}"  # a stored path leaving the output: not inlined
    return out, results


def write_shapes(out: Path, results: list[dict], cfg: EvalConfig | None = None, **kw) -> Page:
    summary = summarize("shapes", out, results, {"prediction_without_gt": [HOSTILE]}, {}, seconds=1.0)
    path = write_shapes_report(out, results, summary, cfg or EvalConfig(), **kw)
    return Page(path.read_text())


def test_shapes_report_is_self_contained_with_small_images(shapes):
    out, results = shapes
    page = write_shapes(out, results)
    assert_self_contained(page)
    # 4 ok uids x (condition + 4 renders), less the one render outside the output; errors only the condition
    assert_thumbnails(page, 4 * 5 - 1)
    assert max(page.images()[0].size) == THUMB  # the 900x600 condition image, downscaled
    assert "Images for all 6 uids." in page.plain
    html = (out / "report.html").read_text()
    assert "secret.png" not in html and "renders/" not in html


def test_shapes_table_has_one_sortable_row_per_uid(shapes):
    out, results = shapes
    page = write_shapes(out, results)
    assert page.headers == ["uid", "status", "chamfer_l1", "chamfer_l2", "fscore@0.01", "error"]
    assert [row[0][1] for row in page.rows] == [r["uid"] for r in results]  # one row each, escaped text intact
    by_uid = {row[0][1]: row for row in page.rows}
    assert [c[1] for c in by_uid["a"][1:5]] == ["ok", "0.125", "0.01562", "0.875"]  # 4 significant digits
    assert float(by_uid["a"][3][0]) == 0.125**2  # the exact value to sort by
    assert [c[0] for c in by_uid["c"][2:4]] == ["Infinity", "Infinity"] and by_uid["c"][2][1] == "inf"
    assert by_uid["bunny"][1][1] == "error" and [c[0] for c in by_uid["bunny"][2:5]] == ["", "", ""]
    assert by_uid["bunny"][5][1].startswith("non-manifold <mesh> y") and len(by_uid["bunny"][5][1]) == 80
    assert by_uid["c"][5][1] == "cannot decode <b>x</b>"
    assert ("table", {"class": "sort", "id": "uids"}) in page.tags
    assert any(tag == "div" and a.get("class") == "scroll" for tag, a in page.tags)  # scrolls, never cut off
    assert any(kind == "script" and "data-num" in text for kind, text in page.blocks)
    links = [a["href"] for tag, a in page.tags if tag == "a"]
    assert links == [f"#u{i}" for i in range(6)]
    assert {"#" + a["id"] for tag, a in page.tags if tag == "h3" and "id" in a} == set(links)  # each link has its card


def test_untrusted_text_is_escaped(shapes):
    out, results = shapes
    page = write_shapes(out, results)
    html = (out / "report.html").read_text()
    assert "<img src=x" not in html and "<mesh>" not in html and "<b>x</b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert page.plain.count(HOSTILE) >= 3  # table cell, card heading, unmatched list
    assert not any(tag == "img" and a.get("src") == "x" for tag, a in page.tags)


def test_max_rows_limits_the_images_and_says_so(shapes):
    out, results = shapes
    page = write_shapes(out, results, EvalConfig.model_validate({"report": {"max_rows": 2}}))
    assert "Images for the first 2 of 6 uids (report.max_rows = 2)" in page.plain
    assert len(page.rows) == 6 and [a["href"] for tag, a in page.tags if tag == "a"] == ["#u0", "#u1"]


def backview_results(tmp_path: Path, count: int) -> list[dict]:
    front = png(tmp_path / "front.png", (400, 300), noise=True)
    pred = png(tmp_path / "pred.png", (300, 400), seed=1, noise=True)
    gt = png(tmp_path / "gt.png", (256, 256), seed=2, noise=True)
    return [
        {
            "uid": f"u{i:04d}",
            "status": "ok",
            "condition": str(front),
            "prediction": str(pred),
            "ground_truth": str(gt),
            "backview": {"psnr": 20.0 + i / 7, "ssim": 0.5, "resized": False},
        }
        for i in range(count)
    ]


def write_backviews(out: Path, results: list[dict], **kw) -> tuple[Path, Page]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize("backviews", out, results, {}, {"lpips": "no weights"}, seconds=1.0)
    path = write_backviews_report(out, results, summary, EvalConfig(), **kw)
    return path, Page(path.read_text())


def test_backviews_report_is_self_contained(tmp_path: Path):
    results = backview_results(tmp_path, 3)
    results.append({"uid": "corrupt", "status": "error", "error": "cannot decode", "prediction": "/no/such.png"})
    path, page = write_backviews(tmp_path / "out", results)
    assert_self_contained(page)
    assert_thumbnails(page, 9)
    assert [row[0][1] for row in page.rows] == ["u0000", "u0001", "u0002", "corrupt"]
    assert page.headers[2:4] == ["psnr", "ssim"] and float(page.rows[1][2][0]) == pytest.approx(20 + 1 / 7)
    assert not (tmp_path / "out" / "renders").exists()  # nothing written next to the report


def test_size_budget_holds_with_many_uids(tmp_path: Path):
    """300 uids of incompressible images would be ~30 MB: the page stays under the budget, says
    how many uids have images, and still lists every uid in the table."""
    results = backview_results(tmp_path, 300)
    path, page = write_backviews(tmp_path / "out", results)
    assert path.stat().st_size <= BUDGET
    shown = len(page.images()) // 3
    assert 10 < shown < 200  # cut by the budget, not by report.max_rows (200)
    assert f"Images for the first {shown} of 300 uids (the report's 8 MB size budget)" in page.plain
    assert len(page.rows) == 300 and len([a for t, a in page.tags if t == "h3" and "id" in a]) == shown
    assert_self_contained(page)
    small, page = write_backviews(tmp_path / "small", results, budget=300_000)
    assert small.stat().st_size <= 300_000 and "Images for the first " in page.plain and len(page.rows) == 300


# --------------------------------------------------------------------------- review gallery


def sample(key: str, name: str, status: str, front_png: bytes) -> dict:
    meta = {
        "asset_id": "a" * 64,
        "name": name,
        "split": "val",
        "pair_index": 1,
        "front_camera": {"azimuth_deg": 30.0},
        "back_camera": {"azimuth_deg": 210.0},
        "components": [HOSTILE, "handle"],
        "annotation": {"status": status, "backend": "parts", "model": "parts", "prompt_version": "v1", "raw": HOSTILE},
    }
    return {"__key__": key, "front.png": front_png, "back.png": front_png, "json": json.dumps(meta).encode()}


def test_review_gallery_is_self_contained_and_labelled(tmp_path: Path):
    big = png(tmp_path / "big.png", (600, 500)).read_bytes()
    shard = tmp_path / "val-000000.tar"
    write_tar(shard, [sample(f"k{i}", HOSTILE if i == 0 else "mug", "ok", big) for i in range(3)])
    assert write_gallery([shard], tmp_path / "review.html", num_samples=3, thumb=200) == 3
    html = (tmp_path / "review.html").read_text()
    page = Page(html)
    assert_self_contained(page)
    assert_thumbnails(page, 6, limit=200)
    captions = [c for c in page.plain.split() if c in ("front", "back")]
    assert captions.count("front") >= 3 and captions.count("back") >= 3
    assert "front 30°" in page.plain and "back 210°" in page.plain
    for key in ("k0", "k1", "k2"):
        assert f"split: val · shard: val-000000.tar · key: {key}" in page.plain
    assert page.plain.count("backend: parts · model: parts · prompt: v1") == 3
    assert "<img src=x" not in html and page.plain.count(HOSTILE) >= 3 + 1  # components, raw answers, one name
