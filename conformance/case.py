"""One point of the matrix: subject x family x component x scale x precision x backend x profile x guard."""

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

    @property
    def id(self) -> str:
        parts = [self.subject, self.component, self.scale, self.precision, self.backend, self.profile]
        if self.guard != "none":
            parts.append(f"guard={self.guard}")
        return "-".join(parts)

    @property
    def kind(self) -> str:
        """``block`` or ``vae``: the part after the family in the component name decides."""
        return "vae" if ".vae" in self.component else "block"

    def markers(self) -> list[str]:
        precision_marker = get_precision(self.precision).marker
        names = [self.family, precision_marker, f"{self.family}_{precision_marker}", self.backend]
        if self.precision != precision_marker:  # an fp8 variant: `-m fp8` takes them all, `-m fp8_scaled` one
            names += [self.precision, f"{self.family}_{self.precision}"]
        if self.scale == "real":
            names.append("real")
        if self.kind == "vae":
            names.append("vae")
        if self.guard != "none":
            names.append("guard")
        return names

    def as_dict(self) -> dict:
        return asdict(self)

