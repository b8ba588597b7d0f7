"""The upgrade gate, the ratchet writer and the CLI, on copies of one real run edited into each situation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conformance import cli
from conformance.expectations import load_ratchet
from conformance.expectations_io import write_expectations
from conformance.compare import margin_for
from conformance.gate import EXIT_BENCHMARK, EXIT_INCONCLUSIVE, EXIT_OK, EXIT_REGRESSED, EXIT_SEMANTICS, compare_runs
from conformance.gate_report import gate_html, gate_markdown
from conformance.paths import REPO_ROOT

from .reportdirs import copy_report, edit_case, executed, load, real_report, save

PREFIX = "diffusers-qwen.block-tiny-"
FP16 = PREFIX + "fp16-sdpa-nominal"
FP32 = PREFIX + "fp32-sdpa-nominal"


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return real_report(tmp_path_factory)


@pytest.fixture
def candidate(real, tmp_path) -> Path:
    return copy_report(real, tmp_path / "candidate")


def _case(report_dir: Path, case_id: str) -> dict:
    return next(c for c in load(report_dir)["cases"] if c["id"] == case_id)


def _verdicts(result) -> dict:
    return {v.case_id: v for v in result.cases}


def test_the_same_run_twice_is_unchanged_everywhere(real, candidate):
    result = compare_runs(real, candidate)
    cases = load(real)["cases"]
    assert result.exit_code == EXIT_OK and result.counts == {"unchanged": len(cases)}
    verdicts = _verdicts(result)
    for case in executed(load(real)):
        v = verdicts[case["id"]]
        assert v.baseline.rel_l2 == v.candidate.rel_l2 == case["metrics"]["rel_l2"]
        if case["precision"] == "fp32":
            assert v.output_diff is not None and v.output_diff.rel_l2 == 0.0  # outputs compared, bit-identical
    skipped = next(c for c in cases if c["outcome"] == "skipped")
    assert verdicts[skipped["id"]].why == ["skipped on both sides"]


def test_worse_rel_l2_regresses_with_the_numbers(real, candidate):
    base = _case(real, FP16)
    b = base["metrics"]["rel_l2"]
    threshold = margin_for(base).threshold(b)
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": threshold * 1.01})
    result = compare_runs(real, candidate)
    v = _verdicts(result)[FP16]
    assert v.verdict == "regressed" and result.exit_code == EXIT_REGRESSED
    assert v.threshold == pytest.approx(threshold)
    assert v.baseline.rel_l2 == b and v.candidate.rel_l2 == pytest.approx(threshold * 1.01)
    assert f"{b:.3g}" in v.why[0] and f"{threshold:.3g}" in v.why[0]
    assert result.counts["regressed"] == 1
    # just inside the margin: not a regression
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": threshold * 0.99})
    assert _verdicts(compare_runs(real, candidate))[FP16].verdict == "unchanged"


def test_better_rel_l2_beyond_the_slack_is_improved(real, candidate):
    base = _case(real, FP16)
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": base["metrics"]["rel_l2"] / 10})
    result = compare_runs(real, candidate)
    assert _verdicts(result)[FP16].verdict == "improved" and result.exit_code == EXIT_OK


def _scale_output(report_dir: Path, case_id: str, relative: float, seed: int = 0) -> None:
    """Perturb a saved output by ``relative`` rel-L2 (random direction)."""
    path = report_dir / "outputs" / f"{case_id}.safetensors"
    tensors = load_file(str(path))
    rng = np.random.default_rng(seed)
    for name, t in tensors.items():
        noise = rng.standard_normal(t.shape)
        tensors[name] = (t + relative * np.linalg.norm(t) * noise / np.linalg.norm(noise)).astype(np.float32)
    save_file(tensors, str(path))


def test_changed_fp32_outputs_are_a_semantics_change(real, candidate):
    _scale_output(candidate, FP32, 1e-3)
    result = compare_runs(real, candidate)
    v = _verdicts(result)[FP32]
    assert v.verdict == "semantics changed" and result.exit_code == EXIT_SEMANTICS
    assert v.output_diff.rel_l2 == pytest.approx(1e-3, rel=0.05) and set(v.output_diff.per_output) == {"img", "txt"}
    assert v.candidate.rel_l2 == v.baseline.rel_l2  # invisible to the golden comparison: that is why the check exists
    accepted = compare_runs(real, candidate, accept_semantics=True)
    assert accepted.exit_code == EXIT_OK and _verdicts(accepted)[FP32].verdict == "semantics changed"
    assert compare_runs(real, candidate, fp32_rtol=2e-3).exit_code == EXIT_OK


def test_a_semantics_change_carries_the_other_precisions_rel_l2_moves(real, candidate):
    """A changed RoPE moves the fp8 error against the new golden by 1 % (seen: ComfyUI 0.3.64 with theta 20000): that is
    the semantics change, not a regression. A newly failing case of the same component still regresses."""
    _scale_output(candidate, FP32, 1e-3)
    base = _case(real, FP16)
    worse = margin_for(base).threshold(base["metrics"]["rel_l2"]) * 1.01
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": worse})
    result = compare_runs(real, candidate)
    v = _verdicts(result)[FP16]
    assert v.verdict == "semantics changed" and result.exit_code == EXIT_SEMANTICS
    assert any(f"{FP32} changed semantics" in w for w in v.why), v.why
    edit_case(candidate, FP16, outcome="failed", reason="rel_l2 over budget", metrics={**base["metrics"], "rel_l2": worse})
    assert _verdicts(compare_runs(real, candidate))[FP16].verdict == "regressed"
    # without the fp32 change the same move regresses (the rule it replaces)
    fresh = copy_report(real, candidate.parent / "fresh")
    edit_case(fresh, FP16, metrics={**base["metrics"], "rel_l2": worse})
    assert _verdicts(compare_runs(real, fresh))[FP16].verdict == "regressed"


def test_fp32_rounding_noise_is_not_a_semantics_change(real, candidate):
    """2e-7 rel-L2 is what two orderings of the same fp32 math give (sdpa vs math: 7e-8; golden distance 1e-7)."""
    _scale_output(candidate, FP32, 2e-7)
    v = _verdicts(compare_runs(real, candidate))[FP32]
    assert v.verdict == "unchanged" and 5e-8 < v.output_diff.rel_l2 < 1e-6


def test_only_fp32_outputs_are_compared(real, candidate):
    _scale_output(candidate, FP16, 1e-2)
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "unchanged" and v.output_diff is None


def test_a_case_skipped_in_the_candidate_is_a_missing_backend(real, candidate):
    reason = "math: package gone"
    edit_case(candidate, FP16, outcome="skipped", reason=reason, metrics={}, stats={}, golden=None, budget=None, backend_calls={})
    result = compare_runs(real, candidate)
    v = _verdicts(result)[FP16]
    assert v.verdict == "regressed" and result.exit_code == EXIT_REGRESSED
    assert "skipped in the candidate" in v.why[0] and reason in v.why[0]


def test_newly_non_finite_and_newly_failing_regress(real, candidate):
    base = _case(real, FP16)
    first = {"boundary": "attention", "module": "attn", "tensor": "output", "count": 16, "nan": 0, "dtype": "float16", "entered": False, "masked_by_guard": False}
    edit_case(candidate, FP16, outcome="failed", reason="non-finite output", metrics={k: None for k in base["metrics"]}, first_nonfinite=first)
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "regressed"
    assert any("newly non-finite: first at attn" in w for w in v.why) and any("newly failed (baseline passed)" in w for w in v.why)
    # and the way back is an improvement
    back = _verdicts(compare_runs(candidate, real))[FP16]
    assert back.verdict == "improved" and any("newly finite" in w for w in back.why)


def test_masked_non_finite_counts_as_non_finite(real, candidate):
    masked = {"boundary": "block", "module": "Tensor.clip", "tensor": "input", "count": 64, "nan": 0, "dtype": "float16", "entered": False, "masked_by_guard": True}
    edit_case(candidate, FP16, first_nonfinite=masked)  # outputs finite, same rel_l2, still passed
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "regressed" and "masked by the subject's guard" in v.why[0]


def test_added_and_removed_cases_are_reported_not_failing(real, candidate):
    """With a different selection (here another --conformance-profile), ids on one side only are reported, not judged."""
    document = load(candidate)
    document["run"]["options"]["profile"] = "nominal,massive,newprofile"
    removed = document["cases"].pop(0)
    new = dict(document["cases"][0], id=PREFIX + "fp16-sdpa-newprofile", profile="newprofile")
    document["cases"].append(new)
    save(candidate, document)
    result = compare_runs(real, candidate)
    verdicts = _verdicts(result)
    assert verdicts[removed["id"]].verdict == "removed" and verdicts[new["id"]].verdict == "added"
    assert result.exit_code == EXIT_OK
    assert [v.verdict for v in result.cases][:2] == ["added", "removed"]  # verdicts needing attention come first


def test_error_where_the_baseline_passed_regresses(real, candidate):
    edit_case(candidate, FP32, outcome="error", reason="RuntimeError: boom", metrics={}, stats={}, golden=None, budget=None)
    v = _verdicts(compare_runs(real, candidate))[FP32]
    assert v.verdict == "regressed" and "newly error (baseline passed): RuntimeError: boom" in v.why


# --- rules added after a review found the gate fooled (each failed under the rule it replaces) ---------------------

BORN = {"kind": "born", "message": "non-finite output; first at attn.to_q", "at": "attn.to_q", "metric": None, "value": 4.0}
ENTERED = {"kind": "entered", "message": "non-finite values entered at the input", "at": "input", "metric": None, "value": 4.0}


def _declared_failure(report_dir: Path, case_id: str, kinds: list[dict], outcome: str = "xfailed", reason: str = "declared") -> None:
    base = _case(report_dir, case_id)
    edit_case(report_dir, case_id, outcome=outcome, reason=reason, failure_kinds=kinds, metrics={k: None for k in base["metrics"]})


def test_xfailed_then_failed_regresses(real, candidate, tmp_path):
    """The old rule read xfailed -> failed as unchanged (only 'passed -> not passed' regressed)."""
    baseline = copy_report(real, tmp_path / "baseline")
    _declared_failure(baseline, FP16, [ENTERED])
    _declared_failure(candidate, FP16, [ENTERED], outcome="failed", reason="expected failure changed: ...")
    v = _verdicts(compare_runs(baseline, candidate))[FP16]
    assert v.verdict == "regressed" and any("xfailed -> failed" in w for w in v.why)


def test_a_failure_at_another_place_regresses(real, candidate, tmp_path):
    """Both sides xfailed, so the old rule saw nothing; the NaN moved from the input into attn.to_q."""
    baseline = copy_report(real, tmp_path / "baseline")
    _declared_failure(baseline, FP16, [ENTERED])
    _declared_failure(candidate, FP16, [BORN])
    v = _verdicts(compare_runs(baseline, candidate))[FP16]
    assert v.verdict == "regressed" and any("fails another way: born failure at attn.to_q" in w for w in v.why)


def test_a_fallback_is_a_regression_not_an_improvement(real, candidate, tmp_path):
    """A sage case that failed its budget in the baseline and silently fell back to SDPA (within budget, so the old
    rule said 'improved')."""
    baseline = copy_report(real, tmp_path / "baseline")
    base = _case(real, FP16)
    budget = {"kind": "budget", "message": "rel_l2 over budget", "at": None, "metric": "rel_l2", "value": 5e-3}
    edit_case(baseline, FP16, outcome="failed", reason="rel_l2 over budget", failure_kinds=[budget], metrics={**base["metrics"], "rel_l2": 5e-3})
    fallback = {"kind": "fallback", "message": "silent fallback: ComfyUI logged: Error running sage attention", "at": None, "metric": None, "value": None}
    edit_case(candidate, FP16, outcome="failed", reason=fallback["message"], failure_kinds=[fallback])
    v = _verdicts(compare_runs(baseline, candidate))[FP16]
    assert v.verdict == "regressed" and any("a logged fallback" in w for w in v.why)


def test_a_component_that_no_longer_builds_regresses(real, candidate):
    """Its cases are in the candidate's matrix, skipped with the build error (they used to vanish: 'removed')."""
    reason = "qwen.block: the suite's adapter cannot build qwen.block on ComfyUI 9.9: TypeError: unexpected keyword"
    for case in executed(load(real)):
        if case["component"] == "qwen.block":
            edit_case(candidate, case["id"], outcome="skipped", reason=reason, metrics={}, stats={}, golden=None, budget=None, backend_calls={})
    result = compare_runs(real, candidate)
    assert result.exit_code == EXIT_REGRESSED
    assert all(reason in v.why[0] for v in result.with_verdict("regressed"))


