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

from .rundir import EXECUTED, benchmark_file, budget_rel_l2, cases_by_id, finite, load_results, outputs_file, rel_l2

VERDICTS = ("regressed", "semantics changed", "improved", "added", "removed", "unchanged")
DEFAULT_MARGIN = 0.10
DEFAULT_FP32_RTOL = 1e-5
EXIT_OK, EXIT_REGRESSED, EXIT_SEMANTICS, EXIT_BENCHMARK = 0, 1, 3, 4


@dataclass(frozen=True)
class Side:
    """What one run recorded for a case, as far as the gate reads it."""

    outcome: str
    rel_l2: float | None
    budget_rel_l2: float | None
    nonfinite: str | None  # where the first non-finite value was, or why there is no finite rel_l2
    reason: str

    @classmethod
    def of(cls, case: dict) -> Side:
        return cls(case["outcome"], rel_l2(case), budget_rel_l2(case), _nonfinite(case), case.get("reason") or "")

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
    margin: float
    fp32_rtol: float
    accept_semantics: bool
    cases: list[CaseVerdict]
    benchmarks: list[BenchmarkDelta] = field(default_factory=list)
    fail_on_benchmark_slowdown: float | None = None
    notes: list[str] = field(default_factory=list)

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
        return EXIT_OK

    @property
    def exit_meaning(self) -> str:
        accepted = self.accept_semantics and self.with_verdict("semantics changed")
        return {
            EXIT_OK: "pass: nothing regressed" + (" (semantics changes accepted)" if accepted else ""),
            EXIT_REGRESSED: f"fail: {len(self.with_verdict('regressed'))} case(s) regressed",
            EXIT_SEMANTICS: f"fail: {len(self.with_verdict('semantics changed'))} fp32 case(s) changed semantics (accept with --accept-semantics)",
            EXIT_BENCHMARK: f"fail: {sum(b.failing for b in self.benchmarks)} benchmark(s) slower than allowed",
        }[self.exit_code]

    def as_dict(self) -> dict:
        return {
            "baseline": str(self.baseline_dir),
            "candidate": str(self.candidate_dir),
            "margin": self.margin,
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


def compare_outputs(baseline_file: Path, candidate_file: Path) -> OutputDiff:
    """Relative L2 of the candidate's saved outputs against the baseline's, in float64, worst output counts."""
    import numpy as np
    from safetensors.numpy import load_file

    base, cand = load_file(str(baseline_file)), load_file(str(candidate_file))
    if set(base) != set(cand):
        return OutputDiff(math.inf, {}, f"different outputs: baseline {sorted(base)}, candidate {sorted(cand)}")
    per_output: dict[str, float | None] = {}
    notes = []
    for name in sorted(base):
        b, c = base[name].astype(np.float64), cand[name].astype(np.float64)
        if b.shape != c.shape:
            per_output[name] = math.inf
            notes.append(f"{name}: shape {tuple(b.shape)} -> {tuple(c.shape)}")
        elif not (np.isfinite(b).all() and np.isfinite(c).all()):
            per_output[name] = None
            notes.append(f"{name}: non-finite values, not compared")
        else:
            b_norm, d_norm = float(np.linalg.norm(b)), float(np.linalg.norm(c - b))
            per_output[name] = d_norm / b_norm if b_norm else (0.0 if d_norm == 0 else math.inf)
    values = [v for v in per_output.values() if v is not None]
    return OutputDiff(max(values) if values else None, per_output, "; ".join(notes))


def judge_case(
    case_id: str,
    base: dict | None,
    cand: dict | None,
    margin: float,
    fp32_rtol: float,
    baseline_dir: Path | None = None,
    candidate_dir: Path | None = None,
) -> CaseVerdict:
    """One case's verdict (module docstring: the rules, in order)."""
    if base is None:
        side = Side.of(cand)
        return CaseVerdict(case_id, "added", [f"only in the candidate ({side.outcome})"], None, side)
    if cand is None:
        side = Side.of(base)
        return CaseVerdict(case_id, "removed", [f"only in the baseline ({side.outcome})"], side, None)
    b, c = Side.of(base), Side.of(cand)
    regressed: list[str] = []
    improved: list[str] = []

    if b.ran and not c.ran:
        regressed.append(f"backend newly missing: ran in the baseline ({b.outcome}), skipped in the candidate: {c.reason}")
    if not b.ran and c.ran:
        if c.outcome in ("failed", "error"):
            regressed.append(f"newly running and {c.outcome}: skipped in the baseline ({b.reason}); {c.reason}")
        elif c.outcome == "passed":
            improved.append(f"backend newly available: skipped in the baseline ({b.reason}), passes now")
    if b.ran and c.ran:
        if c.nonfinite and not b.nonfinite:
            regressed.append(f"newly non-finite: {c.nonfinite}")
        elif b.nonfinite and not c.nonfinite:
            improved.append(f"newly finite (baseline: {b.nonfinite})")
        if b.outcome == "passed" and c.outcome != "passed":
            regressed.append(f"newly {c.outcome} (baseline passed): {c.reason}")
        elif b.outcome in ("failed", "error", "xfailed") and c.outcome == "passed":
            improved.append(f"newly passing (baseline {b.outcome}: {b.reason})")

    threshold = None
    budget = c.budget_rel_l2 or b.budget_rel_l2
    if b.rel_l2 is not None and c.rel_l2 is not None:
        slack = margin * b.rel_l2 + (budget / 10 if budget else 0.0)
        threshold = b.rel_l2 + slack
        if c.rel_l2 > threshold:
            floor = _fmt(budget / 10 if budget else None)
            regressed.append(f"rel_l2 {_fmt(c.rel_l2)} > baseline {_fmt(b.rel_l2)} + {margin:.0%} + budget/10 {floor} = {_fmt(threshold)}")
        elif c.rel_l2 < b.rel_l2 - slack:
            improved.append(f"rel_l2 {_fmt(c.rel_l2)} < baseline {_fmt(b.rel_l2)} - {_fmt(slack)}")

    diff = None
    semantics: list[str] = []
    if (base.get("precision") == "fp32" and b.ran and c.ran and baseline_dir is not None and candidate_dir is not None):
        bf, cf = outputs_file(baseline_dir, case_id), outputs_file(candidate_dir, case_id)
        if bf.is_file() and cf.is_file():
            diff = compare_outputs(bf, cf)
            if diff.rel_l2 is not None and diff.rel_l2 > fp32_rtol:
                semantics.append(
                    f"fp32 outputs differ from the baseline's by {_fmt(diff.rel_l2)} rel-L2 > {fp32_rtol:g}"
                    + "".join(f"; {name} {_fmt(v)}" for name, v in diff.per_output.items())
                    + (f"; {diff.note}" if diff.note else "")
                )

    if regressed:
        return CaseVerdict(case_id, "regressed", regressed + semantics, b, c, threshold, diff)
    if semantics:
        return CaseVerdict(case_id, "semantics changed", semantics + improved, b, c, threshold, diff)
    if improved:
        return CaseVerdict(case_id, "improved", improved, b, c, threshold, diff)
    why = []
    if b.rel_l2 is not None and c.rel_l2 is not None:
        why.append(f"rel_l2 {_fmt(b.rel_l2)} -> {_fmt(c.rel_l2)} (regresses above {_fmt(threshold)})")
    elif not b.ran and not c.ran:
        why.append("skipped on both sides" + ("" if b.reason == c.reason else f" (reason now: {c.reason})"))
    else:
        why.append(f"{b.outcome} -> {c.outcome}")
    if diff is not None and diff.rel_l2 is not None:
        why.append(f"fp32 outputs within {_fmt(diff.rel_l2)} of the baseline's (limit {fp32_rtol:g})")
    return CaseVerdict(case_id, "unchanged", why, b, c, threshold, diff)


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
    margin: float = DEFAULT_MARGIN,
    fp32_rtol: float = DEFAULT_FP32_RTOL,
    accept_semantics: bool = False,
    fail_on_benchmark_slowdown: float | None = None,
) -> GateResult:
    """Compare two report directories case by case (and their benchmarks); see the module docstring for the rules."""
    if margin < 0 or fp32_rtol <= 0:
        raise ValueError(f"margin must be >= 0 and fp32_rtol > 0 (got {margin}, {fp32_rtol})")
    baseline_dir, candidate_dir = Path(baseline_dir), Path(candidate_dir)
    base_doc, cand_doc = load_results(baseline_dir), load_results(candidate_dir)
    base_cases, cand_cases = cases_by_id(base_doc), cases_by_id(cand_doc)
    ids = list(dict.fromkeys([*base_cases, *cand_cases]))
    verdicts = [judge_case(i, base_cases.get(i), cand_cases.get(i), margin, fp32_rtol, baseline_dir, candidate_dir) for i in ids]
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
        margin,
        fp32_rtol,
        accept_semantics,
        verdicts,
        benchmarks,
        fail_on_benchmark_slowdown,
        notes,
    )


def __getattr__(name: str):
    """``gate_markdown`` and ``gate_html`` live in ``gate_report`` (renderers decide nothing); importable from here."""
    if name in ("gate_markdown", "gate_html"):
        from . import gate_report

        return getattr(gate_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
