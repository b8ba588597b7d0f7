"""Metrics against a golden, and the tolerance rules that turn numbers into a verdict.

The rules (ARCHITECTURE.md, "Tolerance rules"), checked in this order, each failure recorded with its numbers:

1. finite: no NaN/Inf at any probed boundary or output;
   no value saturated at the dtype's maximum (a clip or a saturating cast hid an overflow);
2. accuracy: the error against the golden is within the precision's budget (``fixtures/budgets.toml``), and a
   backend's error is within ``k`` times the error of the reference backend in the same precision plus a floor
   (the flash-attention / dynamo ``same()`` rule);
3. ratchet: no worse than a recorded expectation by more than its margin, where one exists;
4. the requested backend really ran (every kernel it is made of has non-zero calls) and nothing fell back silently.

A case declared as an expected failure is ``xfailed`` when it fails, and ``failed`` when it unexpectedly passes.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from .paths import BUDGETS_FILE

METRIC_NAMES = ("rel_l2", "max_abs", "max_abs_rel", "cosine", "sqnr_db")


def metrics(golden: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """Error of ``actual`` against ``golden``, computed in float64.

    ``rel_l2 = |a - g| / |g|``; ``max_abs = max |a - g|``; ``max_abs_rel = max_abs / max |g|``;
    ``cosine`` of the flattened tensors; ``sqnr_db = 20 log10(|g| / |a - g|)`` (torchao's SQNR). A non-finite
    ``actual`` gives NaN metrics (the finite rule explains the failure).
    """
    if golden.shape != actual.shape:
        raise ValueError(f"output shape {tuple(actual.shape)} differs from the golden's {tuple(golden.shape)}")
    g = golden.detach().to("cpu", torch.float64).flatten()
    a = actual.detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(a).all()):
        return {name: math.nan for name in METRIC_NAMES}
    diff = a - g
    g_norm = float(torch.linalg.vector_norm(g))
    d_norm = float(torch.linalg.vector_norm(diff))
    a_norm = float(torch.linalg.vector_norm(a))
    g_max = float(g.abs().max()) if g.numel() else 0.0
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return {
        "rel_l2": d_norm / g_norm if g_norm else (0.0 if d_norm == 0 else math.inf),
        "max_abs": max_abs,
        "max_abs_rel": max_abs / g_max if g_max else (0.0 if max_abs == 0 else math.inf),
        "cosine": float(torch.dot(a, g)) / (a_norm * g_norm) if a_norm and g_norm else (1.0 if a_norm == g_norm else 0.0),
        "sqnr_db": 20 * math.log10(g_norm / d_norm) if d_norm else math.inf,
    }


def worst(per_output: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The case's metrics: for each metric, the worst value over the component's outputs."""
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_output.values()]
        if any(math.isnan(v) for v in values):
            out[name] = math.nan
        elif name in ("cosine", "sqnr_db"):
            out[name] = min(values)
        else:
            out[name] = max(values)
    return out


@dataclass(frozen=True)
class Budget:
    precision: str
    rel_l2: float
    max_abs_rel: float
    cosine: float
    backend_k: float
    ratchet_margin: float
    provenance: str

    @property
    def floor(self) -> float:
        """Absolute slack of the backend and ratchet rules: a tenth of the budget (dynamo ``same()``: tol / 10)."""
        return self.rel_l2 / 10


