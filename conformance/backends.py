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

@dataclass(frozen=True)
class Backend:
    """An attention backend, declared once. Subjects keep only their mapping of ``name`` onto their own attention
    functions; what it needs and what proves it ran is here, and guards, the matrix and the reports read it from here."""

    name: str
    description: str
    package: tuple[str, str] | None = None  # the kernel package it needs: (module to import, distribution)
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types its kernel runs on
    sdpa: bool = False  # it runs through torch's scaled_dot_product_attention (what upcast_attention intercepts)
    kernel: str | None = None  # the package's entry point a spy counts as proof it ran (CallCounter label)

    def device_reasons(self, device) -> list[str]:
        return [] if device.type in self.devices else [f"needs a {' or '.join(d.upper() for d in self.devices)} device"]


# In report order. A new backend is a row here plus one mapping per subject (docs/extending.md).
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("sdpa", "torch scaled_dot_product_attention, torch picks the kernel", sdpa=True),
        Backend("math", "torch SDPA pinned to the math kernel", sdpa=True),
        Backend("split", "ComfyUI attention_split (query-sliced einsum)"),
        Backend("sub_quad", "ComfyUI attention_sub_quad (chunked, memory-efficient)"),
        Backend("basic", "ComfyUI attention_basic (full einsum)"),
        Backend(
            "xformers", "xformers memory_efficient_attention", package=("xformers", "xformers"), devices=("cuda",),
            kernel="xformers.ops.memory_efficient_attention",
        ),
        Backend(
            "sage", "SageAttention (INT8 QK, fp16/fp8 PV)", package=("sageattention", "sageattention"), devices=("cuda",),
            kernel="sageattention.sageattn",
        ),
        Backend(
            "flash", "flash-attn flash_attn_func", package=("flash_attn", "flash-attn"), devices=("cuda",),
            kernel="flash_attn.flash_attn_func",
        ),
    )
}  # fmt: skip


def backend_order() -> tuple[str, ...]:
    """Backend names in report order, the cross-implementation check last."""
    return (*BACKENDS, XCHECK)


def table_reasons(backend: str, device) -> list[str]:
    """Why ``backend`` cannot run on ``device`` by its row alone: its package, its devices. Subjects add their own."""
    row = BACKENDS[backend]
    return [*(package_reasons(*row.package) if row.package else []), *row.device_reasons(device)]


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
