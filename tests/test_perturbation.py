"""A real change to the model fails against the golden in fp32: every weight matrix, perturbed by 1e-3."""

from __future__ import annotations

import pytest
import torch

from conformance import compare
from conformance.case import Case
from conformance.precision import get_precision

from .helpers import diffusers_subject, engine

WEIGHTS = [
    k
    for k in diffusers_subject().weight_shapes("qwen.block", "tiny")
    if not k.endswith("bias") and not k.startswith(("img_in", "txt_in", "txt_norm", "time_text_embed"))
]


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return engine(tmp_path_factory.mktemp("stores"))


def test_unperturbed_fp32_passes(eng):
    result = eng.run(Case("diffusers", "qwen", "qwen.block", "tiny", "fp32", "sdpa", "nominal"))
    assert result.outcome == "passed", result.reason


@pytest.mark.parametrize("key", WEIGHTS)
def test_weight_perturbation_fails(eng, key):
    golden = eng.golden("qwen.block", "tiny", "nominal")
    base = eng.weights("qwen.block", "tiny")
    noise = torch.randn(base[key].shape, generator=torch.Generator().manual_seed(0))
    perturbed = {**base, key: base[key] * (1 + 1e-3 * noise)}
    eng._weights[("qwen.block", "tiny")] = perturbed
    try:
        run = eng.forward("qwen.block", "tiny", get_precision("fp32"), "sdpa", eng.inputs("qwen.block", "tiny", "nominal"), probes=False)
    finally:
        eng._weights[("qwen.block", "tiny")] = base
    rel_l2 = compare.worst({o: compare.metrics(golden.outputs[o], run.outputs[o]) for o in run.outputs})["rel_l2"]
    assert rel_l2 > compare.budget_for("fp32").rel_l2
