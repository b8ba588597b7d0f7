"""The matrix: every case the options ask for, each with the reasons it cannot run here (if any).

Reasons come from the precision policy and the subject's backend support; they become skip messages in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS, XCHECK
from .case import Case
from .families import family_of, profile_family
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
        available_profiles = {n: p for n, p in load_profiles(profile_family(component)).items() if p.applies(component)}
        for scale in scales:
            for profile in profiles or tuple(available_profiles):
                if profile not in available_profiles:
                    continue
                for precision in PRECISIONS.values():
                    precision_reasons = precision.not_supported_reasons(device) + list(subject.precision_support(precision, device, component))
                    for backend in BACKENDS:
                        support = subject.backend_support(backend, device, component)
                        # One reason is enough to skip: the precision's, else the backend's.
                        reasons = [f"{precision.name}: {r}" for r in precision_reasons]
                        reasons = reasons or [f"{backend}: {r}" for r in support.reasons]
                        for guard in guards:
                            case = Case(subject.name, family, component, scale, precision.name, backend, profile, guard)
                            entries.append(MatrixEntry(case, "; ".join(reasons) or None))
                if subject.xcheck_partner:
                    case = Case(subject.name, family, component, scale, "fp32", XCHECK, profile)
                    reason = subject.xcheck_reason(component) or _partner_reason(subject.xcheck_partner)
                    entries.append(MatrixEntry(case, reason))
    return entries


def _partner_reason(partner: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(partner) is None:
        return f"xcheck: the partner implementation {partner} is not installed"
    return None
