"""The budgets against the measurement they rest on (docs/noise/budget-headroom.json, tools/budget_noise.py)."""

from __future__ import annotations

import json
import tomllib

import pytest

from conformance import budget_noise
from conformance.compare import load_budgets
from conformance.families import FAMILIES
from conformance.paths import BUDGETS_FILE, REPO_ROOT
from conformance.profiles import load_profiles

MEASUREMENT = REPO_ROOT / "docs" / "noise" / "budget-headroom.json"


@pytest.fixture(scope="module")
def measurement() -> dict:
    return json.loads(MEASUREMENT.read_text())


def test_every_measured_value_clears_todays_budget_by_the_noise_margin(measurement):
    """A passed case within the cross-path noise margin of its budget fails on another machine; so does a reference run
    that fails undeclared. Tightening a budget past a measured value, or loosening it past a declared failure, fails."""
    assert budget_noise.problems(measurement["cases"], measurement["noise"]) == []


def test_the_measurement_covers_both_subjects_and_several_cpu_paths(measurement):
    subjects = {run["subject"] for run in measurement["runs"].values()}
    assert any(s.startswith("0.42") for s in subjects) and any(s.startswith("0.3.64") for s in subjects)
    assert any(s.startswith("0.3.50") for s in subjects)
    envs = {json.dumps(run["machine"]["env"], sort_keys=True) for run in measurement["runs"].values()}
    assert len(envs) >= 3, envs
    assert measurement["noise"]["block/bf16/max_abs_rel"]["margin"] > 0


def test_the_old_stress_profile_budgets_fail_the_rule(measurement):
    """Without the [profile.*] overrides, unchanged ComfyUI fails bf16 max-abs on peaky_logits (0.056-0.062 > 5e-2) and
    the fp8 cases at 0.0796-0.0798 sit within the cross-path margin of 0.08: the rule sees both."""
    with BUDGETS_FILE.open("rb") as handle:
        data = tomllib.load(handle)

    def without_profiles(kind: str, precision: str, _profile: str, metric: str) -> float:
        table = data.get(kind, {}).get("precision", {}).get(precision, {}) if kind == "vae" else {}
        return float(table.get(metric, data["precision"][precision][metric]))

    found = budget_noise.problems(measurement["cases"], measurement["noise"], budget=without_profiles)
    assert any("comfyui-flux.single-tiny-bf16-sdpa-peaky_logits" in line and "max_abs_rel 0.0557 above" in line for line in found)
    assert any("fp8_block-sdpa-fp16_overflow" in line and "within the noise margin" in line for line in found)


def test_fence_counts_noise_margins_relative_and_absolute():
    relative = {"absolute": False, "margin": 0.5}
    assert budget_noise.fence(0.1, 0.15, relative) == pytest.approx(1.0)
    assert budget_noise.fence(0.2, 0.1, relative) > 1.7
    absolute = {"absolute": True, "margin": 1e-6}
    assert budget_noise.fence(4e-6, 5e-6, absolute) == pytest.approx(1.0)


def _case(outcome: str, rel_l2: float, max_abs_rel: float = 1e-3) -> dict:
    return {"run": "r", "id": "c", "kind": "block", "precision": "fp16", "profile": "nominal", "outcome": outcome,
            "rel_l2": rel_l2, "max_abs_rel": max_abs_rel}


def test_undeclared_values_near_a_budget_and_declared_failures_near_it_are_problems():
    noise = {"block/fp16/rel_l2": {"absolute": False, "margin": 0.1}, "block/fp16/max_abs_rel": {"absolute": False, "margin": 0.1}}

    def budgets(rel_l2: float):
        return lambda _kind, _precision, _profile, metric: rel_l2 if metric == "rel_l2" else 1e-2

    near = [_case("passed", 1.9e-3)]
    assert budget_noise.problems(near, noise, budgets(2e-3))
    assert budget_noise.problems(near, noise, budgets(2.5e-3)) == []
    failed = [_case("failed", 9e-3)]  # undeclared: judged under today's budgets, not the outcome its run recorded
    assert "undeclared, rel_l2 0.009 above" in budget_noise.problems(failed, noise, budgets(2e-3))[0]
    assert budget_noise.problems(failed, noise, budgets(2e-2)) == []
    declared = [_case("xfailed", 9e-3)]
    assert budget_noise.problems(declared, noise, budgets(2e-3)) == []  # clearly failing, as declared
    assert budget_noise.problems(declared, noise, budgets(2e-2)) == []  # clearly passing everywhere: stale, not flaky
    assert "may pass on one machine" in budget_noise.problems(declared, noise, budgets(8.8e-3))[0]


def test_profile_overrides_name_real_profiles_and_precisions():
    with BUDGETS_FILE.open("rb") as handle:
        data = tomllib.load(handle)
    known = {name for family in FAMILIES for name in load_profiles(family)}
    for profile, table in data.get("profile", {}).items():
        assert profile in known, f"[profile.{profile}] names no profile"
        budgets = load_budgets(profile=profile)
        for precision, override in table["precision"].items():
            assert override.get("provenance"), f"[profile.{profile}.precision.{precision}] has no provenance"
            for metric in ("rel_l2", "max_abs_rel"):
                if metric in override:
                    assert getattr(budgets[precision], metric) == override[metric]
            assert budgets[precision].provenance.startswith(f"{profile}: ")
    assert load_budgets(profile="nominal") == load_budgets()
