"""The subjects the benchmarks time, built once per process and shared by every benchmark file: diffusers, plus
ComfyUI when ``COMFYUI_PATH`` names a checkout (ComfyUI can be imported once per process). Goldens go to temporary
stores: a benchmark never compares."""

from __future__ import annotations

import os

import torch

from conformance.goldens import GoldenStore
from conformance.runner import Engine, EngineOptions
from conformance.subjects import load_subject

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUBJECTS = ["diffusers"] + (["comfyui"] if os.environ.get("COMFYUI_PATH") else [])
_ENGINES: dict[str, Engine] = {}


def engine(subject: str, tmp_path_factory) -> Engine:
    if subject not in _ENGINES:
        kwargs = {"comfyui_path": os.environ["COMFYUI_PATH"], "device": DEVICE} if subject == "comfyui" else {}
        store = tmp_path_factory.mktemp("stores")
        _ENGINES[subject] = Engine(
            load_subject(subject, **kwargs),
            EngineOptions(device=DEVICE, committed_store=GoldenStore(store / "c", "c"), local_store=GoldenStore(store / "l", "l")),
        )
    return _ENGINES[subject]