def test_a_case_missing_from_the_same_selection_regresses(real, candidate):
    document = load(candidate)
    document["cases"] = [c for c in document["cases"] if c["id"] != FP16]
    save(candidate, document)
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "regressed" and "missing from the candidate run of the same selection" in v.why[0]


def test_newly_saturated_and_lost_headroom_regress(real, candidate):
    base = _case(real, FP16)
    edit_case(candidate, FP16, stats={**base["stats"], "saturated": 3})
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "regressed" and "newly saturated: 3 values" in v.why[0]
    edit_case(candidate, FP16, stats={**base["stats"], "headroom": 1.5})
    v = _verdicts(compare_runs(real, candidate))[FP16]
    assert v.verdict == "regressed" and "lost headroom" in v.why[0]


def test_a_gate_where_nothing_ran_is_inconclusive(real, candidate, tmp_path):
    """Every case of a component failing to build on both sides read PASS, exit 0, 'unchanged'."""
    baseline = copy_report(real, tmp_path / "baseline")
    for side in (baseline, candidate):
        for case in load(side)["cases"]:
            edit_case(side, case["id"], outcome="skipped", reason="flux.double: the suite's adapter cannot build it", metrics={}, stats={})
    result = compare_runs(baseline, candidate)
    assert result.exit_code == EXIT_INCONCLUSIVE and not result.with_verdict("regressed")
    assert "no case ran on both sides" in result.inconclusive[0]
    assert gate_markdown(result).startswith("# Upgrade gate: INCONCLUSIVE (exit 5)")
    save(baseline, {**load(baseline), "cases": []})
    save(candidate, {**load(candidate), "cases": []})
    assert "the selection is empty" in compare_runs(baseline, candidate).inconclusive[0]


