"""Metrics against a golden, and the tolerance rules that turn numbers into a verdict.

The rules (docs/verdicts.md; budgets in fixtures/budgets.toml), checked in this order, each failure recorded with its numbers:

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

    The cosine comes from the three norms (``(|a|^2 + |g|^2 - |a-g|^2) / 2|a||g|``), not from ``torch.dot``:
    a float64 dot product on the CPU sums in an order that depends on the thread count, so a pytest-xdist worker
    (fewer threads) reported a different last digit than a single process; the norms do not move.
    """
    if golden.shape != actual.shape:
        raise ValueError(f"output shape {tuple(actual.shape)} differs from the golden's {tuple(golden.shape)}")
    # On the output's device: a real-scale output is tens of MB, and its float64 copy on a GPU runner's host took
    # 0.2 s per case. A float64 norm on a GPU sums in another order than the CPU's: the metrics move by ~1e-16.
    device = actual.device if actual.device.type == "cuda" else torch.device("cpu")
    g = golden.detach().to(device, torch.float64).flatten()
    a = actual.detach().to(device, torch.float64).flatten()
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
        "cosine": (a_norm**2 + g_norm**2 - d_norm**2) / (2 * a_norm * g_norm) if a_norm and g_norm else (1.0 if a_norm == g_norm else 0.0),
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
    backend_k: float
    provenance: str

    @property
    def floor(self) -> float:
        """Absolute slack of the backend rule: a tenth of the budget (dynamo ``same()``: tol / 10)."""
        return self.rel_l2 / 10


@cache
def load_budgets(path: Path = BUDGETS_FILE, kind: str | None = None, profile: str | None = None) -> dict[str, Budget]:
    """Budgets by precision; ``kind`` (e.g. ``vae``) applies that table's overrides, ``[<kind>.precision.<name>]``,
    over the precision's own numbers (a decoder chains ~30 convolutions, a block 7-8 linears); ``profile`` then applies
    ``[profile.<profile>.precision.<name>]``, where a stress profile measurably amplifies a precision's rounding."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    defaults = data.get("defaults", {})
    overrides = data.get(kind, {}).get("precision", {}) if kind else {}
    profile_overrides = data.get("profile", {}).get(profile, {}).get("precision", {}) if profile else {}
    budgets = {}
    for name, raw in data.get("precision", {}).items():
        merged = {**defaults, **raw, **overrides.get(name, {})}
        stressed = profile_overrides.get(name, {})
        merged.update({k: v for k, v in stressed.items() if k != "provenance"})
        provenance = " ".join(str(merged.get("provenance", "")).split())
        if "provenance" in stressed:
            provenance = f"{profile}: " + " ".join(str(stressed["provenance"]).split()) + f" Otherwise: {provenance}"
        try:
            budgets[name] = Budget(
                precision=name,
                rel_l2=float(merged["rel_l2"]),
                max_abs_rel=float(merged["max_abs_rel"]),
                backend_k=float(merged["backend_k"]),
                provenance=provenance,
            )
        except KeyError as missing:
            raise ValueError(f"{path}: [precision.{name}] lacks {missing}") from None
    unknown = set(profile_overrides) - set(budgets)
    if unknown:
        raise ValueError(f"{path}: [profile.{profile}.precision] names unknown precisions {sorted(unknown)}")
    return budgets


def budget_for(precision: str, path: Path = BUDGETS_FILE, kind: str | None = None, profile: str | None = None) -> Budget:
    budgets = load_budgets(path, kind, profile)
    if precision not in budgets:
        raise KeyError(f"{path} has no budget for precision {precision!r}")
    return budgets[precision]


@dataclass(frozen=True)
class Margin:
    """How much worse a candidate's rel_l2 may be before it regressed: ``baseline * (1 + rel) + abs``."""

    rel: float
    abs: float

    def threshold(self, baseline: float) -> float:
        return baseline * (1 + self.rel) + self.abs


@cache
def gate_margins(path: Path = BUDGETS_FILE) -> dict[str, Margin]:
    """Per precision, from ``fixtures/budgets.toml [gate.<precision>]`` (measured noise, see its provenance)."""
    with Path(path).open("rb") as handle:
        data = tomllib.load(handle).get("gate", {})
    default = data.get("default", {})
    out = {}
    for name, raw in data.items():
        if isinstance(raw, dict) and "rel" in {**default, **raw}:
            merged = {**default, **raw}
            out[name] = Margin(float(merged["rel"]), float(merged["abs"]))
    return out


