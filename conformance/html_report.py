"""``report.html``: one self-contained page per run, a clickable heatmap per subject above a table of every case.

Why a heatmap: a run is a matrix (component x scale x profile against precision x backend), and what an operator
looks for is the odd cell: the one backend that is 50x worse in fp16, the NaN that appears only under one profile.
Each cell's colour is the case's error relative to the budget it was judged against (``rel_l2 / budget.rel_l2``, on
a fixed log scale centred on 1, so two reports can be compared by eye); marks show what the colour cannot (skipped,
error, failed, xfailed, non-finite and where it came from). The image carries an HTML ``<map>`` whose rectangles
are computed from the figure's own axes transform, so a click on a cell jumps to that case's numbers.

The page opens on what needs attention (``rundir.needs_attention``, the selection summary.md makes too), each entry
a link to its case. Columns and rows of a heatmap in which nothing ran are folded away and named in a line under
it. A heatmap wider than a laptop window is split between precisions into several images: an image map does not
follow an image that CSS scales down, so each image keeps its own pixel size and its map stays exact.

This module renders what ``results.json`` records and decides nothing: outcomes, reasons and first non-finite
locations are the runner's. matplotlib is used through its object API on the Agg canvas (no pyplot, no global
backend switch), so rendering inside a pytest process cannot disturb anything else.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .atomic import write_text
from .backends import backend_order
from .rundir import EXECUTED, PRECISION_ORDER, SCALE_ORDER, budget_rel_l2, check_document, load_results, needs_attention, ordered, rel_l2

REPORT_FILE = "report.html"

# Colour scale: rel_l2 / budget on a log axis from 1e-3 to 1e3, so "at budget" is the midpoint of the colour map.
RATIO_MIN, RATIO_MAX = 1e-3, 1e3
CMAP = "RdYlGn_r"
SKIPPED_FILL, SKIPPED_HATCH = "#dcdcdc", "#8c8c8c"
ERROR_FILL = "#111111"
NO_METRIC_FILL = "#5e3c99"  # ran, but no finite rel_l2 (non-finite outputs)
# A failed (or crashed) cell: a thick ring of a red the colour map does not reach, a white line inside it so the ring
# stands out from a red fill too, and a cross where no non-finite mark says more. An xfailed cell: thin, dashed, grey.
FAILED_EDGE, FAILED_WIDTH = "#e8000b", 2.6  # points
XFAILED_EDGE, XFAILED_WIDTH = "#8c8c8c", 1.2
FAILED_CROSS = {"marker": "x", "s": 55, "linewidths": 2.4, "c": "black"}

# Figure geometry, in inches at DPI: one cell is CELL x CELL.
DPI = 100
CELL = 0.30
CHAR = 0.068  # width of one tick-label character at FONT_SIZE
FONT_SIZE = 8
LEGEND_HEIGHT = 0.95
MIN_WIDTH = 8.0
MAX_WIDTH = 12.8  # wider heatmaps are split: the page must not scroll sideways in a 1366-pixel laptop window
RIGHT = 1.45  # the colour bar and its labels


# --- what a cell shows --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellMarks:
    """How one case is drawn: a fill, an optional border and an optional glyph. Read from the case, not judged."""

    fill: str  # ratio | no_metric | skipped | error
    ratio: float | None  # rel_l2 / budget when the fill is "ratio"
    border: str | None  # failed | xfailed
    glyph: str | None  # nonfinite | entered | masked | error

    def describe(self) -> str:
        parts = []
        if self.fill == "ratio":
            parts.append(f"{self.ratio:.3g} x budget")
        elif self.fill == "no_metric":
            parts.append("no finite rel_l2")
        if self.glyph in GLYPH_TEXT:
            parts.append(GLYPH_TEXT[self.glyph])
        return "; ".join(parts)


GLYPH_TEXT = {
    "nonfinite": "non-finite born inside the component",
    "entered": "non-finite entered at the component's input",
    "masked": "non-finite inside, masked by the subject's guard",
}


def cell_marks(case: dict) -> CellMarks:
    """The marks of ``case``: its recorded outcome, metrics, budget and first non-finite location, drawn as is."""
    outcome = case.get("outcome")
    if outcome == "skipped":
        return CellMarks("skipped", None, None, None)
    first = case.get("first_nonfinite") or None
    glyph = None
    if first:
        glyph = "masked" if first.get("masked_by_guard") else "entered" if first.get("entered") else "nonfinite"
    if outcome == "error":
        return CellMarks("error", None, None, glyph or "error")
    value, budget = rel_l2(case), budget_rel_l2(case)
    border = outcome if outcome in ("failed", "xfailed") else None
    if value is None or not budget:
        return CellMarks("no_metric", None, border, glyph)
    return CellMarks("ratio", value / budget, border, glyph)


# --- the heatmap --------------------------------------------------------------------------------------------------


def row_key(case: dict) -> tuple[str, str, str, str]:
    return (case["component"], case["scale"], case["profile"], case.get("guard", "none"))


def row_label(key: tuple[str, str, str, str]) -> str:
    component, scale, profile, guard = key
    return f"{component} {scale} {profile}" + ("" if guard == "none" else f" guard={guard}")


def _row_order(cases: list[dict]) -> list[tuple[str, str, str, str]]:
    keys = list(dict.fromkeys(row_key(c) for c in cases))
    components = list(dict.fromkeys(k[0] for k in keys))
    profiles = list(dict.fromkeys(k[2] for k in keys))
    scale_rank = {s: i for i, s in enumerate(ordered([k[1] for k in keys], SCALE_ORDER))}
    return sorted(keys, key=lambda k: (components.index(k[0]), scale_rank[k[1]], profiles.index(k[2]), k[3]))


def _column_order(cases: list[dict]) -> list[tuple[str, str]]:
    present = set((c["precision"], c["backend"]) for c in cases)
    precisions = ordered([c["precision"] for c in cases], PRECISION_ORDER)
    backends = ordered([c["backend"] for c in cases], backend_order())
    return [(p, b) for p in precisions for b in backends if (p, b) in present]


@dataclass(frozen=True)
class Fold:
    """A subject's matrix less the columns and rows in which no case ran: what its heatmap shows, what it leaves out,
    and the skipped cases that only the left-out cells held."""

    columns: list[tuple[str, str]]
    rows: list[tuple[str, str, str, str]]
    folded_columns: list[tuple[str, str]]
    folded_rows: list[tuple[str, str, str, str]]
    folded_cases: list[dict]


def fold(cases: list[dict]) -> Fold:
    ran = [c for c in cases if c.get("outcome") in EXECUTED]
    ran_columns = {(c["precision"], c["backend"]) for c in ran}
    ran_rows = {row_key(c) for c in ran}
    columns, rows = _column_order(cases), _row_order(cases)
    kept_columns = [k for k in columns if k in ran_columns]
    kept_rows = [k for k in rows if k in ran_rows]
    left_out = [c for c in cases if (c["precision"], c["backend"]) not in ran_columns or row_key(c) not in ran_rows]
    return Fold(kept_columns, kept_rows, [k for k in columns if k not in ran_columns], [k for k in rows if k not in ran_rows], left_out)


def fold_note(folded: Fold, all_columns: list[tuple[str, str]]) -> str:
    """One line naming what ``folded`` left out and the most common reason its cases were skipped; "" if nothing."""
    parts = []
    if folded.folded_columns:
        parts.append("columns " + _columns_phrase(folded.folded_columns, all_columns))
    if folded.folded_rows:
        labels = [row_label(k) for k in folded.folded_rows]
        parts.append("rows " + ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else ""))
    if not parts:
        return ""
    reasons = Counter(c.get("reason") or "no reason recorded" for c in folded.folded_cases)
    reason, n = reasons.most_common(1)[0]
    why = f"Skipped, most often: {reason} ({n} of {len(folded.folded_cases)} cases)" if len(reasons) > 1 else f"Skipped: {reason}"
    return f"Not run for this subject, folded: {'; '.join(parts)}. {why}."


def _columns_phrase(folded: list[tuple[str, str]], all_columns: list[tuple[str, str]]) -> str:
    """``fp8_mm (every backend); xformers, sage (fp16, bf16)``: whole precisions first, then each set of backends
    with the precisions it was left out of."""
    precisions = list(dict.fromkeys(p for p, _ in all_columns))
    left_out = {p: [b for q, b in folded if q == p] for p in precisions}
    whole = [p for p in precisions if left_out[p] and len(left_out[p]) == sum(1 for q, _ in all_columns if q == p)]
    by_backends: dict[tuple[str, ...], list[str]] = {}
    for p in precisions:
        if left_out[p] and p not in whole:
            by_backends.setdefault(tuple(left_out[p]), []).append(p)
    phrases = [f"{', '.join(whole)} (every backend)"] if whole else []
    phrases += [f"{', '.join(backends)} ({', '.join(ps)})" for backends, ps in by_backends.items()]
    return "; ".join(phrases)


def _left(labels: list[str]) -> float:
    """Inches left of the cells: the row labels."""
    return 0.25 + CHAR * max((len(s) for s in labels), default=0)


def column_chunks(columns: list[tuple[str, str]], labels: list[str]) -> list[list[tuple[str, str]]]:
    """``columns`` in pieces whose figures fit ``MAX_WIDTH``, cut between precisions (a precision wider than a whole
    figure is cut between backends)."""
    room = max(1, int((MAX_WIDTH - _left(labels) - RIGHT) / CELL))
    chunks: list[list[tuple[str, str]]] = []
    for p in dict.fromkeys(p for p, _ in columns):
        group = [col for col in columns if col[0] == p]
        if chunks and len(chunks[-1]) + len(group) <= room:
            chunks[-1] = chunks[-1] + group
        else:
            chunks += [group[i : i + room] for i in range(0, len(group), room)]
    return chunks


@dataclass(frozen=True)
class Area:
    """One clickable cell: pixel rectangle in the PNG (x0, y0 top-left; x1, y1 bottom-right) and its case."""

    x0: int
    y0: int
    x1: int
    y1: int
    case_id: str
    title: str


@dataclass(frozen=True)
class Heatmap:
    subject: str
    name: str  # of its <map>, unique in the page
    png: bytes
    width: int
    height: int
    areas: list[Area]
    rows: list[str]
    columns: list[str]


def draw_heatmap(
    subject: str, cases: list[dict], title: str, columns: list[tuple[str, str]] | None = None, rows: list | None = None, *, name: str | None = None, legend: bool = True
) -> Heatmap:
    """Draw one subject's matrix (only ``columns`` and ``rows`` where given: every one of its cases otherwise);
    return the PNG and the pixel rectangle of every cell that holds a case."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    rows = _row_order(cases) if rows is None else rows
    columns = _column_order(cases) if columns is None else columns
    row_index = {k: i for i, k in enumerate(rows)}
    col_index = {k: i for i, k in enumerate(columns)}
    grid: dict[tuple[int, int], dict] = {}
    for case in cases:
        r, c = row_index.get(row_key(case)), col_index.get((case["precision"], case["backend"]))
        if r is not None and c is not None:
            grid.setdefault((r, c), case)

    nrows, ncols = len(rows), len(columns)
    labels = [row_label(k) for k in rows]
    precisions = list(dict.fromkeys(p for p, _ in columns))
    left = _left(labels)
    group_width = {p: CELL * sum(1 for col in columns if col[0] == p) for p in precisions}
    upright = {p: CHAR * len(p) + 0.1 > group_width[p] for p in precisions}  # too long to stand beside its group
    top = 0.55 + max(CHAR * len(p) if upright[p] else 0.15 for p in precisions)
    labels_h = 0.25 + CHAR * max(len(b) for _, b in columns)
    heat_w, heat_h = CELL * ncols, CELL * nrows
    bar_h = min(max(heat_h, 1.6), 3.5)  # a tall matrix needs no taller colour bar
    width = max(left + heat_w + RIGHT, MIN_WIDTH)
    height = top + max(heat_h + labels_h, bar_h + 0.1) + (LEGEND_HEIGHT if legend else 0.1)

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, 1 - (top + heat_h) / height, heat_w / width, heat_h / height))
    cmap = _colormap()
    norm = LogNorm(RATIO_MIN, RATIO_MAX, clip=False)

    values = np.full((nrows, ncols), np.nan)
    marks = {}
    for (r, c), case in grid.items():
        m = cell_marks(case)
        marks[(r, c)] = m
        if m.fill == "ratio":
            values[r, c] = min(max(m.ratio, RATIO_MIN), RATIO_MAX)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, extent=(0, ncols, nrows, 0), interpolation="nearest", aspect="auto")

    def rect(r, c, inset=0.0):
        return Rectangle((c + inset, r + inset), 1 - 2 * inset, 1 - 2 * inset)

    by_fill = {kind: [rect(r, c) for (r, c), m in marks.items() if m.fill == kind] for kind in ("skipped", "error", "no_metric")}
    if by_fill["skipped"]:
        ax.add_collection(PatchCollection(by_fill["skipped"], facecolor=SKIPPED_FILL, edgecolor=SKIPPED_HATCH, linewidth=0, hatch="///"))
    for kind, colour in (("error", ERROR_FILL), ("no_metric", NO_METRIC_FILL)):
        if by_fill[kind]:
            ax.add_collection(PatchCollection(by_fill[kind], facecolor=colour, edgecolor="none"))
    xfailed = [rect(r, c, 0.1) for (r, c), m in marks.items() if m.border == "xfailed"]
    if xfailed:
        ax.add_collection(PatchCollection(xfailed, facecolor="none", edgecolor=XFAILED_EDGE, linewidth=XFAILED_WIDTH, linestyle="dashed", zorder=5))
    ring = FAILED_WIDTH / 72 / CELL / 2  # half the ring's width, in cells: the ring lies inside its cell
    failed = [(r, c) for (r, c), m in marks.items() if m.border == "failed" or m.fill == "error"]
    if failed:
        ax.add_collection(PatchCollection([rect(r, c, ring) for r, c in failed], facecolor="none", edgecolor=FAILED_EDGE, linewidth=FAILED_WIDTH, zorder=5))
        ax.add_collection(PatchCollection([rect(r, c, 2 * ring + 0.02) for r, c in failed], facecolor="none", edgecolor="white", linewidth=0.8, zorder=5))
    glyph_style = {
        "nonfinite": {"marker": "X", "facecolor": "white", "edgecolor": "black"},
        "entered": {"marker": ">", "facecolor": "white", "edgecolor": "black"},
        "masked": {"marker": "o", "facecolor": "none", "edgecolor": "black"},
    }
    for glyph, style in glyph_style.items():
        points = [(c + 0.5, r + 0.5) for (r, c), m in marks.items() if m.glyph == glyph]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, s=70, linewidths=1.3, zorder=4, **style)
    crosses = [(c + 0.5, r + 0.5) for (r, c), m in marks.items() if m.border == "failed" and m.glyph is None]
    if crosses:
        xs, ys = zip(*crosses)
        ax.scatter(xs, ys, zorder=4, **FAILED_CROSS)
    for (r, c), m in marks.items():
        if m.glyph == "error":
            ax.text(c + 0.5, r + 0.5, "E", color="white", ha="center", va="center", fontsize=FONT_SIZE + 1, fontweight="bold", zorder=4)

    # white cell separators, black lines between precision groups; above the borders, so two failed cells side by
    # side keep a line between them
    ax.vlines(range(1, ncols), 0, nrows, colors="white", linewidth=1.0, zorder=6)
    ax.hlines(range(1, nrows), 0, ncols, colors="white", linewidth=1.0, zorder=6)
    group_edges = [i for i in range(1, ncols) if columns[i][0] != columns[i - 1][0]]
    ax.vlines(group_edges, 0, nrows, colors="black", linewidth=1.4, zorder=6)
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)
    ax.set_yticks([r + 0.5 for r in range(nrows)], labels, fontsize=FONT_SIZE)
    ax.set_xticks([c + 0.5 for c in range(ncols)], [b for _, b in columns], fontsize=FONT_SIZE, rotation=90)
    ax.tick_params(length=0)
    for p in precisions:
        span = [i for i, col in enumerate(columns) if col[0] == p]
        centre = (span[0] + span[-1] + 1) / 2
        ax.text(centre, -0.15, p, rotation=90 if upright[p] else 0, ha="center", va="bottom", fontsize=FONT_SIZE, fontweight="bold", clip_on=False)
    fig.text(left / width, 1 - 0.12 / height, title, fontsize=FONT_SIZE + 2, va="top", ha="left")

    cax = fig.add_axes(((left + heat_w + 0.3) / width, 1 - (top + bar_h) / height, 0.18 / width, bar_h / height))
    bar = fig.colorbar(image, cax=cax, extend="both")
    bar.set_label("rel_l2 / budget (log)", fontsize=FONT_SIZE)
    bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    bar.ax.axhline(1.0, color="black", linewidth=1.5)
    ticks = [10.0**k for k in range(-3, 4)]
    bar.set_ticks(ticks, labels=["budget" if t == 1.0 else f"{t:g}" for t in ticks])

    if legend:
        cross = Line2D([], [], linestyle="", marker="x", markersize=6, markeredgewidth=FAILED_CROSS["linewidths"], markeredgecolor=FAILED_CROSS["c"])
        ring_patch = Patch(facecolor="white", edgecolor=FAILED_EDGE, linewidth=FAILED_WIDTH * 0.7)  # a legend handle is flat
        handles = [
            Patch(facecolor=cmap(norm(0.03))),
            Patch(facecolor=cmap(norm(30.0))),
            Patch(facecolor=NO_METRIC_FILL),
            Patch(facecolor=SKIPPED_FILL, edgecolor=SKIPPED_HATCH, hatch="///", linewidth=0),
            (ring_patch, cross),
            (Patch(facecolor=ERROR_FILL, edgecolor=FAILED_EDGE, linewidth=FAILED_WIDTH * 0.7), Line2D([], [], linestyle="", marker="$E$", markersize=6, color="white")),
            Patch(facecolor="white", edgecolor=XFAILED_EDGE, linewidth=XFAILED_WIDTH, linestyle="dashed"),
            Line2D([], [], linestyle="", markersize=8, **_legend_marker(glyph_style["nonfinite"])),
            Line2D([], [], linestyle="", markersize=8, **_legend_marker(glyph_style["entered"])),
            Line2D([], [], linestyle="", markersize=8, **_legend_marker(glyph_style["masked"])),
        ]
        legend_labels = [
            "within budget (colour = rel_l2/budget)", "over budget", "ran, no finite rel_l2", "skipped (reason: hover / table)",
            "FAILED: red border, cross", "E: error (crashed)", "xfailed (declared)",
            "non-finite born inside", "non-finite entered at input", "non-finite masked by guard",
        ]
        fig.legend(
            handles=handles,
            labels=legend_labels,
            loc="lower left",
            bbox_to_anchor=(0.1 / width, 0.05 / height),
            ncol=4 if width < 12 else 5,
            fontsize=FONT_SIZE - 0.5,
            frameon=False,
            handlelength=1.6,
            columnspacing=1.2,
        )

    fig.canvas.draw()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    px_w, px_h = int(round(fig.bbox.width)), int(round(fig.bbox.height))
    to_px = ax.transData.transform
    areas = []
    for (r, c), case in sorted(grid.items()):
        (x0, y_bottom), (x1, y_top) = to_px([(c, r + 1), (c + 1, r)])
        m = marks[(r, c)]
        areas.append(
            Area(
                int(round(x0)),
                int(round(px_h - y_top)),
                int(round(x1)),
                int(round(px_h - y_bottom)),
                case["id"],
                _area_title(case, m),
            )
        )
    return Heatmap(subject, name or f"map-{subject}", png.getvalue(), px_w, px_h, areas, labels, [f"{p} {b}" for p, b in columns])