def test_errors_on_both_sides_are_inconclusive(real, candidate, tmp_path):
    baseline = copy_report(real, tmp_path / "baseline")
    for side in (baseline, candidate):
        edit_case(side, FP16, outcome="error", reason="IndexError: index out of bounds", metrics={}, stats={})
    result = compare_runs(baseline, candidate)
    assert result.exit_code == EXIT_INCONCLUSIVE and any("error on both sides" in r for r in result.inconclusive)


def test_the_semantics_check_splits_bulk_and_outlier_channels(real, candidate):
    """A 1.4e-2 change in the bulk of an output whose outlier channels are 1e4 reads ~1e-6 on the whole tensor."""
    massive = PREFIX + "fp32-sdpa-massive"
    case = _case(real, massive)
    channels = case["inputs"]["output_outlier_channels"]
    assert channels, "the massive profile records its outlier channels per output"
    path = candidate / "outputs" / f"{massive}.safetensors"
    tensors = load_file(str(path))
    rng = np.random.default_rng(0)
    for name, t in tensors.items():
        keep = np.ones(t.shape[-1], dtype=bool)
        keep[channels.get(name, [])] = False
        bulk = t[..., keep]
        noise = rng.standard_normal(bulk.shape)
        t = t.copy()
        t[..., keep] = bulk + 1.4e-2 * np.linalg.norm(bulk) * noise / np.linalg.norm(noise)
        tensors[name] = t.astype(np.float32)
    save_file(tensors, str(path))
    v = _verdicts(compare_runs(real, candidate))[massive]
    assert v.verdict == "semantics changed"
    whole = {k: x for k, x in v.output_diff.per_output.items() if "/" not in k and k in channels}
    assert any(x < 1e-4 for x in whole.values()) and any(k.endswith("/bulk") and x > 1e-2 for k, x in v.output_diff.per_output.items())


