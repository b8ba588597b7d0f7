"""What the suite expects of a case before it runs: declared expected failures, and ratchet expectations.

Expected failures are data (``fixtures/expected_failures.toml``). An entry matches cases by any of the case fields (a
value or a list of values; an absent field matches everything) and by subject version, and says exactly how the case
fails:

* ``kind``: one or more of ``compare.DECLARABLE_KINDS`` (non-finite values that ``entered`` at the input, were
  ``born`` at a module, or were ``masked`` by a guard; ``saturated`` values; a ``budget`` exceeded; ...);
* ``at``: the module where the first non-finite (or saturated) value appears, or ``input``;
* ``ceiling``: the largest value of each named metric the declaration covers (``{ rel_l2 = 0.5 }``), measured;
* ``versions``: for each subject it covers, a PEP 440 specifier of the versions it was measured on
  (``{ comfyui = ">=0.3.50,<=0.3.64" }``); another version is not covered, its cases are judged plainly;
* ``measured``: where and when the numbers were measured; ``reason``: why it fails.

A case that matches is ``xfailed`` only if it fails that way (where several entries match, as a sage case on a stress
profile does, their kinds and ceilings are read together: ``Declared``); a failure of another kind, at another place, above a
ceiling, or one that is never declarable (a backend that did not run, a fallback, inputs built differently) fails it
with "expected failure changed: ...". A strict declaration whose case passes fails; a non-strict one is reported as
stale.

Ratchet expectations are a JSON file written from an earlier run (``{"cases": {case_id: {"rel_l2": x}}}``); a case
worse than its expectation by more than the budget's margin fails.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .case import Case
from .compare import DECLARABLE_KINDS, LOCATED_KINDS, Failure

MATCH_FIELDS = ("subject", "family", "component", "scale", "precision", "backend", "profile", "guard")
FIELDS = {"kind", "at", "ceiling", "versions", "measured", "reason", "strict"}
CEILING_METRICS = ("rel_l2", "max_abs_rel")


class ExpectationsError(ValueError):
    """The expected-failures file is not valid; the message names the file, the entry and what is wrong."""


@dataclass(frozen=True)
class ExpectedFailure:
    match: dict[str, tuple[str, ...]]
    kinds: tuple[str, ...]
    versions: dict[str, SpecifierSet]
    reason: str
    measured: str
    at: str | None = None
    ceiling: dict[str, float] = field(default_factory=dict)
    strict: bool = True  # a strict declaration fails the run when its case passes
    index: int = 0  # position in the file, to name it

    def matches(self, case: Case, version: str | None = None) -> bool:
        if not all(getattr(case, name) in values for name, values in self.match.items()):
            return False
        spec = self.versions.get(case.subject)
        if spec is None:
            return False
        if version is None:
            return True
        try:
            return spec.contains(Version(version), prereleases=True)
        except InvalidVersion:
            return False

    def summary(self) -> str:
        parts = ["/".join(self.kinds)]
        if self.at:
            parts.append(f"at {self.at}")
        if self.ceiling:
            parts.append(", ".join(f"{k} <= {v:g}" for k, v in self.ceiling.items()))
        return f"expected[{self.index}]: " + " ".join(parts)

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "kind": list(self.kinds),
            "at": self.at,
            "ceiling": dict(self.ceiling),
            "versions": {k: str(v) for k, v in self.versions.items()},
            "strict": self.strict,
            "measured": self.measured,
        }

    def differences(self, failures: Sequence[Failure], metrics: Mapping[str, float]) -> list[str]:
        """How the case's failures differ from this declaration (empty: it failed as declared)."""
        changes: list[str] = []
        for failure in failures:
            if failure.kind not in self.kinds:
                changes.append(f"a {failure.kind} failure ({failure.message}); declared {'/'.join(self.kinds)}")
            elif self.at is not None and failure.kind in LOCATED_KINDS and failure.at != self.at:
                changes.append(f"{failure.kind} at {failure.at}, declared at {self.at}")
        for metric, ceiling in self.ceiling.items():
            value = metrics.get(metric)
            if value is not None and not math.isnan(value) and value > ceiling:
                changes.append(f"{metric} {value:.3g} above the declared ceiling {ceiling:g}")
        return changes


