"""The upgrade gate: is a candidate run (a new ComfyUI, diffusers or torch) at least as good as its baseline?

Each run is judged against its own goldens, so a run that passes everywhere can still be worse than the last one
(an error that grew 5x inside its budget), or compute something else altogether (a new version changed the math,
its golden changed with it, and both runs sit at 1e-7 of their own goldens). The gate compares the two runs case by
case and gives every case id present in either run one verdict, with the numbers behind it:

``regressed``
    * rel_l2 worse than the baseline's by more than ``margin * baseline + budget.rel_l2 / 10``: the ratchet rule of
      ``compare.judge`` (``expectation * (1 + ratchet_margin) + budget.floor``) with the same defaults, so the gate
      and ``--expectations`` agree on what "worse" means. The absolute term keeps fp32's 1e-7 noise from counting;
    * newly non-finite: a first non-finite location (born, entered or masked) or a missing rel_l2 where the baseline
      had none;
    * newly failing: ``failed``, ``error`` or ``xfailed`` where the baseline passed;
    * backend newly missing: the baseline ran the case, the candidate skipped it (its skip reason is quoted);
    * newly running and failing: skipped in the baseline, ``failed``/``error`` in the candidate. A path the upgrade
      turns on (a backend it now offers) and that fails is a risk the operator must see.
``semantics changed``
    fp32 cases whose saved outputs (``--save-outputs``) exist on both sides: the candidate's outputs differ from the
    baseline's by more than ``fp32_rtol`` relative L2 (worst output). Default 1e-5, from data: an fp32 case is
    1.0e-7 from its float64 golden, fp32 sdpa and math outputs of the same Qwen block differ by 7e-8, so two
    implementations of the same math differ by a few 1e-7; multiplying one weight matrix by (1 + 1e-3 N(0,1))
    already moves the output by 2e-5 to 2.3e-4 (``fixtures/budgets.toml``, fp32 provenance). 1e-5 sits between the
    two, and is the cross-implementation check's budget (``[xcheck]``), the suite's existing "same computation" bound.
    Measured on ComfyUI 0.3.50 -> 0.3.64 (the pre-0.3.51 Qwen text/image position ids): the fp32 Qwen block outputs
    move by 1.4e-2 under the nominal profile, flagged; under the massive profile the same change measures 1.0e-6,
    because a few 6e4-magnitude channels dominate the norm. A whole-tensor rel-L2 can hide a change behind huge
    channels: the nominal profile is the one that catches it, and the gate reports both.
    Where the fp32 case of the same component, scale and profile changed semantics, the other precisions' cases are
    measured against a golden of another computation: a rel_l2 that moved beyond the margin is reported as part of
    that semantics change, not as a regression (the other regression rules still apply to them).
``improved``
    nothing regressed and one of: rel_l2 better by more than the same slack, newly passing, newly finite, a backend
    newly available (skipped before, passes now).
``unchanged``
    everything else, including cases skipped on both sides and cases failing the same way on both sides.
``added`` / ``removed``
    the id is in only one run (a different selection, a new matrix entry). Reported, never failing.

A regression outranks a semantics change (the fp32 difference is still shown with it). The result's exit code:
0 when nothing regressed, no semantics change is unaccepted and no benchmark slowed beyond the allowed fraction;
otherwise 1 (regressed), 3 (semantics changed, not accepted) or 4 (benchmark slowdown), the first that applies.
2 is left to the CLI for usage errors.

Benchmarks: when both report directories hold ``benchmark.json`` (pytest-benchmark's ``--benchmark-json``), the
median of every benchmark present on both sides is compared (candidate / baseline). Reported only, unless
``fail_on_benchmark_slowdown`` is given (a fraction: 0.25 fails a benchmark more than 25 % slower).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .compare import Margin, gate_margins, margin_for
from .rundir import EXECUTED, benchmark_file, budget_rel_l2, cases_by_id, finite, load_results, outputs_file, rel_l2

VERDICTS = ("regressed", "semantics changed", "improved", "added", "removed", "unchanged")
DEFAULT_FP32_RTOL = 1e-5
EXIT_OK, EXIT_REGRESSED, EXIT_SEMANTICS, EXIT_BENCHMARK, EXIT_INCONCLUSIVE = 0, 1, 3, 4, 5


@dataclass(frozen=True)
class Side:
    """What one run recorded for a case, as far as the gate reads it."""

    outcome: str
    rel_l2: float | None
    budget_rel_l2: float | None
    nonfinite: str | None  # where the first non-finite value was, or why there is no finite rel_l2
    reason: str
    failures: tuple[tuple[str, str | None], ...] = ()  # (kind, at) of every typed failure (compare.Failure)
    saturated: int | None = None  # None: the run recorded no probe statistics (a ratchet file)
    headroom: float | None = None  # dtype maximum / largest |value| at any probed boundary
    inputs_sha256: str | None = None

    @classmethod
    def of(cls, case: dict) -> Side:
        stats = case.get("stats") or {}
        kinds = tuple(sorted({(f["kind"], f.get("at")) for f in case.get("failure_kinds") or [] if f["kind"] != "expectation"}, key=str))
        return cls(
            case["outcome"], rel_l2(case), budget_rel_l2(case), _nonfinite(case), case.get("reason") or "",
            kinds, int(stats.get("saturated") or 0) if stats else None, finite(stats.get("headroom")), (case.get("inputs") or {}).get("sha256"),
        )  # fmt: skip

    @property
    def ran(self) -> bool:
        return self.outcome in EXECUTED

    def as_dict(self) -> dict:
        return asdict(self)


def _nonfinite(case: dict) -> str | None:
    first = case.get("first_nonfinite")
    if first:
        where = "entered at input" if first.get("entered") else f"first at {first.get('module')} ({first.get('boundary')}, {first.get('tensor')})"
        masked = ", masked by the subject's guard" if first.get("masked_by_guard") else ""
        return f"{where}: {first.get('count')} values{masked}"
    if case["outcome"] in ("passed", "failed", "xfailed") and case.get("metrics") and rel_l2(case) is None:
        return "no finite rel_l2 (non-finite output)"
    if (case.get("stats") or {}).get("nonfinite"):
        return f"{case['stats']['nonfinite']} non-finite values at probed boundaries"
    return None


@dataclass(frozen=True)
class OutputDiff:
    """The candidate's fp32 outputs against the baseline's: worst relative L2 over the outputs both saved."""

    rel_l2: float | None  # None when not comparable (non-finite values); inf when shapes or names differ
    per_output: dict[str, float | None]
    note: str

    def as_dict(self) -> dict:
        return {"rel_l2": finite(self.rel_l2), "per_output": {k: finite(v) for k, v in self.per_output.items()}, "note": self.note}


@dataclass(frozen=True)
class CaseVerdict:
    case_id: str
    verdict: str
    why: list[str]  # every rule that fired, with its numbers; for "unchanged", what was compared
    baseline: Side | None
    candidate: Side | None
    threshold: float | None = None  # the rel_l2 a candidate had to exceed to regress
    output_diff: OutputDiff | None = None

    def as_dict(self) -> dict:
        return {
            "id": self.case_id,
            "verdict": self.verdict,
            "why": self.why,
            "baseline": self.baseline.as_dict() if self.baseline else None,
            "candidate": self.candidate.as_dict() if self.candidate else None,
            "regression_threshold": self.threshold,
            "fp32_output_diff": None if self.output_diff is None else self.output_diff.as_dict(),
        }


@dataclass(frozen=True)
class BenchmarkDelta:
    name: str
    baseline_median: float | None
    candidate_median: float | None
    ratio: float | None  # candidate / baseline; None when the benchmark is on one side only
    failing: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateResult:
    baseline_dir: Path
    candidate_dir: Path
    baseline_run: dict
    candidate_run: dict
    fp32_rtol: float
    accept_semantics: bool
    cases: list[CaseVerdict]
    benchmarks: list[BenchmarkDelta] = field(default_factory=list)
    fail_on_benchmark_slowdown: float | None = None
    notes: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)  # why the runs cannot answer (inconclusive_reasons)

    def with_verdict(self, verdict: str) -> list[CaseVerdict]:
        return [c for c in self.cases if c.verdict == verdict]

    @property
    def counts(self) -> Counter:
        return Counter(c.verdict for c in self.cases)

    @property
    def exit_code(self) -> int:
        if self.with_verdict("regressed"):
            return EXIT_REGRESSED
        if self.with_verdict("semantics changed") and not self.accept_semantics:
            return EXIT_SEMANTICS
        if any(b.failing for b in self.benchmarks):
            return EXIT_BENCHMARK
        if self.inconclusive:
            return EXIT_INCONCLUSIVE
        return EXIT_OK

    @property
    def exit_meaning(self) -> str:
        accepted = self.accept_semantics and self.with_verdict("semantics changed")
        return {
            EXIT_OK: "pass: nothing regressed" + (" (semantics changes accepted)" if accepted else ""),
            EXIT_REGRESSED: f"fail: {len(self.with_verdict('regressed'))} case(s) regressed",
            EXIT_SEMANTICS: f"fail: {len(self.with_verdict('semantics changed'))} case(s) changed semantics (accept with --accept-semantics)",
            EXIT_BENCHMARK: f"fail: {sum(b.failing for b in self.benchmarks)} benchmark(s) slower than allowed",
            EXIT_INCONCLUSIVE: "inconclusive: " + "; ".join(self.inconclusive),
        }[self.exit_code]

    def as_dict(self) -> dict:
        return {
            "baseline": str(self.baseline_dir),
            "candidate": str(self.candidate_dir),
            "margins": {k: {"rel": m.rel, "abs": m.abs} for k, m in gate_margins().items()},
            "inconclusive": self.inconclusive,
            "fp32_rtol": self.fp32_rtol,
            "accept_semantics": self.accept_semantics,
            "fail_on_benchmark_slowdown": self.fail_on_benchmark_slowdown,
            "exit_code": self.exit_code,
            "counts": dict(self.counts),
            "notes": self.notes,
            "cases": [c.as_dict() for c in self.cases],
            "benchmarks": [b.as_dict() for b in self.benchmarks],
        }


# --- per case -----------------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def compare_outputs(baseline_file: Path, candidate_file: Path, outlier_channels: dict[str, list[int]] | None = None) -> OutputDiff:
    """Relative L2 of the candidate's saved outputs against the baseline's, in float64, worst output counts; an output
    with outlier channels (massive activations) is also measured without them (``name/bulk``), since a few 1e4+
    channels dominate the whole tensor's norm and would hide a change in the rest."""
    import numpy as np
    from safetensors.numpy import load_file

    outlier_channels = outlier_channels or {}
    base, cand = load_file(str(baseline_file)), load_file(str(candidate_file))
    if set(base) != set(cand):
        return OutputDiff(math.inf, {}, f"different outputs: baseline {sorted(base)}, candidate {sorted(cand)}")
    per_output: dict[str, float | None] = {}
    notes = []

    def rel(b, c) -> float:
        b_norm, d_norm = float(np.linalg.norm(b)), float(np.linalg.norm(c - b))
        return d_norm / b_norm if b_norm else (0.0 if d_norm == 0 else math.inf)

    for name in sorted(base):
        b, c = base[name].astype(np.float64), cand[name].astype(np.float64)
        if b.shape != c.shape:
            per_output[name] = math.inf
            notes.append(f"{name}: shape {tuple(b.shape)} -> {tuple(c.shape)}")
        elif not (np.isfinite(b).all() and np.isfinite(c).all()):
            per_output[name] = None
            notes.append(f"{name}: non-finite values, not compared")
        else:
            per_output[name] = rel(b, c)
            channels = outlier_channels.get(name)
            if channels and b.ndim and b.shape[-1] > len(channels):
                keep = np.ones(b.shape[-1], dtype=bool)
                keep[list(channels)] = False
                per_output[f"{name}/bulk"] = rel(b[..., keep], c[..., keep])
    values = [v for v in per_output.values() if v is not None]
    return OutputDiff(max(values) if values else None, per_output, "; ".join(notes))


