"""ComfyUI adapter logic that needs no ComfyUI checkout (runs in CI)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conformance.families.qwen import comfyui_inputs_to_diffusers
from conformance.precision import dequantize, quantize_blockwise, saturating_cast
from conformance.subjects import SubjectError, load_subject
from conformance.subjects.base import SubjectInfo
from conformance.subjects.comfyui.loader import git_state, load, read_version


def test_a_directory_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SubjectError, match="is not a ComfyUI checkout"):
        load(tmp_path, torch.device("cpu"))
    with pytest.raises(SubjectError, match="not a directory"):
        load(tmp_path / "nowhere", torch.device("cpu"))


def test_comfyui_subject_needs_a_path():
    with pytest.raises(SubjectError, match="--comfyui PATH or COMFYUI_PATH"):
        load_subject("comfyui")


def test_version_comes_from_comfyui_version_py(tmp_path):
    (tmp_path / "comfyui_version.py").write_text('# generated\n__version__ = "0.3.64"\n')
    assert read_version(tmp_path) == "0.3.64"
    assert read_version(tmp_path / "missing") == "unknown"


def test_git_state_counts_only_python_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert git_state(tmp_path) == (None, None, None)
    git("init", "-q")
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "model.py").write_text("x = 1\n")
    (tmp_path / "main.py").write_text("x = 1\n")
    (tmp_path / "tokenizer.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    commit, dirty, diff_hash = git_state(tmp_path)
    assert len(commit) == 40 and dirty is False and diff_hash is None
    (tmp_path / "tokenizer.json").unlink()  # a missing data file does not change what the blocks compute
    (tmp_path / "main.py").write_text("x = 2\n")  # nor a file outside comfy/, comfy_extras/
    assert git_state(tmp_path)[1] is False
    (tmp_path / "comfy" / "model.py").write_text("x = 2\n")
    _, dirty, diff_hash = git_state(tmp_path)
    assert dirty is True and len(diff_hash) == 64


def test_identity_names_version_commit_and_local_changes():
    assert SubjectInfo("diffusers", "0.42.1").identity == "0.42.1"
    assert SubjectInfo("diffusers", "0.42.1", source_hash="9e12e5df58aa").identity == "0.42.1+s9e12e5df58"
    assert SubjectInfo("comfyui", "0.3.64", commit="637221995f7424a5").identity == "0.3.64+g637221995f"
    dirty = SubjectInfo("comfyui", "0.3.64", commit="637221995f7424a5", dirty=True, diff_hash="abcdef0123", source_hash="ff")
    assert dirty.identity == "0.3.64+g637221995f-dirtyabcdef01"
    assert SubjectInfo("comfyui", "0.3.64", source_hash="feee4e9cd2f5").identity_source == "source hash"


def test_rope_conversion_from_comfyui_matrices_to_diffusers_complex():
    theta = torch.linspace(0, 3, 20 * 64).reshape(20, 64)
    cos, sin = torch.cos(theta), torch.sin(theta)
    matrices = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 20, 1, 64, 2, 2)  # comfy.ldm.flux.math.rope layout
    kwargs = {
        "hidden_states": torch.zeros(1, 16, 8),
        "encoder_hidden_states": torch.zeros(1, 4, 8),
        "temb": torch.zeros(1, 8),
        "image_rotary_emb": matrices,
        "encoder_hidden_states_mask": None,
    }
    img, txt = comfyui_inputs_to_diffusers("qwen.block", kwargs, 4)["image_rotary_emb"]
    assert txt.shape == (4, 64) and img.shape == (16, 64)
    assert torch.allclose(torch.cat([txt, img]), torch.polar(torch.ones_like(theta), theta))
    # the rotation each applies to a pair (x0, x1) is the same
    x = torch.randn(20, 64, 2)
    comfy = (matrices[0, :, 0] @ x.unsqueeze(-1)).squeeze(-1)
    diff = torch.view_as_real(torch.view_as_complex(x) * torch.cat([txt, img]))
    assert torch.allclose(comfy, diff, atol=1e-6)


def test_blockwise_quantizer_layout_and_error():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 256)  # column scales
    q, scale, stats = quantize_blockwise(w, 64)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (32, 4, 1)
    back = (q.float().reshape(32, 4, 64) * scale).reshape(32, 256)
    per_tensor_err = (dequantize(*__import__("conformance.precision", fromlist=["x"]).quantize_per_tensor(w)[:2], torch.float32) - w).norm()
    assert (back - w).norm() < per_tensor_err  # block scales follow the column scales
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_blockwise(torch.ones(4, 100), 64)


def test_unscaled_fp8_storage_saturates_and_is_made_on_the_cpu():
    w = torch.tensor([1e5, -1e5, 500.0, 447.0, 1e-12, 0.0])
    q, stats = saturating_cast(w)
    assert q.dtype == torch.float8_e4m3fn and q.device.type == "cpu"
    assert q.float().tolist()[:4] == [448.0, -448.0, 448.0, 448.0]  # 447 rounds to the nearest e4m3 value, 448
    assert stats.saturated == 3 and stats.flushed_to_zero == 1 and not torch.isnan(q.float()).any()


def test_a_kernel_package_built_for_another_torch_is_a_skip_reason(tmp_path, monkeypatch):
    import json
    import sys

    from conformance.backends import package_reasons

    package = tmp_path / "fakekernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cpp_lib.json").write_text(json.dumps({"version": {"torch": "2.10.0+cu128", "cuda": 1208}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    reasons = package_reasons("fakekernels")
    if torch.__version__.startswith("2.10.0"):
        assert reasons == []
    else:
        assert reasons == [f"fakekernels was built for torch 2.10.0+cu128 and does not load with torch {torch.__version__}"]
    assert "fakekernels" not in sys.modules  # decided without importing it


def test_every_committed_declaration_names_real_axis_values():
    """A typo in a declaration (a profile, backend or component that does not exist) would match nothing and hide
    nothing: every value must name something the matrix has."""
    from conformance.backends import BACKENDS
    from conformance.expectations import load_expected_failures
    from conformance.families import FAMILIES, component_profiles, family_of, vae
    from conformance.guards import GUARD_NAMES
    from conformance.paths import EXPECTED_FAILURES_FILE
    from conformance.precision import PRECISIONS
    from conformance.subjects import SUBJECTS

    components = {c for family in FAMILIES.values() for c in family.components} | set(vae.COMPONENTS)
    profiles = {p for c in components for p in component_profiles(c)}
    known = {
        "subject": set(SUBJECTS), "family": set(FAMILIES), "component": components, "scale": {"tiny", "real"},
        "precision": set(PRECISIONS), "backend": set(BACKENDS), "profile": profiles, "guard": set(GUARD_NAMES),
    }  # fmt: skip
    declared = load_expected_failures(EXPECTED_FAILURES_FILE)
    for entry in declared:
        for field, values in entry.match.items():
            assert set(values) <= known[field], f"expected[{entry.index}].{field}: {sorted(set(values) - known[field])} do not exist"
        assert set(entry.versions) <= set(SUBJECTS)
        for component in entry.match.get("component", ()):
            assert family_of(component) in entry.match.get("family", (family_of(component),))


def test_expected_failure_matching(tmp_path):
    from conformance.case import Case
    from conformance.expectations import expected_failure_for, load_expected_failures

    path = tmp_path / "x.toml"
    path.write_text(
        '[[expected]]\nbackend = "sage"\nprecision = ["bf16", "fp16"]\nversions = { comfyui = ">=0.3.50" }\n'
        'kind = "budget"\nceiling = { rel_l2 = 0.1 }\nreason = "r"\nmeasured = "p"\n'
    )
    declared = load_expected_failures(path)
    assert expected_failure_for(Case("comfyui", "qwen", "qwen.block", "tiny", "fp16", "sage", "nominal"), declared)
    assert not expected_failure_for(Case("comfyui", "qwen", "qwen.block", "tiny", "fp32", "sage", "nominal"), declared)
    assert not expected_failure_for(Case("diffusers", "qwen", "qwen.block", "tiny", "fp16", "sage", "nominal"), declared)
    path.write_text('[[expected]]\nbackend = "sage"\nreason = "r"\n')
    with pytest.raises(ValueError, match="needs `kind`"):
        load_expected_failures(path)
