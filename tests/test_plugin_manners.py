"""The installed plugin in a pytest run that did not ask for the suite: no torch, no COMFYUI_PATH, no change; in one
that did, every bad option value is one usage error before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.paths import REPO_ROOT
from tests.test_suite_run import run_suite

PROBE = """
import sys
def test_nothing_heavy_was_imported():
    assert "torch" not in sys.modules and "conformance.session" not in sys.modules
"""


def _unrelated(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "test_unrelated.py").write_text(PROBE)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.distribution('diffusion-conformance')"], capture_output=True).returncode != 0,
    reason="the package is not installed (its pytest11 entry point is what an unrelated project meets)",
)
def test_an_unrelated_project_meets_neither_torch_nor_comfyui_path(tmp_path):
    # a ComfyUI-like checkout with a conftest that would fail if the suite loaded it
    comfy = tmp_path / "ComfyUI"
    (comfy / "tests").mkdir(parents=True)
    (comfy / "tests" / "conftest.py").write_text("raise RuntimeError('loaded by the suite')\n")
    project = tmp_path / "project"
    project.mkdir()
    proc = _unrelated(project, env={"COMFYUI_PATH": str(comfy)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    listed = subprocess.run([sys.executable, "-m", "pytest", "--markers", "-p", "no:cacheprovider"], cwd=project, capture_output=True, text=True, timeout=300)
    assert "qwen_fp16" not in listed.stdout  # the suite's markers exist only where the suite runs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--scale", "huge"), "--scale: unknown ['huge']"),
        (("--conformance-profile", "nominl"), "no family defines ['nominl']"),
        (("--guard", "nope"), "--guard: unknown ['nope']"),
        (("--expectations", "/nonexistent/expectations.json"), "/nonexistent/expectations.json does not exist"),
        (("--subject", "comfyui"), "--subject comfyui needs a checkout"),
    ],
)
def test_a_bad_option_value_is_one_usage_error(tmp_path, args, message):
    env = {"COMFYUI_PATH": ""} if "--subject" in args else None
    proc, report_dir = run_suite(tmp_path, *args, env=env)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr + proc.stdout and "Traceback" not in proc.stderr + proc.stdout
    assert not (report_dir / "results.jsonl").exists()


def test_the_short_names_other_plugins_own_are_not_taken():
    from conformance.options import OPTIONS, names

    taken = {alias for alias, _ in OPTIONS.values() if alias}
    assert not {"--device", "--profile", "--update-goldens"} & taken
    assert names("device") == ["--conformance-device"] and names("scale") == ["--conformance-scale", "--scale"]
    assert REPO_ROOT.joinpath("suites").is_dir()


def test_a_wheel_install_stops_with_how_to_install(tmp_path):
    """``pip install .`` (not editable) gives the package without fixtures/, golden/ and suites/: the documented
    command stops with one message saying how to install, instead of collecting nothing."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.skip(f"could not build the wheel here: {built.stderr[-300:]}")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        assert not [n for n in archive.namelist() if n.startswith(("fixtures/", "golden/", "suites/"))]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "qwen_fp16", "--scale", "tiny"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "installed without its data" in proc.stderr and "pip install -e" in proc.stderr
