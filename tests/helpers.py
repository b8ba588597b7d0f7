"""Shared helpers of the harness' own tests: an engine (on the diffusers subject unless told) with throwaway golden
stores."""

from __future__ import annotations

from pathlib import Path

import torch

from conformance.goldens import GoldenStore
from conformance.paths import GOLDEN_DIR
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
