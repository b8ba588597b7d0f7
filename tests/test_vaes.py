"""The VAE boundary suite: where a bad value entered or was born, the save stage, tiled decoding, on diffusers' decoders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conformance import compare
from conformance.case import Case
from conformance.expectations import load_expected_failures
from conformance.families import vae
from conformance.paths import EXPECTED_FAILURES_FILE
from conformance.save_stage import save_like_comfyui

from .helpers import engine
from .test_suite_run import run_suite

NUMPY_CAST_WARNING = "RuntimeWarning: invalid value encountered in cast"


def _case(component: str, profile: str, precision: str = "fp32", backend: str = "sdpa") -> Case:
    return Case("diffusers", component.split(".")[0], component, "tiny", precision, backend, profile)


# -- the save stage ---------------------------------------------------------------------------------------------------
def test_save_stage_fails_with_numpys_message_and_counts_bad_pixels():
    pixels = torch.zeros(1, 3, 4, 4)
    pixels[0, 0, 1, 1] = float("nan")  # one position, one channel
    pixels[0, :, 2, 3] = float("nan")  # one position, every channel
    result = save_like_comfyui(pixels)
    assert not result.ok
    assert result.message == NUMPY_CAST_WARNING
    assert (result.bad_pixels, result.pixels) == (2, 16)
    assert result.black_pixels == 1  # NaN in all three channels saves as (0, 0, 0)


def test_save_stage_accepts_out_of_range_and_infinite_pixels():
    # process_output clamps to [0, 1] (inf included) before SaveImage's cast: only NaN survives to the cast
    pixels = torch.tensor([[[[-5.0, 5.0], [float("inf"), float("-inf")]]]]).expand(1, 3, 2, 2)
    result = save_like_comfyui(pixels)
    assert result.ok and result.message is None and result.bad_pixels == 0


def test_save_stage_handles_video_layouts():
    frames = torch.zeros(1, 3, 5, 4, 4)
    frames[0, 1, 4, 0, 0] = float("nan")
    result = save_like_comfyui(frames)
    assert (result.ok, result.bad_pixels, result.pixels) == (False, 1, 5 * 16)


# -- where the first bad value is ------------------------------------------------------------------------------------
def test_nan_latent_is_reported_as_entering_the_vae(tmp_path):
    eng = engine(tmp_path, expected_failures=load_expected_failures(EXPECTED_FAILURES_FILE))
    result = eng.run(_case("qwen.vae", "nan_latent"))
    assert result.outcome == "xfailed", result.failures
    assert result.first_nonfinite["module"] == "input" and result.first_nonfinite["entered"] is True
    assert result.first_nonfinite["tensor"] == "z" and result.first_nonfinite["count"] == 4
    text = " ".join(result.failures)
    assert "entered at the input" in text
    assert NUMPY_CAST_WARNING in text and f"on {result.stats['save_stage']['bad_pixels']} of" in text
    assert result.stats["save_stage"]["bad_pixels"] == result.stats["save_stage"]["pixels"]  # the whole image is black


@pytest.mark.parametrize(
    ("component", "weight", "module"),
    [
        ("qwen.vae", "decoder.up_blocks.1.resnets.0.conv1.weight", "decoder.up_blocks.1.resnets.0.conv1"),
        ("flux.vae", "decoder.up_blocks.2.resnets.1.conv2.weight", "decoder.up_blocks.2.resnets.1.conv2"),
    ],
)
def test_fault_planted_in_an_up_block_is_reported_with_its_module(tmp_path, component, weight, module):
    eng = engine(tmp_path, committed=tmp_path / "committed", update_goldens=True)  # goldens of the faulty weights
    weights = dict(eng.weights(component, "tiny"))
    faulty = weights[weight].clone()
    faulty.view(-1)[0] = float("inf")
    weights[weight] = faulty
    eng._weights.put((component, "tiny"), weights)
    result = eng.run(_case(component, "nominal"))
    assert result.outcome == "failed"
    assert result.first_nonfinite["module"] == module and result.first_nonfinite["entered"] is False
    assert f"first at {module}" in result.failures[0]
    assert any(NUMPY_CAST_WARNING in f for f in result.failures)
    inputs = [b for b in result.boundaries if b["module"] == "input"]
    assert inputs and all(b["nonfinite"] == 0 for b in inputs)  # the latent was clean


def test_probes_cover_the_decoder_path(tmp_path):
    eng = engine(tmp_path)
    result = eng.run(_case("wan.vae22", "nominal"))
    assert result.outcome == "passed", result.failures
    seen = {b["boundary"] for b in result.boundaries}
    for boundary in ("component input", "post-quant convolution", "first convolution", "mid block (with attention)", "mid-block attention",
                     "up block 0", "up block 3", "output norm", "output convolution", "decoded pixels", "input of torch.clamp"):  # fmt: skip
        assert boundary in seen, f"{boundary!r} not probed; saw {sorted(seen)}"


# -- tiled decoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component", vae.COMPONENTS)
def test_tiled_decode_is_compared_with_the_full_decode(tmp_path, component):
    eng = engine(tmp_path)
    result = eng.run(_case(component, "nominal"))
    tiled = result.stats["tiled"]
    assert tiled["shapes"]["pixels"]["full"] == tiled["shapes"]["pixels"]["tiled"]
    assert tiled["nonfinite"]["pixels"] == {"full": 0, "tiled": 0}
    rel = tiled["metrics"]["rel_l2"]
    assert 1e-3 < rel < tiled["budget"], rel  # tiles really differ at the seams, and stay within the budget
    assert result.metrics_by_output["tiled_vs_full/pixels"]["rel_l2"] == rel


def test_tiling_failures_are_named():
    broken = {
        "budget": 0.5,
        "metrics": {"rel_l2": 1.4},
        "shapes": {"pixels": {"full": [1, 3, 64, 64], "tiled": [1, 3, 65, 65]}},
        "nonfinite": {"pixels": {"full": 0, "tiled": 12}},
    }
    failures = compare._tiling_failures(broken)
    assert any("shape [1, 3, 65, 65], the full decode [1, 3, 64, 64]" in f for f in failures)
    assert any("12 non-finite pixels values (full decode: 0)" in f for f in failures)
    assert any("rel_l2 1.4 > tiling budget 0.5" in f for f in failures)
    clean = {**broken, "metrics": {"rel_l2": math.nan}, "shapes": {"pixels": {"full": [1], "tiled": [1]}}, "nonfinite": {"pixels": {"full": 9, "tiled": 9}}}
    assert compare._tiling_failures(clean) == []


# -- budgets ---------------------------------------------------------------------------------------------------------
def test_vae_budgets_override_the_block_budgets_only_where_declared():
    blocks, vaes = compare.load_budgets(), compare.load_budgets(kind="vae")
    assert set(blocks) == set(vaes)
    assert vaes["fp32"] == blocks["fp32"]
    for name in ("bf16", "fp16", "fp8_e4m3"):
        assert vaes[name].rel_l2 >= blocks[name].rel_l2
        assert vaes[name].provenance != blocks[name].provenance


# -- the suite, as users run it --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_nominal_run(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("vae"), "-m", "vae", "--conformance-profile", "nominal", "--tier", "default")


def test_vae_suite_passes_on_nominal_latents(vae_nominal_run):
    proc, report_dir = vae_nominal_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads((report_dir / "results.json").read_text())["cases"]
    ran = [c for c in cases if c["outcome"] != "skipped"]
    assert {c["component"] for c in ran} == set(vae.COMPONENTS)
    assert {c["precision"] for c in ran} == {"fp32", "bf16", "fp16", "fp8_e4m3"}
    for c in ran:
        assert c["outcome"] == "passed", (c["id"], c["failures"])
        assert c["stats"]["save_stage"]["ok"] and c["stats"]["save_stage"]["bad_pixels"] == 0
        assert c["backend_calls"].get("torch.sdpa", 0) >= 1
        assert "tiled_vs_full/pixels" in c["metrics_by_output"]
    for c in cases:
        if c["outcome"] == "skipped":
            assert c["reason"]
