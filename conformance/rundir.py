"""Reading a finished run's report directory: ``results.json``, the saved outputs and ``benchmark.json``.

The HTML report, the upgrade gate and the ratchet writer all read runs the same way through this module, so a
change to the directory layout (``report.py``, ``--save-outputs``) has one place to follow. What of a run needs
attention is selected here too, so summary.md and report.html open on the same cases. It imports neither torch
nor matplotlib: the gate and the CLI stay usable on a machine that only holds two report directories.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .paths import BUDGETS_FILE

RESULTS_FILE = "results.json"
JSONL_FILE = "results.jsonl"  # written while the run goes: a header line ({"schema_version", "run"}), then one case per line
OUTPUTS_DIR = "outputs"
BENCHMARK_FILE = "benchmark.json"
SUPPORTED_SCHEMA_VERSIONS = (1,)

# Axis orders for tables and heatmaps: docs/reference.md's order, unknown values after these in order of appearance.
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_scaled", "fp8_block", "fp8_mm")
SCALE_ORDER = ("tiny", "real")
EXECUTED = ("passed", "failed", "xfailed", "error")


class ReportDirError(ValueError):
    """A path that is not a usable report directory; the message says what is missing."""


def load_results(report_dir: Path) -> dict:
    """The parsed ``results.json`` of ``report_dir``, checked for the fields every reader relies on.

    Where ``results.jsonl`` belongs to a later run than ``results.json`` (or there is no results.json), that run
    was interrupted: its document is rebuilt from the lines, with ``run.interrupted`` set."""
    path = Path(report_dir) / RESULTS_FILE
    lines = Path(report_dir) / JSONL_FILE
    document = None
    if path.is_file():
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ReportDirError(f"{path}: not valid JSON ({error})") from None
    if lines.is_file():
        partial = load_jsonl(lines)
        finished_run = document.get("run", {}).get("run_id") if isinstance(document, dict) else None
        if partial is not None and partial["run"].get("run_id") != finished_run:
            document = partial
    if document is None:
        raise ReportDirError(f"{report_dir}: no {RESULTS_FILE} (not a report directory written by the suite)")
    check_document(document, str(path))
    return document


def load_jsonl(path: Path) -> dict | None:
    """The document of an interrupted run from its ``results.jsonl``; a last line cut off by the kill is dropped.
    None when the file holds no header."""
    records = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the line being written when the run was killed
            raise ReportDirError(f"{path}:{number}: not valid JSON") from None
    if not records or "run" not in records[0]:
        return None
    run = dict(records[0]["run"])
    cases = []
    for record in records[1:]:
        if "run_update" in record:  # what became known about the run after it started (the subject, the device)
            run.update(record["run_update"])
        else:
            cases.append(record)
    run.update(interrupted=True, cases_finished=len(cases))
    return {"schema_version": records[0].get("schema_version"), "run": run, "cases": cases}


def check_document(document: dict, where: str = "results document") -> None:
    """Refuse a document another schema version wrote: silently misreading a renamed field would mislead a gate."""
    version = document.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ReportDirError(f"{where}: schema_version {version!r}, this reader knows {SUPPORTED_SCHEMA_VERSIONS}")
    if not isinstance(document.get("cases"), list) or not isinstance(document.get("run"), dict):
        raise ReportDirError(f"{where}: needs 'run' (object) and 'cases' (array)")


def cases_by_id(document: dict) -> dict[str, dict]:
    """Cases keyed by id, in file order; a duplicated id is an error (two results for one case cannot be compared)."""
    out: dict[str, dict] = {}
    for case in document["cases"]:
        if case["id"] in out:
            raise ReportDirError(f"case {case['id']!r} appears twice in one results document")
        out[case["id"]] = case
    return out


def outputs_file(report_dir: Path, case_id: str) -> Path:
    """Where ``--save-outputs`` put a case's outputs (it may not exist: the option was off or the case did not run)."""
    return Path(report_dir) / OUTPUTS_DIR / f"{case_id}.safetensors"


def benchmark_file(report_dir: Path) -> Path:
    """pytest-benchmark's ``--benchmark-json`` file of the run, by convention inside the report directory."""
    return Path(report_dir) / BENCHMARK_FILE


def finite(value) -> float | None:
    """A number from results.json as a finite float, or None (non-finite numbers are stored as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rel_l2(case: dict) -> float | None:
    return finite((case.get("metrics") or {}).get("rel_l2"))


@cache
def _budgets_toml(path: Path) -> dict:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def budget_rel_l2(case: dict, budgets_file: Path = BUDGETS_FILE) -> float | None:
    """The rel-L2 budget the case was judged against.

    The budget recorded in the case comes first: it is the one its verdict used. Cases that record none (the xcheck
    cases, cases that failed before they were judged) fall back to ``fixtures/budgets.toml`` of this checkout:
    ``[xcheck]`` for the cross-implementation check, ``[precision.<name>]`` otherwise. None when neither knows it.
    """
    recorded = finite((case.get("budget") or {}).get("rel_l2"))
    if recorded is not None:
        return recorded
    try:
        data = _budgets_toml(Path(budgets_file))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if case.get("backend") == "xcheck":
        return finite(data.get("xcheck", {}).get("rel_l2"))
    return finite(data.get("precision", {}).get(case.get("precision"), {}).get("rel_l2"))


def ordered(values, order: tuple[str, ...]) -> list[str]:
    """Distinct ``values`` in ``order`` first, the rest in order of first appearance."""
    seen = list(dict.fromkeys(values))
    known = [v for v in order if v in seen]
    return known + [v for v in seen if v not in order]


@dataclass(frozen=True)
class Attention:
    """The cases a reader of a run must see before anything else, each list in run order.

    ``failed``: failed and error cases; ``changed``: those of them whose failures include a changed expectation (a
    declared expected failure that now fails another way, or that passed under a strict declaration); ``stale``:
    passed under a non-strict declaration; ``masked``: a non-finite value inside the component that the subject's
    guard hid from the outputs, whatever the outcome (an xfailed one included)."""

    failed: list
    changed: list
    stale: list
    masked: list


def needs_attention(cases) -> Attention:
    """Select what needs attention from ``cases``: results.json cases (dicts) or ``CaseResult`` objects, since
    summary.md renders the one and report.html the other; the items are returned as given."""
    failed = [c for c in cases if _field(c, "outcome") in ("failed", "error")]
    return Attention(
        failed=failed,
        changed=[c for c in failed if any(f.get("kind") == "expectation" for f in _field(c, "failure_kinds") or [])],
        stale=[c for c in cases if _field(c, "outcome") == "passed" and _field(c, "expected_failure")],
        masked=[c for c in cases if (_field(c, "first_nonfinite") or {}).get("masked_by_guard")],
    )


def _field(case, name: str):
    return case.get(name) if isinstance(case, dict) else getattr(case, name, None)
