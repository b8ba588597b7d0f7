"""Whole-model sequences: the state-leak rule catches a planted leak and names it, the clean patches pass, a first bad
value is placed by step, block and module, and bad patch specs get one clear message.

The ComfyUI tests need a checkout (COMFYUI_PATH); the rest run anywhere.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from conformance.case import Case
from conformance.workloads.patches import Patch, PatchError, load_patch
from conformance.workloads.state import differences, snapshot

CHECKOUT = os.environ.get("COMFYUI_PATH")
needs_comfyui = pytest.mark.skipif(not CHECKOUT, reason="no ComfyUI checkout: set COMFYUI_PATH to run the whole-model tests")
HERE = Path(__file__).parent
LEAKY = f"{HERE / 'patches' / 'leaky_first_block_cache.py'}:patch"
NONDETERMINISTIC = f"{HERE / 'patches' / 'nondeterministic_output.py'}:patch"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected module:callable"),
        ("no.such.module:patch", "cannot be imported"),
        (f"{HERE / 'patches' / 'missing.py'}:patch", "no such file"),
        (f"{HERE / 'patches' / 'leaky_first_block_cache.py'}:nothing", "has no callable 'nothing'"),
        (":patch", "expected module:callable"),
    ],
)
def test_a_bad_patch_spec_is_one_clear_message(spec, message):
    with pytest.raises(PatchError, match=message):
        load_patch(spec)


def test_the_state_snapshot_names_a_rebound_function_and_a_grown_cache():
    module = types.ModuleType("conformance_test_state")
    module.attention = lambda q: q
    module.CACHE = {}
    module.FLAG = False
    sys.modules[module.__name__] = module
    try:
        before = snapshot((module.__name__,))
        module.attention = lambda q: q * 1  # a custom node's rebinding, same name
        module.CACHE[(2, 64)] = torch.zeros(2, 64)
        after = snapshot((module.__name__,))
    finally:
        del sys.modules[module.__name__]
    changed = differences(before, after)
    assert [line.split(":")[0] for line in changed] == ["conformance_test_state.CACHE", "conformance_test_state.attention"]
    assert "dict of 0 -> dict of 1, 1 tensors [(2, 64)]" in changed[0]
    assert differences(before, before) == []


def test_sequence_cases_have_their_own_ids_and_markers():
    case = Case("comfyui", "qwen", "qwen.model", "tiny", "bf16", "sdpa", "nominal", sequence="wan>flux>qwen", patch="token_merge")
    assert case.id == "comfyui-qwen.model-tiny-bf16-sdpa-nominal-seq=wan>flux>qwen-patch=token_merge"
    assert case.kind == "sequence" and {"sequence", "patch", "qwen_bf16"} <= set(case.markers())
    assert "lifecycle" in Case("comfyui", "qwen", "qwen.model", "tiny", "fp32", "sdpa", "nominal", sequence="qwen*50").markers()


@pytest.fixture(scope="module")
def runner():
    from conformance.subjects import load_subject
    from conformance.workloads.cases import SequenceRunner
    from conformance.workloads.patches import BUILTIN

    subject = load_subject("comfyui", comfyui_path=CHECKOUT, device=torch.device("cpu"))
    models, worker = subject.whole_models()
    return SequenceRunner(models, worker, {**BUILTIN, "leaky_first_block_cache": LEAKY, "nondeterministic_output": NONDETERMINISTIC})


def _case(precision: str, sequence: str, patch: str = "none") -> Case:
    return Case("comfyui", "qwen", "qwen.model", "tiny", precision, "sdpa", "nominal", sequence=sequence, patch=patch)


@needs_comfyui
def test_a_cache_keyed_on_shape_is_a_state_leak_and_is_named(runner):
    leaky = runner.patch("leaky_first_block_cache")
    sys.modules[leaky.module_name]._CACHE.clear()  # FLUX fills it first, as in a process that ran FLUX before Qwen
    result = runner.run(_case("bf16", "flux>qwen", "leaky_first_block_cache"))
    assert result.outcome == "failed", result.reason
    kinds = {f["kind"]: f for f in result.failure_kinds}
    assert kinds["state_leak"]["at"] == f"{leaky.module_name}._CACHE"
    assert result.metrics["differing"] > 0 and result.metrics["rel_l2"] > 0
    assert "_CACHE: dict of 0 -> dict of 1" in result.reason


@needs_comfyui
def test_a_difference_from_an_op_without_a_deterministic_kernel_is_called_nondeterministic(runner):
    result = runner.run(_case("fp32", "isolated", "nondeterministic_output"))
    assert result.outcome == "failed", result.reason
    kinds = {f["kind"]: f for f in result.failure_kinds}
    assert set(kinds) == {"nondeterministic"}, result.failure_kinds
    assert kinds["nondeterministic"]["at"] == "put_" and "no deterministic kernel for put_" in result.reason
    assert result.stats["sequence"]["nondeterministic_ops"] == ["put_"]
    assert not torch.are_deterministic_algorithms_enabled()  # the mode is the run's, not left behind


@needs_comfyui
@pytest.mark.parametrize("patch", ["first_block_cache", "token_merge"])
def test_the_example_patches_are_clean_and_within_their_budget(runner, patch):
    reason = runner.unsupported(_case("bf16", "isolated", patch))
    if reason:
        pytest.skip(reason)
    isolated = runner.run(_case("bf16", "isolated", patch))
    assert isolated.outcome == "passed", isolated.reason
    assert 0 < isolated.metrics["rel_l2_vs_unpatched"] <= isolated.budget["rel_l2"]
    after = runner.run(_case("bf16", "wan>flux>qwen", patch))
    assert after.outcome == "passed", after.reason
    if patch == "first_block_cache":  # it skipped blocks: fewer attention calls than the unpatched run's 12
        plain = runner.run(_case("bf16", "isolated"))
        assert sum(isolated.backend_calls.values()) < sum(plain.backend_calls.values())


@needs_comfyui
def test_the_first_bad_value_is_placed_by_step_block_and_module(runner):
    """An inf written into block 1's attention output projection at the fourth forward (step 3) is reported there."""
    from conformance.backends import CallCounter
    from conformance.workloads.sequences import RunSpec, _run_model

    handles = []

    def plant(model):
        layer = model.model.diffusion_model.transformer_blocks[1].attn.to_out[0]
        calls = {"n": 0}

        def hook(_module, _args, output):
            calls["n"] += 1
            return output.index_fill(1, torch.tensor([3]), float("inf")) if calls["n"] == 4 else output

        handles.append(layer.register_forward_hook(hook))
        return model

    spec = RunSpec("fp32", "sdpa", Patch("plant", "test:plant", __name__, plant, None, None))
    try:
        latent, observer, _, _ = _run_model(runner.models, "qwen", spec, CallCounter(), observe=True)
    finally:
        for handle in handles:
            handle.remove()
    bad = observer.first_bad()
    assert bad is not None and not torch.isfinite(latent).all()
    assert (bad["step"], bad["block"], bad["in_block"]) == (3, "transformer_blocks.1", "attn.to_out.0")


