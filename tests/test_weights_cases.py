"""Block cases on a checkpoint file (``--weights``) and on captured activations (``--conformance-profile
captured:PATH``), through the suite's command line as a user runs it.

The diffusers runs need no ComfyUI; the capture runs need one (``COMFYUI_PATH``): they sample a fixture file through
the checkout's own ``comfy.sd`` and ``comfy.sample`` and replay what the capture recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from safetensors import safe_open

from tests.helpers import checkpoint_maker
from tests.test_suite_run import run_suite

ROOT = Path(__file__).resolve().parent.parent
MAKER = checkpoint_maker()
COMFYUI = os.environ.get("COMFYUI_PATH")
needs_comfyui = pytest.mark.skipif(not COMFYUI, reason="needs a ComfyUI checkout: set COMFYUI_PATH")


def suite(tmp_path: Path, *args: str, comfyui: str | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """``pytest suites`` in a subprocess (``test_suite_run.run_suite``), on diffusers or the given checkout."""
    return run_suite(tmp_path, *([f"--comfyui={comfyui}"] if comfyui else ["--subject", "diffusers"]), *args)


SCHEMA = json.loads((ROOT / "conformance" / "schema" / "results.schema.json").read_text())


def cases(report: Path) -> list[dict]:
    """The run's cases, once results.json is checked against its schema."""
    results = json.loads((report / "results.json").read_text())
    jsonschema.validate(results, SCHEMA)
    return results["cases"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    MAKER.write_all(folder, names=("qwen_image_bf16.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors", "wan2.1_t2v_14B_fp8_scaled.safetensors", "flux_dev_fp8_scaled.safetensors"))
    return folder


@pytest.fixture(scope="module")
def qwen_run(files, tmp_path_factory):
    return suite(tmp_path_factory.mktemp("qwen"), "--weights", str(files / "qwen_image_bf16.safetensors"), "--block", "0,-1", "-m", "qwen and sdpa and (fp32 or bf16 or fp16)")


def test_a_files_blocks_are_the_scales_and_pass(qwen_run, files):
    proc, report = qwen_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = cases(report)
    ran = [c for c in results if c["outcome"] != "skipped"]
    assert {c["scale"].split("@")[0] for c in ran} == {"b0", "b2"}  # first and last of the file's 3 blocks
    assert all(c["outcome"] in ("passed", "xfailed") for c in ran)
    assert any(c["outcome"] == "passed" and c["precision"] == "fp16" for c in ran)
    weights = ran[0]["stats"]["weights"]
    assert weights["file"].endswith("qwen_image_bf16.safetensors") and weights["format"] == "bf16" and weights["blocks_in_file"] == 3
    assert weights["dequantized"] == ["stored bf16: weights upcast to float32"] and weights["as_stored"] is False
    assert ran[0]["notes"][0].startswith(f"block {weights['block']} of ")
    run = json.loads((report / "results.json").read_text())["run"]
    assert run["weights"]["family"] == "qwen" and set(run["weights"]["scales"]) == {c["scale"] for c in ran}


def test_weight_stress_profiles_skip_on_a_file(qwen_run):
    _, report = qwen_run
    stressed = [c for c in cases(report) if c["profile"] == "massive_growth"]
    assert stressed and all(c["outcome"] == "skipped" and "file's weights as they are" in c["reason"] for c in stressed)


def test_goldens_of_a_file_are_local_and_keyed_by_it(qwen_run):
    proc, report = qwen_run
    local = report.parent / "local"
    made = sorted(p.relative_to(local).parts[2:4] for p in local.rglob("*.safetensors") if p.relative_to(local).parts[0] != "inputs")
    assert made and all(component == "qwen.block" and "@" in scale for component, scale in made)


def test_two_files_with_one_header_do_not_share_goldens(files, tmp_path):
    """Same header, other values (two fine-tunes saved by one tool): one scale name, two goldens, both runs pass."""
    original = files / "qwen_image_bf16.safetensors"
    data = bytearray(original.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header : header + 64] = bytes(64)  # the first tensor's first values, zeroed
    other = tmp_path / "other" / original.name
    other.parent.mkdir()
    other.write_bytes(bytes(data))
    made = []
    for path in (original, other):  # one local store (run_suite's tmp_path/local) for both runs
        proc, report = suite(tmp_path, "--weights", str(path), "--block", "0", "--conformance-profile", "nominal", "-m", "fp32 and sdpa")
        assert proc.returncode == 0, proc.stdout[-2000:]
        made.append({c["scale"] for c in cases(report) if c["outcome"] == "passed"})
    assert made[0] == made[1]  # the same scale name: the same header
    goldens = sorted(p.parent.name for p in (tmp_path / "local").rglob("nominal.safetensors"))
    assert len(goldens) == 2 and goldens[0].split("+w")[0] == goldens[1].split("+w")[0] and goldens[0] != goldens[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "{files}/missing.safetensors"], "missing.safetensors"),
        (["--weights", "{files}/qwen_image_bf16.safetensors", "--block", "7"], "no block 7 (qwen.block: 0-2)"),
        (["--weights", "{files}/qwen_image_bf16.safetensors", "--block", "0,-9"], "no block -9 (qwen.block: 0-2)"),
        (["--weights", "{files}/qwen_image_bf16.safetensors", "--scale", "tiny"], "leave --scale out"),
        (["--weights", "{files}/qwen_image_bf16.safetensors", "--block", "x"], "'x' is not a block index"),
        (["--block", "0"], "--block needs --weights PATH"),
        (["--weights", "{files}/qwen_image_bf16.safetensors", "--scale", "real"], "leave --scale out"),
        (["--conformance-profile", "captured:{files}/qwen_image_bf16.safetensors"], "not a capture"),
    ],
)
def test_bad_weights_options_are_one_usage_error(files, tmp_path, args, message):
    proc, _ = suite(tmp_path, *[a.format(files=files) for a in args])
    assert proc.returncode == 4, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


