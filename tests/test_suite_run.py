"""The suite end to end, as users run it: markers select, reports follow their contract, bad goldens fail clearly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from conformance.paths import GOLDEN_DIR, REPO_ROOT

SCHEMA = json.loads((REPO_ROOT / "conformance" / "schema" / "results.schema.json").read_text())


def run_suite(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    report_dir = tmp_path / "report"
    env = {**{k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}, **(env or {})}  # these runs test the diffusers subject
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", "--report-dir", str(report_dir), "--golden-store", str(tmp_path / "local"), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return proc, report_dir


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("fp16"), "-m", "qwen_fp16 and not sequence")  # sequences: tests/test_sequences*.py


def test_marker_selects_only_qwen_fp16_cases(fp16_run):
    proc, report_dir = fp16_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = json.loads((report_dir / "results.json").read_text())["cases"]
    assert {(c["family"], c["precision"]) for c in cases} == {("qwen", "fp16")}
    assert {c["component"] for c in cases} == {"qwen.block", "qwen.vae"}  # the family marker takes Qwen's VAE too
    blocks = [c for c in cases if c["component"] == "qwen.block"]
    profiles = ("nominal", "massive", "massive_2e7", "massive_growth", "peaky_logits", "edit_2refs")
    # one per backend and profile: 8 backends x 6 profiles, the unavailable ones skipped with their reason
    assert sorted({(c["backend"], c["profile"]) for c in blocks}) == sorted(
        (b, p) for b in ("sdpa", "math", "split", "sub_quad", "basic", "xformers", "sage", "flash") for p in profiles
    )
    ran = [c for c in blocks if c["outcome"] != "skipped"]
    assert {c["backend"] for c in ran} == {"sdpa", "math"}
    for c in ran:
        # the two profiles fp16 cannot survive are declared expected failures (the repro matrix's A3)
        assert c["outcome"] == ("xfailed" if c["profile"] in ("massive_2e7", "massive_growth") else "passed"), c["id"]
        assert c["stats"]["boundaries"] > 30 and sum(c["backend_calls"].values()) >= 1
        if c["outcome"] == "passed":
            assert c["metrics"]["rel_l2"] > 0
    decoders = [c for c in cases if c["component"] == "qwen.vae" and c["outcome"] != "skipped"]
    assert {(c["profile"], c["outcome"]) for c in decoders} == {("nominal", "passed"), ("ood", "passed"), ("nan_latent", "xfailed")}
    for c in cases:
        if c["outcome"] == "skipped":
            assert c["reason"]


def test_results_json_follows_its_contract(fp16_run):
    jsonschema = pytest.importorskip("jsonschema", reason="the contract test needs jsonschema (pip install -e '.[test]')")
    _, report_dir = fp16_run
    document = json.loads((report_dir / "results.json").read_text())
    jsonschema.validate(document, SCHEMA)
    run = document["run"]
    assert run["subject"]["name"] == "diffusers" and run["subject"]["version"]
    assert run["options"]["markexpr"] == "qwen_fp16 and not sequence"


def test_summary_and_junit_are_written(fp16_run):
    proc, report_dir = fp16_run
    summary = (report_dir / "summary.md").read_text()
    assert "| case | outcome | rel_l2 |" in summary and "diffusers-qwen.block-tiny-fp16-sdpa-massive" in summary
    # every row of the table has the header's cell count, counting only unescaped "|" (how GitHub splits cells)
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| case | outcome"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]
    cells = {len(re.split(r"(?<!\\)\|", line)) for line in table}
    assert len(table) > 2 and cells == {len(re.split(r"(?<!\\)\|", table[1]))}, cells
    suite = ET.parse(report_dir / "junit.xml").getroot()
    cases = json.loads((report_dir / "results.json").read_text())["cases"]
    assert len(cases) == 48 + 24  # Qwen block: 8 backends x 6 profiles; Qwen VAE: 8 backends x 3 profiles
    assert suite.get("tests") == str(len(cases)) and len(suite.findall("testcase")) == len(cases)
    assert "conformance" in proc.stdout and "first non-finite" in proc.stdout  # the table printed at the end


def _golden_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN_DIR, copy)
    return copy


def _nominal(copy: Path) -> Path:
    (path,) = copy.glob("diffusers/*/qwen.block/tiny/nominal.safetensors")
    return path


def test_missing_golden_fails_with_the_command_that_creates_it(tmp_path):
    copy = _golden_copy(tmp_path)
    _nominal(copy).unlink()
    proc, report_dir = run_suite(tmp_path, "-m", "qwen_fp32 and sdpa", "--conformance-profile", "nominal", "--golden-dir", str(copy))
    assert proc.returncode == 1
    case = json.loads((report_dir / "results.json").read_text())["cases"][0]
    assert case["outcome"] == "failed" and "create it with: pytest suites" in case["reason"] and "--conformance-update-goldens" in case["reason"]


def test_tampered_golden_fails_the_case(tmp_path):
    copy = _golden_copy(tmp_path)
    path = _nominal(copy)
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x10
    path.write_bytes(bytes(data))
    proc, report_dir = run_suite(tmp_path, "-m", "qwen_fp32 and sdpa", "--conformance-profile", "nominal", "--golden-dir", str(copy))
    assert proc.returncode == 1
    case = json.loads((report_dir / "results.json").read_text())["cases"][0]
    assert "changed outside --conformance-update-goldens" in case["reason"]


# FLUX and WAN blocks, fp32 / fp16 / fp8, on the nominal profile and the stress profiles where the first wave's verdicts
# moved with the CPU path (FLUX fp32 on fp16_overflow read rel-L2 5e-6 to 1.2e-5 against 5e-6 on another machine).
CROSS_PATH = ("-m", "(flux or wan) and (fp32 or fp16 or fp8) and sdpa", "-k", "not vae", "--conformance-profile", "nominal,fp16_overflow,peaky_logits,massive")


def test_verdicts_do_not_depend_on_the_cpu_path(tmp_path):
    """The same selection under ATen's default kernels and under AVX2 with MKL's conditional-numerical-reproducibility
    mode (another rounding of every float32 matmul in the embedders): the same outcome, case for case."""
    outcomes, machines = {}, {}
    for label, env in (("default", {}), ("avx2+cbwr", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"})):
        proc, report_dir = run_suite(tmp_path / label, *CROSS_PATH, env=env)
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
        document = json.loads((report_dir / "results.json").read_text())
        outcomes[label] = {c["id"]: c["outcome"] for c in document["cases"]}
        machines[label] = document["run"]["machine"]
    assert machines["avx2+cbwr"]["env"]["MKL_CBWR"] == "COMPATIBLE"
    ran = {i: o for i, o in outcomes["default"].items() if o != "skipped"}
    assert {i.split("-")[1].split(".")[0] for i in ran} == {"flux", "wan"} and any("fp8_e4m3" in i for i in ran)
    differ = {i: (o, outcomes["avx2+cbwr"].get(i)) for i, o in outcomes["default"].items() if outcomes["avx2+cbwr"].get(i) != o}
    assert not differ, differ


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of ``text`` as a CommonMark + GFM-tables parser (markdown-it-py) reads it: rows of cell texts,
    the header row first."""
    from markdown_it import MarkdownIt

    tables, row = [], None
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:  # inside a row, only th/td hold inline text
            row.append(token.content)
        elif token.type == "tr_close":
            tables[-1].append(row)
            row = None
    return tables