def margin_for(case: dict | None) -> Margin:
    margins = gate_margins()
    precision = (case or {}).get("precision")
    return margins.get(precision) or margins["default"]



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
    input_failure: str | None = None  # the subject builds its inputs differently from the golden's (conformance.inputs)
    save_stage: Mapping | None = None  # VAE cases: ComfyUI's save stage (SaveResult.as_dict())
    tiled: Mapping | None = None  # VAE cases: the tiled decode against the full one (Engine._tiled_evidence)


# Failure kinds. A declaration (fixtures/expected_failures.toml) may expect the first group; the second is never
# expected: a backend that did not run, a fallback, two backend paths that disagree, inputs the subject no longer
# builds the same way, a ratchet regression.
DECLARABLE_KINDS = ("entered", "born", "masked", "nonfinite_output", "saturated", "budget", "save_stage", "tiling")
UNDECLARABLE_KINDS = ("backend", "fallback", "consistency", "inputs", "ratchet")
LOCATED_KINDS = ("entered", "born", "masked")  # a declaration's `at` is where the first non-finite value is


@dataclass(frozen=True)
class Failure:
    """One reason a case failed: its kind, where (a module, or ``input`` for values that entered), on which metric."""

    kind: str
    message: str
    at: str | None = None
    metric: str | None = None
    value: float | None = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "at": self.at, "metric": self.metric, "value": self.value}


@dataclass
class Verdict:
    outcome: str  # passed | failed | xfailed
    failures: list[Failure]
    notes: list[str]

    @property
    def messages(self) -> list[str]:
        return [f.message for f in self.failures]

    @property
    def reason(self) -> str:
        return "; ".join(self.messages) if self.failures else "; ".join(self.notes)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def failures_of(ev: Evidence, budget: Budget) -> tuple[list[Failure], list[str]]:
    """Every failure the evidence shows, typed; and notes."""
    failures: list[Failure] = []
    notes: list[str] = []

    # 1. finite
    if ev.first_nonfinite:
        f = ev.first_nonfinite
        if f["module"] == "input":
            failures.append(Failure("entered", f"non-finite values entered at the input ({f['tensor']}: {f['count']} values), they were not born inside"
                                    + ("" if ev.output_nonfinite else "; the outputs are finite"), at="input", value=float(f["count"])))
        else:
            where = f"first at {f['module']} ({f['boundary']}, {f['tensor']}): {f['count']} values"
            if ev.output_nonfinite:
                failures.append(Failure("born", f"non-finite output; {where}", at=f["module"], value=float(f["count"])))
            else:
                masker = "the subject's guard" if ev.guard == "none" else f"the {ev.guard} guard"
                guard = f" (masked by {masker})" if ev.masked_by_guard else ""
                failures.append(Failure("masked", f"non-finite inside the component although its outputs are finite{guard}; {where}", at=f["module"], value=float(f["count"])))
    elif ev.output_nonfinite:
        failures.append(Failure("nonfinite_output", f"non-finite output: {ev.output_nonfinite} values", value=float(ev.output_nonfinite)))
    if ev.saturated:
        s = ev.saturated
        failures.append(Failure(
            "saturated",
            f"{ev.saturated_total} values saturated at the {s['dtype']} maximum; first at {s['module']} ({s['boundary']}, {s['tensor']}): {s['count']} values",
            at=s["module"], value=float(ev.saturated_total),
        ))  # fmt: skip

    # 2. accuracy (cosine is reported, not judged: cos >= sqrt(1 - rel_l2^2), so rel_l2 always fires first)
    m = ev.metrics
    if not any(math.isnan(m[k]) for k in ("rel_l2", "max_abs_rel")):
        if m["rel_l2"] > budget.rel_l2:
            failures.append(Failure("budget", f"rel_l2 {_fmt(m['rel_l2'])} > {ev.precision} budget {_fmt(budget.rel_l2)}", metric="rel_l2", value=m["rel_l2"]))
        if m["max_abs_rel"] > budget.max_abs_rel:
            failures.append(Failure("budget", f"max_abs_rel {_fmt(m['max_abs_rel'])} > {ev.precision} budget {_fmt(budget.max_abs_rel)}", metric="max_abs_rel", value=m["max_abs_rel"]))
        if ev.backend != ev.reference_backend:
            ref = ev.reference_metrics
            if ref is None or math.isnan(ref["rel_l2"]):
                notes.append(f"no finite {ev.reference_backend} run to compare the backend with")
            else:
                bound = budget.backend_k * ref["rel_l2"] + budget.floor
                if m["rel_l2"] > bound:
                    failures.append(Failure(
                        "budget",
                        f"rel_l2 {_fmt(m['rel_l2'])} > {budget.backend_k:g} x {ev.reference_backend} {_fmt(ref['rel_l2'])} + {_fmt(budget.floor)}",
                        metric="rel_l2", value=m["rel_l2"],
                    ))  # fmt: skip

        # 3. ratchet: the gate's rule (a recorded expectation is a baseline run)
        if ev.expectation is not None:
            margin = margin_for({"precision": ev.precision})
            bound = margin.threshold(ev.expectation)
            if m["rel_l2"] > bound:
                failures.append(Failure(
                    "ratchet",
                    f"rel_l2 {_fmt(m['rel_l2'])} worse than the expectation {_fmt(ev.expectation)} (x (1 + {margin.rel:g}) + {margin.abs:g} = {_fmt(bound)})",
                    metric="rel_l2", value=m["rel_l2"],
                ))  # fmt: skip

    # 4. the backend ran
    missing = [k for k in ev.expected_kernels if not ev.backend_calls.get(k, 0)]
    if missing or not ev.backend_calls:
        wanted = ", ".join(missing or ev.expected_kernels) or ev.backend
        failures.append(Failure("backend", f"backend {ev.backend} never ran (calls: {dict(ev.backend_calls) or 'none'}; missing {wanted})"))
    for message in ev.fallbacks:
        failures.append(Failure("fallback", f"silent fallback: {message}"))
    failures.extend(Failure("consistency", message) for message in ev.consistency_failures)
    if ev.input_failure:
        failures.append(Failure("inputs", ev.input_failure))
    if ev.save_stage and not ev.save_stage["ok"]:
        st = ev.save_stage
        failures.append(Failure("save_stage", f"save stage: numpy {st['message']} on {st['bad_pixels']} of {st['pixels']} pixels (saved as 0: black)", value=float(st["bad_pixels"])))
    if ev.tiled:
        failures.extend(Failure("tiling", message) for message in _tiling_failures(ev.tiled))
    return failures, notes


