"""Guard policies on the subject's own blocks: what each changes, what it counts, what it leaves as it was."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.case import Case
from conformance.families.common import apply_outliers
from conformance.guards import GUARD_NAMES, POLICIES, support_reason
from conformance.precision import get_precision
from conformance.boundaries import first_nonfinite
from conformance.profiles import Outliers
from conformance.subjects.base import ComponentInputs

from .helpers import engine

QWEN_STREAMS = {"img": ("hidden_states", None), "txt": ("encoder_hidden_states", None)}


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return engine(tmp_path_factory.mktemp("guards"))


def _case(guard: str, profile: str, precision: str = "fp16", backend: str = "sdpa", component: str = "qwen.block") -> Case:
    return Case("diffusers", component.split(".")[0], component, "tiny", precision, backend, profile, guard)


def test_every_policy_is_offered_with_a_description():
    assert GUARD_NAMES == ("none", "clip", "nan_to_num", "fp32_residual", "upcast_attention", "partial_fp16")
    for policy in POLICIES.values():
        assert policy.description and policy.touched_means


@pytest.mark.parametrize(
    ("guard", "family", "precision", "backend", "vae", "reason"),
    [
        ("clip", "qwen", "fp32", "sdpa", False, "half-precision"),
        ("clip", "qwen", "fp8_e4m3", "sdpa", False, "half-precision"),
        ("clip", "qwen", "fp16", "sdpa", True, "transformer blocks"),
        ("upcast_attention", "qwen", "fp16", "sage", False, "torch SDPA"),
        ("partial_fp16", "flux", "fp16", "sdpa", False, "Qwen-Image"),
        ("partial_fp16", "qwen", "bf16", "sdpa", False, "fp16 policy"),
        ("none", "qwen", "fp32", "sdpa", False, None),
        ("fp32_residual", "wan", "bf16", "split", False, None),
    ],
)
def test_support_reasons(guard, family, precision, backend, vae, reason):
    got = support_reason(guard, family, f"{family}.x", precision, backend, vae)
    assert (got is None) if reason is None else (reason in got), got


def test_unguarded_fp16_overflow_is_born_in_the_attention_output_projection(eng):
    result = eng.run(_case("none", "massive_growth"))
    assert result.outcome == "failed"
    assert result.first_nonfinite["module"] == "attn.to_out.0" and not result.first_nonfinite["entered"]


@pytest.mark.parametrize("guard", ["clip", "nan_to_num"])
def test_saturating_guards_keep_the_block_finite_and_count_what_they_changed(eng, guard):
    result = eng.run(_case(guard, "massive_growth"))
    assert result.stats["guard"]["touched"] > 0
    assert result.stats["nonfinite"] == 0 or result.first_nonfinite.get("masked_by_guard")
    assert 0.1 < result.metrics["rel_l2"] < 1.0  # finite, and honestly far from the golden
    assert any(f"guard {guard}" in n for n in result.notes)


def test_fp32_residual_carries_what_fp16_cannot(eng):
    result = eng.run(_case("fp32_residual", "massive_2e7"))
    assert result.outcome == "passed", result.failures
    assert result.stats["guard"]["touched"] == 240  # the 1e5..2e7 channels of both streams, every token
    unguarded = eng.run(_case("none", "massive_2e7"))
    assert unguarded.first_nonfinite["module"] == "input"


def test_fp32_residual_keeps_the_streams_in_fp32_and_the_weights_in_fp16(eng):
    run = eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", eng.inputs("qwen.block", "tiny", "nominal"), guard="fp32_residual")
    assert {t.dtype for t in run.outputs.values()} == {torch.float32}
    linears = [r for r in run.records if r.module == "attn.to_q" and r.tensor == "output"]
    assert linears and linears[0].dtype == "float16"


def test_upcast_attention_counts_every_attention_value(eng):
    result = eng.run(_case("upcast_attention", "nominal"))
    tokens = result.sizes["image_tokens"] + result.sizes["text_tokens"]
    assert result.stats["guard"]["touched"] == tokens * 256  # tiny Qwen: 2 heads x 128, one joint attention


def test_partial_fp16_computes_the_two_projections_in_fp32_and_restores_them(eng):
    run = eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", eng.inputs("qwen.block", "tiny", "nominal"), guard="partial_fp16")
    dtypes = {(r.module, r.tensor): r.dtype for r in run.records}
    assert dtypes[("attn.to_q", "output")] == "float32" and dtypes[("attn.add_k_proj", "output")] == "float32"
    assert dtypes[("attn.to_k", "output")] == "float16" and dtypes[("attn.add_q_proj", "output")] == "float16"
    assert dtypes[("attn.norm_q", "output")] == "float16"  # the joint attention runs in fp16, as in PR #12522


def test_guards_leave_no_trace(eng):
    """A guarded forward followed by an unguarded one gives the unguarded bits: hooks, modes and weights restored."""
    inputs = eng.inputs("qwen.block", "tiny", "nominal")
    before = eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", inputs, probes=False)
    for guard in POLICIES:
        eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", inputs, probes=False, guard=guard)
    after = eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", inputs, probes=False)
    for name in before.outputs:
        assert torch.equal(before.outputs[name], after.outputs[name])
    assert not torch.overrides._get_current_function_mode_stack()


# -- properties on the tiny Qwen block ----------------------------------------------------------------------------------
BLOCK_EXAMPLES = max(10, settings.default.max_examples // 3)
magnitudes = st.floats(min_value=1.0, max_value=1e7, allow_nan=False)
channel_sets = st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=6, unique=True)


def _forward(eng, guard: str, channels: list[int], magnitude: float):
    base = eng.inputs("qwen.block", "tiny", "nominal")
    groups = [Outliers(stream, tuple(channels), (magnitude,) * len(channels)) for stream in ("img", "txt")]
    inputs = ComponentInputs(apply_outliers(base.kwargs, groups, QWEN_STREAMS), base.sizes)
    return eng.forward("qwen.block", "tiny", get_precision("fp16"), "sdpa", inputs, guard=guard)


@pytest.mark.parametrize("guard", ["clip", "fp32_residual"])
@settings(max_examples=BLOCK_EXAMPLES, deadline=None)
@given(channels=channel_sets, magnitude=magnitudes)
def test_guarded_fp16_output_is_finite_for_any_residual_magnitude(eng, guard, channels, magnitude):
    run = _forward(eng, guard, channels, magnitude)
    for name, out in run.outputs.items():
        assert torch.isfinite(out).all(), f"{guard}: {name} non-finite with channels {channels} at {magnitude:g}"


@settings(max_examples=BLOCK_EXAMPLES, deadline=None)
@given(channels=channel_sets, magnitude=magnitudes)
def test_unguarded_first_nonfinite_is_at_the_input_exactly_when_the_input_is(eng, channels, magnitude):
    run = _forward(eng, "none", channels, magnitude)
    if all(torch.isfinite(out).all() for out in run.outputs.values()):
        return
    first = first_nonfinite(run.records)
    assert first is not None, "non-finite output but no probe saw a non-finite value"
    input_is_finite = magnitude <= torch.finfo(torch.float16).max  # what the cast to fp16 keeps
    if input_is_finite:
        # born inside: in a submodule, or in the block's own code between them (a residual add, recorded as "block")
        modules = dict(eng.subject.build("qwen.block", "tiny", get_precision("fp16"), eng.weights("qwen.block", "tiny"), "cpu").module.named_modules())
        assert first["module"] == "block" or first["module"] in modules, first
    else:
        assert first["module"] == "input"
