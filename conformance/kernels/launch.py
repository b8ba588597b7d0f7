"""The launch layer: launch shapes, the direct launcher of compiled kernels, devices, streams and bit patterns."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import contextlib
import functools
import math
import threading
from dataclasses import dataclass

import torch

from .common import triton_interpreter
from .triton_source import _triton_kernels

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

    @staticmethod
    def key(index: int, addresses: tuple[int, ...], integers: tuple[int, ...], constexprs: dict) -> tuple:
        """What a compiled kernel is kept under: what triton specialised it on (the class docstring says what)."""
        return (index, id(constexprs), *[a % 16 == 0 for a in addresses], *[-(2**31) <= i < 2**31 for i in integers])

    def __call__(self, grid: int, device: torch.device, addresses: tuple[int, ...], tensors, integers: tuple[int, ...], constexprs: dict) -> None:
        """``tensors`` makes the tensor arguments (views) for triton's own launch; ``addresses`` are their addresses.
        ``constexprs`` (values hashable, in the kernel's order) hold the dtype's facts, so they key the dtype too."""
        index = _device_index(device)
        key = self.key(index, addresses, integers, constexprs)
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


_SCRATCH_LOCK = threading.Lock()  # guards the creation of per-stream scratch (clamp and stats)
