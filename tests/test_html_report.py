"""report.html: rendered from a real run and from edits of it that cover every kind of cell, then opened in Chromium.

The clickable map is the part most likely to silently break (a layout change moves the cells, the rectangles stay):
the rectangles are checked against the PNG's own pixels here, and against the browser's hit testing in Chromium.
What a reader sees first is checked in Chromium too, at a laptop's window size: the section on what needs attention
near the top, no sideways scrolling, a failed cell's red ring in the pixels.
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
from conformance.html_report import cell_marks, fold, render_html, render_html_text, render_report_dir

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


def _shown(cases: list[dict]) -> set[str]:
    """Ids of the cases a heatmap keeps: those in a column (precision x backend) and a row in which some case ran."""
    ran = [c for c in cases if c["outcome"] != "skipped"]
    columns, rows = {(c["precision"], c["backend"]) for c in ran}, {html_report.row_key(c) for c in ran}
    return {c["id"] for c in cases if (c["precision"], c["backend"]) in columns and html_report.row_key(c) in rows}


def _area(page: _Page, suffix: str) -> tuple[int, int, int, int]:
    (area,) = [a for a in page.areas if a["href"].endswith(suffix)]
    return tuple(map(int, area["coords"].split(",")))


def _ring_pixels(png, box, colour, tolerance=40) -> int:
    """Pixels near ``colour`` in the band of width 4 just inside the cell's rectangle."""
    x0, y0, x1, y1 = box
    band = [(x, y) for x in range(x0, x1) for y in range(y0, y1) if min(x - x0, x1 - 1 - x, y - y0, y1 - 1 - y) < 4]
    return sum(1 for xy in band if all(abs(a - b) <= tolerance for a, b in zip(png.getpixel(xy), colour)))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


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
    # every case in a column and row where something ran, skipped ones included, has one clickable cell; every
    # case has a table row
    shown = _shown(document["cases"])
    assert len(page.areas) == len(shown) < len(document["cases"])
    assert {unquote(a["href"][1:]) for a in page.areas} == {f"case-{i}" for i in shown}
    assert {f"case-{c['id']}" for c in document["cases"]} <= page.ids
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
    assert PREFIX + "fp32-split-nominal" not in titles  # its column is folded; the line under the heatmap says why
    assert re.search(r"folded: columns split, sub_quad, basic, [^.]*\(fp32, fp16\)\. Skipped, most often: split: not offered by diffusers", text)
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
    ran = {p: next(c for c in executed(document) if c["precision"] == p and c["profile"] == "nominal") for p in ("fp32", "fp16")}
    base = [dict(ran[c["precision"]], backend=c["backend"]) for c in document["cases"] if c["profile"] == "nominal"]  # every column ran
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


@pytest.fixture(scope="module")
def wide(document, edited) -> dict:
    """The edited run with a case in every cell (a passed one where the real run skipped) and every precision: wider
    than one laptop-sized figure."""
    doc = copy.deepcopy(edited)
    ran = {(c["precision"], c["profile"]): c for c in document["cases"] if c["outcome"] == "passed"}
    cases = [c if c["outcome"] != "skipped" else dict(ran[(c["precision"], c["profile"])], id=c["id"], backend=c["backend"]) for c in doc["cases"]]
    for precision in ("bf16", "fp8_e4m3", "fp8_scaled", "fp8_block", "fp8_mm"):
        cases += [dict(c, precision=precision, id=c["id"].replace("-fp16-", f"-{precision}-")) for c in cases if c["precision"] == "fp16"]
    doc["cases"] = cases
    return doc


