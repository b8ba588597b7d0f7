"""Input profiles: data files in ``fixtures/profiles/<family>.toml`` turned into typed values."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .paths import PROFILES_DIR
from .scales import sizes_scale


@dataclass(frozen=True)
class Outliers:
    """Channels of one residual stream held at fixed magnitudes for every token (massive activations)."""

    stream: str
    channels: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class WeightStress:
    """Scale the synthetic weights named by ``keys`` (canonical layout of the family) by ``scale``: every element, or
    only the output rows ``rows`` (dimension 0). How a stress profile reproduces what trained weights do and synthetic
    ones do not: feed-forward rows that grow the massive channels, q/k norm gains that make the logits peaky."""

    keys: tuple[str, ...]
    scale: float
    rows: tuple[int, ...] | None = None
    components: tuple[str, ...] | None = None  # the components whose weights have these keys (None: every one)

    def applies(self, component: str) -> bool:
        return self.components is None or component in self.components


@dataclass(frozen=True)
class Sizes:
    image_grid: tuple[int, int]  # per frame, in packed tokens
    text_tokens: int
    frames: int = 1  # latent frames (video families)

    @property
    def image_tokens(self) -> int:
        return self.frames * self.image_grid[0] * self.image_grid[1]


@dataclass(frozen=True)
class Profile:
    family: str
    name: str
    description: str
    provenance: str
    timestep: float
    latent_std: float
    context_std: float
    sizes: dict[str, Sizes] = field(hash=False)
    outliers: tuple[Outliers, ...] = ()
    modulation_scale: float = 1.0  # multiplies the block's conditioning vector (temb / vec / e): gates grow with it
    latent_nonfinite: tuple[float, ...] = ()  # VAE profiles: NaN / Inf values written into the latent
    applies_to: tuple[str, ...] | None = None  # components the profile is meant for (None: every one of the family)
    weights: tuple[WeightStress, ...] = ()  # changes to the synthetic weights (goldens follow: they are keyed by profile)
    references: int = 0  # edit-style reference images, each of image_grid, appended to the image tokens (Qwen edit)

    def applies(self, component: str) -> bool:
        return self.applies_to is None or component in self.applies_to

    def sizes_for(self, scale: str) -> Sizes:
        try:
            return self.sizes[sizes_scale(scale)]
        except KeyError:
            raise KeyError(f"profile {self.family}/{self.name} defines no sizes for scale {scale!r}") from None


class ProfileError(ValueError):
    pass


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse(family: str, name: str, raw: dict, path: Path) -> Profile:
    where = f"{path}: [{name}]"
    for required in ("description", "provenance"):
        if not str(raw.get(required, "")).strip():
            raise ProfileError(f"{where} has no {required!r}; every profile says what it is and where its numbers come from")
    sizes = {}
    for scale in ("tiny", "real"):
        if scale in raw:
            grid = raw[scale].get("image_grid")
            if not (isinstance(grid, list) and len(grid) == 2):
                raise ProfileError(f"{where}.{scale}.image_grid must be [height, width] in packed tokens")
            sizes[scale] = Sizes(
                image_grid=(int(grid[0]), int(grid[1])),
                text_tokens=int(raw[scale]["text_tokens"]),
                frames=int(raw[scale].get("frames", 1)),
            )
    outliers = []
    for item in raw.get("outliers", []):
        channels, values = tuple(item["channels"]), tuple(float(v) for v in item["values"])
        if len(channels) != len(values):
            raise ProfileError(f"{where}: outliers for stream {item['stream']!r} list {len(channels)} channels but {len(values)} values")
        outliers.append(Outliers(stream=item["stream"], channels=channels, values=values))
    stresses = []
    for i, item in enumerate(raw.get("weights", [])):
        unknown = set(item) - {"keys", "scale", "rows", "components"}
        if unknown or "keys" not in item or "scale" not in item:
            raise ProfileError(f"{where}: weights[{i}] needs keys and scale (optionally rows, components); unknown fields {sorted(unknown)}")
        stresses.append(
            WeightStress(
                tuple(item["keys"]),
                float(item["scale"]),
                tuple(int(r) for r in item["rows"]) if "rows" in item else None,
                tuple(item["components"]) if "components" in item else None,
            )
        )
    return Profile(
        family=family,
        name=name,
        description=" ".join(str(raw["description"]).split()),
        provenance=" ".join(str(raw["provenance"]).split()),
        timestep=float(raw.get("timestep", 0.5)),
        latent_std=float(raw.get("latent_std", 1.0)),
        context_std=float(raw.get("context_std", 1.0)),
        sizes=sizes,
        outliers=tuple(outliers),
        modulation_scale=float(raw.get("modulation_scale", 1.0)),
        latent_nonfinite=tuple(float(v) for v in raw.get("latent_nonfinite", ())),
        applies_to=tuple(raw["applies_to"]) if "applies_to" in raw else None,
        weights=tuple(stresses),
        references=int(raw.get("references", 0)),
    )


@cache
def load_profiles(family: str, directory: Path = PROFILES_DIR) -> dict[str, Profile]:
    path = directory / f"{family}.toml"
    if not path.exists():
        raise ProfileError(f"no profile file for family {family!r}: expected {path}")
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    profiles = {}
    for name, raw in data.items():
        if "base" in raw:
            base = data.get(raw["base"])
            if base is None:
                raise ProfileError(f"{path}: [{name}] is based on unknown profile {raw['base']!r}")
            own_only = ("description", "provenance", "outliers", "modulation_scale", "latent_nonfinite", "applies_to", "weights", "references")
            inherited = {k: v for k, v in base.items() if k not in own_only}
            raw = _merge(inherited, {k: v for k, v in raw.items() if k != "base"})
        profiles[name] = _parse(family, name, raw, path)
    return profiles
