"""What every path of the guarded kernels shares: the statistics' names, the dtypes triton takes, which path a
tensor goes to, and the dtype rounding of bounds."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import functools
import importlib.util
import os

import torch

IMPLS = ("auto", "torch", "triton")
STATS = ("nonfinite", "nan", "max_abs", "saturated")
CLAMP_STATS = (*STATS, "touched")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DTYPE_SET = frozenset(TRITON_DTYPES)


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
