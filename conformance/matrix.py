"""The matrix: every case the options ask for, each with the reasons it cannot run here (if any).

Reasons come from the precision policy and the subject's backend support; they become skip messages in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS, XCHECK
from .case import Case
from .captures import captured
from .families import component_profiles, family_of, get_family, is_vae
from .guards import support_reason
from .precision import PRECISIONS
from .scales import applies, file_scale
from .subjects.base import Subject


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
    patches: tuple[str, ...] = (),
) -> list[MatrixEntry]:
    on_a_file = any(file_scale(s) for s in scales)  # --weights: the file's blocks only, no synthetic whole models
    entries = [] if on_a_file else _whole_model_entries(subject, device, patches)
    for component, reason in subject.unavailable_components().items():
        entries += _unavailable(subject, component, reason, tuple(s for s in scales if applies(s, component)), profiles, guards)
    for component in subject.components():
        family = family_of(component)
        available_profiles = {n: p for n, p in component_profiles(component).items() if p.applies(component)}
        for scale in (s for s in scales if applies(s, component)):
            for profile in profiles or tuple(available_profiles):
                if profile not in available_profiles:
                    continue
                profile_reason = subject.profile_reason(component, available_profiles[profile]) or _scale_profile_reason(subject, scale, component, available_profiles[profile])
                for precision in PRECISIONS.values():
                    precision_reasons = precision.not_supported_reasons(device) + list(subject.precision_support(precision, device, component))
                    for backend in BACKENDS:
                        support = subject.backend_support(backend, device, component)
                        for guard in guards:
                            # One reason is enough to skip: the profile's, else the precision's, the backend's, the guard's.
                            guard_reason = support_reason(guard, family, component, precision.name, backend, is_vae(component))
                            reasons = (
                                [f"profile {profile}: {profile_reason}"] if profile_reason else []
                            ) or [f"{precision.name}: {r}" for r in precision_reasons] or [f"{backend}: {r}" for r in support.reasons] or (
                                [f"guard {guard}: {guard_reason}"] if guard_reason else []
                            )
                            case = Case(subject.name, family, component, scale, precision.name, backend, profile, guard)
                            entries.append(MatrixEntry(case, "; ".join(reasons) or None))
                if subject.xcheck_partner:
                    case = Case(subject.name, family, component, scale, "fp32", XCHECK, profile)
                    reason = subject.xcheck_reason(component) or (f"profile {profile}: {profile_reason}" if profile_reason else None) or _partner_reason(subject.xcheck_partner)
                    entries.append(MatrixEntry(case, reason))
    return entries


def _scale_profile_reason(subject: Subject, scale: str, component: str, profile) -> str | None:
    """Why a profile does not run at a scale: a checkpoint's block is tested with its own weights (no weight stress);
    a capture runs on blocks of its own width, on a file only on the block it was captured at, and on a subject
    other than the one it was captured from only through the family's conversion of its inputs."""
    found = file_scale(scale)
    if found and any(w.applies(component) for w in profile.weights):
        return "rescales the synthetic weights; a checkpoint's blocks run with the file's weights as they are"
    record = captured(profile.name)
    if record is None:
        return None
    dims = get_family(family_of(component)).checkpoint.dims_by_scale(component)[scale]
    if record.width != dims.dim:
        return f"captured from a model {record.width} wide; {component} at {scale} is {dims.dim} wide"
    if found and record.record["block"] != found.block:
        return f"captured at block {record.record['block']}, not block {found.block}"
    if subject.name != "comfyui" and ("comfyui", subject.name) not in get_family(family_of(component)).xcheck_inputs:
        return f"a ComfyUI capture; the suite has no conversion of {component}'s inputs to {subject.name}'s form"
    return None


def _whole_model_entries(subject: Subject, device: torch.device, patches: tuple[str, ...]) -> list[MatrixEntry]:
    """The sequence cases (``conformance.workloads.cases``), each skipped with the subject's or precision's reason."""
    from .workloads.cases import sequence_cases
    from .workloads.lifecycle import judged, not_judged_reason
    from .workloads.sequences import REPEAT

    subject_reason = subject.whole_models_reason()
    entries = []
    for case in sequence_cases(subject.name, subject.reference_backend, patches):
        precision = PRECISIONS[case.precision]
        reasons = [subject_reason] if subject_reason else [f"{precision.name}: {r}" for r in precision.not_supported_reasons(device)]
        if not reasons and case.sequence == REPEAT and not judged(device):
            reasons = [f"lifecycle: {not_judged_reason(device)}"]
        entries.append(MatrixEntry(case, "; ".join(reasons) or None))
    return entries


def _unavailable(subject: Subject, component: str, reason: str, scales, profiles, guards) -> list[MatrixEntry]:
    """The cases of a component the subject cannot offer: in the matrix, skipped with the one reason (so a gate sees
    a component that ran in its baseline and no longer builds)."""
    family = family_of(component)
    available = [n for n, p in component_profiles(component).items() if p.applies(component)]
    out = []
    for scale in scales:
        for profile in profiles or tuple(available):
            if profile not in available:
                continue
            for precision in PRECISIONS:
                for backend in BACKENDS:
                    for guard in guards:
                        out.append(MatrixEntry(Case(subject.name, family, component, scale, precision, backend, profile, guard), f"{component}: {reason}"))
    return out


def _partner_reason(partner: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(partner) is None:
        return f"xcheck: the partner implementation {partner} is not installed"
    return None
