"""Guarded kernels: a tensor's finiteness statistics, and a clamp that reports what it repaired, each in one pass.

``finite_stats`` is what the probes record at every boundary (``probes.tensor_stats``); ``clamp_with_stats`` is what a
subject's guard does (diffusers' ``x.clip(-65504, 65504)``, ComfyUI's ``torch.nan_to_num(x, nan=0, posinf=65504,
neginf=-65504)`` in fp16) together with what the guard spy wants to know about it. In torch each is several full
passes over the tensor (``isfinite`` alone is four kernels, then ``isnan``, ``where`` + ``amax``, ``==``, the clamp
and a comparison for the changed count); at real scale that is most of the probes' cost. On CUDA, with triton, the
kernels here read each element once from memory (and write it once, for the clamp: a tile it must repair is read
again from the cache), and keep every count exact.

Statistics come back as a float64 tensor on the input's device, never synchronised with the host:
``[nonfinite, nan, max finite |x|, saturated]`` exactly as ``tensor_stats`` defines them (saturated counts
``|x| == finfo(dtype).max``; the max of an empty or all-non-finite tensor is 0), and for the clamp a fifth entry,
``touched``: how many elements the clamp changed (a NaN left NaN is unchanged, and -0.0 equals 0.0). Counts are exact
integers below 2**53.

The clamp's bounds and replacement are values of the tensor's dtype: ``limit`` and ``nan`` are rounded to it first
(``dtype_value``), so every path compares and selects the same numbers. Out-of-place only; no autograd (a guard runs
in inference). NaN payloads are not part of the contract: torch's own bf16 clamp canonicalises them.

Layouts, on the triton path: the statistics do not depend on element order, so a tensor whose elements fill one
gap-free block of memory in any dimension order (contiguous, transposed, permuted) is read in place through
``memory_order_view``, and the clamp writes an output with the same strides. Anything else (a strided slice, an
expanded tensor) is first copied with ``.contiguous()``, an extra read and write, and the clamp's output is contiguous.
The torch path takes every layout as torch does.

The package, one job a module: ``common`` (names, dtypes, which path a tensor takes), ``reference`` (the torch
path), ``host`` (pinned host staging for the probes), ``launch`` (launch shapes, the direct launcher, devices and
streams), ``stats`` and ``clamp`` (the triton paths' launches and scratch), ``triton_source`` (the kernels). This
module is the API.
"""

# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import math

import torch

from .clamp import _CLAMP_PLANS, _launch_clamp, _launch_clamp_direct, _triton_clamp
from .common import (
    CLAMP_STATS,
    IMPLS,
    STATS,
    TRITON_DTYPES,
    _launch_groups,
    _require_floating,
    dtype_value,
    memory_order_view,
    select_impl,
    triton_available,
    triton_interpreter,
    triton_unusable,
)
from .host import HostStats
from .launch import CLAMP_TILE_BYTES, TILE_BYTES, BitPatterns, bit_patterns
from .reference import _torch_clamp_with_stats, _torch_finite_stats
from .stats import _triton_stats_many

__all__ = [
    "CLAMP_STATS", "CLAMP_TILE_BYTES", "IMPLS", "STATS", "TILE_BYTES", "TRITON_DTYPES", "BitPatterns", "HostStats",
    "bit_patterns", "clamp_with_stats", "dtype_value", "finite_stats", "finite_stats_groups", "finite_stats_many",
    "memory_order_view", "select_impl", "triton_available", "triton_interpreter", "triton_unusable",
]  # fmt: skip


def finite_stats(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``[nonfinite, nan, max finite |x|, saturated]`` of ``x`` as a float64 tensor on its device (no host sync)."""
    _require_floating(x)
    if select_impl(x, impl) == "triton":
        return _triton_stats_many([x])[0]
    return _torch_finite_stats(x.detach())


def finite_stats_many(tensors: list[torch.Tensor], impl: str = "auto") -> torch.Tensor:
    """``finite_stats`` of every tensor, as a ``[len(tensors), 4]`` float64 tensor (no host sync). On CUDA with triton,
    the tensors of one dtype are read by one launch: what the probes call once per forward, so that watching every
    module costs a read of its output and not a Python-launched kernel per output. Every tensor must be on the same
    device."""
    groups = finite_stats_groups(tensors, impl)
    if len(groups) == 1:
        return groups[0][0]  # one group: its rows are already in order
    if not groups:
        return torch.zeros((0, len(STATS)), dtype=torch.float64)
    order = [i for _, indices in groups for i in indices]
    rows = torch.cat([stats for stats, _ in groups])
    return rows[torch.tensor(order, device=rows.device).argsort()]


def finite_stats_groups(tensors: list[torch.Tensor], impl: str = "auto") -> list[tuple[torch.Tensor, list[int]]]:
    """``finite_stats`` of every tensor, as ``(stats, indices)`` pairs: ``stats[k]`` holds the statistics of
    ``tensors[indices[k]]``. One pair per triton launch (the tensors of one dtype), and one for the tensors on the torch
    path; no host sync, and no per-row indexing."""
    triton_groups, torch_rows = _launch_groups(tensors, impl)
    groups = [(_triton_stats_many([tensors[i] for i in indices]), indices) for indices in triton_groups]
    if torch_rows:
        groups.append((torch.stack([_torch_finite_stats(tensors[i].detach()) for i in torch_rows]), torch_rows))
    return groups


def clamp_with_stats(
    x: torch.Tensor, limit: float | None = None, nan: float | None = None, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` clamped to ``[-limit, limit]`` (default: the dtype's max, so ±inf become ±max), with NaN replaced by
    ``nan`` unless it is None (then NaN passes through, as in ``torch.clamp``); and the statistics of the input plus
    the count of elements changed, ``[nonfinite, nan, max finite |x|, saturated, touched]`` (float64, no host sync).

    ``limit=None, nan=v`` is ``torch.nan_to_num(x, nan=v)``; ``limit=65504`` on fp16 is diffusers' clip. A ``nan``
    that is itself NaN replaces nothing.
    """
    plan = _CLAMP_PLANS.get((x.dtype, limit, None if nan is None else float(nan).hex())) if impl == "auto" and x.is_cuda else None
    if plan is not None and x.is_contiguous():  # the guards' call, again: what the checks below found, remembered
        launched = _launch_clamp_direct(x, plan)
        return launched if launched is not None else _launch_clamp(x, plan, torch.empty_like(x))
    _require_floating(x)
    if limit is not None and not limit >= 0:  # `not >=` also refuses NaN
        raise ValueError(f"limit must be a non-negative number or None, not {limit!r}")
    bound = dtype_value(torch.finfo(x.dtype).max if limit is None else abs(limit), x.dtype)  # abs: -0.0 is 0.0
    replacement = None if nan is None or math.isnan(nan) else dtype_value(nan, x.dtype)
    if select_impl(x, impl) == "triton":
        return _triton_clamp(x, bound, replacement, remember=(limit, nan) if impl == "auto" else None)
    return _torch_clamp_with_stats(x.detach(), bound, replacement)
