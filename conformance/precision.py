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
    compute_dtype: torch.dtype  # activations, and weights inside the math unless the matmul itself is fp8
    kind: str  # native | fp8_storage | fp8_scaled | fp8_block | fp8_mm
    description: str
    block_size: int | None = None

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def is_fp8(self) -> bool:
        return self.kind != "native"

    def with_compute(self, dtype: torch.dtype) -> Precision:
        from dataclasses import replace

        name = str(dtype).removeprefix("torch.")
        return replace(self, compute_dtype=dtype, description=f"{self.description}; compute in {name}")

    def not_supported_reasons(self, device: torch.device) -> list[str]:
        reasons = []
        if self.is_fp8 and not hasattr(torch, "float8_e4m3fn"):
            reasons.append(f"torch {torch.__version__} has no float8 dtypes")
        return reasons


E4M3 = getattr(torch, "float8_e4m3fn", None)

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "fp32", torch.float32, torch.float32, "native", "weights and activations in float32"),
        Precision("bf16", "bf16", torch.bfloat16, torch.bfloat16, "native", "weights and activations in bfloat16"),
        Precision("fp16", "fp16", torch.float16, torch.float16, "native", "weights and activations in float16"),
        Precision(
            "fp8_e4m3",
            "fp8",
            E4M3,
            torch.bfloat16,
            "fp8_storage",
            "weights stored as float8_e4m3fn and cast to bfloat16 for each call, the subject's plain fp8 path "
            "(ComfyUI: manual_cast, unscaled; diffusers: layerwise-casting hooks with a per-tensor scale)",
        ),
        Precision(
            "fp8_scaled",
            "fp8",
            E4M3,
            torch.bfloat16,
            "fp8_scaled",
            "linear weights as float8_e4m3fn with a per-tensor scale (amax / 448), the subject's scaled-fp8 ops",
        ),
        Precision(
            "fp8_block",
            "fp8",
            E4M3,
            torch.bfloat16,
            "fp8_block",
            "linear weights as float8_e4m3fn with one scale per 64 input channels of each row (scale shape out x in/64 x 1)",
            block_size=64,
        ),
        Precision(
            "fp8_mm",
            "fp8",
            E4M3,
            torch.bfloat16,
            "fp8_mm",
            "fp8 weights and a real fp8 matmul (torch._scaled_mm) with activations cast to e4m3 at unit scale",
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


def quantize_per_tensor(weight: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor, QuantStats]:
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


def saturating_cast(weight: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, QuantStats]:
    """Unscaled fp8 storage, the same bits on every device: clamp to the format's range, then round, on the CPU.

    A bare ``.to(float8_e4m3fn)`` is not device-independent: torch's CPU kernels saturate out-of-range values at 448,
    its CUDA kernels make them NaN (e4m3fn has no inf). ComfyUI's own fp8 rounding (``comfy/float.py``) clamps to
    the format's range, as this does."""
    fmax = torch.finfo(dtype).max
    w = weight.detach().to("cpu", torch.float32)
    q = w.clamp(-fmax, fmax).to(dtype)
    qf = q.float()
    stats = QuantStats(numel=w.numel(), saturated=int((w.abs() > fmax).sum()), flushed_to_zero=int(((qf == 0) & (w != 0)).sum()), scale=1.0)
    return q, stats


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize with one rounding: the product is formed in float32 and rounded once to ``dtype``."""
    return (q.float() * scale.float()).to(dtype)


def quantize_blockwise(weight: torch.Tensor, block_size: int, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor, QuantStats]:
    """One scale per ``block_size`` consecutive input channels of each output row: ``scale`` is ``[out, in/block, 1]``.

    The layout of block-wise scaled fp8 checkpoints (musubi-tuner; ComfyUI-musubi's ``block_scaled_fp8_ops``).
    """
    out_features, in_features = weight.shape
    if in_features % block_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the block size {block_size}")
    fmax = torch.finfo(dtype).max
    w = weight.detach().float().reshape(out_features, in_features // block_size, block_size)
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = (w / scale).clamp(-fmax, fmax).to(dtype)
    qf = q.float()
    stats = QuantStats(
        numel=w.numel(),
        saturated=int((qf.abs() == fmax).sum()),
        flushed_to_zero=int(((qf == 0) & (w != 0)).sum()),
        scale=float(scale.mean()),
    )
    return q.reshape(out_features, in_features), scale, stats