def compare_saved_inputs(baseline_file: Path, candidate_file: Path, outlier_channels: dict[str, list[int]] | None = None):
    """The inputs each side's cases ran on (saved with --save-outputs), element-wise (``conformance.inputs``)."""
    from safetensors.torch import load_file

    from .inputs import InputCheck, compare_tensors

    return InputCheck(compare_tensors(load_file(str(baseline_file)), load_file(str(candidate_file)), outlier_channels))


HEADROOM_MIN = 2.0  # a boundary within a factor 2 of its dtype's maximum: one more doubling overflows


def _failure_label(kind: str, at: str | None) -> str:
    return {"backend": "a backend call missing", "fallback": "a logged fallback"}.get(kind, f"{kind} failure") + (f" at {at}" if at else "")


def judge_case(
    case_id: str,
    base: dict | None,
    cand: dict | None,
    margin: Margin | None = None,
    fp32_rtol: float = DEFAULT_FP32_RTOL,
    baseline_dir: Path | None = None,
    candidate_dir: Path | None = None,
    same_selection: bool = False,
    computation_changed: str | None = None,
) -> CaseVerdict:
    """One case's verdict (module docstring: the rules, in order). ``computation_changed`` names the fp32 case of the
    same component, scale and profile whose semantics changed: this case's rel_l2 is then measured against another
    golden, and a move of it is part of that change, not a regression."""
    if base is None:
        side = Side.of(cand)
        return CaseVerdict(case_id, "added", [f"only in the candidate ({side.outcome})"], None, side)
    if cand is None:
        side = Side.of(base)
        if same_selection and side.ran:
            return CaseVerdict(case_id, "regressed", [f"ran in the baseline ({side.outcome}) and is missing from the candidate run of the same selection"], side, None)
        return CaseVerdict(case_id, "removed", [f"only in the baseline ({side.outcome})"], side, None)
    margin = margin or margin_for(base)
    b, c = Side.of(base), Side.of(cand)
    regressed: list[str] = []
    improved: list[str] = []

    if b.ran and not c.ran:
        regressed.append(f"ran in the baseline ({b.outcome}), skipped in the candidate: {c.reason}")
    if not b.ran and c.ran:
        if c.outcome in ("failed", "error"):
            regressed.append(f"newly running and {c.outcome}: skipped in the baseline ({b.reason}); {c.reason}")
        elif c.outcome == "passed":
            improved.append(f"backend newly available: skipped in the baseline ({b.reason}), passes now")
    if b.ran and c.ran:
        if c.nonfinite and not b.nonfinite:
            regressed.append(f"newly non-finite: {c.nonfinite}")
        elif b.nonfinite and not c.nonfinite and c.outcome == "passed":
            improved.append(f"newly finite (baseline: {b.nonfinite})")
        if b.outcome == "passed" and c.outcome != "passed":
            regressed.append(f"newly {c.outcome} (baseline passed): {c.reason}")
        elif b.outcome == "xfailed" and c.outcome in ("failed", "error"):
            regressed.append(f"xfailed -> {c.outcome}: {c.reason}")
        elif b.outcome in ("failed", "error", "xfailed") and c.outcome == "passed":
            improved.append(f"newly passing (baseline {b.outcome}: {b.reason})")
        new_failures = [f for f in c.failures if f not in b.failures]
        if new_failures and b.outcome != "passed":  # (a newly failing case is reported above)
            regressed.append("fails another way: " + ", ".join(_failure_label(*f) for f in new_failures) + f" (baseline: {', '.join(_failure_label(*f) for f in b.failures) or b.outcome})")
        if c.saturated and b.saturated == 0:
            regressed.append(f"newly saturated: {c.saturated} values at the dtype maximum (baseline none)")
        if c.headroom is not None and b.headroom is not None and c.headroom < HEADROOM_MIN <= b.headroom:
            regressed.append(f"lost headroom: largest value within {c.headroom:.3g}x of the dtype maximum (baseline {b.headroom:.3g}x; limit {HEADROOM_MIN:g}x)")

    threshold = None
    semantics: list[str] = []
    if b.rel_l2 is not None and c.rel_l2 is not None:
        threshold = margin.threshold(b.rel_l2)
        moved = f"rel_l2 {_fmt(c.rel_l2)} > baseline {_fmt(b.rel_l2)} x (1 + {margin.rel:g}) + {margin.abs:g} = {_fmt(threshold)}"
        if c.rel_l2 > threshold and computation_changed:
            semantics.append(f"{moved}, against a golden of another computation: {computation_changed} changed semantics")
        elif c.rel_l2 > threshold:
            regressed.append(moved)
        elif c.rel_l2 < b.rel_l2 - (threshold - b.rel_l2):
            improved.append(f"rel_l2 {_fmt(c.rel_l2)} < baseline {_fmt(b.rel_l2)} - {_fmt(threshold - b.rel_l2)}")

    diff = None
    notes: list[str] = []
    if base.get("precision") == "fp32" and b.ran and c.ran and baseline_dir is not None and candidate_dir is not None:
        if b.inputs_sha256 and c.inputs_sha256 and b.inputs_sha256 != c.inputs_sha256:
            b_in, c_in = (base.get("inputs") or {}).get("file"), (cand.get("inputs") or {}).get("file")
            if b_in and c_in and (baseline_dir / "outputs" / b_in).is_file() and (candidate_dir / "outputs" / c_in).is_file():
                check = compare_saved_inputs(baseline_dir / "outputs" / b_in, candidate_dir / "outputs" / c_in, (cand.get("inputs") or {}).get("outlier_channels"))
                failure = check.failure()
                if failure:
                    semantics.append(failure.replace("the subject builds its inputs differently", "the candidate builds the inputs differently"))
                else:
                    notes.append(f"inputs differ within embedder noise (worst rel-L2 {_fmt(check.worst()['rel_l2'])})")
            else:
                notes.append("the two sides ran on different stored inputs, not saved: inputs not compared")
        bf, cf = outputs_file(baseline_dir, case_id), outputs_file(candidate_dir, case_id)
        if bf.is_file() and cf.is_file():
            diff = compare_outputs(bf, cf, (cand.get("inputs") or {}).get("output_outlier_channels"))
            if diff.rel_l2 is not None and diff.rel_l2 > fp32_rtol:
                semantics.append(
                    f"fp32 outputs differ from the baseline's by {_fmt(diff.rel_l2)} rel-L2 > {fp32_rtol:g}"
                    + "".join(f"; {name} {_fmt(v)}" for name, v in diff.per_output.items())
                    + (f"; {diff.note}" if diff.note else "")
                )

    if regressed:
        return CaseVerdict(case_id, "regressed", regressed + semantics + notes, b, c, threshold, diff)
    if semantics:
        return CaseVerdict(case_id, "semantics changed", semantics + improved + notes, b, c, threshold, diff)
    if improved:
        return CaseVerdict(case_id, "improved", improved + notes, b, c, threshold, diff)
    why = []
    if b.rel_l2 is not None and c.rel_l2 is not None:
        why.append(f"rel_l2 {_fmt(b.rel_l2)} -> {_fmt(c.rel_l2)} (regresses above {_fmt(threshold)})")
    elif not b.ran and not c.ran:
        why.append("skipped on both sides" + ("" if b.reason == c.reason else f" (reason now: {c.reason})"))
    else:
        why.append(f"{b.outcome} -> {c.outcome}")
    if diff is not None and diff.rel_l2 is not None:
        why.append(f"fp32 outputs within {_fmt(diff.rel_l2)} of the baseline's (limit {fp32_rtol:g})")
    return CaseVerdict(case_id, "unchanged", why + notes, b, c, threshold, diff)


