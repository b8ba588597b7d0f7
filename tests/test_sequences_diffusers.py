"""Whole-model sequences through diffusers' own classes (``conformance.workloads.diffusers``): Qwen after nothing and
after WAN and FLUX in the same process is Qwen in a fresh worker process bit for bit, and a planted non-finite value
is placed by step, block and module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conformance.subjects.diffusers import DiffusersSubject
from conformance.workloads.cases import SequenceRunner, sequence_cases
from conformance.workloads.patches import load_patch
from conformance.workloads.sequences import RunSpec, run_sequence

PLANTED = Path(__file__).parent / "patches" / "planted_inf.py"


@pytest.fixture(scope="module")
def runner():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster here, and the worker is given the same count
    models, worker = DiffusersSubject(torch.device("cpu")).whole_models()
    yield SequenceRunner(models, worker, {})
    torch.set_num_threads(threads)


def _case(sequence: str):
    return next(c for c in sequence_cases("diffusers", "sdpa", ()) if c.precision == "bf16" and c.sequence == sequence)


@pytest.mark.parametrize("sequence, before", [("isolated", []), ("wan>flux>qwen", ["wan", "flux"])])
def test_qwen_bit_for_bit_with_a_fresh_process(runner, sequence, before):
    result = runner.run(_case(sequence))
    assert result.outcome == "passed", result.reason
    assert result.metrics["differing"] == 0
    assert [r["family"] for r in result.stats["sequence"]["ran_before"]] == before
    assert result.backend_calls == {"diffusers:native": 24}  # 2 blocks x 6 steps x (cond + uncond)
    assert result.stats["sequence"]["loaded_models_after"] is None  # diffusers has no model manager


def test_planted_nonfinite_is_placed(runner):
    patch = load_patch(f"{PLANTED}:patch")
    run = run_sequence(runner.models, "isolated", RunSpec("bf16", "sdpa", patch))
    bad = run.first_bad
    assert bad is not None
    where = (bad["step"], bad["block"], bad["module"], bad["in_block"])
    assert where == (3, "transformer_blocks.1", "transformer_blocks.1", "")
    assert bad["count"] >= 1


def test_comfyui_patches_skip_on_diffusers(runner):
    for name in ("first_block_cache", "token_merge"):
        case = next(c for c in sequence_cases("diffusers", "sdpa", (name,)) if c.patch == name)
        reason = runner.unsupported(case)
        assert reason and "ComfyUI ModelPatcher" in reason and "QwenImageTransformer2DModel" in reason


def test_diffusers_first_block_cache(runner):
    """diffusers' own first-block cache hooks: the patched Qwen equals a fresh worker's patched Qwen bit for bit, skips
    blocks (fewer attention calls than the unpatched 24) and stays inside the patch's budget."""
    cases = sequence_cases("diffusers", "sdpa", ("diffusers_first_block_cache",))
    case = next(c for c in cases if c.patch != "none" and c.precision == "bf16" and c.sequence == "isolated")
    assert runner.unsupported(case) is None
    result = runner.run(case)
    assert result.outcome == "passed", result.reason
    assert result.metrics["differing"] == 0
    assert result.backend_calls["diffusers:native"] < 24
    assert 0 < result.metrics["rel_l2_vs_unpatched"] <= result.budget["rel_l2"]
