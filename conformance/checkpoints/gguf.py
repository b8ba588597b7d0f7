"""GGUF files (the ComfyUI-GGUF custom node's and diffusers' quantized checkpoints), indexed from their own header.

The header is read with the ``gguf`` package's ``GGUFReader`` (a read-only map: nothing but the header and the
tensor table is touched); each tensor's bytes are read like a safetensors tensor's (``files.TensorIndex.read``), a
block-quantized one (Q8_0, Q4_K, ...) as its blocks' bytes. Dequantization is diffusers' own
(``diffusers.quantizers.gguf.utils.dequantize_gguf_tensor``), the kernels ``from_single_file`` uses for GGUF.
GGUF stores dims innermost first; the entries carry them in torch's order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .files import CheckpointError, TensorEntry, TensorIndex

PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGML types read as torch dtypes (safetensors names)
PREFIX = "GGUF_"  # the entries' dtype of a block-quantized tensor: GGUF_Q8_0, GGUF_Q4_K, ...


def _gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(path, "a GGUF file: reading it needs the gguf package (pip install gguf, or the suite's gguf extra)") from None
    return gguf


def index_gguf(path: Path) -> TensorIndex:
    gguf = _gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 - the reader raises many types for a damaged file
        raise CheckpointError(path, f"corrupt or truncated GGUF ({type(error).__name__}: {error})") from None
    size = path.stat().st_size
    entries: dict[str, TensorEntry] = {}
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        begin = int(tensor.data_offset)
        if qtype.name in PLAIN:
            entry = TensorEntry(tensor.name, path, PLAIN[qtype.name], shape, begin, begin + int(tensor.n_bytes))
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise CheckpointError(path, f"corrupt GGUF: tensor {tensor.name!r} {list(shape)} is not a whole number of {qtype.name} blocks")
            stored = (*shape[:-1], shape[-1] // block * type_size)
            entry = TensorEntry(tensor.name, path, PREFIX + qtype.name, shape, begin, begin + int(tensor.n_bytes), stored)
        if entry.end - entry.begin != entry.nbytes:
            raise CheckpointError(path, f"corrupt GGUF: tensor {tensor.name!r} {list(shape)} {qtype.name} needs {entry.nbytes} bytes, the file gives {entry.end - entry.begin}")
        if entry.end > size:
            raise CheckpointError(path, f"truncated: tensor {tensor.name!r} ends at byte {entry.end}, the file has {size}")
        entries[tensor.name] = entry
    architecture = reader.fields.get("general.architecture")
    metadata = {}
    if architecture is not None:
        metadata["general.architecture"] = bytes(architecture.parts[architecture.data[0]]).decode(errors="replace")
    return TensorIndex(path, "GGUF file", (path,), entries, metadata)


def dequantize_gguf(where: str, quant: str, stored: torch.Tensor) -> torch.Tensor:
    """One block-quantized tensor to float32, by diffusers' own GGUF dequantization (``where``: for the message)."""
    gguf = _gguf(Path(where))
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    qtype = gguf.GGMLQuantizationType[quant.removeprefix(PREFIX)]
    return dequantize_gguf_tensor(GGUFParameter(stored, quant_type=qtype)).float()
