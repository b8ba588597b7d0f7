"""Report directories for the tests of the readers of a run (HTML report, gate, ratchet writer).

One real run of the suite per test session (``-m "qwen_fp32 or qwen_fp16" -k qwen.block --conformance-profile nominal,massive --save-outputs``, about 6 s on a CPU),
shared by every test file that asks for it, and helpers that copy it and edit the copy: the readers are tested on
what the suite really writes, and the outcomes a healthy run does not produce (failed, non-finite, error...) are
edits of real cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conformance.paths import REPO_ROOT

MARKEXPR = "qwen_fp32 or qwen_fp16"
KEYWORD = "qwen.block"  # the Qwen transformer block only: 32 cases, 8 of them run on a CPU
PROFILES = "nominal,massive"
_RUN: Path | None = None


def real_report(tmp_path_factory) -> Path:
    """The session's real report directory (results.json + outputs/); run once, then reused. Do not edit it."""
    global _RUN
    if _RUN is None or not (_RUN / "results.json").is_file():
        base = tmp_path_factory.mktemp("real-run")
        report_dir = base / "report"
        env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # the diffusers subject
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "suites", "-q", "-p", "no:randomly", "-m", MARKEXPR, "-k", KEYWORD, "--conformance-profile", PROFILES, "--save-outputs",
             "--report-dir", str(report_dir), "--golden-store", str(base / "local")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        _RUN = report_dir
    return _RUN


def copy_report(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def load(report_dir: Path) -> dict:
    return json.loads((report_dir / "results.json").read_text())


def save(report_dir: Path, document: dict) -> None:
    (report_dir / "results.json").write_text(json.dumps(document, indent=1))


def edit_case(report_dir: Path, case_id: str, **changes) -> dict:
    """Replace fields of one case in a copied report directory; returns the edited case."""
    document = load(report_dir)
    (case,) = [c for c in document["cases"] if c["id"] == case_id]
    case.update(changes)
    save(report_dir, document)
    return case


def executed(document: dict) -> list[dict]:
    return [c for c in document["cases"] if c["outcome"] != "skipped"]
