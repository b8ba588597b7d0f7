"""Storage formats of diffusion checkpoints, told apart by keys, dtypes and metadata, and their dequantization.

| format | how it is recognised | dequantized weight |
|---|---|---|
| ``plain`` (fp32/bf16/fp16) | float matrices, no scale tensors | ``w.float()`` |
| ``fp8`` (e4m3fn/e5m2, unscaled) | fp8 matrices, no scale tensors | ``w.float()`` |
| ``scaled_fp8`` (ComfyUI legacy) | a ``scaled_fp8`` marker tensor (its dtype: the fp8 format); per linear ``scale_weight`` [] (+ ``scale_input``) | ``w.float() * scale_weight`` |
| ``fp8_blockwise`` | fp8 matrices with ``scale_weight`` [out, in/block, 1] | each block of ``block`` inputs times its scale |
| ``comfy_quant`` (ComfyUI mixed precision) | per layer ``comfy_quant`` (uint8 JSON ``{"format": ...}``) or the ``_quantization_metadata`` metadata; ``weight_scale`` [] (+ ``input_scale``) | ``w.float() * weight_scale`` |

The dequantized weights are what the goldens are computed from (in float64): a case then measures the compute path of
its precision, not the quantization the file already made. The stored tensors themselves go to the subject's own ops.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .files import CheckpointError, TensorIndex

MARKER = "scaled_fp8"  # ComfyUI's legacy marker key (with the model prefix)
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2", ".comfy_quant")
QUANT_METADATA = "_quantization_metadata"
FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
COMFY_QUANT_FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class StorageFormat:
    name: str  # plain, fp8, scaled_fp8, fp8_blockwise, comfy_quant, gguf
    weight_dtype: str  # the safetensors dtype most of the blocks' matrices are stored in
    block_size: int | None = None  # fp8_blockwise: input channels per scale
    scale_input: bool = False  # the file carries activation scales (scale_input / input_scale)
    full_precision_mm: bool = False  # legacy marker of 2 elements / comfy_quant full_precision_matrix_mult
    layer_formats: Mapping[str, str] = field(default_factory=dict)  # comfy_quant from metadata: layer -> format

    @property
    def label(self) -> str:
        dtype = FP8_NAMES.get(self.weight_dtype, self.weight_dtype.lower())
        if self.name == "plain":
            return {"f32": "fp32", "f16": "fp16"}.get(dtype, dtype)
        if self.name == "fp8":
            return f"{dtype}, unscaled"
        if self.name == "scaled_fp8":
            return f"scaled fp8 (legacy scaled_fp8 + per-tensor scale_weight{', scale_input' if self.scale_input else ''}), {dtype}"
        if self.name == "gguf":
            return f"GGUF {self.weight_dtype.removeprefix('GGUF_')}"
        if self.name == "fp8_blockwise":
            return f"block-wise fp8 (scale_weight [out, in/{self.block_size}, 1]), {dtype}"
        return f"comfy_quant mixed precision (weight_scale{', input_scale' if self.scale_input else ''}), {dtype}"

    @property
    def is_fp8(self) -> bool:
        return self.weight_dtype in FP8_NAMES

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "weight_dtype": self.weight_dtype, "block_size": self.block_size, "scale_input": self.scale_input}


def _matrices(index: TensorIndex, prefix: str) -> list[str]:
    return [k for k, e in index.entries.items() if k.startswith(prefix) and k.endswith(".weight") and len(e.shape) == 2]


def detect_format(index: TensorIndex, prefix: str) -> StorageFormat:
    """The storage format of the model under ``prefix``, from keys, dtypes and metadata alone."""
    matrices = _matrices(index, prefix)
    if not matrices:
        raise CheckpointError(index.path, f"has no weight matrices under {prefix!r}")
    # by count, not bytes: a tiny model's text embedding (4096 wide, kept in fp16) outweighs its fp8 blocks in bytes
    weight_dtype = Counter(index.entries[key].dtype for key in matrices).most_common(1)[0][0]
    if index.layout == "GGUF file":
        return StorageFormat("gguf", weight_dtype)
    keys = [k for k in index.entries if k.startswith(prefix)]
    scale_input = any(k.endswith((".scale_input", ".input_scale")) for k in keys)
    if any(k.endswith(".comfy_quant") for k in keys) or QUANT_METADATA in index.metadata:
        layers = _metadata_layers(index)
        return StorageFormat("comfy_quant", weight_dtype, scale_input=scale_input, layer_formats=layers)
    scales = [k for k in keys if k.endswith(".scale_weight")]
    if scales:
        ndims = {len(index.entries[k].shape) for k in scales}
        if 3 in ndims:
            return StorageFormat("fp8_blockwise", weight_dtype, block_size=_block_size(index, scales), scale_input=scale_input)
        marker = index.entries.get(f"{prefix}{MARKER}")
        if marker is None:
            raise CheckpointError(
                index.path,
                f"has per-tensor scale_weight tensors ({len(scales)}) but no {prefix}{MARKER} marker: ComfyUI would load "
                "its fp8 weights unscaled (wrong by each layer's scale); re-save it with the marker",
            )
        return StorageFormat("scaled_fp8", weight_dtype, scale_input=scale_input, full_precision_mm=math.prod(marker.shape) == 2)
    if weight_dtype in FP8_NAMES:
        return StorageFormat("fp8", weight_dtype)
    return StorageFormat("plain", weight_dtype)


def _metadata_layers(index: TensorIndex) -> dict[str, str]:
    raw = index.metadata.get(QUANT_METADATA)
    if raw is None:
        return {}
    try:
        layers = json.loads(raw)["layers"]
        return {name: spec["format"] for name, spec in layers.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(index.path, f"its {QUANT_METADATA} metadata is not {{'layers': {{layer: {{'format': ...}}}}}}: {error}") from None


def _block_size(index: TensorIndex, scales: list[str]) -> int:
    sizes = set()
    for key in scales:
        scale_shape = index.entries[key].shape
        weight = index.entries.get(key[: -len(".scale_weight")] + ".weight")
        if weight is None or len(scale_shape) != 3 or len(weight.shape) != 2:
            continue
        if scale_shape[1] and weight.shape[1] % scale_shape[1] == 0:
            sizes.add(weight.shape[1] // scale_shape[1])
    if len(sizes) != 1:
        raise CheckpointError(index.path, f"block-wise scale_weight tensors imply block sizes {sorted(sizes) or 'none'}; one size is needed")
    return sizes.pop()


def _one_element(path, key: str, scale: torch.Tensor, what: str) -> torch.Tensor:
    if scale.numel() != 1:
        raise CheckpointError(path, f"{key} has shape {list(scale.shape)}; {what} is one value per layer (shape [] or [1])")
    return scale.reshape(()).float()


def comfy_quant_spec(path, key: str, tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(path, f"{key} is not JSON bytes ({error})") from None


def dequantize(fmt: StorageFormat, state: Mapping[str, torch.Tensor], path, quant: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Float32 weights in the canonical layout (scale tensors and markers gone) from one block's stored tensors
    (keys without the model prefix), and what was done, for the report. ``quant``: a GGUF block's block-quantized
    tensors, key -> type (``GGUF_Q8_0``)."""
    out: dict[str, torch.Tensor] = {}
    layers = 0
    if fmt.name == "gguf":
        from .gguf import dequantize_gguf

        quant = quant or {}
        for key, tensor in state.items():
            out[key] = dequantize_gguf(path, quant[key], tensor) if key in quant else tensor.float()
        types = sorted({q.removeprefix("GGUF_") for q in quant.values()})
        return out, [f"{len(quant)} tensors dequantized by diffusers' GGUF kernels ({', '.join(types) or 'none'}), the rest upcast to float32"]
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIXES) or key == MARKER:
            continue
        if not key.endswith(".weight") or fmt.name in ("plain", "fp8"):
            out[key] = tensor.float()
            continue
        layer = key[: -len(".weight")]
        if fmt.name == "scaled_fp8":
            scale = state.get(f"{layer}.scale_weight")
            out[key] = tensor.float() if scale is None else tensor.float() * _one_element(path, f"{layer}.scale_weight", scale, "a legacy scale_weight")
            layers += scale is not None
        elif fmt.name == "fp8_blockwise":
            scale = state.get(f"{layer}.scale_weight")
            out[key] = tensor.float() if scale is None else _blockwise(path, layer, tensor, scale, fmt.block_size)
            layers += scale is not None
        else:
            out[key], quantized = _comfy_quant(path, fmt, layer, tensor, state)
            layers += quantized
    notes = {
        "plain": f"stored {fmt.label}: weights upcast to float32",
        "fp8": f"stored {fmt.label}: weights upcast to float32, no scale",
        "scaled_fp8": f"{layers} linears dequantized as weight * scale_weight",
        "fp8_blockwise": f"{layers} linears dequantized per block of {fmt.block_size} inputs",
        "comfy_quant": f"{layers} layers dequantized as weight * weight_scale",
    }
    return out, [notes[fmt.name]]


