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
import os
import tempfile
from pathlib import Path

from .rundir import EXECUTED, cases_by_id, load_results, rel_l2

FORMAT = 1


def expectations_document(document: dict, report_dir: Path | None = None) -> dict:
    """The ratchet document of a results document (``report_dir`` is recorded as provenance only)."""
    run = document["run"]
    cases = {
        case_id: {"rel_l2": rel_l2(case), "outcome": case["outcome"]}
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
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