def test_inputs_built_differently_are_a_semantics_change(real, candidate):
    """Same outputs file, but the candidate's cases ran on other stored inputs: compared element-wise."""
    case = _case(real, FP32)
    source = candidate / "outputs" / case["inputs"]["file"]
    tensors = load_file(str(source))
    name = sorted(tensors)[0]
    tensors[name] = (tensors[name] * 1.01).astype(tensors[name].dtype)
    other = "inputs/changed.safetensors"
    save_file(tensors, str(candidate / "outputs" / other))
    edit_case(candidate, FP32, inputs={**case["inputs"], "sha256": "changed", "file": other})
    v = _verdicts(compare_runs(real, candidate))[FP32]
    assert v.verdict == "semantics changed" and any(f"the candidate builds the inputs differently: {name}" in w for w in v.why)


# --- benchmarks ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark_json(tmp_path_factory) -> dict:
    """A real pytest-benchmark --benchmark-json file, from a two-benchmark test run in a subprocess."""
    where = tmp_path_factory.mktemp("bench")
    (where / "test_tiny_bench.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', [10, 1000])\ndef test_sum(benchmark, n):\n    benchmark(sum, range(n))\n"
    )
    out = where / "benchmark.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "test_tiny_bench.py", f"--benchmark-json={out}",
         "--benchmark-min-rounds=3", "--benchmark-max-time=0.02", "--benchmark-disable-gc"],
        cwd=where, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},  # else it writes no JSON
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_benchmark_medians_are_compared(real, candidate, benchmark_json):
    baseline = copy_report(real, candidate.parent / "baseline")
    (baseline / "benchmark.json").write_text(json.dumps(benchmark_json))
    slower = json.loads(json.dumps(benchmark_json))
    for bench in slower["benchmarks"]:
        bench["stats"]["median"] *= 1.5
    slower["benchmarks"].append({**slower["benchmarks"][0], "name": "test_new", "fullname": "test_tiny_bench.py::test_new"})
    (candidate / "benchmark.json").write_text(json.dumps(slower))
    result = compare_runs(baseline, candidate)
    ratios = {b.name: b.ratio for b in result.benchmarks}
    assert ratios["test_tiny_bench.py::test_sum[10]"] == pytest.approx(1.5) and ratios["test_tiny_bench.py::test_sum[1000]"] == pytest.approx(1.5)
    assert ratios["test_tiny_bench.py::test_new"] is None
    assert result.exit_code == EXIT_OK  # reported, not failing
    assert "1.500" in gate_markdown(result)
    failing = compare_runs(baseline, candidate, fail_on_benchmark_slowdown=0.25)
    assert failing.exit_code == EXIT_BENCHMARK and sum(b.failing for b in failing.benchmarks) == 2
    assert compare_runs(baseline, candidate, fail_on_benchmark_slowdown=0.6).exit_code == EXIT_OK
    (baseline / "benchmark.json").unlink()
    assert any("only one run has benchmark.json" in n for n in compare_runs(baseline, candidate).notes)


