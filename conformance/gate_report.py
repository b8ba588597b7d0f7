"""Renderers of a ``GateResult``: ``gate.md`` (CI step summaries, the terminal) and ``gate.html`` (self-contained).

They print the verdicts and the numbers ``gate.compare_runs`` attached to them and decide nothing: what regressed,
and the exit code, are the gate's. Both lead with the cases that need a person (regressed, semantics changed), then
the rest; the markdown form can leave the unchanged cases out for a terminal.
"""

from __future__ import annotations

import html

from .compare import gate_margins
from .gate import VERDICTS, BenchmarkDelta, CaseVerdict, GateResult

VERDICT_COLOURS = {
    "regressed": "#b00020",
    "semantics changed": "#8a3ffc",
    "improved": "#176a22",
    "added": "#1f6feb",
    "removed": "#8a5a00",
    "unchanged": "#666666",
}


def _n(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _subject(run: dict) -> str:
    s = run.get("subject") or {}
    text = f"{s.get('name', '?')} {s.get('version', '?')}"
    if s.get("commit"):
        text += f" @ {str(s['commit'])[:12]}" + (" (dirty)" if s.get("dirty") else "")
    return text


def _torch(run: dict) -> str:
    return f"{run.get('torch')}" + (f" (CUDA {run['cuda']})" if run.get("cuda") else "")


def _run_rows(result: GateResult) -> list[tuple[str, str, str]]:
    b, c = result.baseline_run, result.candidate_run
    return [
        ("subject", _subject(b), _subject(c)),
        ("torch", _torch(b), _torch(c)),
        ("device", f"{b.get('device')} {b.get('gpu') or ''}".strip(), f"{c.get('device')} {c.get('gpu') or ''}".strip()),
        ("run", f"{b.get('started')} -> {b.get('finished')}", f"{c.get('started')} -> {c.get('finished')}"),
        ("report", str(result.baseline_dir), str(result.candidate_dir)),
    ]


def _rules(result: GateResult) -> str:
    slowdown = "reported only" if result.fail_on_benchmark_slowdown is None else f"fail above {1 + result.fail_on_benchmark_slowdown:.2f}x"
    margins = ", ".join(f"{name} x(1+{m.rel:g})+{m.abs:g}" for name, m in gate_margins().items())
    return (
        f"regressed: rel_l2 above the baseline's by the measured noise margin ({margins}), newly non-finite, newly "
        f"failing (xfailed -> failed included), failing another way (kind or location), a backend call missing or a logged "
        f"fallback, ran in the baseline and skipped or missing now (a component that no longer builds), newly saturated, "
        f"lost headroom; semantics changed: fp32 outputs (whole and bulk channels) differ from the baseline's by more "
        f"than {result.fp32_rtol:g} rel-L2, or the inputs are built differently (and then the other precisions' rel_l2 "
        f"moves of that component and profile count with that change)"
        f"{' (accepted)' if result.accept_semantics else ''}; inconclusive (exit 5): nothing comparable ran; benchmarks: {slowdown}."
    )


def _case_cells(v: CaseVerdict) -> list[str]:
    b, c, d = v.baseline, v.candidate, v.output_diff
    return [
        v.verdict,
        v.case_id,
        b.outcome if b else "-",
        c.outcome if c else "-",
        _n(b.rel_l2) if b else "-",
        _n(c.rel_l2) if c else "-",
        _n(v.threshold),
        _n(d.rel_l2) if d else "-",
        "; ".join(v.why),
    ]


CASE_HEADER = ("verdict", "case", "baseline", "candidate", "rel_l2 baseline", "rel_l2 candidate", "regresses above", "fp32 output diff", "why")
BENCH_HEADER = ("benchmark", "baseline median (s)", "candidate median (s)", "candidate / baseline", "")


def _bench_cells(b: BenchmarkDelta) -> list[str]:
    flag = "FAIL" if b.failing else ("only in baseline" if b.candidate_median is None else "only in candidate" if b.baseline_median is None else "")
    return [b.name, _n(b.baseline_median, ".4g"), _n(b.candidate_median, ".4g"), _n(b.ratio, ".3f"), flag]


# --- markdown -----------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(x) for x in row) + " |" for row in rows]
    return lines


def gate_markdown(result: GateResult, include_unchanged: bool = True) -> str:
    """The gate's verdicts as markdown; with ``include_unchanged=False`` the unchanged cases are only counted."""
    counts = result.counts
    status = {0: "PASS", 5: "INCONCLUSIVE"}.get(result.exit_code, "FAIL")
    lines = [
        f"# Upgrade gate: {status} (exit {result.exit_code})",
        "",
        result.exit_meaning,
        "",
        *_md_table(("", "baseline", "candidate"), _run_rows(result)),
        "",
        " | ".join(f"{v}: {counts.get(v, 0)}" for v in VERDICTS),
        "",
        f"Rules: {_rules(result)}",
        "",
    ]
    if result.notes:
        lines += ["## Notes", "", *(f"- {_md_cell(n)}" for n in result.notes), ""]
    attention = [v for v in result.cases if v.verdict != "unchanged"]
    unchanged = result.with_verdict("unchanged")
    lines += ["## Cases", ""]
    if attention:
        lines += [*_md_table(CASE_HEADER, [_case_cells(v) for v in attention]), ""]
    else:
        lines += ["Every case is unchanged.", ""]
    if unchanged and include_unchanged:
        table = _md_table(CASE_HEADER, [_case_cells(v) for v in unchanged])
        lines += [f"<details><summary>unchanged ({len(unchanged)})</summary>", "", *table, "", "</details>", ""]
    elif unchanged:
        lines += [f"{len(unchanged)} unchanged cases not listed (see gate.md / gate.html).", ""]
    if result.benchmarks:
        lines += ["## Benchmarks (median)", "", *_md_table(BENCH_HEADER, [_bench_cells(b) for b in result.benchmarks]), ""]
    return "\n".join(lines)


# --- html ---------------------------------------------------------------------------------------------------------


def _e(text) -> str:
    return html.escape(str(text), quote=True)


STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.2em;color:#111}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.2em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.3em 0} td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;text-align:left}
td{max-width:40em;overflow-wrap:anywhere} .pass{color:#176a22} .fail{color:#b00020}
.badge{display:inline-block;padding:0 .45em;border-radius:3px;color:#fff;font-weight:bold;white-space:nowrap}
tr:target{outline:3px solid #1f6feb}
"""


def _html_table(header, rows, row_ids=None) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        attr = f' id="{_e(row_ids[i])}"' if row_ids else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def gate_html(result: GateResult) -> str:
    """The gate's verdicts as one self-contained HTML page (no external resources, no script)."""
    counts = result.counts
    status = {0: "PASS", 5: "INCONCLUSIVE"}.get(result.exit_code, "FAIL")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>Upgrade gate: {status}</title><style>{STYLE}</style></head><body>",
        f'<h1>Upgrade gate: <span class="{status.lower()}">{status}</span> (exit {result.exit_code})</h1>',
        f"<p>{_e(result.exit_meaning)}</p>",
        _html_table(("", "baseline", "candidate"), [[_e(x) for x in row] for row in _run_rows(result)]),
        "<p>"
        + " ".join(f'<span class="badge" style="background:{VERDICT_COLOURS[v]}">{_e(v)} {counts.get(v, 0)}</span>' for v in VERDICTS)
        + "</p>",
        f"<p>Rules: {_e(_rules(result))}</p>",
    ]
    if result.notes:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{_e(n)}</li>" for n in result.notes), "</ul>"]
    rows = []
    for v in result.cases:
        cells = [_e(x) for x in _case_cells(v)]
        cells[0] = f'<span class="badge" style="background:{VERDICT_COLOURS[v.verdict]}">{_e(v.verdict)}</span>'
        cells[1] = f"<code>{cells[1]}</code>"
        cells[-1] = "<br>".join(_e(w) for w in v.why)
        rows.append(cells)
    parts += [f"<h2>Cases ({len(result.cases)})</h2>", _html_table(CASE_HEADER, rows, [f"gate-{v.case_id}" for v in result.cases])]
    if result.benchmarks:
        parts += ["<h2>Benchmarks (median)</h2>", _html_table(BENCH_HEADER, [[_e(x) for x in _bench_cells(b)] for b in result.benchmarks])]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