def inconclusive_reasons(base_cases: dict[str, dict], cand_cases: dict[str, dict]) -> list[str]:
    """Why the two runs cannot answer the gate's question (empty: they can): nothing selected, nothing that ran on
    both sides, a component with no case that passed on both sides, cases that error on both sides."""
    if not base_cases and not cand_cases:
        return ["the selection is empty on both sides: nothing was compared"]
    both = [i for i in base_cases if i in cand_cases]
    ran_both = [i for i in both if base_cases[i]["outcome"] in EXECUTED and cand_cases[i]["outcome"] in EXECUTED]
    if not ran_both:
        return [f"no case ran on both sides ({len(both)} common case ids, all skipped on one side or both)"]
    reasons = []
    components: dict[str, list[str]] = {}
    for i in both:
        components.setdefault(base_cases[i].get("component") or cand_cases[i].get("component") or "?", []).append(i)
    for component, ids in sorted(components.items()):
        comparable = [i for i in ids if base_cases[i]["outcome"] in ("passed", "xfailed") and cand_cases[i]["outcome"] in ("passed", "xfailed")]
        ran = [i for i in ids if base_cases[i]["outcome"] in EXECUTED or cand_cases[i]["outcome"] in EXECUTED]
        if not comparable:
            skipped = [i for i in ids if i not in ran]
            why = cand_cases[skipped[0]].get("reason") if skipped else ""
            reasons.append(
                f"{component}: no case passed on both sides ({len(ran)} ran on either side, {len(ids) - len(ran)} skipped on both"
                + (f"; e.g. {why}" if why else "") + ")"
            )  # fmt: skip
    errors = [i for i in both if base_cases[i]["outcome"] == "error" and cand_cases[i]["outcome"] == "error"]
    if errors:
        reasons.append(f"{len(errors)} case(s) error on both sides, e.g. {errors[0]}: {cand_cases[errors[0]].get('reason', '')[:200]}")
    return reasons


