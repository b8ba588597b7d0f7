"""Attention backend names, and the counting spy that proves a kernel ran.

Every subject maps these names onto its own attention functions and says, per name, why it cannot run (package
missing, needs CUDA, not offered by this subject). An empty list of reasons means available. The matrix turns
reasons into skip messages in one place.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

BACKENDS: dict[str, str] = {
    "sdpa": "torch scaled_dot_product_attention, torch picks the kernel",
    "math": "torch SDPA pinned to the math kernel",
    "split": "ComfyUI attention_split (query-sliced einsum)",
    "sub_quad": "ComfyUI attention_sub_quad (chunked, memory-efficient)",
    "basic": "ComfyUI attention_basic (full einsum)",
    "xformers": "xformers memory_efficient_attention",
    "sage": "SageAttention (INT8 QK, fp16/fp8 PV)",
    "flash": "flash-attn flash_attn_func",
}

# Not a backend: the cross-implementation check (same weights and inputs through two subjects' blocks, fp32).
XCHECK = "xcheck"


@dataclass(frozen=True)
class BackendSupport:
    name: str
    reasons: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return not self.reasons


class CallCounter:
    """Counts calls per kernel label. ``wrap`` returns a function that counts, then calls the original."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.fallbacks: list[str] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        """Count a call once it has returned: a kernel that raised (and was replaced by a fallback) did not run."""

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.counts[label] += 1
            return out

        counted.__wrapped_by_conformance__ = True  # type: ignore[attr-defined]
        return counted

    def record_fallback(self, message: str) -> None:
        self.fallbacks.append(message)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def package_reasons(module: str, distribution: str | None = None) -> list[str]:
    """Why an optional kernel package cannot be used here, without importing it.

    Catches the cases seen on GPU runners: the package is missing; its build metadata names another torch (the
    registry's xformers 0.0.35 wheel says torch 2.10.0 in xformers/cpp_lib.json, and its C++ library does not load
    under torch 2.11); its wheel pins another torch exactly.
    """
    import importlib.metadata
    import importlib.util
    import re

    import torch

    distribution = distribution or module
    spec = importlib.util.find_spec(module)
    if spec is None:
        return [f"package {distribution} is not installed"]
    built_for = _built_for_torch(spec)
    if built_for and _base_version(built_for) != _base_version(torch.__version__):
        return [f"{distribution} was built for torch {built_for} and does not load with torch {torch.__version__}"]
    try:
        version = importlib.metadata.version(distribution)
        requires = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    for requirement in requires:
        match = re.match(r"^torch\s*==\s*([0-9][^;,\s]*)", requirement)
        if match and _base_version(match.group(1)) != _base_version(torch.__version__):
            return [
                f"{distribution} {version} was built for torch {match.group(1)} and does not load with "
                f"torch {torch.__version__}"
            ]
    return []


def _built_for_torch(spec) -> str | None:
    """The torch a compiled kernel package was built against, from its own build metadata (xformers: cpp_lib.json)."""
    import json
    from pathlib import Path

    for location in spec.submodule_search_locations or []:
        info = Path(location) / "cpp_lib.json"
        if info.exists():
            try:
                return json.loads(info.read_text())["version"]["torch"]
            except (ValueError, KeyError):
                return None
    return None
