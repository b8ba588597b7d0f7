"""Subjects: the implementations under test. ``load_subject(name)`` imports only the one asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from ..axes import SUBJECTS
from .base import Subject, SubjectError


def load_subject(name: str, *, comfyui_path: str | Path | None = None, device: torch.device | None = None) -> Subject:
    if name == "diffusers":
        from .diffusers import DiffusersSubject

        return DiffusersSubject(device)
    if name == "comfyui":
        if not comfyui_path:
            raise SubjectError("the comfyui subject needs a checkout: --comfyui PATH or COMFYUI_PATH")
        from .comfyui import ComfyUISubject

        return ComfyUISubject(comfyui_path, device or torch.device("cpu"))
    raise SubjectError(f"unknown subject {name!r}; available: {', '.join(SUBJECTS)}")
