"""Families: one module each (dims, canonical weight layout, streams, boundaries), each declaring its ``Family``.
Subject-neutral. ``FAMILIES`` is the registry: a new family is a module with its ``FAMILY``, an entry here (or
``register_family`` from outside), one spec per subject and its profile file (docs/extending.md)."""

from __future__ import annotations

from .. import captures
from ..axes import FAMILY_NAMES
from ..paths import PROFILES_DIR
from ..precision import Precision, get_precision
from ..profiles import Profile, load_profiles
from . import flux, qwen, vae, wan
from .common import Family

FAMILIES: dict[str, Family] = {family.name: family for family in (qwen.FAMILY, flux.FAMILY, wan.FAMILY)}
assert tuple(FAMILIES) == FAMILY_NAMES, "conformance.axes.FAMILY_NAMES names the families the command line knows"
DECODERS: Family = vae.FAMILY


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (a test's or a plugin's family); its components' cases need a subject spec."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def family_of(component: str) -> str:
    return component.split(".", 1)[0]


def is_vae(component: str) -> bool:
    return component in DECODERS.components


def component_family(component: str) -> Family:
    """The declaration behind a component's weights, outputs and streams: its family's, or the decoders' one."""
    return DECODERS if is_vae(component) else get_family(family_of(component))


def component_profiles(component: str) -> dict[str, Profile]:
    """Every input profile of the component's profile file (each profile says which components it applies to)."""
    family = component_family(component)
    profiles = load_profiles(family.profiles, family.profiles_dir or PROFILES_DIR)
    captured = captures.profiles_for(component)  # --profile captured:PATH (conformance.captures)
    return {**profiles, **captured} if captured else profiles


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_precision(name: str, family: str) -> Precision:
    """The precision as this family runs it: fp8 paths compute in the family's default dtype (WAN: fp16)."""
    precision = get_precision(name)
    compute = get_family(family).fp8_compute_dtype
    if precision.is_fp8 and compute is not None and compute != precision.compute_dtype:
        return precision.with_compute(compute)
    return precision