# --- renderers ----------------------------------------------------------------------------------------------------


def test_renderers_show_every_verdict_with_its_numbers(real, candidate):
    fp16_massive = PREFIX + "fp16-sdpa-massive"  # another profile: not carried by the nominal fp32 semantics change
    base = _case(real, fp16_massive)
    edit_case(candidate, fp16_massive, metrics={**base["metrics"], "rel_l2": 0.5})
    _scale_output(candidate, FP32, 1e-3)
    result = compare_runs(real, candidate)
    md = gate_markdown(result)
    assert md.startswith("# Upgrade gate: FAIL (exit 1)")
    assert f"| regressed | {fp16_massive} | passed | passed |" in md and "| semantics changed | " + FP32 in md
    assert md.count("| unchanged |") == len(load(real)["cases"]) - 2
    short = gate_markdown(result, include_unchanged=False)
    assert "| unchanged |" not in short and f"{len(load(real)['cases']) - 2} unchanged cases not listed" in short
    page = gate_html(result)
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<tr id=\"gate-") == len(result.cases) and "0.5" in page and "semantics changed" in page


# --- the ratchet file ---------------------------------------------------------------------------------------------


def test_expectations_round_trip_through_load_ratchet(real, tmp_path):
    out = write_expectations(real, tmp_path / "ratchet" / "expectations.json")
    assert sorted(p.name for p in out.parent.iterdir()) == ["expectations.json"]  # no temporary file left
    written = json.loads(out.read_text())
    document = load(real)
    assert written["format"] == 1 and written["subject"] == document["run"]["subject"]
    ran = executed(document)
    assert {i: (e["rel_l2"], e["outcome"]) for i, e in written["cases"].items()} == {c["id"]: (c["metrics"]["rel_l2"], c["outcome"]) for c in ran}
    assert all(written["cases"][c["id"]]["component"] == c["component"] for c in ran)  # enough to serve as a baseline
    assert load_ratchet(out) == {c["id"]: c["metrics"]["rel_l2"] for c in ran}
    # a case without a finite rel_l2 is recorded with its outcome and ignored by the suite's reader
    edited = copy_report(real, tmp_path / "edited")
    edit_case(edited, FP16, outcome="error", reason="boom", metrics={})
    write_expectations(edited, out)  # overwrites in place
    entry = json.loads(out.read_text())["cases"][FP16]
    assert (entry["rel_l2"], entry["outcome"]) == (None, "error")
    assert FP16 not in load_ratchet(out) and len(load_ratchet(out)) == len(ran) - 1


