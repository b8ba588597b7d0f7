"""The engine builds a component once per precision and weights, and shares it across the cases that differ in
backend, guard or a profile that leaves the weights alone. A case on a shared module must be the case on a freshly
built one, bit for bit: the same metrics, the same probe records, the same backend calls."""

from __future__ import annotations

import os

import pytest
import torch

from conformance.case import Case
from conformance.subjects import load_subject

from .helpers import diffusers_subject, engine

# One walk through what a shared module meets: backends in turn, guards that patch attention, hook every layer, upcast
# the residual or clamp, a profile that leaves the weights alone and one that stresses them, fp8 storage; then back to the
# first case, which must read as it did.
SEQUENCE = [
    ("fp32", "sdpa", "nominal", "none"),
    ("fp32", "math", "nominal", "none"),
    ("fp16", "sdpa", "nominal", "none"),
    ("fp16", "sdpa", "nominal", "upcast_attention"),
    ("fp16", "math", "nominal", "nan_to_num"),
    ("fp16", "sdpa", "massive", "fp32_residual"),
    ("fp16", "sdpa", "peaky_logits", "clip"),
    ("fp8_e4m3", "sdpa", "nominal", "none"),
    ("fp8_e4m3", "math", "massive", "none"),
    ("fp16", "sdpa", "nominal", "none"),
    ("fp32", "sdpa", "nominal", "none"),
]


def _fingerprint(result) -> dict:
    return {
        "outcome": result.outcome,
        "metrics_by_output": result.metrics_by_output,
        "boundaries": result.boundaries,
        "backend_calls": result.backend_calls,
        "first_nonfinite": result.first_nonfinite,
        "stats": result.stats,
    }


def _walk(subject, tmp_path, component: str, backends: dict[str, str]):
    family = component.split(".")[0]
    cases = [Case(subject.name, family, component, "tiny", p, backends.get(b, b), prof, g) for p, b, prof, g in SEQUENCE]
    builds = []
    original = subject.build

    def counting_build(*args, **kwargs):
        builds.append(args[2].name if args[2] is not None else "float64")
        return original(*args, **kwargs)

    shared = engine(tmp_path / "shared", subject=subject)
    subject.build = counting_build
    try:
        cached = [_fingerprint(shared.run(c)) for c in cases]
        shared_builds = list(builds)
        fresh = [_fingerprint(engine(tmp_path / "fresh", subject=subject).run(c)) for c in cases]
    finally:
        del subject.build
    return cases, cached, fresh, shared_builds


def _check(cases, cached, fresh, builds):
    for case, a, b in zip(cases, cached, fresh):
        assert a == b, f"{case.id}: the case on the shared module differs from the case on a fresh one"
    assert cached[0] == cached[-1], "the first case, run again at the end, reads differently"
    # every case runs at least its own forward: with sharing, one build per (precision, weights): fp32, fp16 (nominal
    # weights), fp16 (peaky_logits' stressed weights), fp8_e4m3
    assert builds.count("fp32") == 1 and builds.count("fp16") == 2 and builds.count("fp8_e4m3") == 1, builds


@pytest.mark.parametrize("component", ["qwen.block", "flux.single", "wan.t2v"])
def test_a_shared_module_gives_the_cases_of_a_fresh_one_diffusers(tmp_path, component):
    _check(*_walk(diffusers_subject(), tmp_path, component, {}))


CHECKOUT = os.environ.get("COMFYUI_PATH")


@pytest.mark.skipif(not CHECKOUT, reason="no ComfyUI checkout: set COMFYUI_PATH to run the ComfyUI module-cache test")
@pytest.mark.parametrize("component", ["qwen.block", "flux.double"])
def test_a_shared_module_gives_the_cases_of_a_fresh_one_comfyui(tmp_path, component):
    subject = load_subject("comfyui", comfyui_path=CHECKOUT, device=torch.device("cpu"))
    _check(*_walk(subject, tmp_path, component, {"math": "basic"}))