@cache
def load_budgets(path: Path = BUDGETS_FILE, kind: str | None = None) -> dict[str, Budget]:
    """Budgets by precision; ``kind`` (e.g. ``vae``) applies that table's overrides, ``[<kind>.precision.<name>]``,
    over the precision's own numbers (a decoder chains ~30 convolutions, a block 7-8 linears)."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    defaults = data.get("defaults", {})
    overrides = data.get(kind, {}).get("precision", {}) if kind else {}
    budgets = {}
    for name, raw in data.get("precision", {}).items():
        merged = {**defaults, **raw, **overrides.get(name, {})}
        try:
            budgets[name] = Budget(
                precision=name,
                rel_l2=float(merged["rel_l2"]),
                max_abs_rel=float(merged["max_abs_rel"]),
                cosine=float(merged["cosine"]),
                backend_k=float(merged["backend_k"]),
                ratchet_margin=float(merged["ratchet_margin"]),
                provenance=" ".join(str(merged.get("provenance", "")).split()),
            )
        except KeyError as missing:
            raise ValueError(f"{path}: [precision.{name}] lacks {missing}") from None
    return budgets


def budget_for(precision: str, path: Path = BUDGETS_FILE, kind: str | None = None) -> Budget:
    budgets = load_budgets(path, kind)
    if precision not in budgets:
        raise KeyError(f"{path} has no budget for precision {precision!r}")
    return budgets[precision]


@dataclass
class Evidence:
    """Everything the verdict looks at, gathered by the runner."""

    precision: str
    backend: str
    reference_backend: str
    metrics: Mapping[str, float]
    reference_metrics: Mapping[str, float] | None = None  # same precision, reference backend
    first_nonfinite: Mapping | None = None
    output_nonfinite: int = 0
    saturated: Mapping | None = None  # {"boundary", "module", "tensor", "count", "dtype"} of the first saturation
    saturated_total: int = 0
    backend_calls: Mapping[str, int] = field(default_factory=dict)
    expected_kernels: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    expectation: float | None = None  # rel_l2 recorded by a baseline run
    masked_by_guard: bool = False
    guard: str = "none"  # the guard policy applied ("none": the subject's own behaviour)
    consistency_failures: tuple[str, ...] = ()  # e.g. two ways of forcing one backend that disagree
    save_stage: Mapping | None = None  # VAE cases: ComfyUI's save stage (SaveResult.as_dict())
    tiled: Mapping | None = None  # VAE cases: the tiled decode against the full one (Engine._tiled_evidence)


@dataclass
class Verdict:
    outcome: str  # passed | failed | xfailed
    failures: list[str]
    notes: list[str]

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "; ".join(self.notes)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def judge(ev: Evidence, budget: Budget, expected_failure: str | None = None, strict: bool = True, expected_at: str | None = None) -> Verdict:
    failures: list[str] = []
    notes: list[str] = []

    # 1. finite
    if ev.first_nonfinite:
        f = ev.first_nonfinite
        if f["module"] == "input":
            where = f"the bad values entered at the input ({f['tensor']}: {f['count']} values), they were not born inside"
        else:
            where = f"first at {f['module']} ({f['boundary']}, {f['tensor']}): {f['count']} values"
        if ev.output_nonfinite:
            failures.append(f"non-finite output; {where}")
        else:
            masker = "the subject's guard" if ev.guard == "none" else f"the {ev.guard} guard"
            guard = f" (masked by {masker})" if ev.masked_by_guard else ""
            failures.append(f"non-finite inside the component although its outputs are finite{guard}; {where}")
    elif ev.output_nonfinite:
        failures.append(f"non-finite output: {ev.output_nonfinite} values")
    if ev.saturated:
        s = ev.saturated
        failures.append(
            f"{ev.saturated_total} values saturated at the {s['dtype']} maximum; first at {s['module']} "
            f"({s['boundary']}, {s['tensor']}): {s['count']} values"
        )

    # 2. accuracy
    m = ev.metrics
    if not any(math.isnan(m[k]) for k in ("rel_l2", "max_abs_rel", "cosine")):
        if m["rel_l2"] > budget.rel_l2:
            failures.append(f"rel_l2 {_fmt(m['rel_l2'])} > {ev.precision} budget {_fmt(budget.rel_l2)}")
        if m["max_abs_rel"] > budget.max_abs_rel:
            failures.append(f"max_abs_rel {_fmt(m['max_abs_rel'])} > {ev.precision} budget {_fmt(budget.max_abs_rel)}")
        if m["cosine"] < budget.cosine:
            failures.append(f"cosine {m['cosine']:.6f} < {ev.precision} budget {budget.cosine}")
        if ev.backend != ev.reference_backend:
            ref = ev.reference_metrics
            if ref is None or math.isnan(ref["rel_l2"]):
                notes.append(f"no finite {ev.reference_backend} run to compare the backend with")
            else:
                bound = budget.backend_k * ref["rel_l2"] + budget.floor
                if m["rel_l2"] > bound:
                    failures.append(
                        f"rel_l2 {_fmt(m['rel_l2'])} > {budget.backend_k:g} x {ev.reference_backend} "
                        f"{_fmt(ref['rel_l2'])} + {_fmt(budget.floor)}"
                    )

        # 3. ratchet
        if ev.expectation is not None:
            bound = ev.expectation * (1 + budget.ratchet_margin) + budget.floor
            if m["rel_l2"] > bound:
                failures.append(
                    f"rel_l2 {_fmt(m['rel_l2'])} worse than the expectation {_fmt(ev.expectation)} "
                    f"(+{budget.ratchet_margin:.0%} + {_fmt(budget.floor)})"
                )

    # 4. the backend ran
    missing = [k for k in ev.expected_kernels if not ev.backend_calls.get(k, 0)]
    if missing or not ev.backend_calls:
        wanted = ", ".join(missing or ev.expected_kernels) or ev.backend
        failures.append(f"backend {ev.backend} never ran (calls: {dict(ev.backend_calls) or 'none'}; missing {wanted})")
    for message in ev.fallbacks:
        failures.append(f"silent fallback: {message}")
    failures.extend(ev.consistency_failures)
    if ev.save_stage and not ev.save_stage["ok"]:
        st = ev.save_stage
        failures.append(
            f"save stage: numpy {st['message']} on {st['bad_pixels']} of {st['pixels']} pixels (saved as 0: black)"
        )
    if ev.tiled:
        failures.extend(_tiling_failures(ev.tiled))

    if expected_failure:
        place = ev.first_nonfinite["module"] if ev.first_nonfinite else None
        if expected_at is not None and failures and place != expected_at:
            found = f"at {place}" if place else "no non-finite value"
            return Verdict("failed", [f"declared expected failure needs the first non-finite value at {expected_at}, found {found}"] + failures, notes)
        if failures:
            return Verdict("xfailed", failures, [f"expected failure: {expected_failure}"] + notes)
        if strict:
            return Verdict("failed", [f"declared as an expected failure ({expected_failure}) but passed"], notes)
        notes.append(f"declared as a non-strict expected failure, passed here: {expected_failure}")
    return Verdict("failed" if failures else "passed", failures, notes)


@cache
def xcheck_budget(path: Path = BUDGETS_FILE) -> float:
    with path.open("rb") as handle:
        return float(tomllib.load(handle)["xcheck"]["rel_l2"])


def _tiling_failures(tiled: Mapping) -> list[str]:
    failures = []
    for name, shape in tiled["shapes"].items():
        if shape["full"] != shape["tiled"]:
            failures.append(f"tiled decode returned {name} of shape {shape['tiled']}, the full decode {shape['full']}")
    for name, count in tiled["nonfinite"].items():
        if count["tiled"] > count["full"]:
            failures.append(f"tiled decode produced {count['tiled']} non-finite {name} values (full decode: {count['full']})")
    rel = tiled["metrics"].get("rel_l2", math.nan)
    if not math.isnan(rel) and rel > tiled["budget"]:
        failures.append(f"tiled decode differs from the full decode: rel_l2 {_fmt(rel)} > tiling budget {_fmt(tiled['budget'])}")
    return failures


def judge_xcheck(
    per_output: Mapping[str, Mapping[str, float]], budget: float, ours: Mapping[str, int], theirs: Mapping[str, int]
) -> Verdict:
    """Two implementations, same weights and inputs, fp32: every output within ``budget`` relative L2."""
    failures = []
    for name, m in per_output.items():
        if math.isnan(m["rel_l2"]):
            failures.append(f"{name}: non-finite output")
        elif m["rel_l2"] > budget:
            failures.append(f"{name}: rel_l2 {_fmt(m['rel_l2'])} > cross-implementation budget {_fmt(budget)}")
    if not ours or not theirs:
        failures.append(f"an attention backend never ran (calls: {dict(ours)} / {dict(theirs)})")
    return Verdict("failed" if failures else "passed", failures, [])


@cache
def tiling_budget(path: Path = BUDGETS_FILE) -> float:
    with path.open("rb") as handle:
        return float(tomllib.load(handle)["tiling"]["rel_l2"])