def test_needs_attention_opens_the_page_with_a_link_per_case(edited):
    text = render_html_text(edited)
    assert text.index('id="attention"') < text.index("<img") < text.index('id="run"')
    section = unescape(re.search(r'<section id="attention">.*?</section>', text, re.S).group(0))
    assert "Failed and errors (5)" in section and "Masked non-finite values (1)" in section and "Changed expectations" not in section
    for case in edited["cases"]:
        listed = f'href="#case-{case["id"]}"' in section
        assert listed == (case["outcome"] in ("failed", "error")), case["id"]
    assert "born in attn (attention): output x16" in section and "entered at the input: hidden_states x4" in section
    assert "in Tensor.clip (block), masked by the subject's guard: input x64" in section and "RuntimeError: boom" in section


def test_changed_expectations_are_listed_and_a_clean_run_says_so_in_one_line(document, edited):
    doc = copy.deepcopy(edited)
    by_id = {c["id"]: c for c in doc["cases"]}
    by_id[PREFIX + "fp16-sdpa-massive"]["failure_kinds"] = [{"kind": "expectation", "message": "expected failure changed: budget became born"}]
    by_id[PREFIX + "fp32-sdpa-massive"].update(expected_failure={"index": [3]}, notes=["stale expected failure: declared non-strict (budget) and passed here"])
    section = unescape(re.search(r'<section id="attention">.*?</section>', render_html_text(doc), re.S).group(0))
    changed = section.split("Changed expectations (2)")[1].split("<h3>")[0]
    assert "expected failure changed: budget became born" in changed and "stale expected failure: declared non-strict" in changed
    clean = re.search(r'<section id="attention" class="clear">(.*?)</section>', render_html_text(document), re.S).group(1)
    assert clean.count("<p>") == 1 and "Nothing needs attention" in clean


def test_columns_and_rows_where_nothing_ran_are_folded_and_named(document):
    doc = copy.deepcopy(document)
    for case in doc["cases"]:
        if case["profile"] == "massive":
            case.update(outcome="skipped", reason="massive: not on this machine")
    folded = fold(doc["cases"])
    assert folded.columns == [("fp32", "sdpa"), ("fp32", "math"), ("fp16", "sdpa"), ("fp16", "math")]
    assert folded.rows == [("qwen.block", "tiny", "nominal", "none")] and folded.folded_rows == [("qwen.block", "tiny", "massive", "none")]
    text = unescape(render_html_text(doc))
    note = re.search(r'<p class="folded">(.*?)</p>', text).group(1)
    assert "columns split, sub_quad, basic, xformers, sage, flash (fp32, fp16)" in note and "rows qwen.block tiny massive" in note
    assert len(_parse_text(text).areas) == 4  # one per kept cell


