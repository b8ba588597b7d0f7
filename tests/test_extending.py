"""docs/extending.md's recipes, followed from test code. A new attention backend is one row in
``conformance.backends.BACKENDS`` and one name mapping per subject; a new family is a ``Family`` value, one spec per
subject and a profile file. The matrix, the markers, the guards, the report order and a real case pick them up."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from conformance.backends import BACKENDS, Backend, backend_order
from conformance.guards import support_reason
from conformance.matrix import build_matrix
from conformance.subjects import load_subject

from .helpers import diffusers_subject, engine

CPU = torch.device("cpu")
TOY = Backend("toy_sdpa", "torch SDPA under a throwaway name (tests/test_extending.py)", sdpa=True)


@pytest.fixture
def toy_backend(monkeypatch):
    """The recipe's one row."""
    monkeypatch.setitem(BACKENDS, TOY.name, TOY)
    return TOY


def _runnable(subject, component: str, backend: str):
    entries = [e for e in build_matrix(subject, CPU) if e.case.backend == backend and e.case.component == component]
    assert entries, f"the matrix has no {backend} case of {component}"
    return entries


def test_a_throwaway_backend_runs_a_diffusers_case(toy_backend, monkeypatch, tmp_path):
    from conformance.subjects import diffusers as diffusers_module

    monkeypatch.setitem(diffusers_module.BACKEND_NAMES, TOY.name, "native")  # the subject's one mapping
    subject = diffusers_subject()
    entries = _runnable(subject, "qwen.block", TOY.name)
    case = next(e.case for e in entries if e.skip_reason is None and e.case.precision == "fp32" and e.case.profile == "nominal")
    assert TOY.name in case.markers() and backend_order()[-2:] == (TOY.name, "xcheck")
    assert support_reason("upcast_attention", "qwen", "qwen.block", "fp16", TOY.name, False) is None  # an SDPA row

    result = engine(tmp_path).run(case)
    assert result.outcome == "passed", result.reason
    assert result.backend_calls.get("diffusers:native", 0) > 0, result.backend_calls
    # the same kernel under another name: the same numbers as the reference backend's case
    reference = engine(tmp_path).run(type(case)(**{**case.as_dict(), "backend": "sdpa"}))
    assert result.metrics_by_output == reference.metrics_by_output

    # a decoder adapter offers only its own list: the new row is a skip with its reason, not a crash
    vae = _runnable(subject, "qwen.vae", TOY.name)
    assert all(e.skip_reason for e in vae) and any("only sdpa, math" in e.skip_reason for e in vae)


def test_without_the_mapping_the_backend_is_a_skip_with_a_reason(toy_backend):
    entries = _runnable(diffusers_subject(), "qwen.block", TOY.name)
    assert all(e.skip_reason and "not offered by diffusers" in e.skip_reason for e in entries)


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI checkout (COMFYUI_PATH)")
def test_a_throwaway_backend_runs_a_comfyui_case(toy_backend, monkeypatch, tmp_path):
    from conformance.subjects.comfyui import attention

    monkeypatch.setitem(attention.FUNCTIONS, TOY.name, "attention_pytorch")  # the subject's one mapping
    subject = load_subject("comfyui", comfyui_path=Path(os.environ["COMFYUI_PATH"]))
    entries = _runnable(subject, "flux.single", TOY.name)
    case = next(e.case for e in entries if e.skip_reason is None and e.case.precision == "fp32" and e.case.profile == "nominal")
    result = engine(tmp_path, subject=subject).run(case)
    assert result.outcome == "passed", result.reason
    assert result.backend_calls.get("comfy:attention_pytorch", 0) > 0, result.backend_calls


# -- a family ----------------------------------------------------------------------------------------------------------
TOY_PROFILES = """
[nominal]
description = "a throwaway family's one profile (tests/test_extending.py)"
provenance = "FLUX.1's nominal inputs at the tiny sizes"
timestep = 0.5
latent_std = 1.0
context_std = 1.0

[nominal.tiny]
image_grid = [8, 8]
text_tokens = 16

[nominal.real]
image_grid = [64, 64]
text_tokens = 512
"""


def test_a_throwaway_family_runs_a_case(monkeypatch, tmp_path):
    """A family named ``toy`` whose one component is a FLUX single-stream block of diffusers' classes: its
    ``Family`` (registered), its diffusers spec and its profile file, nothing else."""
    from conformance import families
    from conformance.families import flux
    from conformance.families.common import Family, by_subject
    from conformance.subjects.diffusers import DiffusersSubject, blocks

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "toy.toml").write_text(TOY_PROFILES)
    toy = Family(
        name="toy",
        components=("toy.single",),
        init=flux.INIT,
        output_streams={"txt": "txt", "img": "img"},
        boundary_names=by_subject({"diffusers": {"toy.single": flux.BOUNDARY_NAMES["diffusers"]["flux.single"]}}),
        input_probes=by_subject({"diffusers": {"toy.single": flux.INPUT_PROBES["diffusers"]["flux.single"]}}),
        profiles_dir=tmp_path / "profiles",
    )
    monkeypatch.setitem(families.FAMILIES, toy.name, toy)  # families.register_family(toy), undone after the test
    spec = dataclasses.replace(
        blocks.FLUX_SINGLE,
        component="toy.single",
        to_own=lambda state, dims: flux.to_diffusers("flux.single", state, dims),
        canonical_shapes=lambda scale: flux.weight_shapes("flux.single", scale),
    )
    monkeypatch.setitem(blocks.SPECS, spec.component, spec)
    subject = DiffusersSubject()

    entries = [e for e in build_matrix(subject, CPU) if e.case.component == "toy.single"]
    assert {e.case.profile for e in entries} == {"nominal"} and {e.case.family for e in entries} == {"toy"}
    case = next(e.case for e in entries if e.skip_reason is None and e.case.precision == "fp16" and e.case.backend == "sdpa")
    assert {"toy", "toy_fp16"} <= set(case.markers())

    # a new component's tiny goldens are committed ones: made by --update-goldens (here into a throwaway store)
    result = engine(tmp_path, committed=tmp_path / "committed", subject=subject, update_goldens=True).run(case)
    assert result.outcome == "passed", result.reason
    assert (tmp_path / "committed").exists()
    assert result.boundaries and result.metrics_by_output["img"]["rel_l2"] > 0  # probed, compared with its own golden