def subject_heatmaps(subject: str, cases: list[dict], title: str) -> tuple[list[Heatmap], str]:
    """A subject's heatmaps (its folded matrix, split to fit ``MAX_WIDTH``; the legend under the last) and the line
    that says what was folded."""
    folded = fold(cases)
    note = fold_note(folded, _column_order(cases))
    if not folded.columns:
        return [], note
    chunks = column_chunks(folded.columns, [row_label(k) for k in folded.rows])
    maps = []
    for i, columns in enumerate(chunks):
        part = title if len(chunks) == 1 else f"{title} ({', '.join(dict.fromkeys(p for p, _ in columns))})"
        maps.append(draw_heatmap(subject, cases, part, columns, folded.rows, name=f"map-{subject}-{i + 1}", legend=i == len(chunks) - 1))
    return maps, note


def _colormap():
    from matplotlib import colormaps

    return colormaps[CMAP].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


def _legend_marker(style: dict) -> dict:
    return {"marker": style["marker"], "markerfacecolor": style["facecolor"], "markeredgecolor": style["edgecolor"], "markeredgewidth": 1.3}


def _area_title(case: dict, marks: CellMarks) -> str:
    parts = [f"{case['id']}: {case['outcome']}"]
    described = marks.describe()
    if described:
        parts.append(described)
    if case.get("reason"):
        parts.append(case["reason"])
    return " | ".join(parts)