def _blockwise(path, layer: str, weight: torch.Tensor, scale: torch.Tensor, block: int | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    expected = (out_features, in_features // block, 1) if block and in_features % block == 0 else None
    if expected is None or tuple(scale.shape) != expected:
        raise CheckpointError(path, f"{layer}.scale_weight has shape {list(scale.shape)}; the block-wise weight {list(weight.shape)} needs {list(expected) if expected else f'in_features a multiple of {block}'}")
    return (weight.float().view(out_features, in_features // block, block) * scale.float()).view(out_features, in_features)


def _comfy_quant(path, fmt: StorageFormat, layer: str, weight: torch.Tensor, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    spec_tensor = state.get(f"{layer}.comfy_quant")
    layer_format = comfy_quant_spec(path, f"{layer}.comfy_quant", spec_tensor).get("format") if spec_tensor is not None else None
    layer_format = layer_format or _metadata_format(fmt, layer)
    if layer_format is None:
        return weight.float(), False  # a layer left in high precision
    if layer_format not in COMFY_QUANT_FP8:
        raise CheckpointError(path, f"{layer} is quantized as {layer_format!r}; the suite dequantizes {', '.join(COMFY_QUANT_FP8)} only")
    if weight.dtype != COMFY_QUANT_FP8[layer_format]:
        raise CheckpointError(path, f"{layer}.weight is {weight.dtype}, its comfy_quant says {layer_format}")
    scale = state.get(f"{layer}.weight_scale")
    if scale is None:
        raise CheckpointError(path, f"{layer} is quantized ({layer_format}) but has no weight_scale")
    return weight.float() * _one_element(path, f"{layer}.weight_scale", scale, "an fp8 weight_scale"), True


def _metadata_format(fmt: StorageFormat, layer: str) -> str | None:
    for name, layer_format in fmt.layer_formats.items():
        if name == layer or name.endswith(f".{layer}"):  # metadata names may carry the model prefix
            return layer_format
    return None
