"""Renderers of one list of ``CaseResult``: results.json, summary.md, junit.xml and the terminal table."""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree as ET

import torch

from .atomic import write_text
from .machine import cpu_path
from .results import CaseResult
from .rundir import needs_attention

SCHEMA_VERSION = 1


def environment() -> dict:
    cuda = torch.version.cuda
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "cuda": cuda,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": cpu_path(),
    }


def results_document(run: dict, results: Sequence[CaseResult]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run": run, "cases": [r.as_dict() for r in results]}


def _num(x, fmt: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (x != x):
        return "nan"
    return format(x, fmt)


def _first(result: CaseResult) -> str:
    f = result.first_nonfinite
    if not f:
        return ""
    where = "entered at input" if f.get("entered") else f"{f['module']}"
    masked = " (masked by guard)" if f.get("masked_by_guard") else ""
    return f"{where}: {f['tensor']} x{f['count']}{masked}"


def _calls(result: CaseResult) -> str:
    return ", ".join(f"{k.split(':', 1)[-1]}={v}" for k, v in result.backend_calls.items())


COLUMNS = ("case", "outcome", "rel_l2", "max_abs", "cosine", "sqnr dB", "max |x|", "headroom", "saturated", "non-finite", "first non-finite", "calls", "s")


def _row(r: CaseResult) -> list[str]:
    m, s = r.metrics, r.stats
    return [
        r.id,
        r.outcome,
        _num(m.get("rel_l2")),
        _num(m.get("max_abs")),
        _num(m.get("cosine"), ".6f"),
        _num(m.get("sqnr_db"), ".1f"),
        _num(s.get("max_abs_value"), ".3g"),
        _num(s.get("headroom"), ".3g"),
        str(s.get("saturated", "")),
        str(s.get("nonfinite", "")),
        _first(r),
        _calls(r),
        f"{r.seconds:.2f}",
    ]


def _cell(text: str) -> str:
    """Text safe in a GitHub table cell or list item: a "|" would end the cell (the header's "max |x|" made 15 cells
    of 13), a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(run: dict, results: Sequence[CaseResult]) -> str:
    counts = Counter(r.outcome for r in results)
    subject = run.get("subject") or {}
    lines = [
        "# Conformance summary",
        "",
        f"Subject **{subject.get('name')} {subject.get('version')}**"
        + (f" (commit `{subject['commit']}`)" if subject.get("commit") else "")
        + f" on {run.get('device')} | torch {run.get('torch')} | {run.get('started')} -> {run.get('finished')}",
        "",
        " | ".join(f"{k}: {counts.get(k, 0)}" for k in ("passed", "failed", "xfailed", "error", "skipped")),
        "",
    ]
    lines += [f"> {note}" for note in run.get("notes") or []] + ([""] if run.get("notes") else [])
    # What needs attention comes first: a reader of a run with hundreds of cases must not scroll to find a failure.
    attention = needs_attention(results)
    failed, changed, stale = attention.failed, attention.changed, attention.stale
    if failed:
        lines += [f"## Failed ({len(failed)})", ""]
        if changed:
            lines += [f"{len(changed)} of them matched a declared expected failure that now fails another way (changed expectation).", ""]
        lines += [f"- `{r.id}` **{r.outcome}**: {_cell(r.reason or '')}" for r in failed] + [""]
    if stale:
        lines += ["## Stale expected failures", "", "Declared non-strict in `fixtures/expected_failures.toml` and passed here:", ""]
        by_entry = Counter(i for r in stale for i in r.expected_failure["index"])
        for index, n in sorted(by_entry.items()):
            example = next(r.id for r in stale if index in r.expected_failure["index"])
            lines.append(f"- expected[{index}]: {n} case(s) passed, e.g. `{example}`")
        lines.append("")
    from .workloads.report import sequences_markdown

    lines += sequences_markdown(results)
    ran = [r for r in results if r.outcome != "skipped"]
    if ran:
        lines += ["## Cases", ""]
        lines += ["| " + " | ".join(_cell(c) for c in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cell(cell) for cell in _row(r)) + " |" for r in ran]
        lines.append("")
    xfailed = [r for r in results if r.outcome == "xfailed"]
    if xfailed:
        lines += [f"## Expected failures ({len(xfailed)})", ""]
        lines += [f"- `{r.id}`: {_cell(r.reason or '')}" for r in xfailed] + [""]
    identity = run.get("golden_identity")
    if identity:
        lines += [f"Goldens keyed by `{identity.get('identity')}` ({identity.get('from')}).", ""]
    skipped = Counter(r.reason for r in results if r.outcome == "skipped")
    if skipped:
        lines += ["## Skipped", "", "| cases | reason |", "|---|---|"]
        lines += [f"| {n} | {_cell(reason or '')} |" for reason, n in skipped.most_common()]
        lines.append("")
    changes = run.get("golden_changes") or []
    if changes:
        lines += ["## Goldens written", ""] + [f"- {c}" for c in changes] + [""]
    lines.append(f"Golden stores: committed `{run.get('golden_stores', {}).get('committed')}`, local `{run.get('golden_stores', {}).get('local')}`.")
    return "\n".join(lines) + "\n"


def junit_xml(run: dict, results: Sequence[CaseResult]) -> str:
    counts = Counter(r.outcome for r in results)
    suite = ET.Element(
        "testsuite",
        name="conformance",
        tests=str(len(results)),
        failures=str(counts.get("failed", 0)),
        errors=str(counts.get("error", 0)),
        skipped=str(counts.get("skipped", 0) + counts.get("xfailed", 0)),
        time=f"{sum(r.seconds for r in results):.3f}",
        timestamp=str(run.get("started", "")),
    )
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{r.case.subject}.{r.case.component}", name=r.id, time=f"{r.seconds:.3f}")
        props = ET.SubElement(case, "properties")
        for key, value in {**{f"metric.{k}": v for k, v in r.metrics.items()}, **{f"stat.{k}": v for k, v in r.stats.items()}}.items():
            ET.SubElement(props, "property", name=key, value=str(value))
        if r.outcome == "failed":
            ET.SubElement(case, "failure", message=r.reason[:500]).text = r.reason
        elif r.outcome == "error":
            ET.SubElement(case, "error", message=r.reason[:500]).text = r.reason
        elif r.outcome in ("skipped", "xfailed"):
            ET.SubElement(case, "skipped", message=(f"xfailed: {r.reason}" if r.outcome == "xfailed" else r.reason)[:500])
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(report_dir: Path, run: dict, results: Sequence[CaseResult]) -> list[Path]:
    report_dir = Path(report_dir)
    written = []
    for name, text in (
        ("results.json", json.dumps(results_document(run, results), indent=1) + "\n"),
        ("summary.md", summary_markdown(run, results)),
        ("junit.xml", junit_xml(run, results)),
    ):
        write_text(report_dir / name, text)
        written.append(report_dir / name)
    html = _html_report(report_dir, results_document(run, results))
    if html is not None:
        written.append(html)
    return written


def _html_report(report_dir: Path, document: dict) -> Path | None:
    """report.html (heatmaps drawn with matplotlib, embedded). A run without matplotlib still writes its other
    reports; ``python -m conformance html DIR`` draws it later."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("report.html not written: matplotlib is not installed (pip install matplotlib)")
        return None
    from .html_report import render_html

    return render_html(document, report_dir / "report.html")


TERMINAL_COLUMNS = ("component", "scale", "precision", "backend", "profile", "outcome", "rel_l2", "max |x|", "headroom", "sat", "first non-finite", "calls", "s")


def terminal_table(results: Sequence[CaseResult]) -> list[str]:
    rows = []
    for r in results:
        if r.outcome == "skipped":
            continue
        c = r.case
        rows.append(
            [
                c.component,
                c.scale,
                c.precision,
                c.backend,
                c.profile + ("" if c.guard == "none" else f"+{c.guard}"),
                r.outcome,
                _num(r.metrics.get("rel_l2")),
                _num(r.stats.get("max_abs_value"), ".3g"),
                _num(r.stats.get("headroom"), ".3g"),
                str(r.stats.get("saturated", "")),
                _first(r) or "-",
                _calls(r),
                f"{r.seconds:.2f}",
            ]
        )
    if not rows:
        return []
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(TERMINAL_COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*TERMINAL_COLUMNS), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return lines


def skip_summary(results: Sequence[CaseResult]) -> list[str]:
    skipped = Counter(r.reason for r in results if r.outcome == "skipped")
    return [f"{n:4d} skipped: {reason}" for reason, n in skipped.most_common()]

