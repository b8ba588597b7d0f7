"""Families: one module each (dims, canonical weight layout, streams, boundaries). Subject-neutral."""

from __future__ import annotations

from types import ModuleType

from ..axes import FAMILY_NAMES
from ..precision import Precision, get_precision
from . import flux, qwen, vae, wan

FAMILIES: dict[str, ModuleType] = dict(zip(FAMILY_NAMES, (qwen, flux, wan), strict=True))


def family_of(component: str) -> str:
    return component.split(".", 1)[0]


def is_vae(component: str) -> bool:
    return component in vae.COMPONENTS


def component_module(component: str) -> ModuleType:
    """The module defining a component's weights, outputs and streams: its family's, or ``vae`` for decoders."""
    return vae if is_vae(component) else get_family(family_of(component))


def profile_family(component: str) -> str:
    """Which ``fixtures/profiles/<name>.toml`` holds the component's input profiles."""
    return vae.FAMILY if is_vae(component) else family_of(component)


def get_family(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_precision(name: str, family: str) -> Precision:
    """The precision as this family runs it: fp8 paths compute in the family's default dtype (WAN: fp16)."""
    precision = get_precision(name)
    compute = getattr(get_family(family), "FP8_COMPUTE_DTYPE", None)
    if precision.is_fp8 and compute is not None and compute != precision.compute_dtype:
        return precision.with_compute(compute)
    return precision
