"""Declared expected failures hold only while the case fails exactly as declared: a real block, a planted NaN."""

from __future__ import annotations

import math

import torch

from conformance.case import Case
from conformance.expectations import parse_entry

from .helpers import engine

CASE = Case("diffusers", "qwen", "qwen.block", "tiny", "fp32", "sdpa", "nominal")
ENTERED_AT_INPUT = parse_entry(
    {"component": "qwen.block", "profile": "nominal", "precision": "fp32", "kind": "entered", "at": "input",
     "versions": {"diffusers": ">=0.35"}, "measured": "this test", "reason": "a NaN planted in the input"},
    0, "test",
)  # fmt: skip


def test_a_nan_that_moves_from_the_input_into_attn_to_q_is_no_longer_the_expected_failure(tmp_path, monkeypatch):
    eng = engine(tmp_path, expected_failures=[ENTERED_AT_INPUT])
    stored = eng._stored_inputs

    def with_nan_input(golden):
        inputs = stored(golden)
        hidden = inputs.kwargs["hidden_states"].clone()
        hidden[0, 3, 5] = math.nan
        inputs.kwargs = {**inputs.kwargs, "hidden_states": hidden}
        return inputs

    monkeypatch.setattr(eng, "_stored_inputs", with_nan_input)
    entered = eng.run(CASE)
    assert entered.outcome == "xfailed", entered.reason
    assert entered.first_nonfinite["module"] == "input" and entered.expected_failure["index"] == [0]
    monkeypatch.setattr(eng, "_stored_inputs", stored)

    build = eng.subject.build

    def with_nan_in_to_q(*args, **kwargs):
        built = build(*args, **kwargs)
        with torch.no_grad():
            built.module.attn.to_q.weight[0, 0] = math.nan
        return built

    monkeypatch.setattr(eng.subject, "build", with_nan_in_to_q)
    moved = engine(tmp_path, expected_failures=[ENTERED_AT_INPUT]).run(CASE)  # a new engine: the old one keeps its module
    assert moved.outcome == "failed"
    assert moved.first_nonfinite["module"] == "attn.to_q"
    assert moved.failures[0].startswith("expected failure changed: a born failure"), moved.failures
    assert {"kind": "born", "at": "attn.to_q"}.items() <= moved.failure_kinds[1].items()
