"""A subject's identity by content: a hash of the Python sources its components are built from.

Release zips and container images carry no ``.git``, so a version string alone names many trees (every commit
between two releases reads the same ``comfyui_version.py``). The hash covers the files the suite's adapters import
and their neighbours (ComfyUI: ``comfy/`` and ``comfy_extras/`` and the version file; diffusers: its package), by
relative path and content, so two copies of one tree hash alike wherever they lie and however they were copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def python_files(root: Path, parts: Iterable[str]) -> list[Path]:
    """Every ``*.py`` under the directories (or the single files) ``parts`` of ``root``, skipping caches."""
    out: list[Path] = []
    for part in parts:
        path = root / part
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(set(out))


def source_hash(root: Path, parts: Iterable[str]) -> str:
    """sha256 over (relative path, sha256 of the content) of every Python source under ``parts``."""
    h = hashlib.sha256()
    for path in python_files(root, parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