@needs_comfyui
@pytest.mark.parametrize(("name", "precision", "stored"), [
    ("wan2.1_t2v_14B_fp8_scaled.safetensors", "fp8_scaled", "scaled fp8 (legacy scaled_fp8 + per-tensor scale_weight)"),
    ("flux_dev_fp8_scaled.safetensors", "fp8_scaled", "scaled fp8 (legacy scaled_fp8 + per-tensor scale_weight"),
])  # fmt: skip
def test_a_files_own_fp8_runs_as_stored_through_comfyuis_ops(files, tmp_path, name, precision, stored):
    proc, report = suite(tmp_path, "--weights", str(files / name), "--block", "0", "-m", f"{precision} and sdpa", "--conformance-profile", "nominal", comfyui=COMFYUI)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = [c for c in cases(report) if c["outcome"] != "skipped"]
    assert ran and all(c["outcome"] == "passed" for c in ran)
    for case in ran:
        assert any(n.startswith(f"weights as stored in the file ({stored}") and "scaled_fp8_ops" in n for n in case["notes"]), case["notes"]
        assert case["stats"]["weights"]["as_stored"] is True
    detection = json.loads((report / "results.json").read_text())["run"]["weights"]["subject_detection"]
    assert detection["supported_model"] in ("WAN21_T2V", "Flux") and detection["scaled_fp8"] == "torch.float8_e4m3fn"  # ComfyUI's own reading


@pytest.fixture(scope="module")
def capture(files, tmp_path_factory):
    """A capture of WAN blocks 0 and 2 at model evaluations 0 and 2 of a 3-step euler run of ComfyUI."""
    out = tmp_path_factory.mktemp("capture") / "wan.safetensors"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "capture_run.py"), "--comfyui", COMFYUI, "--weights", str(files / "wan2.1_t2v_1.3B_fp16.safetensors"),
         "--out", str(out), "--blocks", "0,2", "--evaluations", "0,2", "--grid", "4x4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


@needs_comfyui
def test_a_capture_records_the_blocks_inputs_with_their_metadata(capture):
    path, run = capture
    assert run["finite"]
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["conformance_capture"])
        keys = set(handle.keys())
    assert meta["comfyui"] == run["comfyui"] and meta["model_file"].endswith("wan2.1_t2v_1.3B_fp16.safetensors") and meta["model_dtype"]
    records = {r["name"]: r for r in meta["records"]}
    assert set(records) == {"e0b0", "e0b2", "e2b0", "e2b2"}
    first, later = records["e0b0"], records["e2b0"]
    assert first["sigma"][0] > later["sigma"][0] > 0  # the sampler's schedule, as the model saw it
    assert first["resolution"] == [64, 64] and first["text_tokens"] == 8
    assert {"x", "e", "freqs", "context"} <= set(first["tensors"])
    assert set(first["dropped"]) <= {"transformer_options"}  # the run's patches (0.3.64), not block inputs
    assert {f"e0b0.{k}" for k in first["tensors"]} <= keys


