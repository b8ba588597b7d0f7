"""Writing the ratchet file (``--expectations``) from a finished run.

A baseline run is frozen into ``{"format": 1, "subject": {...}, "source": {...}, "cases": {id: {"rel_l2", "outcome"}}}``;
``expectations.load_ratchet`` reads the ``cases`` part back, and a later run fails any case worse than its entry by
more than the budget's ratchet margin. Only cases that ran are written: a skipped case has nothing to ratchet, and an
entry for it would read as a promise. Cases that ran without a finite rel_l2 (non-finite outputs, errors) are
written with ``rel_l2: null`` and their outcome, so the file records them; ``load_ratchet`` skips them.

The write is atomic (temporary file in the same directory, then ``os.replace``): a CI job killed mid-write must not
leave a truncated ratchet that the next run would refuse or, worse, half-read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_text
from .rundir import EXECUTED, cases_by_id, load_results, rel_l2

FORMAT = 1
CASE_KEYS = ("subject", "family", "component", "scale", "precision", "backend", "profile", "guard")


def is_expectations_file(path: Path) -> bool:
    """Whether ``path`` is a ratchet file this module wrote (a JSON object with ``format`` and a ``cases`` object)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("format") == FORMAT and isinstance(document.get("cases"), dict)


def results_from_expectations(path: Path) -> dict:
    """A results document holding a ratchet file's cases, so that the gate can take the ratchet as its baseline: the
    verdicts then rest on rel_l2, outcome and first non-finite location (no saved outputs: no fp32 semantics check)."""
    document = json.loads(Path(path).read_text())
    cases = []
    for case_id, entry in document["cases"].items():
        case = {key: entry.get(key) for key in CASE_KEYS}
        case.update(
            id=case_id,
            outcome=entry.get("outcome"),
            reason="",
            metrics={"rel_l2": entry.get("rel_l2")},
            budget=entry.get("budget") or {},
            first_nonfinite=entry.get("first_nonfinite"),
        )
        cases.append(case)
    run = {"subject": document.get("subject") or {}, **(document.get("source") or {}), "expectations_file": str(path)}
    return {"schema_version": 1, "run": run, "cases": cases}


def expectations_document(document: dict, report_dir: Path | None = None) -> dict:
    """The ratchet document of a results document (``report_dir`` is recorded as provenance only)."""
    run = document["run"]
    cases = {
        case_id: {
            "rel_l2": rel_l2(case),
            "outcome": case["outcome"],
            # what the gate needs to read the file as a baseline run (python -m conformance gate --baseline FILE)
            **{key: case.get(key) for key in CASE_KEYS},
            "budget": {"rel_l2": (case.get("budget") or {}).get("rel_l2")},
            "first_nonfinite": case.get("first_nonfinite"),
        }
        for case_id, case in cases_by_id(document).items()
        if case["outcome"] in EXECUTED
    }
    source = {key: run.get(key) for key in ("started", "finished", "device", "torch", "cuda", "gpu")}
    if report_dir is not None:
        source["report_dir"] = str(report_dir)
    return {"format": FORMAT, "subject": run.get("subject") or {}, "source": source, "cases": cases}


def write_expectations(report_dir: Path, out_path: Path) -> Path:
    """Write the ratchet file of the run in ``report_dir`` to ``out_path``, atomically; returns ``out_path``."""
    report_dir, out_path = Path(report_dir), Path(out_path)
    text = json.dumps(expectations_document(load_results(report_dir), report_dir), indent=1, sort_keys=True) + "\n"
    return write_text(out_path, text, durable=True)
