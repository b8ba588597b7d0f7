"""Goldens are checked by hash, never replaced silently, written atomically, and missing ones say how to create them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conformance import goldens as goldens_module
from conformance.goldens import GoldenKey, GoldenMissing, GoldenStale, GoldenStore, GoldenTampered, input_fingerprint, tensor_digest

from .helpers import engine

KEY = GoldenKey("diffusers", "0.42.1", "qwen.block", "tiny", "nominal")
INPUTS = {"x": torch.linspace(-1, 1, 100)}
META = {
    "subject": {"name": "diffusers", "version": "x"},
    "torch": "t",
    "inputs_fingerprint": input_fingerprint(INPUTS),
    "weights_sha256": "w" * 64,
}


def _write(store: GoldenStore, value: float = 1.0):
    outputs = {"img": torch.full((2, 3), value, dtype=torch.float64)}
    return store.write(KEY, outputs, META)


def test_roundtrip_and_manifest(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    change = _write(store)
    assert change.action == "created"
    golden = store.load(KEY, INPUTS, "w" * 64, "CMD")
    assert golden.outputs["img"].dtype == torch.float32 and golden.outputs["img"].sum() == 6
    entry = json.loads((tmp_path / "manifest.json").read_text())["goldens"][KEY.id]
    assert entry["sha256"] == golden.sha256 and entry["subject"]["version"] == "x"


def test_missing_golden_names_the_command(tmp_path):
    with pytest.raises(GoldenMissing, match="create it with: pytest suites --update-goldens"):
        GoldenStore(tmp_path, "committed").load(KEY, INPUTS, "w" * 64, "pytest suites --update-goldens")


def test_tampered_file_is_detected(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    path = tmp_path / KEY.relpath
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last float
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenTampered, match="changed outside --update-goldens"):
        store.load(KEY, INPUTS, "w" * 64, "CMD")


def test_drifted_inputs_are_detected_and_float32_noise_is_not(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    _write(store)
    noisy = {"x": INPUTS["x"] * (1 + 1e-7)}  # another BLAS, another last bit
    store.load(KEY, noisy, "w" * 64, "CMD")
    with pytest.raises(GoldenStale, match="x differs by 0.001"):
        store.load(KEY, {"x": INPUTS["x"] * (1 + 1e-3)}, "w" * 64, "CMD")
    with pytest.raises(GoldenStale, match="appeared"):
        store.load(KEY, {**INPUTS, "y": torch.ones(2)}, "w" * 64, "CMD")
    with pytest.raises(GoldenStale, match="weights"):
        store.load(KEY, INPUTS, "v" * 64, "CMD")


def test_update_reports_old_and_new_hash_and_max_difference(tmp_path):
    store = GoldenStore(tmp_path, "committed")
    first = _write(store, 1.0)
    again = _write(store, 1.0)
    assert again.action == "unchanged" and again.new_sha256 == first.new_sha256
    changed = _write(store, 1.5)
    assert changed.action == "updated"
    assert changed.old_sha256 == first.new_sha256 != changed.new_sha256
    assert changed.max_diff == {"img": 0.5}
    assert first.new_sha256[:12] in changed.describe() and changed.new_sha256[:12] in changed.describe()


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
        _write(store, 2.0)
    assert (tmp_path / KEY.relpath).read_bytes() == before
    assert [p.name for p in (tmp_path / KEY.relpath).parent.iterdir()] == ["nominal.safetensors"]  # no temp file left
    store.load(KEY, INPUTS, "w" * 64, "CMD")  # still valid


def test_committed_goldens_match_their_manifest(tmp_path):
    """The committed tiny goldens load, hash-check and match the inputs and weights this checkout generates."""
    eng = engine(tmp_path)
    for profile in ("nominal", "massive"):
        golden = eng.golden("qwen.block", "tiny", profile)
        assert set(golden.outputs) == {"txt", "img"}
    assert eng.golden_changes == []


def test_real_scale_goldens_are_created_on_demand_in_the_local_store(tmp_path, monkeypatch):
    eng = engine(tmp_path)
    # Exercise the on-demand path at tiny cost: point the tiny scale at the local store.
    monkeypatch.setattr(eng, "store_for", lambda key: eng.options.local_store)
    golden = eng.golden("qwen.block", "tiny", "nominal")
    assert golden.path.is_relative_to(tmp_path / "local")
    assert [c.action for c in eng.golden_changes] == ["created"]
    committed = engine(tmp_path).golden("qwen.block", "tiny", "nominal")
    for name in golden.outputs:  # same float64 computation, same bits
        assert torch.equal(golden.outputs[name], committed.outputs[name])


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


def test_missing_golden_of_a_committed_identity_fails(tmp_path):
    committed = tmp_path / "golden"
    store = GoldenStore(committed, "committed")
    eng = engine(tmp_path, committed=committed)
    identity = eng.subject.info().identity
    store.write(GoldenKey("diffusers", identity, "qwen.block", "tiny", "massive"), {"img": torch.zeros(1)}, META)
    with pytest.raises(GoldenMissing, match="create it with"):
        eng.golden("qwen.block", "tiny", "nominal")


def test_atomic_writes_leave_files_readable_like_an_ordinary_open(tmp_path):
    """mkstemp makes 0600 files; a report or golden must get the mode open(path, "w") would give it."""
    import os

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