def judge(ev: Evidence, budget: Budget, declared=None) -> Verdict:
    """The case's verdict. ``declared`` (``expectations.Declared``, an ``ExpectedFailure``, or None): the case is then ``xfailed``
    only if it fails exactly as declared (kinds, location, ceilings); any other failure is ``expected failure
    changed``; a pass fails a strict declaration and is noted as stale for a non-strict one."""
    failures, notes = failures_of(ev, budget)
    if declared is None:
        return Verdict("failed" if failures else "passed", failures, notes)
    if not failures:
        if declared.strict:
            return Verdict("failed", [Failure("expectation", f"declared as an expected failure ({declared.summary()}) but passed")], notes)
        notes.append(f"stale expected failure: declared non-strict ({declared.summary()}) and passed here")
        return Verdict("passed", [], notes)
    changes = declared.differences(failures, ev.metrics)
    if changes:
        changed = [Failure("expectation", f"expected failure changed: {c}") for c in changes]
        return Verdict("failed", changed + failures, notes)
    return Verdict("xfailed", failures, [f"expected failure ({declared.summary()}): {declared.reason}"] + notes)


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
            failures.append(Failure("nonfinite_output", f"{name}: non-finite output"))
        elif m["rel_l2"] > budget:
            failures.append(Failure("budget", f"{name}: rel_l2 {_fmt(m['rel_l2'])} > cross-implementation budget {_fmt(budget)}", metric="rel_l2", value=m["rel_l2"]))
    if not ours or not theirs:
        failures.append(Failure("backend", f"an attention backend never ran (calls: {dict(ours)} / {dict(theirs)})"))
    return Verdict("failed" if failures else "passed", failures, [])


@cache
def tiling_budget(path: Path = BUDGETS_FILE) -> float:
    with path.open("rb") as handle:
        return float(tomllib.load(handle)["tiling"]["rel_l2"])