def test_summary_renders_as_one_table_with_failures_first():
    """summary.md through a CommonMark + GFM-tables parser (markdown-it-py, what GitHub-like renderers do): one table
    whose every row has the header's cells, "|" in a reason or a header kept inside its cell, failures and a changed
    expectation listed before the table, expected failures after it."""
    from markdown_it import MarkdownIt

    from conformance.case import Case
    from conformance.report import COLUMNS, summary_markdown
    from conformance.results import CaseResult

    def result(outcome: str, backend: str, reason: str | None = None, kinds=()) -> CaseResult:
        case = Case("diffusers", "qwen", "qwen.block", "tiny", "fp16", backend, "massive")
        return CaseResult(case, outcome, reason=reason, metrics={"rel_l2": 1e-3}, failure_kinds=list(kinds))

    results = [
        result("passed", "sdpa"),
        result("xfailed", "math", "rel_l2 0.1 > budget | declared"),
        result("failed", "split", "max |x| 7e4 | first at attn", [{"kind": "expectation", "message": "expected failure changed"}]),
        result("skipped", "sage", "sage: needs a CUDA device | not here"),
    ]
    text = summary_markdown({"subject": {"name": "diffusers", "version": "0.42.1"}, "device": "cpu"}, results)
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings.index("Failed (1)") < headings.index("Cases") < headings.index("Expected failures (1)"), headings
    tables = _markdown_tables(text)
    cases = tables[0]
    assert cases[0] == list(COLUMNS) and len(cases) == 1 + 3  # the header, then every case that ran
    assert all(len(r) == len(COLUMNS) for r in cases)
    assert "changed expectation" in text.split("## Cases")[0]
    skipped = tables[1]
    assert skipped[1] == ["1", "sage: needs a CUDA device | not here"]  # the escaped "|" stays inside the cell


