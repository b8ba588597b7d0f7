"""Goldens carry their inputs, are checked by hash, never replaced behind anyone's back, written atomically under a
lock, and missing ones say how to create them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conformance import goldens as goldens_module
from conformance.goldens import (
    GoldenConflict,
    GoldenKey,
    GoldenMissing,
    GoldenStale,
    GoldenStore,
    GoldenTampered,
    inputs_sha256,
    outputs_agree,
    tensor_digest,
)
from conformance.paths import GOLDEN_DIR
from conformance.runner import Engine, EngineOptions
from conformance.subjects import load_subject

from .helpers import engine

KEY = GoldenKey("diffusers", "0.42.1+sabc", "qwen.block", "tiny", "nominal")
INPUTS = {
    "x": torch.linspace(-1, 1, 100),
    "rope": (torch.polar(torch.ones(4, 2), torch.arange(8.0).reshape(4, 2)), None),
    "mask": None,
    "steps": 3,
}
META = {
    "subject": {"name": "diffusers", "version": "x", "identity": KEY.identity, "source_hash": "abc"},
    "torch": "t",
    "seed": 0,
    "backend": "math",
    "machine": {"cpu_capability": "test"},
    "weights_sha256": "w" * 64,
}


def _write(store: GoldenStore, value: float = 1.0, inputs=INPUTS, replace=False, key=KEY):
    outputs = {"img": torch.full((2, 3), value, dtype=torch.float64)}
    return store.write(key, outputs, inputs, {"tokens": 4}, {"x": [3]}, META, replace=replace)


def test_a_golden_holds_its_inputs_bit_for_bit(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    assert _write(store).action == "created"
    golden = store.load(KEY, "w" * 64, "CMD")
    assert golden.outputs["img"].dtype == torch.float32 and golden.outputs["img"].sum() == 6
    kwargs = golden.inputs.kwargs
    assert torch.equal(kwargs["x"], INPUTS["x"]) and kwargs["x"].dtype == torch.float32
    assert kwargs["rope"][0].is_complex() and torch.equal(kwargs["rope"][0], INPUTS["rope"][0])
    assert kwargs["rope"][1] is None and kwargs["mask"] is None and kwargs["steps"] == 3
    assert golden.inputs.sizes == {"tokens": 4} and golden.inputs.outlier_channels == {"x": [3]}
    assert golden.inputs.sha256 == inputs_sha256(INPUTS)
    entry = json.loads((tmp_path / "manifest.json").read_text())["goldens"][KEY.id]
    assert entry["sha256"] == golden.sha256 and entry["inputs"]["sha256"] == golden.inputs.sha256


def test_input_tensors_are_stored_once_by_content(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    _write(store, key=GoldenKey("diffusers", "0.42.1+sabc", "qwen.block", "tiny", "massive"))
    assert len(list((tmp_path / "inputs").glob("*/*.safetensors"))) == 2  # x and the rope table, shared
    assert store.verify() == []


def test_missing_golden_names_the_command(tmp_path):
    with pytest.raises(GoldenMissing, match="create it with: pytest suites --conformance-update-goldens"):
        GoldenStore(tmp_path, "committed").load(KEY, "w" * 64, "pytest suites --conformance-update-goldens")


def test_tampered_output_file_and_input_tensor_are_detected(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    path = tmp_path / KEY.relpath
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last float
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenTampered, match="changed outside --conformance-update-goldens"):
        store.load(KEY, "w" * 64, "CMD")
    assert any("does not match its manifest sha256" in p for p in store.verify())

    other = GoldenStore(tmp_path / "b", "committed")
    _write(other)
    blob = next((tmp_path / "b" / "inputs").glob("*/*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(GoldenTampered, match="does not hash to its name"):
        other.load(KEY, "w" * 64, "CMD")
    blob.unlink()
    with pytest.raises(GoldenTampered, match="missing from the store"):
        other.load(KEY, "w" * 64, "CMD")
    assert any("is missing" in p for p in other.verify())


def test_other_weights_make_a_golden_stale(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    with pytest.raises(GoldenStale, match="weights"):
        store.load(KEY, "v" * 64, "CMD")


def test_an_existing_golden_is_replaced_only_when_asked(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    first = _write(store, 1.0)
    with pytest.raises(GoldenConflict, match="only with --conformance-update-goldens"):
        _write(store, 1.5)
    assert store.load(KEY, "w" * 64, "CMD").sha256 == first.new_sha256
    changed = _write(store, 1.5, replace=True)
    assert changed.action == "updated"
    assert changed.old_sha256 == first.new_sha256 != changed.new_sha256
    assert changed.max_diff == {"img": 0.5}
    assert first.new_sha256[:12] in changed.describe() and changed.new_sha256[:12] in changed.describe()


def test_replacing_a_goldens_inputs_prunes_the_old_tensors(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    _write(store, inputs={**INPUTS, "x": INPUTS["x"] * 2}, replace=True)
    assert store.verify() == []  # no orphan input tensor left


def test_failed_write_leaves_the_old_golden_intact(tmp_path, monkeypatch):
    store = GoldenStore(tmp_path, "committed")
    _write(store, 1.0)
    before = (tmp_path / KEY.relpath).read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(goldens_module, "save_file", broken_save)
    with pytest.raises(OSError):
        _write(store, 2.0, replace=True)
    assert (tmp_path / KEY.relpath).read_bytes() == before
    assert [p.name for p in (tmp_path / KEY.relpath).parent.iterdir()] == ["nominal.safetensors"]  # no temp file left
    store.load(KEY, "w" * 64, "CMD")  # still valid


def test_every_committed_golden_verifies():
    """Every committed golden: manifest fields, file hash, loadable, outputs as recorded, input tensors present and
    intact, no orphan file."""
    store = GoldenStore(GOLDEN_DIR, "committed")
    assert len(store.manifest()["goldens"]) > 100
    assert store.verify() == []


def test_outputs_agree_within_one_float32_ulp_and_no_further():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10
    up = torch.nextafter(x, torch.tensor(float("inf")))
    assert outputs_agree({"o": x}, {"o": up})[0]
    three = torch.nextafter(torch.nextafter(up, torch.tensor(float("inf"))), torch.tensor(float("inf")))
    agree, ulps = outputs_agree({"o": x}, {"o": three})
    assert not agree and ulps["o"] >= 2
    nan = x.clone()
    nan[3] = float("nan")
    assert not outputs_agree({"o": x}, {"o": nan})[0]
    assert not outputs_agree({"o": x}, {"p": x})[0]


def test_a_golden_recomputed_here_agrees_with_the_committed_one(tmp_path):
    """Cross-machine equality is a tolerance (one float32 ulp, outputs_agree); same machine, same stored inputs: the
    same bits."""
    eng = engine(tmp_path)
    committed = eng.golden("qwen.block", "tiny", "massive")
    inputs = eng._stored_inputs(committed)
    first = eng._golden_outputs(committed.key, inputs)
    again = eng._golden_outputs(committed.key, inputs)
    assert all(torch.equal(first[name], again[name]) for name in first)
    agree, ulps = outputs_agree(committed.outputs, first)
    assert agree, ulps


def test_real_scale_goldens_are_created_on_demand_in_the_local_store(tmp_path, monkeypatch):
    eng = engine(tmp_path)
    monkeypatch.setattr(eng, "store_for", lambda key: eng.options.local_store)  # the on-demand path at tiny cost
    golden = eng.golden("qwen.block", "tiny", "nominal")
    assert golden.path.is_relative_to(tmp_path / "local")
    assert [c.action for c in eng.golden_changes] == ["created"]
    again = engine(tmp_path)
    monkeypatch.setattr(again, "store_for", lambda key: again.options.local_store)
    assert again.golden("qwen.block", "tiny", "nominal").sha256 == golden.sha256 and again.golden_changes == []


def test_a_golden_that_appears_while_waiting_is_confirmed_not_replaced(tmp_path, monkeypatch):
    eng = engine(tmp_path, committed=tmp_path / "empty")
    store = eng.options.local_store
    made = engine(tmp_path, committed=tmp_path / "empty").golden("qwen.block", "tiny", "nominal")  # "another process"
    real_load, calls = store.load, []

    def first_misses(*args, **kwargs):  # this process looked before the other one wrote
        calls.append(1)
        if len(calls) == 1:
            raise GoldenMissing("not yet")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(store, "load", first_misses)
    golden = eng.golden("qwen.block", "tiny", "nominal")
    assert golden.sha256 == made.sha256
    assert [c.action for c in eng.golden_changes] == ["confirmed"]


def test_a_golden_that_disagrees_with_this_process_is_a_conflict(tmp_path, monkeypatch):
    eng = engine(tmp_path, committed=tmp_path / "empty")
    store = eng.options.local_store
    made = engine(tmp_path, committed=tmp_path / "empty").golden("qwen.block", "tiny", "nominal")
    before = made.path.read_bytes()
    monkeypatch.setattr(eng, "_golden_outputs", lambda key, inputs, why="":  {n: t + 1e-3 for n, t in made.outputs.items()})
    real_load, calls = store.load, []

    def first_misses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise GoldenMissing("not yet")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(store, "load", first_misses)
    with pytest.raises(GoldenConflict, match="Nothing was replaced"):
        eng.golden("qwen.block", "tiny", "nominal")
    assert made.path.read_bytes() == before


def test_concurrent_creators_compute_a_golden_once(tmp_path):
    """Two processes asking for the same missing golden at once: one creates it, the other confirms it. This
    process holds the golden's lock until both have found it missing and are waiting for it, so the race is real
    whatever the start-up skew of the two."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.helpers import engine
        from pathlib import Path
        eng = engine(Path({str(tmp_path)!r}), committed=Path({str(tmp_path / "empty")!r}), progress=lambda m: print("PROGRESS", m, flush=True))
        eng.golden("qwen.block", "tiny", "nominal")
        print("ACTIONS", [c.action for c in eng.golden_changes])
        """
    )
    parent = engine(tmp_path, committed=tmp_path / "empty")
    key = parent.golden_key("qwen.block", "tiny", "nominal")
    with parent.options.local_store.creating(key):
        procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        seen = [[] for _ in procs]
        for proc, lines in zip(procs, seen):
            for line in proc.stdout:
                lines.append(line)
                if "waiting for golden" in line:
                    break
            assert "waiting for golden" in "".join(lines), (lines, proc.stderr.read()[-2000:])
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    actions = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("ACTIONS"))
    assert actions == ["ACTIONS ['confirmed']", "ACTIONS ['created']"]
    assert GoldenStore(tmp_path / "local", "local").verify() == []


def test_digest_depends_on_names_dtypes_and_values():
    a = {"x": torch.zeros(3), "y": (torch.ones(2), None)}
    assert tensor_digest(a) == tensor_digest({"x": torch.zeros(3), "y": (torch.ones(2), None)})
    assert tensor_digest(a) != tensor_digest({"x": torch.zeros(3, dtype=torch.float64), "y": (torch.ones(2), None)})
    assert tensor_digest(a) != tensor_digest({"z": torch.zeros(3), "y": (torch.ones(2), None)})
    assert tensor_digest({"c": torch.ones(2, dtype=torch.complex64)}) != tensor_digest({"c": torch.ones(2, 2)})


def test_written_files_follow_the_umask(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / KEY.relpath).stat().st_mode & 0o777 == 0o666 & ~mask


def test_identities_without_committed_goldens_go_to_the_local_store(tmp_path):
    """A checkout the repository holds no goldens for (a user's own) gets them on demand, locally, announced."""
    eng = engine(tmp_path, committed=tmp_path / "empty")
    golden = eng.golden("qwen.block", "tiny", "nominal")
    assert golden.path.is_relative_to(tmp_path / "local")
    assert [c.action for c in eng.golden_changes] == ["created"]


def test_a_copy_without_git_finds_the_goldens_of_its_sources(tmp_path):
    """Identity by content: a store entry made from the same version and source hash under another identity (the git
    checkout of a release) is the identity a plain copy uses; the report says so."""
    eng = engine(tmp_path, committed=tmp_path / "committed")
    info = eng.subject.info()
    store = eng.options.committed_store
    key = GoldenKey("diffusers", f"{info.version}+g0123456789", "qwen.block", "tiny", "nominal")
    meta = {**META, "subject": {"name": "diffusers", "version": info.version, "identity": key.identity, "source_hash": info.source_hash}}
    store.write(key, {"img": torch.zeros(1)}, INPUTS, {}, {}, meta)
    resolved = eng.identity()
    assert resolved["identity"] == key.identity and resolved["natural"] == info.identity
    assert "source hash matches" in resolved["from"]
    other = engine(tmp_path / "o", committed=tmp_path / "o" / "committed")
    assert other.identity()["identity"] == info.identity


def test_missing_golden_of_a_committed_identity_fails(tmp_path):
    committed = tmp_path / "golden"
    store = GoldenStore(committed, "committed")
    eng = engine(tmp_path, committed=committed)
    identity = eng.subject.info().identity
    store.write(GoldenKey("diffusers", identity, "qwen.block", "tiny", "massive"), {"img": torch.zeros(1)}, INPUTS, {}, {}, META)
    with pytest.raises(GoldenMissing, match="create it with"):
        eng.golden("qwen.block", "tiny", "nominal")


def test_an_old_format_store_gets_one_clear_message(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "goldens": {}}))
    with pytest.raises(goldens_module.GoldenError, match="format 1.*move the old store away"):
        GoldenStore(tmp_path, "local").load(KEY, "w" * 64, "CMD")


