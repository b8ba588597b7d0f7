"""The torch path: every device and floating dtype; the fallback, and the baseline the benchmarks compare against."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import math

import torch

from .common import STATS


def _torch_finite_stats(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.zeros(len(STATS), dtype=torch.float64, device=x.device)
    magnitude = x.abs()
    finite = magnitude < math.inf  # False for NaN and ±inf: one comparison where isfinite is four kernels
    return torch.stack(
        [
            (~finite).sum(dtype=torch.float64),
            (magnitude != magnitude).sum(dtype=torch.float64),
            torch.where(finite, magnitude, 0.0).amax().double(),
            (magnitude == torch.finfo(x.dtype).max).sum(dtype=torch.float64),
        ]
    )


def _torch_clamp_with_stats(x: torch.Tensor, bound: float, replacement: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    stats = _torch_finite_stats(x)
    out = x.clamp(-bound, bound)
    touched = (x.abs() > bound).sum(dtype=torch.float64)  # a clamp changes exactly the values beyond its bound
    if replacement is not None:
        out.masked_fill_(torch.isnan(x), replacement)
        touched = touched + stats[1]
    return out, torch.cat([stats, touched.reshape(1)])