def test_the_suite_fails_a_case_worse_than_its_written_expectation(real, tmp_path):
    """The written file is what --expectations reads: tighten one entry and that case fails the ratchet rule."""
    out = write_expectations(real, tmp_path / "expectations.json")
    ratchet = json.loads(out.read_text())
    ratchet["cases"][FP16]["rel_l2"] = 1e-5  # fp16 measures 4e-4, far above the gate's margin over 1e-5
    out.write_text(json.dumps(ratchet))
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", "-m", "qwen_fp16 and sdpa", "-k", "qwen.block",
         "--expectations", str(out), "--report-dir", str(tmp_path / "report"), "--golden-store", str(tmp_path / "local")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    cases = {c["id"]: c for c in load(tmp_path / "report")["cases"]}
    assert cases[FP16]["outcome"] == "failed" and "worse than the expectation 1e-05" in cases[FP16]["reason"], proc.stdout[-3000:]
    assert cases[PREFIX + "fp16-sdpa-massive"]["outcome"] == "passed"


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_gate_on_two_report_directories(real, candidate, tmp_path, capsys):
    out = tmp_path / "gate"
    assert cli.main(["gate", "--baseline", str(real), "--candidate", str(candidate), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Upgrade gate: PASS (exit 0)") and "| unchanged |" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["gate.html", "gate.json", "gate.md"]
    assert json.loads((out / "gate.json").read_text())["exit_code"] == 0
    base = _case(real, FP16)
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": 0.5})
    assert cli.main(["gate", "--baseline", str(real), "--candidate", str(candidate), "--out", str(out)]) == EXIT_REGRESSED
    assert f"| regressed | {FP16} |" in capsys.readouterr().out
    _scale_output(candidate, FP32, 1e-3)
    edit_case(candidate, FP16, metrics=base["metrics"])
    args = ["gate", "--baseline", str(real), "--candidate", str(candidate), "--out", str(out)]
    assert cli.main(args) == EXIT_SEMANTICS
    assert cli.main([*args, "--accept-semantics"]) == 0
    assert cli.main([*args, "--fp32-rtol", "1e-2"]) == 0


def test_cli_refuses_what_is_neither_a_run_nor_a_checkout(real, tmp_path, capsys):
    assert cli.main(["gate", "--baseline", str(tmp_path), "--candidate", str(real), "--out", str(tmp_path / "o")]) == 2
    assert "neither a report directory" in capsys.readouterr().err
    assert cli.main(["gate", "--baseline", str(real)]) == 2  # argparse: --candidate is required
    assert cli.main(["gate", "--baseline", str(real), "--candidate", str(real), "--fp32-rtol", "-1"]) == 2


def test_cli_runs_the_suite_on_a_checkout(real, tmp_path, capsys):
    """A directory with comfy/model_management.py is run through the suite in a subprocess, with the command the
    gate documents; this one is not a real ComfyUI, so the suite refuses it and the gate says so (exit 2)."""
    fake = tmp_path / "NotComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "comfy" / "model_management.py").write_text("raise ImportError('not a real checkout')\n")
    out = tmp_path / "gate"
    code = cli.main(["gate", "--baseline", str(fake), "--candidate", str(real), "--out", str(out), "--suite-args", "-m 'qwen_fp32 and sdpa'"])
    err = capsys.readouterr().err
    assert code == 2 and f"the suite on {fake}" in err
    expected = cli.suite_command(fake, out / "baseline", ["-m", "qwen_fp32 and sdpa"])
    assert expected == [sys.executable, "-m", "pytest", "suites", "-q", f"--comfyui={fake}", "--save-outputs", "--report-dir", str(out / "baseline"), "-m", "qwen_fp32 and sdpa"]
    # the gate tier's profiles come first unless --suite-args names its own
    assert f"--comfyui={fake} --save-outputs --report-dir {out / 'baseline'} --conformance-profile nominal,massive -m 'qwen_fp32 and sdpa'" in err
    assert cli.gate_suite_args(["--conformance-profile", "nominal"]) == ["--conformance-profile", "nominal"]


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="no ComfyUI checkout: set COMFYUI_PATH to gate a checkout against itself")
def test_cli_gates_a_real_checkout_against_itself(tmp_path, capsys):
    checkout = os.environ["COMFYUI_PATH"]
    code = cli.main(["gate", "--baseline", checkout, "--candidate", checkout, "--out", str(tmp_path), "--suite-args", f"-m 'qwen_fp32 and sdpa' -k qwen.block --golden-store {tmp_path / 'local'}"])
    assert code == 0, capsys.readouterr()
    result = json.loads((tmp_path / "gate.json").read_text())
    assert set(result["counts"]) == {"unchanged"} and any(c["fp32_output_diff"] for c in result["cases"])


def test_cli_writes_expectations_and_html(real, tmp_path, capsys):
    assert cli.main(["expectations", "--from", str(real), "--out", str(tmp_path / "exp.json")]) == 0
    assert load_ratchet(tmp_path / "exp.json")
    copy = copy_report(real, tmp_path / "run")
    assert cli.main(["html", str(copy)]) == 0
    assert (copy / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_the_ratchet_file_is_a_gate_baseline(real, candidate, tmp_path, capsys):
    """Written by one command from a run, read by the suite (--expectations) and by the gate (--baseline FILE)."""
    ratchet = tmp_path / "comfyui-0.3.64.json"
    assert cli.main(["expectations", "--from", str(real), "--out", str(ratchet)]) == 0
    out = tmp_path / "gate"
    assert cli.main(["gate", "--baseline", str(ratchet), "--candidate", str(candidate), "--out", str(out)]) == 0
    assert "no fp32 semantics check" in capsys.readouterr().err
    base = _case(real, FP16)
    edit_case(candidate, FP16, metrics={**base["metrics"], "rel_l2": 0.5})
    assert cli.main(["gate", "--baseline", str(ratchet), "--candidate", str(candidate), "--out", str(out)]) == EXIT_REGRESSED
    assert f"| regressed | {FP16} |" in capsys.readouterr().out


def test_an_existing_ratchet_file_is_not_silently_replaced(real, tmp_path, capsys):
    ratchet = tmp_path / "exp.json"
    assert cli.main(["expectations", "--from", str(real), "--out", str(ratchet)]) == 0
    before = ratchet.read_text()
    assert cli.main(["expectations", "--from", str(real), "--out", str(ratchet)]) == 2
    assert "--replace" in capsys.readouterr().err and ratchet.read_text() == before
    assert cli.main(["expectations", "--from", str(real), "--out", str(ratchet), "--replace"]) == 0
    assert "replaced" in capsys.readouterr().out