@needs_comfyui
def test_the_gate_names_a_patch_that_started_leaking(tmp_path):
    """Two real runs of the same case: the example first-block cache, then a user's ``first_block_cache.py`` (same
    name, so the same case id) that keys its cache on shape. The gate calls the case regressed, with the leak."""
    import shutil
    import subprocess

    from conformance.gate import EXIT_REGRESSED, compare_runs
    from conformance.paths import REPO_ROOT

    user_patch = tmp_path / "custom_node" / "first_block_cache.py"
    user_patch.parent.mkdir()
    shutil.copy(HERE / "patches" / "leaky_first_block_cache.py", user_patch)
    selection = ["-m", "sequence and bf16 and patch", "-k", "flux and first_block_cache and not wan and not diffusers"]
    sides = {}
    for side, extra in (("baseline", []), ("candidate", ["--conformance-patch", f"{user_patch}:patch"])):
        sides[side] = tmp_path / side
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "suites/test_sequences.py", "-q", "-p", "no:cacheprovider", f"--comfyui={CHECKOUT}",
             "--report-dir", str(sides[side]), *selection, *extra],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == (0 if side == "baseline" else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = compare_runs(sides["baseline"], sides["candidate"])
    (verdict,) = result.cases
    assert result.exit_code == EXIT_REGRESSED and verdict.verdict == "regressed"
    assert verdict.case_id.endswith("seq=flux>qwen-patch=first_block_cache")
    assert any("newly failed" in why and "first_block_cache._CACHE" in why for why in verdict.why), verdict.why