# --- the page -----------------------------------------------------------------------------------------------------


def case_anchor(case_id: str) -> str:
    """The element id of a case's row: ``case-<id>`` (ids are made of letters, digits and ``._=-``)."""
    return f"case-{case_id}"


def _href(case_id: str) -> str:
    return "#" + quote(case_anchor(case_id), safe="-._~=")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, fmt: str = ".3g") -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _kv(mapping: dict | None, skip: tuple[str, ...] = ()) -> str:
    if not mapping:
        return '<span class="none">-</span>'
    items = [f"<div><b>{_e(k)}</b> {_e(_num(v))}</div>" for k, v in mapping.items() if k not in skip and not isinstance(v, (dict, list))]
    nested = [f"<div><b>{_e(k)}</b> {_e(v)}</div>" for k, v in mapping.items() if k not in skip and isinstance(v, (dict, list))]
    return "".join(items + nested)


def _list(values: list | None) -> str:
    if not values:
        return ""
    return "<ul>" + "".join(f"<li>{_e(v)}</li>" for v in values) + "</ul>"


STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.2em;color:#111}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.2em;margin:1.2em 0 .4em} h3{font-size:1em;margin:.6em 0 .2em}
p.run-line{margin:.2em 0 .8em;color:#333}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 5px;vertical-align:top;text-align:left}
table.run td:first-child{font-weight:bold;background:#f4f4f4}
#attention{border-left:5px solid #e8000b;background:#fff4f4;padding:.3em .9em .5em;margin:.6em 0 1em}
#attention.clear{border-left-color:#176a22;background:#f2faf3}
#attention h2{margin:.2em 0} #attention ul{padding-left:1.3em} #attention li{margin:.1em 0;overflow-wrap:anywhere}
#attention .where{color:#444}
.heatmap{overflow-x:auto;max-width:100%;border:1px solid #ddd;margin:.4em 0}
.heatmap img{max-width:none;display:block}
p.folded{color:#444;margin:.2em 0 .8em;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%}
table.cases{font-size:12px} table.cases td{max-width:32em;overflow-wrap:anywhere}
tr:target{outline:3px solid #1f6feb;background:#fff6cc}
.o-passed{color:#176a22;font-weight:bold} .o-failed,.o-error{color:#b00020;font-weight:bold}
.o-xfailed{color:#8a5a00;font-weight:bold} .o-skipped{color:#666}
.none{color:#999} ul{margin:0;padding-left:1.1em} code{font-size:11px}
dl.legend dt{font-weight:bold;float:left;clear:left;width:11em} dl.legend dd{margin-left:11.5em}
.ring{display:inline-block;width:.9em;height:.9em;vertical-align:-.1em;box-sizing:border-box}
.ring.failed{border:3px solid #e8000b} .ring.xfailed{border:1px dashed #8c8c8c}
"""


def _option(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


OUTCOME_ORDER = ("passed", "failed", "xfailed", "error", "skipped")


def _outcomes(cases: list[dict]) -> str:
    counts = Counter(c.get("outcome") for c in cases)
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in OUTCOME_ORDER)


def _run_line(run: dict, cases: list[dict]) -> str:
    """The run in one line above what needs attention; the full header is further down."""
    bits = [run.get("device"), run.get("gpu"), run.get("torch") and f"torch {run['torch']}", run.get("started"), _outcomes(cases)]
    return f'<p class="run-line">{" | ".join(_e(b) for b in bits if b)} (<a href="#run">run details</a>)</p>'


def _run_header(run: dict, cases: list[dict]) -> str:
    subject = run.get("subject") or {}
    commit = subject.get("commit") or "-"
    if subject.get("dirty"):
        commit += " (sources differ from this commit)"
    options = run.get("options") or {}
    rows = [
        ("subject", f"{subject.get('name', '?')} {subject.get('version', '?')}"),
        ("commit", commit),
        ("path", subject.get("path") or "-"),
        ("device", " / ".join(str(x) for x in (run.get("device"), run.get("gpu")) if x)),
        ("torch", " / ".join(str(x) for x in (run.get("torch"), run.get("cuda") and f"CUDA {run.get('cuda')}") if x)),
        ("python", run.get("python", "-")),
        ("started", run.get("started", "-")),
        ("finished", f"interrupted: {run.get('cases_finished', len(cases))} cases finished (from results.jsonl)" if run.get("interrupted") else run.get("finished", "-")),
        ("selection", " ".join(f"{k}={_option(v)}" for k, v in options.items() if v not in (None, False, [], ""))),
        ("outcomes", _outcomes(cases)),
    ]
    return '<table class="run">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


# --- what needs attention -----------------------------------------------------------------------------------------

ATTENTION_SHOWN = 12  # entries per list before the rest fold into "n more"


def first_nonfinite_text(first: dict | None) -> str:
    """Where the first non-finite value was, in words: ``born in attn (attention): output x16``."""
    if not first:
        return ""
    values = f"{first.get('tensor', '?')} x{first.get('count', '?')}"
    if first.get("entered"):
        return f"entered at the input: {values}"
    at = first.get("module") or "?"
    if first.get("boundary") and first.get("boundary") != at:
        at += f" ({first['boundary']})"
    return f"in {at}, masked by the subject's guard: {values}" if first.get("masked_by_guard") else f"born in {at}: {values}"


def _entry(case: dict, detail: str) -> str:
    outcome = case.get("outcome", "?")
    return (
        f'<li><a href="{_e(_href(case["id"]))}"><code>{_e(case["id"])}</code></a> '
        f'<span class="o-{_e(outcome)}">{_e(outcome)}</span>{": " + _e(detail) if detail else ""}</li>'
    )


def _failure_detail(case: dict) -> str:
    first = first_nonfinite_text(case.get("first_nonfinite"))
    return (case.get("reason") or "") + (f" [first non-finite: {first}]" if first else "")


def _change_detail(case: dict) -> str:
    messages = [f.get("message", "") for f in case.get("failure_kinds") or [] if f.get("kind") == "expectation"]
    messages += [n for n in case.get("notes") or [] if n.startswith("stale expected failure")]
    return "; ".join(messages) or "declared as an expected failure, passed here"


def _entries(cases: list[dict], detail) -> str:
    shown = "".join(_entry(c, detail(c)) for c in cases[:ATTENTION_SHOWN])
    rest = cases[ATTENTION_SHOWN:]
    more = f"<details><summary>{len(rest)} more</summary><ul>{''.join(_entry(c, detail(c)) for c in rest)}</ul></details>" if rest else ""
    return f"<ul>{shown}</ul>{more}"


def attention_html(run: dict, cases: list[dict]) -> str:
    """The page's first section: failed and crashed cases, changed expectations and masked non-finite values (the
    selection summary.md makes), each linked to its row; one line when there are none."""
    attention = needs_attention(cases)
    groups = [
        ("Failed and errors", "the verdict failed, or the case crashed before one", attention.failed, _failure_detail),
        ("Changed expectations", "a declared expected failure that now fails another way, or passed", attention.changed + attention.stale, _change_detail),
        ("Masked non-finite values", "non-finite inside the component, hidden from the outputs by the subject's guard", attention.masked, lambda c: first_nonfinite_text(c["first_nonfinite"])),
    ]
    parts = []
    if run.get("interrupted"):
        parts.append(f"<p><b>Interrupted run</b>: {_e(run.get('cases_finished', len(cases)))} cases finished; the rest never ran.</p>")
    for title, meaning, selected, detail in groups:
        if selected:
            parts.append(f'<h3>{_e(title)} ({len(selected)})</h3><div class="where">{_e(meaning)}</div>{_entries(selected, detail)}')
    if not any(selected for _, _, selected, _ in groups):
        xfailed = sum(1 for c in cases if c.get("outcome") == "xfailed")
        declared = f"; {xfailed} xfailed as declared" if xfailed else ""
        parts.append(f"<p>Nothing needs attention: no failed or crashed case, changed expectation or masked non-finite value{declared}.</p>")
        return '<section id="attention" class="clear"><h2>Needs attention</h2>' + "".join(parts) + "</section>"
    return '<section id="attention"><h2>Needs attention</h2>' + "".join(parts) + "</section>"


LEGEND = f"""
<dl class="legend">
<dt>colour</dt><dd>rel_l2 against the golden divided by the rel_l2 budget the case was judged against
(<code>budget.rel_l2</code>; for cases that record none, <code>fixtures/budgets.toml</code>), log scale from
{RATIO_MIN:g} to {RATIO_MAX:g}; the black line on the colour bar is the budget (1). Green is well inside it, red is over it.</dd>
<dt><span class="ring failed"></span> thick red border</dt><dd>failed, with a cross unless a non-finite mark says
more; around a black cell marked E: error (the case crashed before a verdict).</dd>
<dt><span class="ring xfailed"></span> dashed grey</dt><dd>xfailed: a declared expected failure that failed as declared.</dd>
<dt>purple</dt><dd>ran, but has no finite rel_l2 (non-finite outputs).</dd>
<dt>grey, hatched</dt><dd>skipped; the reason is in the cell's tooltip and in the table.</dd>
<dt>white</dt><dd>no case of this precision and backend for this row in the run.</dd>
<dt>folded</dt><dd>a column (precision and backend) or row in which no case of the subject ran is left out; the line
under the heatmap names it and why its cases were skipped.</dd>
<dt>X / &#9655; / o</dt><dd>first non-finite value born inside the component / entered at its input / inside but masked
by the subject's guard (the outputs are finite).</dd>
<dt>click</dt><dd>every cell links to its case in the table below.</dd>
</dl>
"""


def _heatmap_html(heatmap: Heatmap) -> str:
    data = base64.b64encode(heatmap.png).decode("ascii")
    areas = "".join(
        f'<area shape="rect" coords="{a.x0},{a.y0},{a.x1},{a.y1}" href="{_e(_href(a.case_id))}" title="{_e(a.title)}" alt="{_e(a.case_id)}">'
        for a in heatmap.areas
    )
    return (
        f'<div class="heatmap"><img class="heatmap-img" src="data:image/png;base64,{data}" width="{heatmap.width}" '
        f'height="{heatmap.height}" usemap="#{_e(heatmap.name)}" alt="heatmap of {_e(heatmap.subject)}: rel_l2/budget per case">'
        f'<map name="{_e(heatmap.name)}" id="{_e(heatmap.name)}">{areas}</map></div>'
    )


def _subject_html(name: str, version: str, cases: list[dict]) -> list[str]:
    maps, note = subject_heatmaps(name, cases, f"{name} {version}: rel_l2 / budget per case".replace("  ", " "))
    parts = [f'<h2 id="subject-{_e(name)}">{_e(name)} {_e(version)}</h2>', *(_heatmap_html(h) for h in maps)]
    if not maps:
        parts.append("<p>No case of this subject ran.</p>")
    if note:
        parts.append(f'<p class="folded">{_e(note)}</p>')
    return parts


CASE_COLUMNS = ("case", "outcome", "reason", "metrics", "stats", "first non-finite", "backend calls", "golden", "budget", "failures / notes")


def _case_row(case: dict) -> str:
    metrics = dict(case.get("metrics") or {})
    budget = budget_rel_l2(case)
    if rel_l2(case) is not None and budget:
        metrics["rel_l2 / budget"] = rel_l2(case) / budget
    golden = case.get("golden") or None
    golden_cells = _kv(golden, skip=("sha256",))
    if golden and golden.get("sha256"):
        golden_cells += f"<div><b>sha256</b> <code>{_e(golden['sha256'][:16])}…</code></div>"
    outcome = case.get("outcome", "?")
    return (
        f'<tr id="{_e(case_anchor(case["id"]))}" class="row-{_e(outcome)}">'
        f"<td><code>{_e(case['id'])}</code></td>"
        f'<td class="o-{_e(outcome)}">{_e(outcome)}</td>'
        f"<td>{_e(case.get('reason') or '')}</td>"
        f"<td>{_kv(metrics)}</td>"
        f"<td>{_kv(case.get('stats'))}</td>"
        f"<td>{_kv(case.get('first_nonfinite'))}</td>"
        f"<td>{_kv(case.get('backend_calls'))}</td>"
        f"<td>{golden_cells if golden else _kv(None)}</td>"
        f"<td>{_kv(case.get('budget'))}</td>"
        f"<td>{_list(case.get('failures'))}{_list(case.get('notes'))}</td>"
        "</tr>"
    )


def render_html_text(document: dict) -> str:
    """The page for a results document, as a string (``render_html`` writes it)."""
    check_document(document)
    run, cases = document["run"], document["cases"]
    subject = run.get("subject") or {}
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Conformance: {_e(subject.get('name', '?'))} {_e(subject.get('version', ''))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Conformance report: {_e(subject.get('name', '?'))} {_e(subject.get('version', ''))}</h1>",
        _run_line(run, cases),
        attention_html(run, cases),
    ]
    by_subject: dict[str, list[dict]] = {}
    for case in cases:
        by_subject.setdefault(case.get("subject", "?"), []).append(case)
    for name, subject_cases in by_subject.items():
        parts += _subject_html(name, subject.get("version", "") if name == subject.get("name") else "", subject_cases)
    if not cases:
        parts.append("<p>This run recorded no cases.</p>")
    parts += [
        '<h2 id="run">Run</h2>',
        _run_header(run, cases),
        "<h2>Legend</h2>",
        LEGEND,
        f"<h2>Cases ({len(cases)})</h2>",
        '<div class="table-wrap"><table class="cases"><thead><tr>' + "".join(f"<th>{_e(c)}</th>" for c in CASE_COLUMNS) + "</tr></thead><tbody>",
        *(_case_row(c) for c in cases),
        "</tbody></table></div>",
        "<p>Per-boundary probe records and per-output metrics are in <code>results.json</code>.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def render_html(document: dict, out_path: Path) -> Path:
    """Write the self-contained page for ``document`` to ``out_path`` (a directory gets ``report.html``); atomic."""
    out_path = Path(out_path)
    if out_path.is_dir():
        out_path = out_path / REPORT_FILE
    return write_text(out_path, render_html_text(document))


def render_report_dir(report_dir: Path) -> Path:
    """``<report_dir>/report.html`` from ``<report_dir>/results.json``."""
    return render_html(load_results(report_dir), Path(report_dir) / REPORT_FILE)

