"""Tiers: the default run's cases are a property of the cases, never of the machine; the rest is in nightly."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conformance.case import Case
from conformance.machine import half_precision_path
from conformance.paths import REPO_ROOT
from conformance.tiers import in_tier, tier_of


def _case(component: str, precision: str, backend: str, profile: str) -> Case:
    return Case("diffusers", component.split(".")[0], component, "tiny", precision, backend, profile, "none")


@pytest.mark.parametrize(
    ("component", "precision", "backend", "profile", "tier"),
    [
        ("qwen.block", "fp16", "math", "massive_growth", "default"),  # every block case
        ("flux.single", "fp8_e4m3", "sage", "fp16_overflow", "default"),
        ("wan.vae22", "fp32", "sdpa", "video", "default"),  # decoders: fp32 on every profile
        ("wan.vae22", "fp16", "sdpa", "nan_latent", "default"),  # every precision on the black-image profile
        ("wan.vae22", "fp16", "sdpa", "video", "nightly"),
        ("flux.vae", "fp32", "math", "nominal", "nightly"),  # another backend than the reference
    ],
)
def test_each_case_has_one_smallest_tier(component, precision, backend, profile, tier):
    case = _case(component, precision, backend, profile)
    assert tier_of(case, "sdpa") == tier
    assert in_tier(case, "nightly", "sdpa") and in_tier(case, "default", "sdpa") == (tier == "default")


def _collected(*args: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites", "--collect-only", "-q", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    if (none := re.search(r"no tests collected \((\d+) deselected\)", proc.stdout)) is not None:
        return 0, int(none.group(1))
    match = re.search(r"(\d+)(?:/(\d+))? tests? collected", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(match.group(1)), int(match.group(2) or match.group(1))


def test_the_default_run_holds_the_default_tier_and_an_expression_selects_from_everything():
    default, total = _collected()
    nightly, _ = _collected("--tier", "nightly")
    assert nightly == total and 0 < default < total
    vae_any_backend, _ = _collected("-m", "vae and math")  # -m names the selection: nothing deselected by the tier
    assert vae_any_backend > 0
    assert _collected("-m", "vae and math", "--tier", "default")[0] == 0


def test_the_slow_half_precision_path_is_named():
    assert half_precision_path({"avx2", "f16c"}).startswith("this CPU has no native fp16 or bf16 arithmetic")
    assert "no native fp16 arithmetic" in half_precision_path({"avx512_bf16"})
    assert half_precision_path({"amx_bf16", "amx_fp16", "avx512_fp16"}) is None