def _tuple(value) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def parse_entry(raw: Mapping, index: int, where: str) -> ExpectedFailure:
    name = f"{where}: expected[{index}]"
    unknown = set(raw) - set(MATCH_FIELDS) - FIELDS
    if unknown:
        raise ExpectationsError(f"{name} has unknown fields {sorted(unknown)} (known: {sorted(set(MATCH_FIELDS) | FIELDS)})")
    for needed in ("kind", "versions", "measured", "reason"):
        if not raw.get(needed):
            raise ExpectationsError(f"{name} needs `{needed}`")
    kinds = _tuple(raw["kind"])
    bad = [k for k in kinds if k not in DECLARABLE_KINDS]
    if bad:
        raise ExpectationsError(f"{name}: kind {bad} cannot be declared (declarable: {', '.join(DECLARABLE_KINDS)})")
    ceiling = dict(raw.get("ceiling") or {})
    if set(ceiling) - set(CEILING_METRICS):
        raise ExpectationsError(f"{name}: ceiling on {sorted(set(ceiling) - set(CEILING_METRICS))}; ceilings are on {', '.join(CEILING_METRICS)}")
    if "budget" in kinds and not ceiling:
        raise ExpectationsError(f"{name}: a budget failure needs a measured `ceiling` (e.g. {{ rel_l2 = 0.1 }})")
    if not isinstance(raw["versions"], Mapping):
        raise ExpectationsError(f"{name}: `versions` is a table of subject = PEP 440 specifier")
    versions = {}
    for subject, spec in raw["versions"].items():
        try:
            versions[subject] = SpecifierSet(spec)
        except InvalidSpecifier:
            raise ExpectationsError(f"{name}: versions.{subject} = {spec!r} is not a PEP 440 specifier") from None
    subjects = _tuple(raw["subject"]) if "subject" in raw else ()
    if subjects and set(subjects) - set(versions):
        raise ExpectationsError(f"{name}: matches subject {sorted(set(subjects) - set(versions))} but `versions` does not name it")
    return ExpectedFailure(
        match={k: _tuple(v) for k, v in raw.items() if k in MATCH_FIELDS},
        kinds=kinds,
        versions=versions,
        reason=" ".join(str(raw["reason"]).split()),
        measured=" ".join(str(raw["measured"]).split()),
        at=raw.get("at"),
        ceiling={k: float(v) for k, v in ceiling.items()},
        strict=bool(raw.get("strict", True)),
        index=index,
    )


def load_expected_failures(path: Path) -> list[ExpectedFailure]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ExpectationsError(f"{path}: not valid TOML ({error})") from None
    return [parse_entry(raw, i, str(path)) for i, raw in enumerate(data.get("expected", []))]


@dataclass(frozen=True)
class Declared:
    """Every declaration that matches one case, read together: a failure is expected when one of them declares its
    kind (at its place, where that declaration names one), and a metric may reach the largest ceiling any of them
    sets for it. (A sage case on a stress profile fails both ways: the profile's and the kernel's.)"""

    entries: tuple[ExpectedFailure, ...]

    @property
    def strict(self) -> bool:
        return any(e.strict for e in self.entries)

    @property
    def reason(self) -> str:
        return " | ".join(e.reason for e in self.entries)

    def summary(self) -> str:
        return "; ".join(e.summary() for e in self.entries)

    def as_dict(self) -> dict:
        return {"entries": [e.as_dict() for e in self.entries], "index": [e.index for e in self.entries], "strict": self.strict}

    def differences(self, failures: Sequence[Failure], metrics: Mapping[str, float]) -> list[str]:
        changes: list[str] = []
        kinds = {k for e in self.entries for k in e.kinds}
        for failure in failures:
            if failure.kind not in kinds:
                changes.append(f"a {failure.kind} failure ({failure.message}); declared {'/'.join(sorted(kinds))}")
            elif failure.kind in LOCATED_KINDS:
                places = {e.at for e in self.entries if failure.kind in e.kinds}
                if None not in places and failure.at not in places:
                    changes.append(f"{failure.kind} at {failure.at}, declared at {' or '.join(sorted(places))}")
        ceilings: dict[str, float] = {}
        for entry in self.entries:
            for metric, ceiling in entry.ceiling.items():
                ceilings[metric] = max(ceiling, ceilings.get(metric, ceiling))
        for metric, ceiling in ceilings.items():
            value = metrics.get(metric)
            if value is not None and not math.isnan(value) and value > ceiling:
                changes.append(f"{metric} {value:.3g} above the declared ceiling {ceiling:g}")
        return changes


def expected_failure_for(case: Case, declared: list[ExpectedFailure], version: str | None = None) -> Declared | None:
    """The declarations that cover ``case`` at ``version`` (None: none does)."""
    matching = tuple(d for d in declared if d.matches(case, version))
    return Declared(matching) if matching else None


def load_ratchet(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    return {case_id: float(entry["rel_l2"]) for case_id, entry in data.get("cases", {}).items() if entry.get("rel_l2") is not None}
