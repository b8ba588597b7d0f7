"""The triton clamp: its plan, its launch (checked and direct), its scratch and its statistics rows."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import functools
from dataclasses import dataclass, field

import torch

from .common import CLAMP_STATS, memory_order_view, triton_interpreter
from .launch import (
    _SCRATCH_LOCK,
    CLAMP_NUM_WARPS,
    CLAMP_PROGRAMS_PER_SM,
    CLAMP_TILE_BYTES,
    VECTOR_BYTES,
    _bits,
    _device_index,
    _Launcher,
    _max_programs,
    _no_launch_hooks,
    _on_device,
    _stream_key,
    bit_patterns,
)
from .triton_source import _triton_kernels


@dataclass(frozen=True)
class _ClampPlan:
    """What a clamp of one dtype, bound and replacement launches with: found once by ``clamp_with_stats``'s checks,
    then taken straight from ``_CLAMP_PLANS`` by the calls that repeat them (a guard calls with the same arguments on
    every boundary; the checks and conversions are host microseconds that a 100-microsecond kernel's caller feels)."""

    integers: tuple[int, int, int]  # the bits of the bound, of minus the bound, of the replacement
    constexprs: dict
    element_size: int
    # (device index, raw stream) -> (compiled kernel, scratch address, programs at most), once a launch there compiled
    ready: dict = field(default_factory=dict, compare=False)

    @functools.cached_property
    def constexpr_values(self) -> tuple:
        return tuple(self.constexprs.values())


# (dtype, limit, nan.hex() or None) -> plan, for CUDA tensors of a triton dtype with impl="auto". The hex form tells
# -0.0 from 0.0; a NaN ``nan`` never matches its own key, so it always takes the checked path (which replaces nothing).
_CLAMP_PLANS: dict[tuple, _ClampPlan] = {}


def _triton_clamp(x: torch.Tensor, bound: float, replacement: float | None, remember: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the clamp kernel on ``x``. Returns (out, ``[*STATS, touched]``).

    One launch, through ``_Launcher`` once the kernel is compiled: the kernel's floor is the memory's rate (200 MiB
    of fp16 through ``torch.nan_to_num``: 100 us of device time on an H200), and next to it the host's tens of
    microseconds per call are what a synchronous guard call feels (a launch through ``kernel[grid](...)`` alone
    costs 20-35 us on the lent machines' hosts; the old clamp made two). The input and
    output are passed as addresses: a dense tensor's data pointer is the start of its block of memory in any dimension
    order, and the output is made with the input's strides, so element ``i`` of one block maps to element ``i`` of the
    other."""
    if x.is_contiguous() or memory_order_view(x) is not None:  # read in place: no torch op on x, so no detach
        source = x
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    else:
        source = x.detach().contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan = _ClampPlan(_clamp_bits(bound, replacement, x.dtype), _clamp_constexprs(x.dtype, replacement is not None), x.element_size())
    if remember is not None and x.is_cuda and not triton_interpreter():
        limit, nan = remember
        _CLAMP_PLANS[(x.dtype, limit, None if nan is None else float(nan).hex())] = plan
    return _launch_clamp(source, plan, out)


def _launch_clamp(source: torch.Tensor, plan: _ClampPlan, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the clamp kernel from dense ``source`` into ``out`` (the same strides): (out, the statistics)."""
    n = source.numel()
    device = source.device
    if n == 0:
        return out, torch.zeros(len(CLAMP_STATS), dtype=torch.float64, device=device)
    with _on_device(device):
        stats = torch.empty(len(CLAMP_STATS), dtype=torch.float64, device=device)
        scratch = _clamp_scratch(device)
        max_programs = _max_programs(device, CLAMP_PROGRAMS_PER_SM)
        programs = min(-(-n // (CLAMP_TILE_BYTES // plan.element_size)), max_programs)
        addresses = (source.data_ptr(), out.data_ptr(), scratch.data_ptr(), stats.data_ptr())
        launcher = _clamp_launcher()
        launcher(
            programs,
            device,
            addresses,
            lambda: (memory_order_view(source), memory_order_view(out), scratch, stats),
            (n, *plan.integers),
            plan.constexprs,
        )
        # the direct launch reuses this specialisation only: every address 16-byte aligned, every integer 32-bit
        if device.type == "cuda" and all(a % 16 == 0 for a in addresses) and n < 2**31:
            index = _device_index(device)
            compiled = launcher.compiled.get(launcher.key(index, addresses, (n, *plan.integers), plan.constexprs))
            if compiled is not None:
                plan.ready[(index, torch._C._cuda_getCurrentRawStream(index))] = (compiled, scratch.data_ptr(), max_programs)
    return out, stats


_STATS_SLOTS: dict[int, list[torch.Tensor]] = {}
STATS_SLOTS_PER_CHUNK = 1024


def _stats_slot(index: int) -> torch.Tensor:
    """A new float64 ``[5]`` tensor on CUDA device ``index`` for a clamp's statistics: a row of a chunk allocated 1024
    rows at a time and split into views at once (an allocation per call is host time the guard feels). Each row is
    handed out once, so no two calls share one; a chunk's memory goes when its last row does."""
    free = _STATS_SLOTS.get(index)
    if free:
        try:
            return free.pop()
        except IndexError:  # another thread took the last one
            pass
    rows = _stats_rows(torch.device("cuda", index))
    row = rows.pop()
    _STATS_SLOTS[index] = rows
    return row


def _stats_rows(device: torch.device) -> list[torch.Tensor]:
    """A chunk's rows: ``[5]`` float64 views whose addresses are 16-byte aligned like every fresh allocation, as the
    direct launch's specialisation assumes (a row stride of 5 float64 would put every other row at 8 bytes: rows
    are 6 wide, the last unused)."""
    width = -(-len(CLAMP_STATS) * 8 // 16) * 16 // 8
    chunk = torch.empty((STATS_SLOTS_PER_CHUNK, width), dtype=torch.float64, device=device)
    return list(chunk[:, : len(CLAMP_STATS)].unbind(0))


def _launch_clamp_direct(x: torch.Tensor, plan: _ClampPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The launch of a call that repeats an earlier one on this device and stream, straight to the compiled kernel
    (what ``_Launcher`` does, without its key): a contiguous CUDA tensor on the current device, 16-byte aligned, of
    fewer than 2**31 elements, no launch hook installed. None where any of that does not hold: the caller launches
    through ``_launch_clamp``. Host time is the reason (docs/gpu-notes.md): a synchronous guard call pays it in full."""
    index = x.get_device()
    stream = torch._C._cuda_getCurrentRawStream(index)
    ready = plan.ready.get((index, stream))
    n = x.numel()
    if ready is None or not 0 < n < 2**31 or index != torch.cuda.current_device() or not _no_launch_hooks():
        return None
    compiled, scratch_address, max_programs = ready
    out = torch.empty_like(x)
    x_address, out_address = x.data_ptr(), out.data_ptr()
    if (x_address | out_address) % 16:
        return None
    stats = _stats_slot(index)
    programs = min(-(-n // (CLAMP_TILE_BYTES // plan.element_size)), max_programs)
    compiled.run(
        programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
        x_address, out_address, scratch_address, stats.data_ptr(), n, *plan.integers, *plan.constexpr_values,
    )  # fmt: skip
    return out, stats


def _clamp_bits(bound: float, replacement: float | None, dtype: torch.dtype) -> tuple[int, int, int]:
    """The clamp's integer arguments: the bits of ``bound``, of ``-bound`` and of the replacement (0 when there is
    none). Cached with the replacement keyed by its hex form: -0.0 equals 0.0 as a key, not as bits. The bound is
    never -0.0 (``clamp_with_stats`` takes its ``abs``)."""
    return _clamp_bits_of_hex(bound, None if replacement is None else replacement.hex(), dtype)


@functools.lru_cache(maxsize=1024)
def _clamp_bits_of_hex(bound: float, replacement_hex: str | None, dtype: torch.dtype) -> tuple[int, int, int]:
    nan_bits = 0 if replacement_hex is None else _bits(float.fromhex(replacement_hex), dtype)
    return _bits(bound, dtype), _bits(-bound, dtype), nan_bits


@functools.cache
def _clamp_constexprs(dtype: torch.dtype, replace_nan: bool) -> dict:
    """The constexpr arguments of ``clamp_with_stats_kernel``, one dict per combination for the life of the process
    (its identity keys the compiled kernels in ``_Launcher``). Not to be changed."""
    size = dtype.itemsize
    patterns = bit_patterns(dtype)
    return dict(
        BITS=8 * size, INF_BITS=patterns.infinity, MAX_BITS=patterns.max, REPLACE_NAN=replace_nan,
        BLOCK=CLAMP_TILE_BYTES // size, SUB=32 * CLAMP_NUM_WARPS * VECTOR_BYTES // size, VEC=VECTOR_BYTES // size,
    )  # fmt: skip


_CLAMP_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}
CLAMP_SCRATCH_SLOTS = 8  # int64: the completion counter, then the five statistics' accumulators (two spare)


def _clamp_scratch(device: torch.device) -> torch.Tensor:
    """The clamp's zeroed int64 scratch on ``device``'s current stream: a completion counter and the accumulators of
    the five statistics, which every launch's last program reads and puts back to zero. Launches on one stream run in
    order, so each has it to itself; another stream gets its own."""
    key = _stream_key(device)
    scratch = _CLAMP_SCRATCH.get(key)
    if scratch is None:
        with _SCRATCH_LOCK:
            scratch = _CLAMP_SCRATCH.get(key)
            if scratch is None:
                scratch = _CLAMP_SCRATCH[key] = torch.zeros(CLAMP_SCRATCH_SLOTS, dtype=torch.int64, device=device)
    return scratch


@functools.cache
def _clamp_launcher() -> "_Launcher":
    return _Launcher(_triton_kernels().clamp_with_stats_kernel, num_warps=CLAMP_NUM_WARPS)
