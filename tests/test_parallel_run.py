"""Runs spread over pytest-xdist workers, and runs cut short: the reports say the same as one process would."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conformance.paths import REPO_ROOT
from conformance.session import worker_device
from conformance.progress import Progress
from conformance.results import CaseResult
from conformance.rundir import JSONL_FILE, load_results

from .test_suite_run import run_suite

needs_xdist = pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="pytest-xdist is not installed (pip install -e '.[test]')")

# Passed, xfailed (fp16 on massive_2e7/massive_growth) and skipped (xformers) cases, blocks only: seconds on a CPU.
SELECTION = ("-m", "qwen_fp16 and (sdpa or xformers) and not vae and not sequence")
# Everything a case's verdict rests on; timings and the worker's device string aside.
VERDICT_FIELDS = ("id", "outcome", "reason", "metrics", "metrics_by_output", "stats", "first_nonfinite", "failure_kinds", "failures", "budget", "golden", "inputs", "backend_calls")


@pytest.fixture(scope="module")
def serial_and_parallel(tmp_path_factory):
    serial = run_suite(tmp_path_factory.mktemp("serial"), *SELECTION, "-p", "no:xdist")
    parallel = run_suite(tmp_path_factory.mktemp("parallel"), *SELECTION, "-n", "2", "--dist", "loadgroup")
    return serial, parallel


@needs_xdist
def test_two_workers_write_the_reports_one_process_writes(serial_and_parallel):
    (serial, serial_dir), (parallel, parallel_dir) = serial_and_parallel
    assert serial.returncode == 0, serial.stdout + serial.stderr
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    one, two = load_results(serial_dir), load_results(parallel_dir)
    assert len(one["cases"]) == 12 and {c["outcome"] for c in one["cases"]} == {"passed", "xfailed", "skipped"}
    assert [c["id"] for c in two["cases"]] == [c["id"] for c in one["cases"]]  # same order too
    for a, b in zip(one["cases"], two["cases"], strict=True):
        assert {k: a[k] for k in VERDICT_FIELDS} == {k: b[k] for k in VERDICT_FIELDS}, a["id"]
    for key in ("subject", "subject_settings", "packages", "golden_identity", "device"):
        assert two["run"][key] == one["run"][key], key
    assert two["run"]["options"]["workers"] == 2
    for name in ("summary.md", "junit.xml", "report.html", JSONL_FILE):
        assert (parallel_dir / name).is_file(), name
    assert "[conformance] qwen: all 12 cases done" in parallel.stdout


@needs_xdist
def test_results_travel_as_json_lines_and_round_trip(serial_and_parallel):
    (_, serial_dir), _ = serial_and_parallel
    document = load_results(serial_dir)
    assert "interrupted" not in document["run"]  # results.json of the same run wins over its lines
    lines = [json.loads(line) for line in (serial_dir / JSONL_FILE).read_text().splitlines()]
    assert lines[0]["run"]["run_id"] == document["run"]["run_id"]
    cases = [line for line in lines[1:] if "run_update" not in line]
    assert sorted(c["id"] for c in cases) == sorted(c["id"] for c in document["cases"])
    for case in document["cases"]:
        assert CaseResult.from_dict(case).as_dict() == case


def test_a_killed_run_leaves_lines_that_render(tmp_path):
    report_dir = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    command = [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", "-m", "qwen and fp32 and sdpa and not vae"]
    command += ["--report-dir", str(report_dir), "--golden-store", str(tmp_path / "local")]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lines = report_dir / JSONL_FILE
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if lines.is_file() and sum(1 for line in lines.read_text().splitlines() if '"outcome"' in line) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (report_dir / "results.json").exists()
    document = load_results(report_dir)
    assert document["run"]["interrupted"] and 3 <= document["run"]["cases_finished"] < 6
    assert document["run"]["subject"]["name"] == "diffusers"
    rendered = subprocess.run([sys.executable, "-m", "conformance", "html", str(report_dir)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    page = (report_dir / "report.html").read_text()
    assert "interrupted" in page and document["cases"][0]["id"] in page


def test_a_line_cut_off_by_the_kill_is_dropped(tmp_path):
    header = {"schema_version": 1, "run": {"run_id": "x", "started": "2026-01-01T00:00:00+00:00"}}
    case = {"id": "diffusers-qwen.block-tiny-fp32-sdpa-nominal", "outcome": "passed"}
    (tmp_path / JSONL_FILE).write_text(json.dumps(header) + "\n" + json.dumps(case) + "\n" + json.dumps(case)[:20])
    document = load_results(tmp_path)
    assert document["cases"] == [case] and document["run"]["cases_finished"] == 1


def test_progress_counts_per_family_with_an_estimate():
    lines, now = [], [0.0]
    progress = Progress(lines.append, interval=30, clock=lambda: now[0])
    ids = [f"diffusers-qwen.block-tiny-fp32-sdpa-p{i}" for i in range(3)] + ["diffusers-flux.double-tiny-fp32-sdpa-nominal"]
    progress.expect(ids)
    now[0] = 10
    progress.finished(ids[0], "passed")
    assert lines == []  # neither a family finished nor 30 s passed
    now[0] = 40
    progress.finished(ids[1], "skipped")
    assert lines[-1] == "2/4 cases, 40s elapsed, ETA ~40s (qwen 2/3)"
    progress.finished(ids[1], "skipped")  # a second report of one case counts once
    now[0] = 45
    progress.finished(ids[2], "passed")
    assert lines[-1] == "qwen: all 3 cases done (2 ran, 1 skipped); 3/4 cases, 45s elapsed, ETA ~15s"


@pytest.mark.parametrize(
    ("option", "worker", "count", "expected"),
    [
        ("auto", "gw0", 4, "cuda:0"),
        ("cuda", "gw5", 4, "cuda:1"),  # more workers than GPUs: round robin
        ("auto", "gw1", 1, "auto"),  # one GPU: every worker shares it
        ("cuda:2", "gw0", 4, "cuda:2"),  # a device named by the user wins
        ("cpu", "gw3", 4, "cpu"),
        ("auto", None, 4, "auto"),  # not a worker
    ],
)
def test_each_worker_takes_its_own_gpu(option, worker, count, expected):
    assert worker_device(option, worker, count) == expected