def _parse_text(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_a_wide_matrix_is_split_between_precisions_into_figures_that_fit_a_laptop(wide, tmp_path):
    page = _parse(render_html(wide, tmp_path / "report.html"))
    assert len(page.images) == 3 and len(page.maps) == 3
    assert all(int(i["width"]) <= html_report.MAX_WIDTH * html_report.DPI for i in page.images)
    assert sorted(unquote(a["href"][len("#case-"):]) for a in page.areas) == sorted(c["id"] for c in wide["cases"])  # each once


def test_a_failed_cell_has_a_red_ring_and_an_xfailed_one_a_grey_dashed_line(edited, tmp_path):
    page = _parse(render_html(edited, tmp_path / "report.html"))
    png = _png(page.images[0])
    red, grey = _rgb(html_report.FAILED_EDGE), _rgb(html_report.XFAILED_EDGE)
    for suffix in ("fp16-sdpa-massive", "fp16-math-massive", "fp16-sdpa-nominal", "fp16-math-nominal", "fp32-math-nominal"):  # failed, error
        box = _area(page, suffix)
        assert _ring_pixels(png, box, red) > 4 * (box[2] - box[0]), suffix  # over a quarter of the band is red
    xfailed = _area(page, "fp32-math-massive")
    assert _ring_pixels(png, xfailed, red) < 10 and _ring_pixels(png, (xfailed[0] + 2, xfailed[1] + 2, xfailed[2] - 2, xfailed[3] - 2), grey, 30) > 10


# --- in a browser -------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# Appended to a copy of the page: once it has loaded, records what the browser sees in a data attribute.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  // The load event waits for every image, so the heatmaps have been decoded (or have failed) by now; all synchronous.
  const out = {};
  const imgs = [...document.querySelectorAll('img.heatmap-img')];
  out.images = imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const areas = [...document.querySelectorAll('map area')];
  out.areas = areas.length;
  out.missing = areas.filter(a => !document.getElementById(decodeURIComponent(new URL(a.href).hash.slice(1)))).map(a => a.getAttribute('href'));
  out.inner = [window.innerWidth, window.innerHeight];
  out.scroll_width = document.documentElement.scrollWidth;
  out.attention_top = document.getElementById('attention').getBoundingClientRect().top;
  out.heatmap_top = imgs.length ? imgs[0].getBoundingClientRect().top : null;
  out.right = Math.max(0, ...imgs.map(i => i.getBoundingClientRect().right));
  out.hits = 0;
  for (const img of imgs) {
    for (const a of document.querySelector('map[name="' + img.useMap.slice(1) + '"]').areas) {
      const c = a.coords.split(',').map(Number);
      window.scrollTo(0, window.scrollY + img.getBoundingClientRect().top + (c[1] + c[3]) / 2 - window.innerHeight / 2);
      const r = img.getBoundingClientRect();
      const el = document.elementFromPoint(r.left + (c[0] + c[2]) / 2, r.top + (c[1] + c[3]) / 2);
      out.hits += el && el.tagName === 'AREA' && el.getAttribute('href') === a.getAttribute('href') ? 1 : 0;
    }
  }
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


def _check(tmp_path: Path, page: Path, window: str) -> dict:
    """What CHECK_SCRIPT records of ``page`` in a Chromium window of size ``window`` ("W,H")."""
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    proc = _chromium(tmp_path, f"--window-size={window}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert found, f"no result in the DOM; chromium said: {proc.stderr[-2000:]}"
    return json.loads(unescape(found.group(1)))


@needs_chromium
def test_chromium_decodes_the_heatmap_and_every_area_reaches_its_case(edited, tmp_path):
    page = render_html(edited, tmp_path / "report.html")
    check = _check(tmp_path, page, "2400,1600")
    image = _parse(page).images[0]
    assert check["images"] == [[True, int(image["width"]), int(image["height"])]]
    assert check["areas"] == len(_shown(edited["cases"])) and check["missing"] == []
    assert check["hits"] == check["areas"]  # the browser's hit test finds each area over its own cell
    assert check["target"] == check["clicked"]  # a click on a cell scrolls to that case's row


@needs_chromium
def test_chromium_at_laptop_size_opens_on_what_needs_attention_and_shows_the_failed_cells(edited, tmp_path):
    from PIL import Image

    page = render_html(edited, tmp_path / "report.html")
    check = _check(tmp_path, page, "1366,768")
    width, height = check["inner"]
    assert width == 1366 and check["scroll_width"] <= width and check["right"] <= width  # no sideways scrolling
    assert check["attention_top"] < 0.2 * height and check["attention_top"] < check["heatmap_top"]
    assert check["hits"] == check["areas"] == len(_shown(edited["cases"]))  # folded columns hold no area
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, "--window-size=1366,768", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1366, 768)
    red = _rgb(html_report.FAILED_EDGE)
    rings = sum(n for n, rgb in image.getcolors(maxcolors=1 << 20) if all(abs(a - b) <= 40 for a, b in zip(rgb, red)))
    assert rings > 5 * 100  # the five failed and crashed cells' rings are on the first screen


@needs_chromium
def test_chromium_at_laptop_size_fits_a_split_matrix_and_its_maps_still_hit(wide, tmp_path):
    check = _check(tmp_path, render_html(wide, tmp_path / "report.html"), "1366,768")
    assert len(check["images"]) == 3 and check["scroll_width"] <= check["inner"][0] and check["right"] <= check["inner"][0]
    assert check["hits"] == check["areas"] == len(wide["cases"])


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
