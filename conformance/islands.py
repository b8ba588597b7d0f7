"""Float32 islands of a float64 forward: the ops whose result is float32 (or complex64, or half) while the golden runs
in float64, and whether another device's kernel must give the same bits for them.

The subjects upcast on purpose for half precision (``hidden_states.float()`` before a LayerNorm, ``.to(float32)`` in
an RMSNorm); in a float64 forward those are downcasts. A basic elementwise op on float32 is correctly rounded on every
device (the same bits on a CPU and a GPU); a reduction (mean, layer_norm), ``rsqrt`` (approximate on CUDA) or a fused
multiply-add is not. A golden whose forward has islands of that second kind is made on the CPU only: a GPU-made one
differs from it by hundreds of float32 ulps (docs/gpu-notes.md). One with none may be made on the GPU, where a
real-scale float64 forward takes milliseconds instead of seconds.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LOW_PRECISION = (torch.float32, torch.complex64, torch.float16, torch.bfloat16)
# float32 results that are correctly rounded (or exact) on every device: the same bits on a CPU and a GPU
SAME_BITS = frozenset({
    "add", "sub", "mul", "div", "neg", "sqrt", "abs", "_to_copy", "copy_", "clone", "cat", "stack", "view", "reshape",
    "expand", "permute", "transpose", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind",
    "t", "alias", "detach", "_unsafe_view", "view_as_real", "view_as_complex", "index", "clamp", "where", "masked_fill",
    "contiguous", "narrow", "repeat", "chunk", "movedim", "_reshape_alias", "as_strided", "rsub", "flatten", "unflatten",
})  # fmt: skip
# ops that make tensors rather than compute on values (module construction before the weights load, nearest upsampling)
NOT_ARITHMETIC = frozenset({
    "empty", "empty_strided", "uniform", "normal", "randn", "rand", "ones", "zeros", "zero", "fill", "full", "arange",
    "linspace", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_nearest2d", "upsample_nearest3d",
})  # fmt: skip


class Islands(TorchDispatchMode):
    """Counts the low-precision results of every op dispatched while active: ``(op, dtype, same_bits) -> count``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[tuple[str, str, bool]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        low = [t for t in results if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION]
        if low:
            raw = func.overloadpacket.__name__
            name = raw if raw == "copy_" else raw.rstrip("_")
            if name not in NOT_ARITHMETIC:
                complex_product = any(t.is_complex() for t in low) and name in ("mul", "div")
                self.ops[(name, str(low[0].dtype).removeprefix("torch."), name in SAME_BITS and not complex_product)] += 1
        return out

    def may_differ(self) -> dict[str, int]:
        """The islands whose bits another device's kernels need not reproduce, as ``"op (dtype)": count``."""
        return {f"{n} ({d})": c for (n, d, same), c in sorted(self.ops.items()) if not same}

    def same_bits(self) -> dict[str, int]:
        return {f"{n} ({d})": c for (n, d, same), c in sorted(self.ops.items()) if same}
