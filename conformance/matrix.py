"""The matrix: every case the options ask for, each with the reasons it cannot run here (if any).

Reasons come from the precision policy and the subject's backend support; they become skip messages in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS
from .case import Case
from .families import family_of
from .precision import PRECISIONS
from .profiles import load_profiles
from .subjects.base import Subject

SCALES = ("tiny", "real")


@dataclass(frozen=True)
class MatrixEntry:
    case: Case
    skip_reason: str | None = None


def build_matrix(
    subject: Subject,
    device: torch.device,
    scales: tuple[str, ...] = ("tiny",),
    profiles: tuple[str, ...] | None = None,
    guards: tuple[str, ...] = ("none",),
) -> list[MatrixEntry]:
    entries = []
    for component in subject.components():
        family = family_of(component)
        available_profiles = load_profiles(family)
        for scale in scales:
            for profile in profiles or tuple(available_profiles):
                if profile not in available_profiles:
                    continue
                for precision in PRECISIONS.values():
                    precision_reasons = precision.not_supported_reasons(device)
                    for backend in BACKENDS:
                        support = subject.backend_support(backend, device)
                        reasons = [f"{precision.name}: {r}" for r in precision_reasons]
                        reasons += [f"{backend}: {r}" for r in support.reasons]
                        for guard in guards:
                            case = Case(subject.name, family, component, scale, precision.name, backend, profile, guard)
                            entries.append(MatrixEntry(case, "; ".join(reasons) or None))
    return entries
