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
"""

# No `from __future__ import annotations` here: triton reads a kernel's `tl.constexpr` annotations, and evaluated ones
# are the form every triton version accepts. (The annotations outside the kernels are valid at runtime in 3.11.)
import array
import contextlib
import functools
import importlib.util
import itertools
import math
import os
import threading
import types
from dataclasses import dataclass, field

import torch

IMPLS = ("auto", "torch", "triton")
STATS = ("nonfinite", "nan", "max_abs", "saturated")
CLAMP_STATS = (*STATS, "touched")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DTYPE_SET = frozenset(TRITON_DTYPES)

# Launch shape of the triton kernels; the first knobs to tune on a GPU (benchmarks/test_kernels_bench.py).
VECTOR_BYTES = 16  # one thread's load: 8 fp16/bf16 or 4 fp32 elements, reduced in registers before accumulating
TILE_BYTES = 16384  # what one program reads per loop step: four vectors per thread with 8 warps
NUM_WARPS = 8
PROGRAMS_PER_SM = 4  # persistent grid: at most this many programs per SM, each striding over the tensor's tiles
REDUCE_LANES = 256  # a tensor's last program reads its partials in chunks of this many columns
INTERPRETER_PROGRAMS = 3  # under TRITON_INTERPRET=1 there are no SMs; an odd count makes the grid-stride loop uneven
# The clamp's own shape: one-warp programs, so that its per-tile test (a max over the tile) is a warp shuffle and no
# barrier (``_triton_kernels`` says why), many of them per SM for loads in flight.
CLAMP_TILE_BYTES = 4096  # one warp's loop step: eight 16-byte vectors per thread
CLAMP_NUM_WARPS = 1
CLAMP_PROGRAMS_PER_SM = 128  # more than fit at once (~60 registers a thread): the sweep in docs/gpu-notes.md


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


def _launch_groups(tensors: list[torch.Tensor], impl: str) -> tuple[list[list[int]], list[int]]:
    """The indices of ``tensors`` the triton kernel reads, one list per launch (per dtype), and those left to torch."""
    if not tensors:
        return [], []
    device = tensors[0].device
    triton_groups: dict[torch.dtype, list[int]] = {}
    torch_rows: list[int] = []
    # the usual case decided without select_impl's per-tensor checks: a probe calls this with every module's output
    fast = impl == "auto" and device.type == "cuda" and triton_available()
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError("finite_stats_many: tensors on several devices")
        if fast and t.dtype in _TRITON_DTYPE_SET:
            triton_groups.setdefault(t.dtype, []).append(i)
            continue
        _require_floating(t)
        if select_impl(t, impl) == "triton":
            triton_groups.setdefault(t.dtype, []).append(i)
        else:
            torch_rows.append(i)
    return list(triton_groups.values()), torch_rows


_STREAMS: dict[tuple[int, int], "torch.cuda.Stream"] = {}  # (device index, raw stream) -> its Stream object


class _Chunk:
    """A flat float64 host buffer of ``HostStats``: ``used`` numbers filled so far, the first of which is number
    ``base`` of the collection."""

    __slots__ = ("memory", "used", "base", "pinned")

    def __init__(self, size: int, pinned: bool) -> None:
        self.memory = torch.empty(size, dtype=torch.float64, pin_memory=pinned)
        self.used, self.base, self.pinned = 0, 0, pinned


class HostStats:
    """Host memory that the statistics of many launches land in, read back with one synchronisation: what a probed
    forward collects. ``stats_of(tensors)`` (``finite_stats`` of each, one launch per dtype) and ``put(values)``
    (numbers computed elsewhere: a guard's changed count) return where their numbers start in the flat list that
    ``take()`` returns; ``take()`` waits for the devices involved, and the next numbers start a new collection.

    On CUDA the memory is pinned, and the device addresses pinned memory directly (unified addressing), so the
    statistics kernel's last programs store their numbers straight into it: nothing is queued behind a block's
    forward but the one launch, no copy back, and the synchronisation is all the host waits for. Numbers already in a
    tensor are copied in (asynchronously from CUDA, in stream order).

    Memory is kept between collections (chunks of float64; a collection that outgrew one chunk gets one large enough
    next time). A collection abandoned without ``take()`` (``reset()``) may still be written by the device: its chunks
    are set aside until the next ``take()`` has waited, never reused or freed before."""

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []  # this collection's, in order
        self._spare: list[_Chunk] = []  # an emptied chunk, ready for reuse
        self._retired: list[_Chunk] = []  # chunks of an abandoned collection, kept until the device is waited for
        self._streams: dict[tuple[int, int], torch.cuda.Stream] = {}  # the streams its numbers come on
        self._size = 0  # the size of the next chunk made, at least

    def stats_of(self, tensors: list[torch.Tensor], impl: str = "auto") -> list[int]:
        """Launch ``finite_stats`` of ``tensors`` (all on one device) into this memory; the index of each tensor's
        four numbers in ``take()``'s list."""
        triton_groups, torch_rows = _launch_groups(tensors, impl)
        places = [0] * len(tensors)
        for indices in triton_groups:
            device = tensors[indices[0]].device
            view, at = self._reserve(len(STATS) * len(indices), device)
            _triton_stats_many([tensors[i] for i in indices], out=view)
            for row, i in enumerate(indices):
                places[i] = at + len(STATS) * row
        if torch_rows:
            at = self.put(torch.stack([_torch_finite_stats(tensors[i].detach()) for i in torch_rows]))
            for row, i in enumerate(torch_rows):
                places[i] = at + len(STATS) * row
        return places

    def put(self, values: torch.Tensor) -> int:
        """Copy ``values`` (any shape, float64) in, without waiting; the index of its first number."""
        flat = values.detach().reshape(-1)
        view, at = self._reserve(flat.numel(), flat.device)
        view.copy_(flat, non_blocking=flat.device.type == "cuda")
        return at

    def take(self) -> list[float]:
        """Wait for every number of this collection (the one synchronisation) and return them; memory is kept for
        the next collection. Everything but the wait and the read is done before the wait: what comes after it is on
        the critical path of a probed loop."""
        views = [chunk.memory[: chunk.used] for chunk in self._chunks]
        streams = list(self._streams.values())
        retired, self._retired = self._retired, []  # freed only after the wait below
        self._empty(abandoned=False)
        for stream in streams:
            stream.synchronize()
        values = views[0].tolist() if len(views) == 1 else [value for view in views for value in view.tolist()]
        del retired  # the abandoned chunks may go now that the device is past them
        return values

    def reset(self) -> None:
        """Start a new collection, abandoning what this one holds."""
        self._empty(abandoned=bool(self._streams))

    def _empty(self, abandoned: bool) -> None:
        if abandoned:  # its streams stay listed, so that the next take() waits for them before the chunks go
            self._retired += self._chunks
            self._chunks = []
            return
        if len(self._chunks) == 1:
            self._spare = self._chunks
        elif self._chunks:  # the collection outgrew a chunk: next time, one chunk for all of it
            self._spare, self._size = [], 2 * sum(chunk.used for chunk in self._chunks)
        self._chunks, self._streams = [], {}

    def _reserve(self, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """``n`` float64 numbers of host memory for results from ``device`` (pinned where it is CUDA), and the index
        of the first one."""
        pinned = device.type == "cuda"
        if pinned:
            key = _stream_key(device)
            if key not in self._streams:  # a Stream object costs tens of microseconds to make on a slow host: kept
                stream = _STREAMS.get(key)
                if stream is None:
                    stream = _STREAMS[key] = torch.cuda.current_stream(key[0])
                self._streams[key] = stream
        chunk = self._chunks[-1] if self._chunks else None
        if chunk is None or chunk.used + n > chunk.memory.numel() or (pinned and not chunk.pinned):
            base = chunk.base + chunk.used if chunk is not None else 0
            spare = self._spare[0] if self._spare and not self._chunks else None
            if spare is not None and spare.memory.numel() >= n and (spare.pinned or not pinned):
                chunk = spare
            else:
                chunk = _Chunk(max(n, 1024, self._size, 2 * sum(c.memory.numel() for c in self._chunks)), pinned)
            self._spare = []
            chunk.used, chunk.base = 0, base
            self._chunks.append(chunk)
        at = chunk.used
        chunk.used += n
        return chunk.memory[at : at + n], chunk.base + at


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


def select_impl(x: torch.Tensor, impl: str = "auto") -> str:
    """``"triton"`` or ``"torch"``: what ``impl`` means for ``x``. ``auto`` takes triton wherever it can run it (a CUDA
    tensor of a supported dtype, triton installed); ``torch`` forces the torch path (comparisons, benchmarks);
    ``triton`` forces the kernels and raises where they cannot run, so a test never passes on the wrong path."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    if impl == "torch":
        return "torch"
    reason = triton_unusable(x)
    if impl == "triton" and reason:
        raise RuntimeError(f"impl='triton': {reason}")
    if impl == "auto" and (reason or x.device.type != "cuda"):  # the interpreter is for checking kernels, not speed
        return "torch"
    return "triton"


def triton_unusable(x: torch.Tensor) -> str | None:
    """Why the triton kernels cannot take ``x``, or None. On CPU they run only under triton's interpreter."""
    if not triton_available():
        return "triton is not installed"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreter()):
        return f"the kernels run on CUDA (or on CPU with TRITON_INTERPRET=1); this tensor is on {x.device}"
    if x.dtype not in TRITON_DTYPES:
        return f"the kernels take {', '.join(str(d) for d in TRITON_DTYPES)}; this tensor is {x.dtype}"
    return None


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """Whether triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): on CPU tensors, slowly, exactly."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def dtype_value(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` as torch rounds a float64 (overflowing to ±inf), as a Python float."""
    return _rounded(float(value).hex(), dtype)


# Host-side conversions are cached: a guard calls with the same few bounds every time, and each conversion through a
# torch tensor costs microseconds that a 50-microsecond kernel would feel. The key is the value's hex form, which,
# unlike the float, tells -0.0 from 0.0.
@functools.lru_cache(maxsize=1024)
def _rounded(value_hex: str, dtype: torch.dtype) -> float:
    return torch.tensor(float.fromhex(value_hex), dtype=torch.float64).to(dtype).item()


def memory_order_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x``'s elements as a 1-D view in memory order, when they fill one gap-free block of memory (any dimension order);
    None when they do not (a strided slice, an expanded dimension)."""
    expected_stride = 1
    for stride, size in sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size != 1):
        if stride != expected_stride:
            return None
        expected_stride *= size
    return x.as_strided((x.numel(),), (1,))


def _require_floating(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"the guarded kernels take floating-point tensors, not {x.dtype}")


# -- torch path: every device and floating dtype; the fallback, and the baseline the benchmarks compare against ------


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


# -- triton path -----------------------------------------------------------------------------------------------------


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
        if device.type == "cuda" and all(a % 16 == 0 for a in addresses) and n < 2**31:
            index = _device_index(device)
            compiled = launcher.compiled.get((index, id(plan.constexprs), True, True, True, True, True, True, True, True))
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
    rows = list(torch.empty((STATS_SLOTS_PER_CHUNK, len(CLAMP_STATS)), dtype=torch.float64, device=torch.device("cuda", index)).unbind(0))
    row = rows.pop()
    _STATS_SLOTS[index] = rows
    return row


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
_SCRATCH_LOCK = threading.Lock()


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


class _Launcher:
    """Launch a triton kernel through its compiled form, without triton's per-call argument binding.

    ``kernel[grid](...)`` binds and specialises every argument on every call: tens of microseconds of Python in triton
    3.6, which the probes would pay on every forward. The first call of each specialisation goes through triton
    (which compiles or loads the kernel and returns it); later calls with the same key call the compiled launcher with
    integer addresses. The key holds everything triton specialises these kernels on: the device, the constexprs
    (which include the dtype's bit patterns, so they tell the dtypes apart), each address's 16-byte alignment and each
    integer's width (the integer arguments are ``do_not_specialize``). Where the compiled form does not look as
    expected (another triton), under the interpreter, or while a launch hook is installed (a profiler), every call
    goes through triton."""

    def __init__(self, kernel, num_warps: int = NUM_WARPS) -> None:
        self.kernel = kernel
        self.num_warps = num_warps
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: int, device: torch.device, addresses: tuple[int, ...], tensors, integers: tuple[int, ...], constexprs: dict) -> None:
        """``tensors`` makes the tensor arguments (views) for triton's own launch; ``addresses`` are their addresses.
        ``constexprs`` (values hashable, in the kernel's order) hold the dtype's facts, so they key the dtype too."""
        index = _device_index(device)
        key = (index, id(constexprs), *[a % 16 == 0 for a in addresses], *[-(2**31) <= i < 2**31 for i in integers])
        compiled = self.compiled.get(key)
        if compiled is not None and _no_launch_hooks():
            compiled.run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(index), compiled.function, compiled.packed_metadata, None, None, None, *addresses, *integers, *constexprs.values())
            return
        compiled = self.kernel[(grid,)](*tensors(), *integers, **constexprs, num_warps=self.num_warps)
        if device.type == "cuda" and not triton_interpreter() and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            self.compiled[key] = compiled


def _no_launch_hooks() -> bool:
    """No launch hook is installed (a profiler's): from triton 3.5 the hooks are chains, empty when unused."""
    knobs = _triton_kernels().knobs
    return knobs is not None and _empty_hook(knobs.runtime.launch_enter_hook) and _empty_hook(knobs.runtime.launch_exit_hook)


def _empty_hook(hook) -> bool:
    return hook is None or getattr(hook, "calls", None) == []


@functools.cache
def _stats_launcher() -> _Launcher:
    return _Launcher(_triton_kernels().stats_many)


@dataclass(frozen=True)
class BitPatterns:
    """Magnitude bit patterns of a float dtype, as integers: for non-negative floats, integer order is value order, so
    ``bits & (2**(width-1) - 1)`` compared with these classifies a value with integer operations alone."""

    max: int  # the largest finite value; a magnitude above it is inf, or NaN above ``infinity``
    infinity: int


@functools.cache
def bit_patterns(dtype: torch.dtype) -> BitPatterns:
    return BitPatterns(max=_bits(torch.finfo(dtype).max, dtype), infinity=_bits(math.inf, dtype))


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(value: float, dtype: torch.dtype) -> int:
    """The bits of ``value`` in ``dtype`` as a signed integer of the same width (negative exactly when the sign is)."""
    return _bits_of_hex(float(value).hex(), dtype)


@functools.lru_cache(maxsize=1024)
def _bits_of_hex(value_hex: str, dtype: torch.dtype) -> int:
    return torch.tensor(float.fromhex(value_hex), dtype=dtype).view(_SAME_WIDTH_INT[dtype.itemsize]).item()


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` where launching needs it (another GPU than the current one); entering that
    context costs microseconds a probe pays on every call."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def _device_index(device: torch.device) -> int:
    """A CUDA device's index (the current device for a bare ``cuda``); -1 off CUDA."""
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream_key(device: torch.device) -> tuple[int, int]:
    """(device index, current raw stream) on CUDA, what per-stream state is kept under; (-1, 0) elsewhere."""
    index = _device_index(device)
    return (index, torch._C._cuda_getCurrentRawStream(index)) if index >= 0 else (-1, 0)


def _max_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _multiprocessors(_device_index(device)) * per_sm


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _triton_kernels() -> types.SimpleNamespace:
    """The kernels, defined (and triton imported) on first use, so that importing this module never needs triton.

    The check (``finite_stats``, ``finite_stats_many``) is ``stats_many``: one launch over one or many tensors, built
    on ``finite_stats_of_tiles`` (a max-only first pass with no barrier in its loop; exact counts only over the
    tiles between a program's first and last special tile), and the last of a tensor's programs to finish reduces
    that tensor's partials (a completion counter per tensor, which that program puts back to zero), so the
    reductions of many tensors run side by side. On an H200 it reads 200 MiB of fp16 in about 58 us, 3.65 TB/s.

    The clamp (``clamp_with_stats``) is ``clamp_with_stats_kernel``, one launch over a persistent grid of one-warp
    programs: program ``p`` of ``P`` clamps tiles ``p, p + P, ...`` of ``BLOCK`` elements (``clamp_tile``; 4 KiB,
    eight 16-byte vectors per thread, unmasked), and works on their bits: ``bits & ABS`` is the magnitude, and
    integer comparisons with the dtype's max and inf patterns classify it (a NaN's magnitude is above inf's).

    Most tiles hold nothing at or beyond the dtype's max and nothing for the clamp to change: the tile's largest
    magnitude decides that, and such a tile is stored as read, its max kept (in triton 3.8's code for sm_90, for
    16-bit dtypes, the mask and the max run on pairs of values: one ``LOP3`` and about one ``VIMNMX.U16x2`` per two
    elements, between eight ``LDG.E.128`` and eight ``STG.E.128`` per thread). With one warp per program that max is
    a warp reduction (``REDUX``) and the branch needs no barrier. The old clamp's 8-warp programs took a block-wide
    max before every store, a shared-memory round trip and a barrier per tile, and ran at 0.81 of copy traffic (the
    check, in that shape, read 1.75 TB/s, against 3.5-3.9 without the barrier).

    A tile holding a value beyond the bound or at or beyond the dtype's max is clamped and counted by
    ``clamp_counted``, one vector per thread at a time, read again from the cache that has just served it (memory
    traffic stays one read and one write); the tensor's partial last tile always goes that way, masked, taken by the
    program after the one with the last whole tile. Doing the per-element work at the whole tile's width made the
    kernel 255 registers with spills; this way it is 57-62 (the same compiler), which leaves room for the 16 programs
    per SM meant to keep enough loads in flight. Counts and the max are scalars per program (int64; the max as
    magnitude bits: exact).

    At the end each program adds its non-zero counts and its max to a scratch kept per device and stream (relaxed
    integer atomics, all by one thread, then an acq_rel completion counter: exact in any order); the last program to
    finish turns them into the float64 statistics and puts the scratch back to zero (``atomic_xchg``). One launch, no
    zero-fill, no partials to reduce.

    ``tl`` is bound as a module global because triton resolves the names a kernel uses in its ``__globals__``.
    """
    global tl, finite_stats_of_tiles, clamp_counted, clamp_tile
    import triton
    import triton.language as tl

    @triton.jit
    def finite_stats_of_tiles(
        x_ptr, n, program, programs, BITS: tl.constexpr, INF_BITS: tl.constexpr, MAX_BITS: tl.constexpr,
        BLOCK: tl.constexpr, VEC: tl.constexpr,
    ):
        # Program `program` of `programs` over tiles program, program + programs, ... of x (n elements). First pass:
        # per row (one thread's vector, reduced in registers, no barrier in the loop) the largest magnitude, and the
        # first and last tile where a row reached the dtype's max (a saturated, infinite or NaN value: rare). Full
        # tiles load unmasked (vector loads). Only the tiles from the first to the last such tile are read again, to
        # count exactly and to take the largest finite magnitude there; elsewhere the first pass's max is finite.
        # Returns (nonfinite, nan, largest finite |x| as float64, saturated).
        same_width_int = tl.int16 if BITS == 16 else tl.int32
        lanes = tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        full = n // BLOCK
        clean_max = tl.zeros([BLOCK // VEC], dtype=tl.int32)  # rows with nothing at or beyond the max
        first_rows = tl.full([BLOCK // VEC], 2**62, dtype=tl.int64)
        last_rows = tl.full([BLOCK // VEC], -1, dtype=tl.int64)
        for tile in range(program, full, programs):
            raw = tl.load(x_ptr + tile * BLOCK + lanes)
            row_max = tl.max(raw.to(same_width_int, bitcast=True).to(tl.int32) & ((1 << (BITS - 1)) - 1), axis=1)
            special = row_max >= MAX_BITS
            clean_max = tl.maximum(clean_max, tl.where(special, 0, row_max))
            first_rows = tl.where(special, tl.minimum(first_rows, tile), first_rows)
            last_rows = tl.where(special, tile, last_rows)
        if (n % BLOCK != 0) & (program == full % programs):
            offsets = full * BLOCK + lanes
            raw = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
            row_max = tl.max(raw.to(same_width_int, bitcast=True).to(tl.int32) & ((1 << (BITS - 1)) - 1), axis=1)
            special = row_max >= MAX_BITS
            clean_max = tl.maximum(clean_max, tl.where(special, 0, row_max))
            first_rows = tl.where(special, tl.minimum(first_rows, full), first_rows)
            last_rows = tl.where(special, full, last_rows)
        largest_bits = tl.max(clean_max, axis=0)
        first_special = tl.min(first_rows, axis=0)
        last_special = tl.max(last_rows, axis=0)
        nonfinite = program * 0
        nan = program * 0
        saturated = program * 0
        if last_special >= 0:
            counts_nonfinite = tl.zeros([BLOCK // VEC], dtype=tl.int32)
            counts_nan = tl.zeros([BLOCK // VEC], dtype=tl.int32)
            counts_saturated = tl.zeros([BLOCK // VEC], dtype=tl.int32)
            finite_bits = tl.zeros([BLOCK // VEC], dtype=tl.int32)
            for tile in range(first_special, last_special + 1, programs):
                offsets = tile * BLOCK + lanes
                raw = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
                magnitude = raw.to(same_width_int, bitcast=True).to(tl.int32) & ((1 << (BITS - 1)) - 1)
                finite = magnitude < INF_BITS
                counts_nonfinite += tl.sum(1 - finite.to(tl.int32), axis=1)
                counts_nan += tl.sum((magnitude > INF_BITS).to(tl.int32), axis=1)
                counts_saturated += tl.sum((magnitude == MAX_BITS).to(tl.int32), axis=1)
                finite_bits = tl.maximum(finite_bits, tl.max(tl.where(finite, magnitude, 0), axis=1))
            nonfinite = tl.sum(counts_nonfinite.to(tl.int64), axis=0)
            nan = tl.sum(counts_nan.to(tl.int64), axis=0)
            saturated = tl.sum(counts_saturated.to(tl.int64), axis=0)
            largest_bits = tl.maximum(largest_bits, tl.max(finite_bits, axis=0))
        if x_ptr.dtype.element_ty == tl.bfloat16:  # bf16 is float32's upper half: widened exactly, subnormals too
            largest = (largest_bits << 16).to(tl.float32, bitcast=True)
        else:
            largest = largest_bits.to(same_width_int).to(x_ptr.dtype.element_ty, bitcast=True)
        return nonfinite, nan, largest.to(tl.float64), saturated

    @triton.jit
    def clamp_counted(
        x_ptr,
        out_ptr,
        start,
        n,
        limit_bits,
        negative_limit_bits,
        nan_bits,
        nonfinite,
        nan,
        saturated,
        touched,
        max_bits,
        BITS: tl.constexpr,
        INF_BITS: tl.constexpr,
        MAX_BITS: tl.constexpr,
        REPLACE_NAN: tl.constexpr,
        BLOCK: tl.constexpr,
        SUB: tl.constexpr,
        VEC: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        # The tile of BLOCK elements from element `start` clamped and counted element by element, SUB elements (one
        # vector per thread) at a time: the program's running statistics (scalars) updated. MASKED: the tensor's last,
        # partial tile.
        same_width_int = tl.int16 if BITS == 16 else tl.int32
        lanes = tl.arange(0, SUB // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        for sub in range(0, BLOCK, SUB):
            offsets = start + sub + lanes
            if MASKED:
                raw = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
            else:
                raw = tl.load(x_ptr + offsets)
            bits = raw.to(same_width_int, bitcast=True).to(tl.int32)  # sign-extended: negative iff the sign bit is set
            magnitude = bits & ((1 << (BITS - 1)) - 1)
            finite = magnitude < INF_BITS
            is_nan = magnitude > INF_BITS
            nonfinite += tl.sum(tl.sum(1 - finite.to(tl.int32), axis=1), axis=0)
            nan += tl.sum(tl.sum(is_nan.to(tl.int32), axis=1), axis=0)
            saturated += tl.sum(tl.sum((magnitude == MAX_BITS).to(tl.int32), axis=1), axis=0)
            max_bits = tl.maximum(max_bits, tl.max(tl.max(tl.where(finite, magnitude, 0), axis=1), axis=0))
            changed = (magnitude > limit_bits) & (magnitude <= INF_BITS)  # beyond the bound, not NaN
            out_bits = tl.where(changed, tl.where(bits < 0, negative_limit_bits, limit_bits), bits)
            if REPLACE_NAN:
                out_bits = tl.where(is_nan, nan_bits, out_bits)
                changed = changed | is_nan
            touched += tl.sum(tl.sum(changed.to(tl.int32), axis=1), axis=0)
            out = out_bits.to(same_width_int).to(raw.dtype, bitcast=True)
            if MASKED:
                tl.store(out_ptr + offsets, out, mask=offsets < n)
            else:
                tl.store(out_ptr + offsets, out)
        return nonfinite, nan, saturated, touched, max_bits

    @triton.jit
    def clamp_tile(
        x_ptr,
        out_ptr,
        start,
        n,
        fast_below,
        limit_bits,
        negative_limit_bits,
        nan_bits,
        nonfinite,
        nan,
        saturated,
        touched,
        max_bits,
        BITS: tl.constexpr,
        INF_BITS: tl.constexpr,
        MAX_BITS: tl.constexpr,
        REPLACE_NAN: tl.constexpr,
        BLOCK: tl.constexpr,
        SUB: tl.constexpr,
        VEC: tl.constexpr,
    ):
        # The full tile of BLOCK elements from element `start`, read with 16-byte vector loads. If its largest
        # magnitude is below `fast_below`, it holds nothing at or beyond the dtype's max and nothing beyond the bound:
        # it is stored as read, and only its max is kept (a masked max on pairs of 16-bit values, and a warp
        # reduction: a few instructions per vector). Otherwise `clamp_counted` reads it again, from the cache that has
        # just served it, and does the per-element work: at the whole tile's width that work would cost every tile
        # its registers (255 and spills with eight vectors per thread), hence fewer programs resident and fewer loads
        # in flight.
        same_width_int = tl.int16 if BITS == 16 else tl.int32
        lanes = tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        raw = tl.load(x_ptr + start + lanes)
        magnitude = raw.to(same_width_int, bitcast=True).to(tl.int32) & ((1 << (BITS - 1)) - 1)
        tile_max = tl.max(tl.max(magnitude, axis=1), axis=0)  # one warp: registers, then a warp reduction
        if tile_max < fast_below:
            max_bits = tl.maximum(max_bits, tile_max)
            tl.store(out_ptr + start + lanes, raw)
        else:
            nonfinite, nan, saturated, touched, max_bits = clamp_counted(
                x_ptr, out_ptr, start, n, limit_bits, negative_limit_bits, nan_bits,
                nonfinite, nan, saturated, touched, max_bits,
                BITS, INF_BITS, MAX_BITS, REPLACE_NAN, BLOCK, SUB, VEC, False,
            )  # fmt: skip
        return nonfinite, nan, saturated, touched, max_bits

    @triton.jit(do_not_specialize=["n", "limit_bits", "negative_limit_bits", "nan_bits"])
    def clamp_with_stats_kernel(
        x_ptr,
        out_ptr,
        scratch_ptr,  # int64 [8], zero: the completion counter, then the accumulators of the five statistics
        stats_ptr,  # float64 [5]
        n,
        limit_bits,
        negative_limit_bits,
        nan_bits,
        BITS: tl.constexpr,
        INF_BITS: tl.constexpr,
        MAX_BITS: tl.constexpr,
        REPLACE_NAN: tl.constexpr,
        BLOCK: tl.constexpr,
        SUB: tl.constexpr,
        VEC: tl.constexpr,
    ):
        # Program `program` of `programs` clamps tiles program, program + programs, ... (full tiles unmasked: 16-byte
        # vector loads and stores), and the program after the last full tile's takes the partial one. It adds its
        # non-zero counts and its max to the scratch (integer atomics: exact, in any order); the last program to
        # finish (the completion counter) turns the accumulators into the float64 statistics and puts the scratch back
        # to zero for the next launch on this stream.
        program = tl.program_id(0).to(tl.int64)  # int64 tile indices and offsets: tensors past 2**31 elements
        programs = tl.num_programs(0)
        fast_below = tl.minimum(limit_bits + 1, MAX_BITS)  # below both the bound's successor and the dtype's max
        nonfinite = program * 0
        nan = program * 0
        saturated = program * 0
        touched = program * 0
        max_bits = (program * 0).to(tl.int32)  # largest finite magnitude, as bits
        full = n // BLOCK
        for tile in range(program, full, programs):
            nonfinite, nan, saturated, touched, max_bits = clamp_tile(
                x_ptr, out_ptr, tile * BLOCK, n, fast_below, limit_bits, negative_limit_bits, nan_bits,
                nonfinite, nan, saturated, touched, max_bits, BITS, INF_BITS, MAX_BITS, REPLACE_NAN, BLOCK, SUB, VEC,
            )  # fmt: skip
        if (n % BLOCK != 0) & (program == full % programs):  # the partial tile: always counted element by element
            nonfinite, nan, saturated, touched, max_bits = clamp_counted(
                x_ptr, out_ptr, full * BLOCK, n, limit_bits, negative_limit_bits, nan_bits,
                nonfinite, nan, saturated, touched, max_bits,
                BITS, INF_BITS, MAX_BITS, REPLACE_NAN, BLOCK, SUB, VEC, True,
            )  # fmt: skip
        # most programs have nothing to count: only the max and the counter are contended
        if nonfinite > 0:
            tl.atomic_add(scratch_ptr + 1, nonfinite, sem="relaxed")
        if nan > 0:
            tl.atomic_add(scratch_ptr + 2, nan, sem="relaxed")
        if max_bits > 0:
            tl.atomic_max(scratch_ptr + 3, max_bits.to(tl.int64), sem="relaxed")
        if saturated > 0:
            tl.atomic_add(scratch_ptr + 4, saturated, sem="relaxed")
        if touched > 0:
            tl.atomic_add(scratch_ptr + 5, touched, sem="relaxed")
        finished = tl.atomic_add(scratch_ptr, 1, sem="acq_rel")  # releases this program's sums, acquires the others'
        if finished == programs - 1:
            largest_bits = tl.atomic_xchg(scratch_ptr + 3, 0, sem="relaxed").to(tl.int32)
            if x_ptr.dtype.element_ty == tl.bfloat16:  # bf16 is float32's upper half: widened exactly, subnormals too
                largest = (largest_bits << 16).to(tl.float32, bitcast=True)
            else:
                largest = largest_bits.to(tl.int16 if BITS == 16 else tl.int32).to(x_ptr.dtype.element_ty, bitcast=True)
            tl.store(stats_ptr, tl.atomic_xchg(scratch_ptr + 1, 0, sem="relaxed").to(tl.float64))
            tl.store(stats_ptr + 1, tl.atomic_xchg(scratch_ptr + 2, 0, sem="relaxed").to(tl.float64))
            tl.store(stats_ptr + 2, largest.to(tl.float64))
            tl.store(stats_ptr + 3, tl.atomic_xchg(scratch_ptr + 4, 0, sem="relaxed").to(tl.float64))
            tl.store(stats_ptr + 4, tl.atomic_xchg(scratch_ptr + 5, 0, sem="relaxed").to(tl.float64))
            tl.store(scratch_ptr, 0)  # ready for the next launch on this stream

    @triton.jit(do_not_specialize=["tensors", "grid", "n_single"])
    def stats_many(
        base_ptr,  # the first tensor: every tensor's address is an element offset from it
        table_ptr,  # int64 [4, T]: element offsets, element counts, first program, programs (unused when SINGLE)
        partials_ptr,  # float64 [4, G], each column written before it is read
        counter_ptr,  # int64 [T], zero: one completion counter per tensor, put back to zero by its last program
        out_ptr,  # float64 [T, 4]: the statistics (device memory, or pinned host memory the device writes into)
        tensors,
        grid,
        n_single,  # the element count when SINGLE
        BITS: tl.constexpr,
        INF_BITS: tl.constexpr,
        MAX_BITS: tl.constexpr,
        ALIGNED: tl.constexpr,
        SINGLE: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,
        VEC: tl.constexpr,
    ):
        # Each program reads its share of the tensor that owns it and stores one column of partials; the last of a
        # tensor's programs to finish (its completion counter) reduces that tensor's columns into its statistics.
        # One launch, and the reductions of different tensors run in parallel.
        program = tl.program_id(0).to(tl.int64)
        if SINGLE:
            which = program * 0
            first = program * 0
            programs = program * 0 + grid
            nonfinite, nan, largest, saturated = finite_stats_of_tiles(
                base_ptr, n_single, program, grid, BITS, INF_BITS, MAX_BITS, BLOCK, VEC
            )
        else:
            entries = tl.arange(0, BLOCK_T)
            firsts = tl.load(table_ptr + 2 * tensors + entries, mask=entries < tensors, other=grid)
            which = tl.sum((firsts <= program).to(tl.int64), axis=0) - 1
            offset = tl.load(table_ptr + which)
            if ALIGNED:
                offset = tl.multiple_of(offset, VEC)
            n = tl.load(table_ptr + tensors + which)
            first = tl.load(table_ptr + 2 * tensors + which)
            programs = tl.load(table_ptr + 3 * tensors + which)
            nonfinite, nan, largest, saturated = finite_stats_of_tiles(
                base_ptr + offset, n, program - first, programs, BITS, INF_BITS, MAX_BITS, BLOCK, VEC
            )
        column = partials_ptr + program
        tl.store(column, nonfinite.to(tl.float64))
        tl.store(column + grid, nan.to(tl.float64))
        tl.store(column + 2 * grid, largest)
        tl.store(column + 3 * grid, saturated.to(tl.float64))
        finished = tl.atomic_add(counter_ptr + which, 1, sem="acq_rel")  # releases this column, acquires the others
        if finished == programs - 1:
            # in chunks of BLOCK_P columns: a wide reduction here would cost the streaming loop above its registers
            lanes = tl.arange(0, BLOCK_P)
            sum_nonfinite = tl.zeros([BLOCK_P], dtype=tl.float64)
            sum_nan = tl.zeros([BLOCK_P], dtype=tl.float64)
            max_finite = tl.zeros([BLOCK_P], dtype=tl.float64)
            sum_saturated = tl.zeros([BLOCK_P], dtype=tl.float64)
            for start in range(0, programs, BLOCK_P):
                columns = partials_ptr + first + start + lanes
                inside = start + lanes < programs
                sum_nonfinite += tl.load(columns, mask=inside, other=0.0, cache_modifier=".cg")
                sum_nan += tl.load(columns + grid, mask=inside, other=0.0, cache_modifier=".cg")
                max_finite = tl.maximum(max_finite, tl.load(columns + 2 * grid, mask=inside, other=0.0, cache_modifier=".cg"))
                sum_saturated += tl.load(columns + 3 * grid, mask=inside, other=0.0, cache_modifier=".cg")
            stats_ptr = out_ptr + which * 4
            tl.store(stats_ptr, tl.sum(sum_nonfinite, axis=0))
            tl.store(stats_ptr + 1, tl.sum(sum_nan, axis=0))
            tl.store(stats_ptr + 2, tl.max(max_finite, axis=0))
            tl.store(stats_ptr + 3, tl.sum(sum_saturated, axis=0))
            tl.store(counter_ptr + which, 0)  # ready for the next launch on this stream

    return types.SimpleNamespace(
        clamp_with_stats_kernel=clamp_with_stats_kernel,
        stats_many=stats_many,
        element_types={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32},
        next_power_of_2=triton.next_power_of_2,
        knobs=getattr(triton, "knobs", None),  # launch hooks live here from triton 3.4; without it, no direct launch
    )
