"""The result of one case: built once by the runner, rendered by every report. No renderer computes a verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .case import Case

OUTCOMES = ("passed", "failed", "skipped", "error", "xfailed")


@dataclass
class CaseResult:
    case: Case
    outcome: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_by_output: dict[str, dict[str, float]] = field(default_factory=dict)
    reference: dict | None = None
    stats: dict = field(default_factory=dict)
    first_nonfinite: dict | None = None
    backend_calls: dict[str, int] = field(default_factory=dict)
    golden: dict | None = None
    seconds: float = 0.0
    forward_seconds: float | None = None
    budget: dict | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    boundaries: list[dict] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    # The failures as data: [{"kind", "message", "at", "metric", "value"}] (compare.Failure), what the gate compares.
    failure_kinds: list[dict] = field(default_factory=list)
    expected_failure: dict | None = None  # the declaration that matched this case, if any
    inputs: dict | None = None  # {"sha256" of the stored inputs the case ran on, "outlier_channels", "file" if saved}
    device: str | None = None  # where the case ran ("cuda:1" under a worker per GPU)
    # Seconds per phase of the case: golden (load or create, its float64 forward included), capture (the subject's
    # own inputs, built once per golden, against the stored ones), build, inputs (cast to the device), forward (every
    # forward pass of the case: its own, the reference backend's, other backend paths), probes (reading the records),
    # compare, other.
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} not in {OUTCOMES}")

    @property
    def id(self) -> str:
        return self.case.id

    def as_dict(self) -> dict:
        """The ``results.json`` form of a case (the contract: conformance/schema/results.schema.json, docs/reference.md)."""
        return _json_safe(
            {
                "id": self.id,
                **self.case.as_dict(),
                "outcome": self.outcome,
                "reason": self.reason,
                "device": self.device,
                "metrics": self.metrics,
                "metrics_by_output": self.metrics_by_output,
                "reference": self.reference,
                "stats": self.stats,
                "first_nonfinite": self.first_nonfinite,
                "backend_calls": self.backend_calls,
                "golden": self.golden,
                "seconds": round(self.seconds, 4),
                "forward_seconds": None if self.forward_seconds is None else round(self.forward_seconds, 4),
                "phases": {k: round(v, 4) for k, v in self.phases.items()},
                "budget": self.budget,
                "failures": self.failures,
                "failure_kinds": self.failure_kinds,
                "expected_failure": self.expected_failure,
                "inputs": self.inputs,
                "notes": self.notes,
                "sizes": self.sizes,
                "boundaries": self.boundaries,
            }
        )


    @classmethod
    def from_dict(cls, document: dict) -> CaseResult:
        """The inverse of ``as_dict``: how a result travels from a pytest-xdist worker (or a results.jsonl line) to
        the reports. ``from_dict(r.as_dict()).as_dict() == r.as_dict()``."""
        case = Case(**{f.name: document[f.name] for f in fields(Case)})
        values = {f.name: document[f.name] for f in fields(cls) if f.name != "case" and f.name in document}
        return cls(case, **values)


def _json_safe(obj):
    """Strict JSON: non-finite floats become null (the verdict's reason says why a number is missing)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
