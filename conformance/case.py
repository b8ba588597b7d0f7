"""One point of the matrix: subject x family x component x scale x precision x backend x profile x guard, and for a
whole-model case (component ``<family>.model``) the sequence it runs after and the patch installed
(``conformance.workloads``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .precision import get_precision


@dataclass(frozen=True)
class Case:
    subject: str
    family: str
    component: str
    scale: str
    precision: str
    backend: str
    profile: str
    guard: str = "none"
    sequence: str = "none"  # a whole-model case: what the process ran before it (workloads.sequences.SEQUENCES)
    patch: str = "none"  # a whole-model case: the third-party patch installed on every model (workloads.patches)

    @property
    def id(self) -> str:
        parts = [self.subject, self.component, self.scale, self.precision, self.backend, self.profile]
        if self.guard != "none":
            parts.append(f"guard={self.guard}")
        if self.sequence != "none":
            parts.append(f"seq={self.sequence}")
        if self.patch != "none":
            parts.append(f"patch={self.patch}")
        return "-".join(parts)

    @property
    def kind(self) -> str:
        """``block``, ``vae`` or ``sequence`` (a whole model after a sequence of others)."""
        if self.sequence != "none":
            return "sequence"
        return "vae" if ".vae" in self.component else "block"

    def markers(self) -> list[str]:
        precision_marker = get_precision(self.precision).marker
        names = [self.family, precision_marker, f"{self.family}_{precision_marker}", self.backend]
        if self.precision != precision_marker:  # an fp8 variant: `-m fp8` takes them all, `-m fp8_scaled` one
            names += [self.precision, f"{self.family}_{self.precision}"]
        if self.scale == "real":
            names.append("real")
        elif self.scale != "tiny":  # a block of a checkpoint file (--weights: conformance.scales)
            names.append("checkpoint")
        if self.kind == "vae":
            names.append("vae")
        if self.guard != "none":
            names.append("guard")
        if self.kind == "sequence":
            names.append("sequence")
            if "*" in self.sequence:  # a model run many times over (workloads.sequences.REPEAT)
                names.append("lifecycle")
        if self.patch != "none":
            names.append("patch")
        return names

    def as_dict(self) -> dict:
        return asdict(self)

