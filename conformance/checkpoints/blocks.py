"""One block of a checkpoint, read lazily: its stored tensors (for the subject's own ops) and the same weights
dequantized to float32 in the canonical layout (what goldens are computed from), with the embedder tensors the
block's inputs are built with, and the identity its goldens are keyed by.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch

from ..families import get_family
from .detect import Checkpoint
from .files import CheckpointError
from .formats import MARKER, dequantize


@dataclass
class BlockWeights:
    """One block as read: the stored tensors (block-local keys ``attn.to_q.weight`` + embedder keys, as the file
    stores them); ``weights`` dequantizes them to float32 on first use (the read itself holds the block's bytes once:
    docs/benchmarks.md)."""

    checkpoint: Checkpoint
    component: str
    block: int
    stored: dict[str, torch.Tensor]
    where: str = ""  # the file and block, for messages
    quant: dict[str, str] = field(default_factory=dict)  # GGUF: block-quantized tensors, key -> type (GGUF_Q8_0)

    @functools.cached_property
    def _dequantized(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        return dequantize(self.checkpoint.format, self.stored, self.where, self.quant)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The same tensors dequantized to float32 in the canonical layout, scale tensors gone."""
        return self._dequantized[0]

    @property
    def notes(self) -> list[str]:
        """How ``weights`` were dequantized."""
        return self._dequantized[1]

    @property
    def dims(self):
        return self.checkpoint.model.dims[self.component]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())


def block_prefix(checkpoint: Checkpoint, component: str, block: int) -> str:
    """The file's key prefix of one block (``transformer_blocks.30.``, after the model prefix), checked to exist."""
    counts = checkpoint.block_counts
    if component not in counts:
        raise CheckpointError(checkpoint.path, f"holds no {component} blocks (it holds {', '.join(counts)})")
    if not 0 <= block < counts[component]:
        raise CheckpointError(checkpoint.path, f"has {counts[component]} {component} blocks (0-{counts[component] - 1}); block {block} asked")
    return f"{checkpoint.prefix}{checkpoint.model.block_lists[component]}.{block}."


def block_keys(checkpoint: Checkpoint, component: str, block: int) -> list[str]:
    """The file's keys of one block (with the model prefix)."""
    start = block_prefix(checkpoint, component, block)
    return [k for k in checkpoint.index.keys() if k.startswith(start)]


def embedder_keys(checkpoint: Checkpoint) -> list[str]:
    """The model's tensors outside every block list and after the blocks: the embedders the inputs are built with."""
    layout = get_family(checkpoint.family).checkpoint
    lists = tuple(f"{checkpoint.prefix}{name}." for name in checkpoint.model.block_lists.values())
    after = tuple(f"{checkpoint.prefix}{p}" for p in layout.after_blocks)
    return [
        k
        for k in checkpoint.index.keys()
        if k.startswith(checkpoint.prefix) and not k.startswith(lists + after) and k != f"{checkpoint.prefix}{MARKER}"
    ]


def read_block(checkpoint: Checkpoint, component: str, block: int, embedders: bool = True) -> BlockWeights:
    """Block ``block`` of ``component``: only its tensors (and the embedders') are read."""
    start = block_prefix(checkpoint, component, block)
    wanted = [k for k in checkpoint.index.keys() if k.startswith(start)] + (embedder_keys(checkpoint) if embedders else [])
    raw = checkpoint.index.read(wanted)
    n = len(checkpoint.prefix)
    local = {k: (k[len(start):] if k.startswith(start) else k[n:]) for k in raw}
    stored = {local[k]: v for k, v in raw.items()}
    quant = {local[k]: checkpoint.index.entries[k].dtype for k in raw if checkpoint.index.entries[k].stored_shape is not None}
    return BlockWeights(checkpoint, component, block, stored, f"{checkpoint.path} ({start.rstrip('.')})", quant)


def file_id(checkpoint: Checkpoint) -> str:
    """sha256 of the files' sizes and headers: a copy or a rename has the same id; a re-saved file another one."""
    digest = hashlib.sha256()
    for file in checkpoint.index.files:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            digest.update(file.stat().st_size.to_bytes(8, "little"))
            digest.update(handle.read(length))
    return digest.hexdigest()


def identity(block: BlockWeights) -> str:
    """A block's identity: the files' sizes and headers (``file_id``) and the bytes of the tensors read (a re-saved
    file with other values gets another; a copy or a rename, the same)."""
    digest = hashlib.sha256(file_id(block.checkpoint).encode())
    digest.update(f"{block.component}:{block.block}".encode())
    for key in sorted(block.stored):
        tensor = block.stored[key].contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()
