"""The tolerance rules, one at a time, and the metrics they read."""

from __future__ import annotations

import math

import pytest
import torch

from conformance.case import Case
from conformance.compare import Budget, Evidence, budget_for, judge, load_budgets, metrics, worst
from conformance.expectations import ExpectationsError, parse_entry

BUDGET = Budget("fp16", rel_l2=2e-3, max_abs_rel=1e-2, backend_k=3.0, provenance="test")
GOOD = {"rel_l2": 4e-4, "max_abs": 1e-3, "max_abs_rel": 1e-3, "cosine": 0.9999999, "sqnr_db": 68.0}


def evidence(**over) -> Evidence:
    base = dict(
        precision="fp16",
        backend="sdpa",
        reference_backend="sdpa",
        metrics=GOOD,
        backend_calls={"diffusers:native": 1},
        expected_kernels=("diffusers:native",),
    )
    base.update(over)
    return Evidence(**base)


def test_metrics_of_a_known_difference():
    g = torch.tensor([3.0, 4.0])
    m = metrics(g, torch.tensor([3.0, 4.5]))
    assert m["rel_l2"] == pytest.approx(0.1)
    assert m["max_abs"] == pytest.approx(0.5)
    assert m["max_abs_rel"] == pytest.approx(0.125)
    assert m["sqnr_db"] == pytest.approx(20.0)
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert metrics(g, g.clone())["sqnr_db"] == math.inf


def test_nonfinite_output_gives_nan_metrics():
    assert all(math.isnan(v) for v in metrics(torch.ones(3), torch.tensor([1.0, math.nan, 1.0])).values())


def test_worst_takes_the_worst_of_each_metric():
    w = worst({"a": {**GOOD, "rel_l2": 1e-3, "cosine": 0.9}, "b": {**GOOD, "sqnr_db": 10.0}})
    assert (w["rel_l2"], w["cosine"], w["sqnr_db"]) == (1e-3, 0.9, 10.0)


def test_cosine_cannot_fail_before_rel_l2_so_it_is_not_judged():
    """cos(a, g) >= sqrt(1 - rel_l2^2): any cosine bound is implied by the rel-L2 budget (or never fires)."""
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-3, 1e-1, 0.5):
        g = torch.randn(4096, generator=gen, dtype=torch.float64)
        a = g + scale * torch.randn(4096, generator=gen, dtype=torch.float64) * g.norm() / 64
        m = metrics(g, a)
        assert m["cosine"] >= math.sqrt(max(0.0, 1 - m["rel_l2"] ** 2)) - 1e-12
    assert "cosine" not in Budget.__dataclass_fields__


def test_good_case_passes():
    assert judge(evidence(), BUDGET).outcome == "passed"


@pytest.mark.parametrize(
    "metric, value, text",
    [("rel_l2", 3e-3, "rel_l2"), ("max_abs_rel", 0.02, "max_abs_rel")],
)
def test_budget_rule(metric, value, text):
    verdict = judge(evidence(metrics={**GOOD, metric: value}), BUDGET)
    assert verdict.outcome == "failed" and text in verdict.reason


def test_nonfinite_rule_names_the_first_module():
    first = {"boundary": "img mlp", "module": "img_mlp.net.2", "tensor": "output", "count": 7}
    verdict = judge(evidence(first_nonfinite=first, output_nonfinite=3, metrics={k: math.nan for k in GOOD}), BUDGET)
    assert verdict.outcome == "failed" and "img_mlp.net.2" in verdict.reason and "non-finite output" in verdict.reason


def test_nonfinite_inside_masked_by_guard():
    first = {"boundary": "img mlp", "module": "img_mlp.net.2", "tensor": "output", "count": 7}
    verdict = judge(evidence(first_nonfinite=first, output_nonfinite=0, masked_by_guard=True), BUDGET)
    assert verdict.outcome == "failed" and "masked by the subject's guard" in verdict.reason


def test_saturation_rule():
    sat = {"boundary": "block output", "module": "block", "tensor": "output[1]", "count": 4, "dtype": "float16"}
    verdict = judge(evidence(saturated=sat, saturated_total=4), BUDGET)
    assert verdict.outcome == "failed" and "saturated at the float16 maximum" in verdict.reason


def test_backend_rule_is_relative_to_the_reference_backend():
    ref = {**GOOD, "rel_l2": 1e-4}
    within = judge(evidence(backend="math", metrics={**GOOD, "rel_l2": 3e-4}, reference_metrics=ref), BUDGET)
    assert within.outcome == "passed"  # 3e-4 <= 3 x 1e-4 + 2e-4
    beyond = judge(evidence(backend="math", metrics={**GOOD, "rel_l2": 6e-4}, reference_metrics=ref), BUDGET)
    assert beyond.outcome == "failed" and "3 x sdpa" in beyond.reason


def test_ratchet_rule():
    assert judge(evidence(expectation=4e-4), BUDGET).outcome == "passed"
    verdict = judge(evidence(metrics={**GOOD, "rel_l2": 7e-4}, expectation=4e-4), BUDGET)
    assert verdict.outcome == "failed" and "expectation" in verdict.reason


