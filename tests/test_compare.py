"""The tolerance rules, one at a time, and the metrics they read."""

from __future__ import annotations

import math

import pytest
import torch

from conformance.compare import Budget, Evidence, budget_for, judge, load_budgets, metrics, worst

BUDGET = Budget("fp16", rel_l2=2e-3, max_abs_rel=1e-2, cosine=0.99999, backend_k=3.0, ratchet_margin=0.1, provenance="test")
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


def test_good_case_passes():
    assert judge(evidence(), BUDGET).outcome == "passed"


@pytest.mark.parametrize(
    "metric, value, text",
    [("rel_l2", 3e-3, "rel_l2"), ("max_abs_rel", 0.02, "max_abs_rel"), ("cosine", 0.9999, "cosine")],
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


def test_expected_failure_is_xfailed_and_strict():
    first = {"boundary": "b", "module": "m", "tensor": "t", "count": 1}
    assert judge(evidence(first_nonfinite=first, output_nonfinite=1), BUDGET, expected_failure="known").outcome == "xfailed"
    verdict = judge(evidence(), BUDGET, expected_failure="known")
    assert verdict.outcome == "failed" and "but passed" in verdict.reason


def test_budget_file_covers_every_precision():
    from conformance.precision import PRECISIONS

    budgets = load_budgets()
    assert set(PRECISIONS) <= set(budgets)
    for b in budgets.values():
        assert b.provenance, f"budget {b.precision} has no provenance"
    assert budget_for("fp32").rel_l2 < budget_for("fp16").rel_l2 < budget_for("bf16").rel_l2 < budget_for("fp8_e4m3").rel_l2


def test_non_strict_expected_failure_may_pass():
    verdict = judge(evidence(), BUDGET, expected_failure="borderline on some GPUs", strict=False)
    assert verdict.outcome == "passed" and "non-strict" in verdict.notes[-1]