def test_atomic_writes_leave_files_readable_like_an_ordinary_open(tmp_path):
    """mkstemp makes 0600 files; a report or golden must get the mode open(path, "w") would give it."""
    from conformance.atomic import publish

    mask = os.umask(0o022)
    try:
        tmp = tmp_path / ".x.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        publish(tmp, tmp_path / "x")
        assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644 and not tmp.exists()
    finally:
        os.umask(mask)


CHECKOUT = os.environ.get("COMFYUI_PATH")
GOLDEN_CASES = [
    ("qwen.block", "massive"), ("flux.double", "nominal"), ("flux.single", "fp16_overflow"), ("wan.t2v", "nominal"),
    ("wan.i2v", "massive"), ("qwen.vae", "nominal"), ("flux.vae", "ood"),
]  # fmt: skip


def _subject_engine(tmp_path, subject_name: str, device: torch.device) -> Engine:
    if subject_name == "comfyui":
        if not CHECKOUT:
            pytest.skip("no ComfyUI checkout: set COMFYUI_PATH")
        subject = load_subject("comfyui", comfyui_path=CHECKOUT, device=device)
    else:
        subject = load_subject("diffusers")
    return Engine(subject, EngineOptions(device=device, committed_store=GoldenStore(GOLDEN_DIR, "committed"), local_store=GoldenStore(tmp_path / "local", "local")))