@needs_comfyui
def test_a_capture_replays_in_fp32_bf16_fp16(capture, tmp_path):
    path, _ = capture
    proc, report = suite(tmp_path, "--conformance-profile", f"captured:{path}", "-m", "wan and not sequence and (fp32 or bf16 or fp16) and sdpa", comfyui=COMFYUI)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = [c for c in cases(report) if c["outcome"] != "skipped" and c["component"] == "wan.t2v"]
    assert {c["profile"].split("@")[0] for c in ran} == {"cape0b0", "cape0b2", "cape2b0", "cape2b2"}
    assert {c["precision"] for c in ran} == {"fp32", "bf16", "fp16"} and all(c["outcome"] == "passed" for c in ran)
    # a capture of the 256-wide WAN T2V: no wan.t2v case skips but for its backend; the other WAN blocks never take it
    assert all(c["reason"].startswith(("math:", "xformers:", "sage:", "flash:")) for c in cases(report) if c["outcome"] == "skipped" and c["component"] == "wan.t2v")
    assert not [c for c in cases(report) if c["component"] in ("wan.i2v", "wan.ti2v") and c["profile"].startswith("cap")]


@needs_comfyui
def test_a_capture_replays_on_the_files_own_block(capture, files, tmp_path):
    path, _ = capture
    proc, report = suite(
        tmp_path, "--weights", str(files / "wan2.1_t2v_1.3B_fp16.safetensors"), "--block", "0", "--conformance-profile", f"captured:{path}",
        "-m", "fp32 and sdpa", comfyui=COMFYUI,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = cases(report)
    ran = [c for c in results if c["outcome"] != "skipped"]
    assert {c["profile"].split("@")[0] for c in ran} == {"cape0b0", "cape2b0"} and all(c["outcome"] == "passed" for c in ran)
    other = [c for c in results if c["profile"].startswith(("cape0b2", "cape2b2"))]
    assert other and all("captured at block 2, not block 0" in c["reason"] for c in other)


# -- every layout, in process: its first block through each subject -------------------------------------------------
SUBJECTS = ["diffusers"] + (["comfyui"] if COMFYUI else [])
_SUBJECTS: dict = {}


def _subject(name: str):
    if name not in _SUBJECTS:
        from conformance.subjects import load_subject

        _SUBJECTS[name] = load_subject(name, comfyui_path=COMFYUI) if name == "comfyui" else load_subject(name)
    return _SUBJECTS[name]


@pytest.fixture(scope="module")
def every_layout(tmp_path_factory):
    return MAKER.write_all(tmp_path_factory.mktemp("layouts"))


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", sorted(MAKER.LAYOUTS))
def test_every_layout_runs_its_first_block(every_layout, tmp_path, request, subject, name):
    """fp32 and fp16 cases (and, on ComfyUI, the file's own fp8 format as stored) pass on block 0 of every layout."""
    from conformance.case import Case
    from conformance.checkpoints.cases import register_file
    from conformance.scales import clear
    from tests.helpers import engine

    if name not in every_layout:
        pytest.skip("a GGUF layout: the gguf package is not installed (pip install gguf)")
    checkpoint, scales = register_file(str(every_layout[name]), "0")
    request.addfinalizer(clear)
    chosen = _subject(subject)
    detection = chosen.detect_checkpoint(checkpoint)  # ComfyUI's own model_detection agrees (None on diffusers)
    assert (detection is None) == (subject == "diffusers")
    runner = engine(tmp_path, subject=chosen)
    own = {"scaled_fp8": "fp8_scaled", "fp8_blockwise": "fp8_block"}.get(checkpoint.format.name)
    precisions = ["fp32", "fp16"] + ([own] if own and subject == "comfyui" else [])
    for component in checkpoint.block_counts:
        for precision in precisions:
            result = runner.run(Case(chosen.name, checkpoint.family, component, scales[0], precision, chosen.reference_backend, "nominal"))
            assert result.outcome == "passed", f"{component} {precision}: {result.reason}"
            assert result.stats["weights"]["block"] == 0 and result.stats["weights"]["format"] == checkpoint.format.label
            assert result.stats["weights"]["as_stored"] is (precision == own), result.notes