# --- benchmarks ---------------------------------------------------------------------------------------------------


def load_benchmarks(path: Path) -> tuple[dict[str, float], dict]:
    """Medians (seconds) by benchmark fullname from a pytest-benchmark JSON file, and its machine_info."""
    data = json.loads(Path(path).read_text())
    medians = {}
    for bench in data.get("benchmarks", []):
        name = bench.get("fullname") or bench.get("name")
        median = finite((bench.get("stats") or {}).get("median"))
        if name and median is not None:
            medians[name] = median
    return medians, data.get("machine_info") or {}


def compare_benchmarks(baseline: Path, candidate: Path, fail_on_slowdown: float | None) -> tuple[list[BenchmarkDelta], list[str]]:
    base, base_machine = load_benchmarks(baseline)
    cand, cand_machine = load_benchmarks(candidate)
    notes = []
    for key in ("node", "processor"):
        if base_machine.get(key) != cand_machine.get(key):
            where = f"{key}: {base_machine.get(key)} / {cand_machine.get(key)}"
            notes.append(f"benchmarks ran on different machines ({where}): the ratios compare the machines too")
            break
    cpu_b, cpu_c = (base_machine.get("cpu") or {}).get("brand_raw"), (cand_machine.get("cpu") or {}).get("brand_raw")
    if cpu_b != cpu_c and not notes:
        notes.append(f"benchmarks ran on different CPUs ({cpu_b} / {cpu_c})")
    deltas = []
    for name in sorted(set(base) | set(cand)):
        b, c = base.get(name), cand.get(name)
        ratio = c / b if b and c is not None else None
        failing = fail_on_slowdown is not None and ratio is not None and ratio > 1 + fail_on_slowdown
        deltas.append(BenchmarkDelta(name, b, c, ratio, failing))
    return deltas, notes


