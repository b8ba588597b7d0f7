"""Families: one module each (dims, canonical weight layout, streams, boundaries). Subject-neutral."""

from __future__ import annotations

from types import ModuleType

from . import qwen

FAMILIES: dict[str, ModuleType] = {"qwen": qwen}


def family_of(component: str) -> str:
    return component.split(".", 1)[0]


def get_family(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None
