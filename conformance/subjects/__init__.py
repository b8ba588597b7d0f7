"""Subjects: the implementations under test. ``load_subject(name)`` imports only the one asked for."""

from __future__ import annotations

from .base import Subject, SubjectError


def load_subject(name: str) -> Subject:
    if name == "diffusers":
        from .diffusers import DiffusersSubject

        return DiffusersSubject()
    raise SubjectError(f"unknown subject {name!r}; available: diffusers")