def test_float32_islands_of_the_float64_forwards_are_found(tmp_path):
    """The subjects' own upcasts are float32 islands in a float64 forward: diffusers' Qwen RMSNorm (mean, rsqrt)
    and WAN FP32LayerNorm round in float32 on any device, FLUX's blocks do not (docs/noise/float32-islands-*.json)."""
    cpu = engine(tmp_path)
    qwen = cpu.float32_islands("qwen.block")
    assert {"mean (float32)", "rsqrt (float32)"} <= set(qwen), qwen
    assert "native_layer_norm (float32)" in cpu.float32_islands("wan.t2v")
    assert cpu.float32_islands("flux.double") == {} and cpu.float32_islands("flux.single") == {}


@pytest.mark.skipif(not CHECKOUT, reason="no ComfyUI checkout: set COMFYUI_PATH")
def test_comfyui_float64_forwards_have_no_float32_island(tmp_path):
    """ComfyUI casts the queries to the RoPE table's dtype and the stored table is cast to the golden's float64: its
    blocks and decoders compute in float64 throughout, so their goldens may be made on a GPU."""
    comfy = _subject_engine(tmp_path, "comfyui", torch.device("cpu"))
    assert {c: comfy.float32_islands(c) for c in ("qwen.block", "flux.double", "wan.t2v", "wan.i2v", "qwen.vae")} == dict.fromkeys(("qwen.block", "flux.double", "wan.t2v", "wan.i2v", "qwen.vae"), {})