# --- whole-model sequences: their results.json, summary table and gate verdicts -------------------------------------

SEQUENCE_SELECTION = ("-m", "sequence and bf16 and not patch and not lifecycle", "-k", "isolated or clear")


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("sequences"), *SEQUENCE_SELECTION)


def test_sequence_cases_follow_the_results_contract(sequence_run):
    jsonschema = pytest.importorskip("jsonschema", reason="the contract test needs jsonschema (pip install -e '.[test]')")
    proc, report_dir = sequence_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads((report_dir / "results.json").read_text())
    jsonschema.validate(document, SCHEMA)
    cases = {c["sequence"]: c for c in document["cases"]}
    assert set(cases) == {"isolated", "wan>flux>clear>qwen"}
    for case in cases.values():
        assert case["outcome"] == "passed" and case["reason"].startswith("bit for bit equal"), case["reason"]
        assert case["patch"] == "none" and case["metrics"]["differing"] == 0
        sequence = case["stats"]["sequence"]
        assert [p["label"] for p in sequence["target_memory"]] == ["before build", "after load", "after run", "after unload"]
        assert sequence["nondeterministic_ops"] == [] and sequence["boundaries"] > 0
    assert [r["family"] for r in cases["wan>flux>clear>qwen"]["stats"]["sequence"]["ran_before"]] == ["wan", "flux"]


def test_the_sequences_table_sits_beside_the_isolated_run(sequence_run):
    _, report_dir = sequence_run
    text = (report_dir / "summary.md").read_text()
    rows = _markdown_tables(text[text.index("## Sequences"):])[0]
    header, (cells,) = rows[0], rows[1:]
    assert header[:4] == ["subject", "precision", "backend", "patch"] and header[4] == "isolated (A1-A3)" and len(header) == 11
    assert cells[:4] == ["diffusers", "bf16", "sdpa", "none"]
    assert cells[header.index("isolated (A1-A3)")] == cells[header.index("wan>flux>clear>qwen (D1)")] == "equal"


def test_the_gate_compares_sequences_like_any_case(sequence_run, tmp_path):
    """The same run twice is unchanged; a sequence that newly leaks state regresses, with the leak's message."""
    from conformance.gate import EXIT_OK, EXIT_REGRESSED, compare_runs

    from .reportdirs import copy_report, load, save

    _, report_dir = sequence_run
    same = compare_runs(report_dir, report_dir)
    assert same.exit_code == EXIT_OK and same.counts == {"unchanged": 2}
    candidate = copy_report(report_dir, tmp_path / "candidate")
    document = load(candidate)
    (case,) = [c for c in document["cases"] if c["sequence"] == "wan>flux>clear>qwen"]
    leak = "qwen after wan>flux>clear>qwen differs from qwen in a fresh worker process: 12 values"
    case.update(outcome="failed", reason=leak, failures=[leak], metrics={**case["metrics"], "rel_l2": 1e-3, "differing": 12},
                failure_kinds=[{"kind": "state_leak", "message": leak, "at": "custom_node._CACHE", "metric": "rel_l2", "value": 1e-3}])  # fmt: skip
    save(candidate, document)
    result = compare_runs(report_dir, candidate)
    verdicts = {v.case_id: v for v in result.cases}
    assert result.exit_code == EXIT_REGRESSED and result.counts == {"regressed": 1, "unchanged": 1}
    assert any(leak in why for why in verdicts[case["id"]].why), verdicts[case["id"]].why
