"""What the suite expects of a case before it runs: declared expected failures, and ratchet expectations.

Expected failures are data (``fixtures/expected_failures.toml``): each entry matches cases by any of the case fields
(a value or a list of values; an absent field matches everything) and carries the reason and its provenance. A case
that matches fails as ``xfailed`` with its numbers and location recorded, and fails outright if it passes (unless the
declaration says ``strict = false``: for borderline cases that pass on some hardware, a pass is then noted, not failed).

Ratchet expectations are a JSON file written from an earlier run (``{"cases": {case_id: {"rel_l2": x}}}``); a case
worse than its expectation by more than the budget's margin fails.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .case import Case

MATCH_FIELDS = ("subject", "family", "component", "scale", "precision", "backend", "profile", "guard")


@dataclass(frozen=True)
class ExpectedFailure:
    match: dict[str, tuple[str, ...]]
    reason: str
    provenance: str
    strict: bool = True  # a strict declaration fails the run when its case passes
    # Where the first non-finite value must be for the declaration to hold ("input": it entered the component); a
    # case that fails with its first bad value elsewhere is a failure, not the expected one.
    first_nonfinite_at: str | None = None

    def matches(self, case: Case) -> bool:
        return all(getattr(case, name) in values for name, values in self.match.items())


def load_expected_failures(path: Path) -> list[ExpectedFailure]:
    if not path.exists():
        return []
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    out = []
    for i, raw in enumerate(data.get("expected", [])):
        unknown = set(raw) - set(MATCH_FIELDS) - {"reason", "provenance", "strict", "first_nonfinite_at"}
        if unknown:
            raise ValueError(f"{path}: expected[{i}] has unknown fields {sorted(unknown)}")
        if not raw.get("reason") or not raw.get("provenance"):
            raise ValueError(f"{path}: expected[{i}] needs a reason and a provenance")
        match = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items() if k in MATCH_FIELDS}
        out.append(
            ExpectedFailure(
                match,
                " ".join(raw["reason"].split()),
                " ".join(raw["provenance"].split()),
                bool(raw.get("strict", True)),
                raw.get("first_nonfinite_at"),
            )
        )
    return out


def expected_failure_for(case: Case, declared: list[ExpectedFailure]) -> ExpectedFailure | None:
    return next((d for d in declared if d.matches(case)), None)


def load_ratchet(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    return {case_id: float(entry["rel_l2"]) for case_id, entry in data.get("cases", {}).items() if entry.get("rel_l2") is not None}