def test_goldens_stay_on_the_cpu_without_cuda(tmp_path):
    assert engine(tmp_path).golden_device("flux.double") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: GPU-made goldens are compared with the committed CPU-made ones")
@pytest.mark.parametrize("subject_name", ["diffusers", "comfyui"])
@pytest.mark.parametrize(("component", "profile"), GOLDEN_CASES)
def test_a_golden_made_on_the_gpu_agrees_with_the_cpu_made_one(tmp_path, subject_name, component, profile):
    """Where the engine makes a golden on the GPU (no float32 island, ``Engine.golden_device``), it must agree with
    the committed CPU-made one within ``outputs_agree`` (one float32 ulp plus float64 noise), or GPU runners would
    create goldens that a CPU run calls different. Where it keeps the golden on the CPU, the islands are why; the
    GPU's float64 outputs are then measured and printed (an H100 differed by 660-1508 float32 ulps there)."""
    gpu = _subject_engine(tmp_path, subject_name, torch.device("cuda"))
    committed = gpu.golden(component, "tiny", profile)
    device = gpu.golden_device(component)
    outputs = gpu._golden_outputs(committed.key, gpu._stored_inputs(committed)) if device.type == "cuda" else None
    if outputs is None:
        islands = gpu.float32_islands(component)
        assert islands, f"{component}: kept on the CPU without a float32 island"
        with torch.no_grad():
            run = gpu.forward(component, "tiny", None, gpu.subject.golden_backend_for(component), gpu._stored_inputs(committed), device=torch.device("cuda"), probes=False)
        print(f"{subject_name} {component} {profile}: on the CPU ({islands}); the GPU's float64 differs by {outputs_agree(committed.outputs, {k: v.cpu() for k, v in run.outputs.items()})[1]} float32 ulps")
        return
    agree, ulps = outputs_agree(committed.outputs, outputs)
    print(f"{subject_name} {component} {profile}: made on the GPU, worst difference {ulps} float32 ulps")
    assert agree, ulps


def test_cuda_forwards_pin_ieee_float32_and_goldens_also_full_precision_reductions():
    """A case's forward on CUDA turns TF32 off (matmul and cuDNN, whose default is on); a golden's also turns off
    reduced-precision reductions; both put every setting back. Off CUDA nothing is touched."""
    from conformance.forward import cuda_numerics

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    before = [getattr(matmul, n) for n in names] + [cudnn.allow_tf32]
    matmul.allow_tf32 = cudnn.allow_tf32 = matmul.allow_fp16_reduced_precision_reduction = True
    try:
        with cuda_numerics(torch.device("cpu")):
            assert matmul.allow_tf32 and cudnn.allow_tf32
        with cuda_numerics(torch.device("cuda")):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32 and matmul.allow_fp16_reduced_precision_reduction
        with cuda_numerics(torch.device("cuda"), golden=True):
            assert not matmul.allow_fp16_reduced_precision_reduction and not matmul.allow_bf16_reduced_precision_reduction
        assert matmul.allow_tf32 and cudnn.allow_tf32 and matmul.allow_fp16_reduced_precision_reduction
    finally:
        for n, v in zip(names, before):
            setattr(matmul, n, v)
        cudnn.allow_tf32 = before[-1]
