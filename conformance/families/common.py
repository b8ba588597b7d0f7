"""Pieces every family uses: the ``Family`` declaration, the synthetic weight rule and the weight generator."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..axes import SUBJECTS
from ..boundaries import InputProbe
from ..synthetic import normal


@dataclass(frozen=True)
class LayerInit:
    """How synthetic weights are drawn, by the kind of tensor a key names.

    * ``*.bias``: N(0, bias_std)
    * other 1-D tensors (norm gains): N(norm_mean, norm_std)
    * parameter tables ``[1, n, dim]`` (WAN's modulation): N(0, 1 / sqrt(dim)), as the models initialise them
    * matrices and conv kernels: N(0, linear_gain / sqrt(fan_in)), which keeps activations at unit scale
    """

    bias_std: float
    norm_mean: float
    norm_std: float
    linear_gain: float

    def spec(self, key: str, shape: Sequence[int]) -> tuple[float, float]:
        if key.endswith("bias"):
            return 0.0, self.bias_std
        if len(shape) == 1:
            return self.norm_mean, self.norm_std
        if len(shape) == 3 and shape[0] == 1:
            return 0.0, 1.0 / math.sqrt(shape[-1])
        fan_in = math.prod(shape[1:])
        return 0.0, self.linear_gain / math.sqrt(fan_in)


@dataclass(frozen=True)
class FileModel:
    """What a checkpoint of a family holds, read from its keys and shapes alone: the published variant, and the suite's
    components it has blocks of, with their dims and the block list each is found under."""

    variant: str
    dims: Mapping[str, object]  # component -> the family's dims dataclass
    block_lists: Mapping[str, str]  # component -> block list name ("transformer_blocks")
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointLayout:
    """How a family's checkpoints are recognised and read (``conformance.checkpoints``). Keys here carry no model
    prefix (``model.diffusion_model.`` is stripped first)."""

    markers: tuple[str, ...]  # every one present: a checkpoint of this family in the canonical (original) layout
    describe: Callable[[Mapping[str, tuple[int, ...]]], FileModel]  # keys -> shapes of the file => what it holds
    after_blocks: tuple[str, ...]  # key prefixes after the blocks (final norm, head): not needed by block cases
    # a key of another layout of the family -> what that layout is (the file is refused with it)
    other_layouts: Mapping[str, str] = field(default_factory=dict)
    # component -> the table the family's code reads its dims from by scale (a file's dims are registered there)
    dims_by_scale: Callable[[str], dict] | None = None


@dataclass(frozen=True)
class Family:
    """A model family as the harness sees it apart from any subject, declared once as its module's ``FAMILY`` and
    registered in ``conformance.families.FAMILIES`` (docs/extending.md). The module keeps the rest: its dims, weight
    shapes and input builders, which the subjects' specs for its components call by name."""

    name: str  # the marker, the namespace of its synthetic weights' seeds, the profile file's name
    components: tuple[str, ...]
    init: LayerInit  # how its synthetic weights are drawn
    output_streams: Mapping[str, str]  # a block output -> the residual stream it continues (its outliers judged apart)
    boundary_names: Mapping[tuple[str, str], Mapping[str, str]]  # (subject, component) -> {module path: label}
    input_probes: Mapping[tuple[str, str], tuple[InputProbe, ...]]  # (subject, component) -> probes on module inputs
    xcheck_inputs: Mapping[tuple[str, str], Callable] = field(default_factory=dict)  # (subject, partner) -> converter
    fp8_compute_dtype: torch.dtype | None = None  # what fp8 paths compute in, where not the precision's own
    profile_file: str | None = None  # <profiles_dir>/<profile_file>.toml; None: the family's name
    profiles_dir: Path | None = None  # None: the suite's fixtures/profiles
    checkpoint: CheckpointLayout | None = None  # how its checkpoint files are read; None: the suite reads none

    @property
    def profiles(self) -> str:
        return self.profile_file or self.name


def for_every_subject(components: Iterable[str], value):
    """A ``Family`` table whose entry is the same for every subject and component (the subjects name modules alike)."""
    return {(subject, component): value for subject in SUBJECTS for component in components}


def by_subject(table: Mapping[str, Mapping[str, object]]):
    """A ``Family`` table from ``{subject: {component: entry}}``."""
    return {(subject, component): entry for subject, per_component in table.items() for component, entry in per_component.items()}


def synthetic_weights(
    shapes: Mapping[str, Sequence[int]], seed: int, family: str, init: LayerInit
) -> dict[str, torch.Tensor]:
    """Float32 weights for canonical keys; each tensor depends only on (seed, family, key, shape)."""
    out = {}
    for key, shape in shapes.items():
        mean, std = init.spec(key, shape)
        out[key] = normal(shape, seed, family, key, mean=mean, std=std)
    return out


def apply_weight_stress(weights: Mapping[str, torch.Tensor], stresses) -> dict[str, torch.Tensor]:
    """A profile's weight stresses (``profiles.WeightStress``) applied to a copy of ``weights``."""
    out = dict(weights)
    for stress in stresses:
        for key in stress.keys:
            if key not in out:
                near = sorted(k for k in out if k.split(".")[-1] == key.split(".")[-1])[:6]
                raise KeyError(f"weight stress names {key!r}, which these weights lack (same-suffix keys: {near})")
            tensor = out[key].clone()
            if stress.rows is None:
                tensor.mul_(stress.scale)
            else:
                rows = [r for r in stress.rows if r < tensor.shape[0]]
                tensor[rows] *= stress.scale
            out[key] = tensor
    return out


def apply_outliers(kwargs: dict, outliers, streams: Mapping[str, tuple[str, slice | None]]) -> dict:
    """Hold the profile's outlier channels of each residual stream at their values, for every token.

    ``streams`` maps a stream name of the profile (``img``, ``txt``) to the keyword the block takes it under and the
    tokens of that keyword that belong to the stream (None: all; a joint-stream block keeps text and image in one
    tensor). Returns a new dict; tensors that change are copied.
    """
    out = dict(kwargs)
    for group in outliers:
        if group.stream not in streams:
            raise KeyError(f"profile names stream {group.stream!r}; this component has {', '.join(streams)}")
        key, tokens = streams[group.stream]
        tensor = out[key].clone()
        width = tensor.shape[-1]
        view = tensor if tokens is None else tensor[:, tokens]
        for channel, value in zip(group.channels, group.values):
            if not 0 <= channel < width:
                raise IndexError(f"outlier channel {channel} outside the {key} width {width}")
            view[..., channel] = value
        out[key] = tensor
    return out


def outlier_channels(outliers, streams: Mapping[str, tuple[str, slice | None]]) -> dict[str, list[int]]:
    """The channels ``apply_outliers`` holds at fixed values, by the keyword of the tensor holding them."""
    out: dict[str, set[int]] = {}
    for group in outliers:
        key, _tokens = streams[group.stream]
        out.setdefault(key, set()).update(group.channels)
    return {key: sorted(channels) for key, channels in out.items()}


def scale_modulation(kwargs: dict, key: str, scale: float) -> dict:
    """Multiply the block's conditioning vector (the input every modulation linear reads) by ``scale``."""
    if scale == 1.0:
        return kwargs
    return {**kwargs, key: kwargs[key] * scale}
