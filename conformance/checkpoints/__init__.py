"""Real checkpoints: the files a deployment serves, read one block at a time (docs/checkpoints.md).

``open_checkpoint(path)`` indexes a safetensors file or a diffusers folder from its headers and says what it holds
(family, variant, block counts, storage format); ``read_block`` reads one block's tensors lazily, as stored and
dequantized. Every problem with a file is one ``CheckpointError`` line naming the file.
"""

from .blocks import BlockWeights, block_keys, embedder_keys, identity, read_block
from .detect import Checkpoint, comfyui_detection, open_checkpoint
from .files import CheckpointError, TensorIndex, index_checkpoint
from .formats import StorageFormat

__all__ = [
    "BlockWeights",
    "Checkpoint",
    "CheckpointError",
    "StorageFormat",
    "TensorIndex",
    "block_keys",
    "comfyui_detection",
    "embedder_keys",
    "identity",
    "index_checkpoint",
    "open_checkpoint",
    "read_block",
]
