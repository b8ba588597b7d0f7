"""The sequences side by side: one row per (subject, precision, patch), one column per sequence row, each cell what
the case found against Qwen in a fresh worker (summary.md's "Sequences" table)."""

from __future__ import annotations

from collections.abc import Sequence

from ..results import CaseResult
from .sequences import SEED_ROWS, SEQUENCES


def _escape(text: str) -> str:
    return text.replace("*", r"\*")  # qwen*50: not emphasis


def _cell(result: CaseResult | None) -> str:
    if result is None:
        return ""
    if result.outcome == "skipped":
        return "skipped"
    if result.outcome == "error":
        return "error"
    kinds = [f["kind"] for f in result.failure_kinds]
    if "nonfinite" in kinds:
        bad = result.first_nonfinite or {}
        return f"**non-finite** (step {bad.get('step')}, {bad.get('block') or bad.get('module')})"
    if "nondeterministic" in kinds:
        return f"**nondeterministic** rel-L2 {result.metrics.get('rel_l2', float('nan')):.2g}"
    if "state_leak" in kinds:
        return f"**leak** rel-L2 {result.metrics.get('rel_l2', float('nan')):.2g}"
    if kinds:
        return "**" + ", ".join(k.replace("_", " ") for k in kinds) + "**"
    vs_plain = result.metrics.get("rel_l2_vs_unpatched")
    return "equal" + (f" ({vs_plain:.2g} vs unpatched)" if vs_plain is not None else "")


def sequences_markdown(results: Sequence[CaseResult]) -> list[str]:
    """The table's lines (empty when the run had no sequence case)."""
    cases = [r for r in results if r.case.kind == "sequence"]
    if not cases:
        return []
    by_row: dict[tuple[str, str, str, str], dict[str, CaseResult]] = {}
    for result in cases:
        c = result.case
        by_row.setdefault((c.subject, c.precision, c.backend, c.patch), {})[c.sequence] = result
    columns = list(SEQUENCES)
    lines = [
        "## Sequences",
        "",
        "Qwen after each sequence against Qwen in a fresh worker process, bit for bit (docs/workloads.md).",
        "",
        "| subject | precision | backend | patch | " + " | ".join(f"{_escape(name)} ({SEED_ROWS[name]})" for name in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for (subject, precision, backend, patch), row in sorted(by_row.items()):
        lines.append(f"| {subject} | {precision} | {backend} | {patch} | " + " | ".join(_cell(row.get(name)) for name in columns) + " |")
    return lines + [""]
