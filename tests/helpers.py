"""Shared helpers of the harness' own tests: an engine (on the diffusers subject unless told) with throwaway golden
stores."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from conformance.goldens import GoldenStore
from conformance.paths import GOLDEN_DIR, REPO_ROOT
from conformance.runner import Engine, EngineOptions
from conformance.subjects import load_subject

_SUBJECT = None


def diffusers_subject():
    global _SUBJECT
    if _SUBJECT is None:
        _SUBJECT = load_subject("diffusers")
    return _SUBJECT


def engine(tmp_path: Path, committed: Path = GOLDEN_DIR, subject=None, **options) -> Engine:
    return Engine(
        subject or diffusers_subject(),
        EngineOptions(
            device=torch.device("cpu"),
            committed_store=GoldenStore(committed, "committed"),
            local_store=GoldenStore(tmp_path / "local", "local"),
            **options,
        ),
    )


@functools.cache
def checkpoint_maker():
    """``fixtures/make_checkpoints.py`` as a module (the checkpoint fixtures' writer; not a package)."""
    spec = importlib.util.spec_from_file_location("make_checkpoints", REPO_ROOT / "fixtures" / "make_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
