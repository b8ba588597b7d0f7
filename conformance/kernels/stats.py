"""The triton finiteness statistics over many tensors in one launch: the table, the scratch, the launch."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import array
import functools
import itertools
import threading

import torch

from .common import STATS, memory_order_view
from .launch import (
    _SCRATCH_LOCK,
    REDUCE_LANES,
    TILE_BYTES,
    VECTOR_BYTES,
    _Launcher,
    _max_programs,
    _on_device,
    _stream_key,
    bit_patterns,
)
from .triton_source import _triton_kernels


def _triton_stats_many(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One ``stats_many`` launch over tensors of one dtype; the ``[len(tensors), 4]`` float64 statistics go to ``out``
    (default: a new tensor on the tensors' device; ``HostStats`` hands out host memory the device writes into).

    The persistent grid is shared out in proportion to size: tensor ``t`` gets ``count[t]`` programs (at least one),
    and program ``g`` finds its tensor in the table by the first program of each. Pointers travel as element offsets
    from the first tensor, so that when every tensor is 16-byte aligned the kernel can be told so and load 16-byte
    vectors (a pointer read from memory carries no alignment the compiler could see).

    Host time is what a probe pays per call, and the device time after a block's forward is what a probed forward
    waits for, so this stays lean: the completion counters, the table and the partials live in a scratch kept per
    device and stream (``_Scratch``; the counters are put back to zero by the kernel itself), the table is copied only
    when it differs from the one the scratch holds (a probed loop's tensors come back at the same addresses), and the
    launch skips triton's argument binding once the kernel is compiled (``_Launcher``). In the usual probed forward
    the launch is the only work queued: no fill, no table copy, no copy back."""
    x0 = tensors[0]
    sources, keep, pointers, numels = [], [], [], []
    for t in tensors:
        if not t.is_contiguous():
            view = memory_order_view(t)
            if view is None:
                view = t.contiguous()
                keep.append(view)  # alive until the kernel has read it
            t = view
        sources.append(t)
        pointers.append(t.data_ptr())
        numels.append(t.numel())
    size = x0.element_size()
    block = TILE_BYTES // size
    max_programs = _max_programs(x0.device)
    count = len(sources)
    if count == 1:
        numel = numels[0]
        grid = max(1, min(-(-numel // block), max_programs))
        table = None  # no table; a pointer argument: triton specialises its alignment itself
        aligned = True
    else:
        numel = 0
        base = pointers[0]
        tiles = [-(-n // block) for n in numels]
        total_tiles = max(1, sum(tiles))
        counts = [max(1, min(t, max_programs * t // total_tiles)) for t in tiles]
        firsts = list(itertools.accumulate(counts, initial=0))
        grid = firsts[-1]
        aligned = all(p % VECTOR_BYTES == 0 for p in pointers)
        table = [*((p - base) // size for p in pointers), *numels, *firsts[:-1], *counts]
    device = x0.device
    with _on_device(device):
        if out is None:
            out = torch.empty((count, len(STATS)), dtype=torch.float64, device=device)
        scratch = _scratch(device, count, grid)
        with scratch.lock:  # the table compared, copied and read by this launch, not another thread's
            if table is not None and table != scratch.table:
                _copy_from_host(table, scratch.tables[: len(table)])
                scratch.table = table
            addresses = (pointers[0], scratch.tables.data_ptr(), scratch.partials.data_ptr(), scratch.counters.data_ptr())
            _stats_launcher()(
                grid,
                device,
                (*addresses, out.data_ptr()),
                lambda: (sources[0], scratch.tables, scratch.partials, scratch.counters, out),
                (count, grid, numel),
                _stats_constexprs(x0.dtype, aligned, count == 1, _triton_kernels().next_power_of_2(count)),
            )
    del keep  # the caching allocator keeps the copies' memory reserved for the stream until the kernel has run
    return out


class _Scratch:
    """The working memory of ``stats_many`` launches on one device and stream: one completion counter per tensor
    (zero between launches: each tensor's last program puts its counter back), the table of the last multi-tensor
    launch (``table``: its host copy, to skip copying it again) and the ``[4, grid]`` partials. Launches on one stream
    run in order, so each can use all of it; a launch that needs more gets a larger scratch (the old one stays with
    the caching allocator until the stream is past it)."""

    def __init__(self, device: torch.device, tensors: int, programs: int) -> None:
        self.capacity, self.programs = tensors, programs
        self.counters = torch.zeros(tensors, dtype=torch.int64, device=device)
        self.tables = torch.empty(4 * tensors, dtype=torch.int64, device=device)
        self.partials = torch.empty(len(STATS) * programs, dtype=torch.float64, device=device)
        self.table: list[int] | None = None
        self.lock = threading.Lock()


_SCRATCH: dict[tuple[int, int], _Scratch] = {}


def _scratch(device: torch.device, tensors: int, programs: int) -> _Scratch:
    key = _stream_key(device)  # off CUDA one key: the interpreter runs each launch to its end before returning
    scratch = _SCRATCH.get(key)
    if scratch is None or scratch.capacity < tensors or scratch.programs < programs:
        with _SCRATCH_LOCK:
            scratch = _SCRATCH.get(key)
            if scratch is None or scratch.capacity < tensors or scratch.programs < programs:
                if scratch is not None:  # grown to hold both this launch and what the old one held
                    tensors, programs = max(tensors, scratch.capacity), max(programs, scratch.programs)
                tensors = max(16, _triton_kernels().next_power_of_2(tensors))
                scratch = _SCRATCH[key] = _Scratch(device, tensors, max(_max_programs(device), programs))
    return scratch


@functools.cache
def _stats_constexprs(dtype: torch.dtype, aligned: bool, single: bool, block_t: int) -> dict:
    """The constexpr arguments of ``stats_many``: one dict per combination, kept for the life of the process (few: a
    dtype, two flags and a power of two), so that its identity can key the compiled kernels. Not to be changed."""
    size = dtype.itemsize
    patterns = bit_patterns(dtype)
    return dict(
        BITS=8 * size, INF_BITS=patterns.infinity, MAX_BITS=patterns.max, ALIGNED=aligned, SINGLE=single,
        BLOCK=TILE_BYTES // size, BLOCK_T=block_t, BLOCK_P=REDUCE_LANES, VEC=VECTOR_BYTES // size,
    )  # fmt: skip


def _copy_from_host(values: list[int], target: torch.Tensor) -> None:
    """Fill the int64 ``target`` with ``values`` without waiting for the device. From pageable memory on purpose: an
    asynchronous copy of a few kilobytes from pageable memory is staged by the driver as the call returns, so the
    source can go at once, where pinned memory would need an allocation and an event per call (both dearer here).
    The host tensor is made from an ``array`` (several times cheaper than ``torch.tensor`` of a list)."""
    target.copy_(torch.frombuffer(array.array("q", values), dtype=torch.int64), non_blocking=True)


@functools.cache
def _stats_launcher() -> _Launcher:
    return _Launcher(_triton_kernels().stats_many)
