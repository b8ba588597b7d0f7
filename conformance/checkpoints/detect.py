"""What a checkpoint is, from its headers: the model prefix, the family and variant, the block counts, the storage
format; and what the subject's own detection says of it (ComfyUI's ``comfy.model_detection``), which must agree.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..families import FAMILIES
from ..families.common import FileModel
from .files import CheckpointError, TensorIndex, index_checkpoint
from .formats import StorageFormat, detect_format

# comfy.model_detection.unet_prefix_from_state_dict's candidates: all-in-one checkpoints, others, then none.
PREFIXES = ("model.diffusion_model.", "model.model.", "net.")


@dataclass
class Checkpoint:
    """A checkpoint the suite can read blocks of."""

    index: TensorIndex
    prefix: str
    family: str
    model: FileModel
    block_counts: dict[str, int]  # component -> blocks in the file
    format: StorageFormat
    notes: list[str] = field(default_factory=list)
    subject_detection: dict | None = None  # what the subject's own detection says (comfyui_detection)

    @property
    def path(self) -> Path:
        return self.index.path

    def default_blocks(self, component: str) -> tuple[int, ...]:
        """First, middle and last."""
        n = self.block_counts[component]
        return tuple(sorted({0, n // 2, n - 1}))

    def describe(self) -> dict:
        return {
            "file": str(self.index.path),
            "layout": self.index.layout,
            "bytes": self.index.total_bytes(),
            "prefix": self.prefix,
            "family": self.family,
            "variant": self.model.variant,
            "blocks": dict(self.block_counts),
            "format": self.format.as_dict(),
            "notes": [*self.model.notes, *self.notes],
            **({"subject_detection": self.subject_detection} if self.subject_detection else {}),
        }


def model_prefix(keys) -> str:
    """The model's key prefix, by ComfyUI's rule (``unet_prefix_from_state_dict``): the most frequent candidate with
    more than 5 keys, else none (a ``models/diffusion_models`` file)."""
    counts = Counter()
    for key in keys:
        for candidate in PREFIXES:
            if key.startswith(candidate):
                counts[candidate] += 1
                break
    best = [p for p, c in counts.most_common() if c > 5]
    return best[0] if best else ""


def count_blocks(keys, block_list: str) -> int:
    pattern = re.compile(rf"^{re.escape(block_list)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"{block_list} has gaps: no block {missing[:5]}")
    return len(indices)


def detect(index: TensorIndex) -> Checkpoint:
    prefix = model_prefix(index.keys())
    n = len(prefix)
    shapes = {k[n:]: e.shape for k, e in index.entries.items() if k.startswith(prefix)}
    for family in FAMILIES.values():
        layout = family.checkpoint
        if layout is None:
            continue
        for key, what in layout.other_layouts.items():
            if key in shapes:
                raise CheckpointError(index.path, what)
        if not all(marker in shapes for marker in layout.markers):
            continue
        try:
            model = layout.describe(shapes)
        except KeyError as error:
            raise CheckpointError(index.path, f"looks like {family.name} ({', '.join(layout.markers)}) but lacks {error.args[0]!r}") from None
        try:
            counts = {c: count_blocks(shapes, block_list) for c, block_list in model.block_lists.items()}
        except ValueError as error:
            raise CheckpointError(index.path, str(error)) from None
        if not all(counts.values()):
            raise CheckpointError(index.path, f"a {family.name} file with no blocks under {', '.join(model.block_lists.values())}")
        notes = [f"model prefix {prefix!r} stripped"] if prefix else []
        return Checkpoint(index, prefix, family.name, model, counts, detect_format(index, prefix), notes)
    sample = sorted(shapes)[:4]
    raise CheckpointError(
        index.path,
        f"unknown family: none of {', '.join(FAMILIES)} matches its keys (e.g. {sample}); the suite knows "
        + "; ".join(f"{f.name} by {' + '.join(f.checkpoint.markers)}" for f in FAMILIES.values() if f.checkpoint),
    )


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Index and identify the checkpoint at ``path``; ``CheckpointError`` (one line) when it cannot be used."""
    return detect(index_checkpoint(path))


# ComfyUI's model_detection names -> the suite's family
COMFY_IMAGE_MODELS = {"qwen_image": "qwen", "flux": "flux", "wan2.1": "wan"}
COMFY_DEPTHS = {"qwen": {"qwen.block": "num_layers"}, "flux": {"flux.double": "depth", "flux.single": "depth_single_blocks"}, "wan": {"*": "num_layers"}}


def comfyui_detection(comfy, checkpoint: Checkpoint) -> dict:
    """What ComfyUI's own ``comfy.model_detection`` makes of the file's header (meta tensors: nothing is read): its
    unet config, the ``supported_models`` class it matches, and its block counts, which must be the suite's."""
    from ..workloads.comfyui import placeholders

    placeholders()  # model_detection imports every model class (Cosmos needs torchvision): absent packages stand in
    detection = comfy.module("comfy.model_detection")
    meta = {k: torch.empty(e.shape, dtype=e.torch_dtype or torch.float32, device="meta") for k, e in checkpoint.index.entries.items()}
    prefix = detection.unet_prefix_from_state_dict(meta)
    if not any(k.startswith(prefix) for k in meta):  # as load_diffusion_model_state_dict: no such keys, no prefix
        prefix = ""
    config = detection.detect_unet_config(dict(meta), prefix)
    if config is None:
        raise CheckpointError(checkpoint.path, f"ComfyUI {comfy.version}'s model_detection does not recognise this file")
    model_config = detection.model_config_from_unet(dict(meta), prefix)  # pops and reads the scaled_fp8 marker
    family = COMFY_IMAGE_MODELS.get(config.get("image_model"), config.get("image_model"))
    counts = {}
    for component, name in COMFY_DEPTHS.get(family, {}).items():
        for own in checkpoint.block_counts if component == "*" else (component,):
            counts[own] = config.get(name)
    result = {
        "comfyui": comfy.version,
        "prefix": prefix,
        "image_model": config.get("image_model"),
        "model_type": config.get("model_type"),
        "supported_model": type(model_config).__name__ if model_config is not None else None,
        "blocks": counts,
        "scaled_fp8": str(getattr(model_config, "scaled_fp8", None)) if model_config is not None else None,
    }
    disagree = []
    if prefix != checkpoint.prefix:
        disagree.append(f"prefix {prefix!r} (suite: {checkpoint.prefix!r})")
    unread = sorted(c for c, n in counts.items() if n is None)
    if unread:  # ComfyUI 0.3.50 reads no Qwen block count: it builds its default (60)
        result["notes"] = [f"ComfyUI {comfy.version}'s detection does not count the {', '.join(unread)} blocks (it builds its default number)"]
    counted = {c: n for c, n in counts.items() if n is not None}
    if family != checkpoint.family:
        disagree.append(f"family {config.get('image_model')} (suite: {checkpoint.family})")
    elif counted != {c: checkpoint.block_counts.get(c) for c in counted}:
        disagree.append(f"blocks {counts} (suite: {checkpoint.block_counts})")
    if disagree:
        raise CheckpointError(checkpoint.path, f"ComfyUI {comfy.version}'s model_detection disagrees with the suite: {'; '.join(disagree)}")
    return result

