"""report.html: rendered from a real run and from edits of it that cover every kind of cell, then opened in Chromium.

The clickable map is the part most likely to silently break (a layout change moves the cells, the rectangles stay):
the rectangles are checked against the PNG's own pixels here, and against the browser's hit testing in Chromium.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from html import unescape
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote

import pytest

from conformance import html_report
from conformance.html_report import cell_marks, render_html, render_report_dir

from .reportdirs import executed, real_report

PREFIX = "diffusers-qwen.block-tiny-"
NONFINITE_BORN = {"boundary": "attention", "module": "attn", "tensor": "output", "count": 16, "nan": 0, "dtype": "float16", "entered": False, "masked_by_guard": False}
NONFINITE_MASKED = {"boundary": "block", "module": "Tensor.clip", "tensor": "input", "count": 64, "nan": 0, "dtype": "float16", "entered": False, "masked_by_guard": True}
NONFINITE_ENTERED = {"boundary": "component input", "module": "input", "tensor": "hidden_states", "count": 4, "nan": 4, "dtype": "float16", "entered": True, "masked_by_guard": False}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return real_report(tmp_path_factory)


@pytest.fixture(scope="module")
def document(real) -> dict:
    return json.loads((real / "results.json").read_text())


def _null_metrics(case: dict) -> dict:
    return {k: None for k in case["metrics"]}


@pytest.fixture(scope="module")
def edited(document) -> dict:
    """The real run with one case of every kind a healthy CPU run does not produce."""
    doc = copy.deepcopy(document)
    by_id = {c["id"]: c for c in doc["cases"]}
    over = by_id[PREFIX + "fp16-sdpa-massive"]
    over.update(outcome="failed", reason="rel_l2 0.05 > fp16 budget 0.002", metrics={**over["metrics"], "rel_l2": 0.05})
    born = by_id[PREFIX + "fp16-math-massive"]
    born.update(outcome="failed", reason="non-finite output; first at attn", metrics=_null_metrics(born), first_nonfinite=NONFINITE_BORN)
    masked = by_id[PREFIX + "fp16-sdpa-nominal"]
    masked.update(outcome="failed", reason="non-finite inside the component although its outputs are finite (masked by the subject's guard)", first_nonfinite=NONFINITE_MASKED)
    entered = by_id[PREFIX + "fp16-math-nominal"]
    entered.update(outcome="failed", reason="non-finite output; entered at input", metrics=_null_metrics(entered), first_nonfinite=NONFINITE_ENTERED)
    xfailed = by_id[PREFIX + "fp32-math-massive"]
    xfailed.update(outcome="xfailed", reason="rel_l2 1e-05 > fp32 budget 5e-06", metrics={**xfailed["metrics"], "rel_l2": 1e-5})
    error = by_id[PREFIX + "fp32-math-nominal"]
    error.update(outcome="error", reason="RuntimeError: boom", metrics={}, stats={}, golden=None, budget=None, backend_calls={})
    return doc


class _Page(HTMLParser):
    """The parts of the page the tests look at: images, map areas, element ids, external references."""

    def __init__(self):
        super().__init__()
        self.images, self.maps, self.areas, self.ids, self.external = [], [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        if tag == "map":
            self.maps.append(a)
        if tag == "area":
            self.areas.append(a)
        for key in ("src", "href"):
            if key in a and not (a[key].startswith("#") or a[key].startswith("data:")):
                self.external.append((tag, a[key]))
        if tag in ("link", "script") and (a.get("src") or a.get("href")):
            self.external.append((tag, a.get("src") or a.get("href")))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _png(image: dict):
    from PIL import Image

    data = image["src"].split(",", 1)[1]
    import base64

    return Image.open(BytesIO(base64.b64decode(data))).convert("RGB")


def test_real_run_renders_one_self_contained_clickable_heatmap(real, document, tmp_path):
    path = render_html(document, tmp_path / "report.html")
    page = _parse(path)
    text = path.read_text()
    assert page.external == []  # nothing outside the file
    (image,) = page.images
    assert image["src"].startswith("data:image/png;base64,")
    png = _png(image)
    assert png.size == (int(image["width"]), int(image["height"]))
    (map_,) = page.maps
    assert image["usemap"] == "#" + map_["name"]
    # every case, skipped ones included, has one clickable cell and one table row
    assert len(page.areas) == len(document["cases"])
    assert {unquote(a["href"][1:]) for a in page.areas} == {f"case-{c['id']}" for c in document["cases"]}
    for area in page.areas:
        assert unquote(area["href"][1:]) in page.ids
        x0, y0, x1, y1 = map(int, area["coords"].split(","))
        assert 0 <= x0 < x1 <= png.size[0] and 0 <= y0 < y1 <= png.size[1]
    run = document["run"]
    for value in (run["subject"]["version"], run["torch"], run["started"], run["finished"], run["device"]):
        assert value in text
    skipped = next(c for c in document["cases"] if c["outcome"] == "skipped")
    assert skipped["reason"] in unescape(text)


def test_area_rectangles_land_on_their_cells_in_the_image(document, tmp_path):
    """Sample each cell a quarter in from its corner (clear of borders, glyphs and separators): the colour must be
    the one drawn for that case, so a rectangle that drifted off its cell fails here."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    page = _parse(render_html(document, tmp_path / "report.html"))
    png = _png(page.images[0])
    cases = {c["id"]: c for c in document["cases"]}
    cmap, norm = colormaps[html_report.CMAP], LogNorm(html_report.RATIO_MIN, html_report.RATIO_MAX)
    checked = 0
    for area in page.areas:
        case = cases[unquote(area["href"][len("#case-"):])]
        x0, y0, x1, y1 = map(int, area["coords"].split(","))
        pixel = png.getpixel((x0 + (x1 - x0) // 4, y0 + (y1 - y0) // 4))
        marks = cell_marks(case)
        if marks.fill == "ratio":
            expected = tuple(round(255 * v) for v in cmap(norm(marks.ratio))[:3])
            assert all(abs(p - e) <= 12 for p, e in zip(pixel, expected)), (case["id"], pixel, expected)
            checked += 1
        elif marks.fill == "skipped":
            assert max(pixel) - min(pixel) <= 10 and 120 <= pixel[0] <= 235, (case["id"], pixel)
    assert checked == len(executed(document))


def test_every_kind_of_cell_gets_its_own_marks(edited):
    marks = {c["id"]: cell_marks(c) for c in edited["cases"]}
    assert marks[PREFIX + "fp16-sdpa-massive"].border == "failed" and marks[PREFIX + "fp16-sdpa-massive"].ratio == pytest.approx(0.05 / 2e-3)
    assert marks[PREFIX + "fp16-math-massive"] == html_report.CellMarks("no_metric", None, "failed", "nonfinite")
    assert marks[PREFIX + "fp16-sdpa-nominal"].glyph == "masked" and marks[PREFIX + "fp16-sdpa-nominal"].fill == "ratio"
    assert marks[PREFIX + "fp16-math-nominal"].glyph == "entered"
    assert marks[PREFIX + "fp32-math-massive"].border == "xfailed"
    assert marks[PREFIX + "fp32-math-nominal"] == html_report.CellMarks("error", None, None, "error")
    assert marks[PREFIX + "fp32-split-nominal"].fill == "skipped"
    assert marks[PREFIX + "fp32-sdpa-nominal"] == html_report.CellMarks("ratio", marks[PREFIX + "fp32-sdpa-nominal"].ratio, None, None)


def test_edited_run_shows_marks_numbers_and_reasons(edited, tmp_path):
    path = render_html(edited, tmp_path)  # a directory gets report.html
    assert path == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temporary file was renamed, not left
    page = _parse(path)
    text = unescape(path.read_text())
    titles = {unquote(a["href"][len("#case-"):]): a["title"] for a in page.areas}
    assert "non-finite born inside" in titles[PREFIX + "fp16-math-massive"]
    assert "masked by the subject's guard" in titles[PREFIX + "fp16-sdpa-nominal"]
    assert "entered at the component's input" in titles[PREFIX + "fp16-math-nominal"]
    assert "25 x budget" in titles[PREFIX + "fp16-sdpa-massive"]
    assert "RuntimeError: boom" in titles[PREFIX + "fp32-math-nominal"]
    assert "not offered by diffusers" in titles[PREFIX + "fp32-split-nominal"]
    row = re.search(r'<tr id="case-' + re.escape(PREFIX) + r'fp16-math-massive".*?</tr>', path.read_text(), re.S).group(0)
    assert "attn" in row and "float16" in row and "o-failed" in row
    assert "outcomes</td><td>passed 2, failed 4, xfailed 1, error 1, skipped 24" in text
    png = _png(page.images[0])
    error_area = next(a for a in page.areas if a["href"].endswith("fp32-math-nominal"))
    x0, y0, x1, y1 = map(int, error_area["coords"].split(","))
    assert max(png.getpixel((x0 + (x1 - x0) // 4, y0 + (y1 - y0) // 4))) < 40  # the error fill is black


def test_render_report_dir_and_empty_run(real, tmp_path):
    shutil.copy(real / "results.json", tmp_path / "results.json")
    assert render_report_dir(tmp_path) == tmp_path / "report.html"
    empty = {"schema_version": 1, "run": {"subject": {"name": "diffusers", "version": "0"}}, "cases": []}
    page = render_html(empty, tmp_path / "empty.html")
    assert "recorded no cases" in page.read_text() and _parse(page).images == []
    with pytest.raises(ValueError, match="schema_version"):
        render_html({"schema_version": 2, "run": {}, "cases": []}, tmp_path / "x.html")


def test_a_thousand_cases_render_into_one_image_map(document, tmp_path):
    """A nightly-sized run renders one heatmap image with an area per case. (Its time is printed, not asserted: a
    wall-clock limit fails on a loaded CI machine; it took 10 s beside a busy pytest-xdist run on 2 cores.)"""
    cases = []
    base = [c for c in document["cases"] if c["profile"] == "nominal"]
    for component in ("qwen.block", "flux.double", "flux.single", "wan.t2v", "wan.i2v", "wan.ti2v"):
        for scale in ("tiny", "real"):
            for profile in ("nominal", "massive", "fp16_overflow"):
                for c in base:
                    d = {k: v for k, v in c.items() if k != "boundaries"}
                    d.update(component=component, scale=scale, profile=profile, id="-".join((c["subject"], component, scale, c["precision"], c["backend"], profile)))
                    cases.append(d)
    big = {**document, "cases": cases * 2}
    big["cases"] = [dict(c, id=f"{c['id']}{'' if i < len(cases) else '-x'}", guard="none" if i < len(cases) else "x") for i, c in enumerate(big["cases"])]
    assert len(big["cases"]) >= 1000
    start = time.perf_counter()
    page = _parse(render_html(big, tmp_path / "big.html"))
    seconds = time.perf_counter() - start
    assert len(page.areas) == len(big["cases"]) and len(page.images) == 1
    print(f"{len(big['cases'])} cases rendered in {seconds:.1f} s")


# --- in a browser -------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# Appended to a copy of the page: once it has loaded, records what the browser sees in a data attribute.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  // The load event waits for every image, so the heatmap has been decoded (or has failed) by now; all synchronous.
  const out = {};
  const imgs = [...document.querySelectorAll('img.heatmap-img')];
  out.images = imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const areas = [...document.querySelectorAll('map area')];
  out.areas = areas.length;
  out.missing = areas.filter(a => !document.getElementById(decodeURIComponent(new URL(a.href).hash.slice(1)))).map(a => a.getAttribute('href'));
  const img = imgs[0];
  img.scrollIntoView();
  const r = img.getBoundingClientRect();
  out.hits = areas.filter(a => {
    const c = a.coords.split(',').map(Number);
    const el = document.elementFromPoint(r.left + (c[0] + c[2]) / 2, r.top + (c[1] + c[3]) / 2);
    return el && el.tagName === 'AREA' && el.getAttribute('href') === a.getAttribute('href');
  }).length;
  const pick = areas[areas.length - 1];
  pick.click();  // a same-document fragment navigation: :target is updated before click() returns
  const target = document.querySelector(':target');
  out.clicked = decodeURIComponent(pick.getAttribute('href').slice(1));
  out.target = target ? target.id : null;
  document.body.setAttribute('data-check', JSON.stringify(out));
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@needs_chromium
def test_chromium_decodes_the_heatmap_and_every_area_reaches_its_case(edited, tmp_path):
    page = render_html(edited, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    proc = _chromium(tmp_path, "--window-size=2400,1600", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert found, f"no result in the DOM; chromium said: {proc.stderr[-2000:]}"
    check = json.loads(unescape(found.group(1)))
    image = _parse(page).images[0]
    assert check["images"] == [[True, int(image["width"]), int(image["height"])]]
    assert check["areas"] == len(edited["cases"]) and check["missing"] == []
    assert check["hits"] == check["areas"]  # the browser's hit test finds each area over its own cell
    assert check["target"] == check["clicked"]  # a click on a cell scrolls to that case's row


@needs_chromium
def test_chromium_screenshot_is_not_blank(edited, tmp_path):
    from PIL import Image

    page = render_html(edited, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, "--window-size=1400,1000", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    non_white = sum(n for n, rgb in colours if min(rgb) < 245)
    assert len(colours) > 50 and non_white > 0.02 * image.size[0] * image.size[1]
    # the heatmap's green (fp32 within budget) is on screen, so the embedded image was painted, not just the text
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    ratio = cell_marks(next(c for c in edited["cases"] if c["id"] == PREFIX + "fp32-sdpa-nominal")).ratio
    green = tuple(round(255 * v) for v in colormaps[html_report.CMAP](LogNorm(html_report.RATIO_MIN, html_report.RATIO_MAX)(ratio))[:3])
    assert any(n > 100 and all(abs(a - b) <= 6 for a, b in zip(rgb, green)) for n, rgb in colours)