# --- the gate -----------------------------------------------------------------------------------------------------


def _run_notes(base_run: dict, cand_run: dict) -> list[str]:
    notes = []
    for key in ("device", "torch", "cuda", "gpu"):
        if base_run.get(key) != cand_run.get(key):
            notes.append(f"the runs differ in {key}: {base_run.get(key)} / {cand_run.get(key)}")
    b_opts, c_opts = base_run.get("options") or {}, cand_run.get("options") or {}
    for key in ("scale", "profile", "guard", "markexpr", "keyword"):
        if b_opts.get(key) != c_opts.get(key):
            notes.append(f"the runs selected different cases ({key}: {b_opts.get(key)} / {c_opts.get(key)}): ids on one side only are added/removed")
    if not b_opts.get("save_outputs") or not c_opts.get("save_outputs"):
        notes.append("a run was made without --save-outputs: fp32 semantics were not compared")
    return notes


def compare_runs(
    baseline_dir: Path,
    candidate_dir: Path,
    fp32_rtol: float = DEFAULT_FP32_RTOL,
    accept_semantics: bool = False,
    fail_on_benchmark_slowdown: float | None = None,
) -> GateResult:
    """Compare two report directories case by case (and their benchmarks); see the module docstring for the rules."""
    if fp32_rtol <= 0:
        raise ValueError(f"fp32_rtol must be > 0 (got {fp32_rtol})")
    baseline_dir, candidate_dir = Path(baseline_dir), Path(candidate_dir)
    base_doc, cand_doc = load_results(baseline_dir), load_results(candidate_dir)
    base_cases, cand_cases = cases_by_id(base_doc), cases_by_id(cand_doc)
    ids = list(dict.fromkeys([*base_cases, *cand_cases]))
    same = _same_selection(base_doc["run"], cand_doc["run"])
    verdicts = [
        judge_case(i, base_cases.get(i), cand_cases.get(i), None, fp32_rtol, baseline_dir, candidate_dir, same_selection=same) for i in ids
    ]
    changed = _changed_computations(verdicts, base_cases)
    for n, v in enumerate(verdicts):
        key = _computation(base_cases.get(v.case_id))
        if v.verdict == "regressed" and key in changed and base_cases[v.case_id].get("precision") != "fp32":
            verdicts[n] = judge_case(v.case_id, base_cases[v.case_id], cand_cases.get(v.case_id), None, fp32_rtol, baseline_dir,
                                     candidate_dir, same_selection=same, computation_changed=changed[key])
    severity = {v: k for k, v in enumerate(VERDICTS)}
    verdicts.sort(key=lambda v: severity[v.verdict])  # stable: file order within a verdict
    notes = _run_notes(base_doc["run"], cand_doc["run"])
    benchmarks: list[BenchmarkDelta] = []
    b_bench, c_bench = benchmark_file(baseline_dir), benchmark_file(candidate_dir)
    if b_bench.is_file() and c_bench.is_file():
        benchmarks, bench_notes = compare_benchmarks(b_bench, c_bench, fail_on_benchmark_slowdown)
        notes += bench_notes
    elif b_bench.is_file() or c_bench.is_file():
        notes.append(f"only one run has {b_bench.name}: benchmarks not compared")
    return GateResult(
        baseline_dir,
        candidate_dir,
        base_doc["run"],
        cand_doc["run"],
        fp32_rtol,
        accept_semantics,
        verdicts,
        benchmarks,
        fail_on_benchmark_slowdown,
        notes,
        inconclusive_reasons(base_cases, cand_cases),
    )


def _computation(case: dict | None) -> tuple | None:
    """What a golden is of: the subject's component at a scale on a profile (every precision and backend shares it)."""
    return None if case is None else (case.get("subject"), case.get("component"), case.get("scale"), case.get("profile"))


def _changed_computations(verdicts: list[CaseVerdict], base_cases: dict[str, dict]) -> dict[tuple, str]:
    """The computations whose fp32 case changed semantics, each with the first such case's id."""
    changed: dict[tuple, str] = {}
    for v in verdicts:
        case = base_cases.get(v.case_id)
        if case is not None and case.get("precision") == "fp32" and v.verdict == "semantics changed":
            changed.setdefault(_computation(case), v.case_id)
    return changed


def _same_selection(base_run: dict, cand_run: dict) -> bool:
    """Whether both runs asked for the same cases (then a case that ran in the baseline must be in the candidate)."""
    keys = ("scale", "profile", "guard", "markexpr", "keyword")
    b, c = base_run.get("options") or {}, cand_run.get("options") or {}
    return bool(b) and bool(c) and all(b.get(k) == c.get(k) for k in keys)