def test_backend_must_have_run():
    verdict = judge(evidence(backend_calls={}), BUDGET)
    assert verdict.outcome == "failed" and "never ran" in verdict.reason
    wrong = judge(evidence(backend_calls={"diffusers:_native_math": 1}), BUDGET)
    assert wrong.outcome == "failed"


def test_fallback_fails():
    verdict = judge(evidence(fallbacks=("sage failed, using pytorch attention",)), BUDGET)
    assert verdict.outcome == "failed" and "silent fallback" in verdict.reason


def declared(**over):
    raw = {"kind": "born", "versions": {"diffusers": ">=0.40"}, "measured": "test", "reason": "known", **over}
    return parse_entry(raw, 0, "test.toml")


BORN_AT_TO_Q = {"boundary": "b", "module": "attn.to_q", "tensor": "out", "count": 1}
ENTERED = {"boundary": "b", "module": "input", "tensor": "hidden_states", "count": 4}


def test_expected_failure_is_xfailed_only_when_it_fails_as_declared():
    at_input = declared(kind="entered", at="input")
    assert judge(evidence(first_nonfinite=ENTERED, output_nonfinite=4, metrics={k: math.nan for k in GOOD}), BUDGET, at_input).outcome == "xfailed"
    # the same NaN, now born inside attn.to_q: the declaration no longer holds
    moved = judge(evidence(first_nonfinite=BORN_AT_TO_Q, output_nonfinite=4, metrics={k: math.nan for k in GOOD}), BUDGET, at_input)
    assert moved.outcome == "failed" and "expected failure changed: a born failure" in moved.reason
    verdict = judge(evidence(), BUDGET, at_input)
    assert verdict.outcome == "failed" and "but passed" in verdict.reason


def test_expected_failure_at_another_module_is_a_change():
    at_out = declared(kind="born", at="attn.to_out.0")
    verdict = judge(evidence(first_nonfinite=BORN_AT_TO_Q, output_nonfinite=1, metrics={k: math.nan for k in GOOD}), BUDGET, at_out)
    assert verdict.outcome == "failed" and "born at attn.to_q, declared at attn.to_out.0" in verdict.reason


def test_expected_budget_failure_has_a_ceiling():
    over = declared(kind="budget", ceiling={"rel_l2": 5e-3})
    assert judge(evidence(metrics={**GOOD, "rel_l2": 4e-3}), BUDGET, over).outcome == "xfailed"
    ten_times = judge(evidence(metrics={**GOOD, "rel_l2": 4e-2}), BUDGET, over)
    assert ten_times.outcome == "failed" and "rel_l2 0.04 above the declared ceiling 0.005" in ten_times.reason
    with pytest.raises(ExpectationsError, match="needs a measured `ceiling`"):
        declared(kind="budget")


def test_a_fallback_or_a_missing_backend_call_is_never_expected():
    over = declared(kind="budget", ceiling={"rel_l2": 5e-3})
    fell_back = judge(evidence(metrics={**GOOD, "rel_l2": 4e-3}, fallbacks=("sage failed, using pytorch attention",)), BUDGET, over)
    assert fell_back.outcome == "failed" and "expected failure changed: a fallback failure" in fell_back.reason
    never_ran = judge(evidence(metrics={**GOOD, "rel_l2": 4e-3}, backend_calls={}), BUDGET, over)
    assert never_ran.outcome == "failed" and "a backend failure" in never_ran.reason
    with pytest.raises(ExpectationsError, match="cannot be declared"):
        declared(kind="fallback")


def test_declarations_cover_the_versions_they_name():
    d = declared(versions={"comfyui": ">=0.3.50,<=0.3.64"}, subject="comfyui")
    case = Case("comfyui", "qwen", "qwen.block", "tiny", "fp16", "sdpa", "nominal", "none")
    assert d.matches(case, "0.3.64") and d.matches(case, "0.3.50")
    assert not d.matches(case, "0.3.65") and not d.matches(case, "0.3.49")
    with pytest.raises(ExpectationsError, match="`versions` does not name"):
        declared(subject="comfyui")
    with pytest.raises(ExpectationsError, match="needs `versions`"):
        parse_entry({"kind": "born", "measured": "m", "reason": "r"}, 0, "t.toml")


def test_the_inputs_rule_is_never_expected():
    over = declared(kind="budget", ceiling={"rel_l2": 5e-3})
    verdict = judge(evidence(metrics={**GOOD, "rel_l2": 4e-3}, input_failure="the subject builds its inputs differently: temb by 1e-2"), BUDGET, over)
    assert verdict.outcome == "failed" and "builds its inputs differently" in verdict.reason


def test_budget_file_covers_every_precision():
    from conformance.precision import PRECISIONS

    budgets = load_budgets()
    assert set(PRECISIONS) <= set(budgets)
    for b in budgets.values():
        assert b.provenance, f"budget {b.precision} has no provenance"
    assert budget_for("fp32").rel_l2 < budget_for("fp16").rel_l2 < budget_for("bf16").rel_l2 < budget_for("fp8_e4m3").rel_l2


def test_non_strict_expected_failure_may_pass_and_is_stale():
    verdict = judge(evidence(), BUDGET, declared(strict=False))
    assert verdict.outcome == "passed" and "stale expected failure" in verdict.notes[-1]
