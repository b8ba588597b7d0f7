"""Block cases on a deployment's own file (``--weights PATH --block N[,M...]``).

Each chosen block becomes a scale of the matrix (``conformance.scales.FileScale``): its dims are the file's, its
weights the block's tensors read lazily (``read_block``) and its embedders', its goldens float64 from the same weights
dequantized, in the local store under ``b<N>@<file id>``. A case whose precision is the file's own storage format
loads the tensors **as stored** (the file's fp8 bits and scales) into the ops the subject picks for that format
(``AS_STORED``); every other precision starts from the dequantized weights, as a deployment converting the file would.
"""

from __future__ import annotations

import torch

from .. import scales
from ..families import get_family
from .blocks import BlockWeights, file_id, read_block
from .detect import Checkpoint, open_checkpoint
from .files import CheckpointError

# storage format -> the precision kinds whose cases load the file's tensors as stored (conformance.precision kinds)
AS_STORED = {"scaled_fp8": ("fp8_scaled",), "fp8_blockwise": ("fp8_block",), "fp8": ("fp8_storage", "fp8_mm")}
AS_STORED_NOTE = "weights as stored in the file"  # how a subject's build says it loaded them so (stats.weights.as_stored)
NOT_AS_STORED = {
    "gguf": "no precision runs it as stored: ComfyUI core has no GGUF loader (the ComfyUI-GGUF custom node has one); "
    "every case starts from the weights dequantized by diffusers' GGUF kernels",
    "comfy_quant": "no precision runs it as stored: ComfyUI 0.3.50-0.3.64 have no ops for comfy_quant layers (they would "
    "load the fp8 weights without their weight_scale); every case starts from the dequantized weights",
}


class CheckpointWeights(dict):
    """A block's float32 weights in the canonical layout (what every precision but the file's own is built from),
    carrying the block as read: the stored tensors and the file's format."""

    def __init__(self, block: BlockWeights, weights: dict[str, torch.Tensor]) -> None:
        super().__init__(weights)
        self.block = block

    def as_stored_for(self, precision) -> dict[str, torch.Tensor] | None:
        """The stored tensors, where ``precision`` (a ``conformance.precision.Precision``) is the file's own format
        (block-wise: with the file's block size), else None: build from the dequantized weights."""
        fmt = self.block.checkpoint.format
        if precision is None or precision.kind not in AS_STORED.get(fmt.name, ()):
            return None
        if fmt.name == "fp8_blockwise" and (precision.block_size or 64) != fmt.block_size:
            return None
        if fmt.name == "fp8" and fmt.weight_dtype != "F8_E4M3":  # e5m2: the suite's unscaled fp8 paths are e4m3
            return None
        return self.block.stored


def parse_blocks(text: str | None, checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """``--block``: comma-separated indices (negative from the end), for every component of the file that has them;
    default first, middle and last of each. An index no block list has is named, not dropped (FLUX's two lists
    differ in length: one having it is enough)."""
    counts = checkpoint.block_counts
    if not text:
        return {component: checkpoint.default_blocks(component) for component in counts}
    ranges = ", ".join(f"{c}: 0-{n - 1}" for c, n in counts.items())
    out: dict[str, set[int]] = {component: set() for component in counts}
    for word in text.split(","):
        try:
            n = int(word)
        except ValueError:
            raise CheckpointError(checkpoint.path, f"--block {text!r}: {word!r} is not a block index") from None
        held = [c for c, count in counts.items() if 0 <= (n + count if n < 0 else n) < count]
        if not held:
            raise CheckpointError(checkpoint.path, f"--block {text}: no block {word} ({ranges})")
        for component in held:
            out[component].add(n + counts[component] if n < 0 else n)
    return {component: tuple(sorted(chosen)) for component, chosen in out.items()}


def register_file(path: str, blocks: str | None) -> tuple[Checkpoint, list[str]]:
    """Open ``path``, register a scale per chosen block, return the checkpoint and the scale names."""
    checkpoint = open_checkpoint(path)
    layout = get_family(checkpoint.family).checkpoint
    ident = file_id(checkpoint)
    chosen = parse_blocks(blocks, checkpoint)
    names = []
    for n in sorted({n for ns in chosen.values() for n in ns}):
        name = f"b{n}@{ident[:8]}"
        components = tuple(c for c, ns in chosen.items() if n in ns)
        for component in components:
            layout.dims_by_scale(component)[name] = checkpoint.model.dims[component]
        scales.register(scales.FileScale(name, str(path), ident, n, components, checkpoint=checkpoint))
        names.append(name)
    return checkpoint, names


def read_weights(scale: str, component: str, shapes: dict[str, tuple[int, ...]]) -> CheckpointWeights:
    """The block of ``scale`` for ``component``, checked against the shapes the subject builds it with."""
    found = scales.file_scale(scale)
    block = read_block(found.checkpoint, component, found.block)
    missing = sorted(set(shapes) - set(block.weights))
    if missing:
        raise CheckpointError(found.checkpoint.path, f"block {found.block} of {component}: no tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    wrong = [f"{k} {tuple(block.weights[k].shape)} (built: {shapes[k]})" for k in shapes if tuple(block.weights[k].shape) != tuple(shapes[k])]
    if wrong:
        raise CheckpointError(found.checkpoint.path, f"block {found.block} of {component}: wrong shapes {wrong[:4]}")
    found.dequantized[component] = list(block.notes)
    return CheckpointWeights(block, {k: block.weights[k] for k in shapes})


def describe_scale(scale: str, component: str) -> dict | None:
    """What a file scale's case ran on, for its result: the file, its format, the block, the dequantization."""
    found = scales.file_scale(scale)
    if found is None:
        return None
    checkpoint = found.checkpoint
    return {
        "file": found.path,
        "file_id": found.file_id,
        "variant": checkpoint.model.variant,
        "format": checkpoint.format.label,
        "component": component,
        "block": found.block,
        "blocks_in_file": checkpoint.block_counts.get(component),
        **({"as_stored_note": NOT_AS_STORED[checkpoint.format.name]} if checkpoint.format.name in NOT_AS_STORED else {}),
        "dequantized": found.dequantized.get(component, []),
    }
