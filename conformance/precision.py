"""Precision policies: how weights are stored, in which dtype the math runs, and the fp8 quantizers.

A policy is subject-neutral data. Each subject applies it the way that implementation itself would (diffusers: cast or
layerwise-casting hooks; ComfyUI: its own ``comfy.ops`` classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    marker: str  # the precision marker users type: fp32, bf16, fp16, fp8
    storage_dtype: torch.dtype  # weights at rest
    compute_dtype: torch.dtype  # weights and activations inside the math
    description: str
    scaled: str | None = None  # None, "per_tensor" or "block"

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def is_fp8(self) -> bool:
        return self.storage_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        reasons = []
        if self.is_fp8 and not hasattr(torch, "float8_e4m3fn"):
            reasons.append(f"torch {torch.__version__} has no float8 dtypes")
        return reasons


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "fp32", torch.float32, torch.float32, "weights and activations in float32"),
        Precision("bf16", "bf16", torch.bfloat16, torch.bfloat16, "weights and activations in bfloat16"),
        Precision("fp16", "fp16", torch.float16, torch.float16, "weights and activations in float16"),
        Precision(
            "fp8_e4m3",
            "fp8",
            torch.float8_e4m3fn,
            torch.bfloat16,
            "linear weights stored as float8_e4m3fn with a per-tensor scale, dequantized to bfloat16 for each call",
            scaled="per_tensor",
        ),
    )
}

# Float64 is not a user precision: it is how goldens are computed.
GOLDEN_DTYPE = torch.float64


def get_precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise KeyError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}") from None


@dataclass(frozen=True)
class QuantStats:
    """What quantizing one tensor did: how many values hit the format's max, how many flushed to zero."""

    numel: int
    saturated: int
    flushed_to_zero: int
    scale: float


def quantize_per_tensor(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor, QuantStats]:
    """Symmetric per-tensor quantization: ``scale = amax / fmax``, ``q = cast(w / scale)``.

    Returns the quantized tensor, the float32 scale (a 0-d tensor) and the stats. Dequantize with
    ``q.to(compute) * scale``. An all-zero tensor gets scale 1.
    """
    fmax = torch.finfo(dtype).max
    w = weight.detach().float()
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).float()
    scaled = w / scale
    q = scaled.clamp(-fmax, fmax).to(dtype)
    qf = q.float()
    stats = QuantStats(
        numel=w.numel(),
        saturated=int((qf.abs() == fmax).sum()),
        flushed_to_zero=int(((qf == 0) & (w != 0)).sum()),
        scale=float(scale),
    )
    return q, scale, stats


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize with one rounding: the product is formed in float32 and rounded once to ``dtype``."""
    return (q.float() * scale.float()).to(dtype)
