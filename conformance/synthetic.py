"""Seeded synthetic tensors that are bit-identical on every machine.

``torch.randn`` on CPU takes a vectorised Box-Muller path whose ``log``/``cos`` results depend on the instruction set
(AVX2, AVX-512, NEON), so the same seed can give different last bits on two runners. Goldens and their hashes must not
depend on that. Here every value comes from integer arithmetic on PCG64 output plus one correctly rounded
multiplication:

* each 64-bit PCG64 word is split into four 16-bit integers ``k_i``;
* their sum ``S`` is an Irwin-Hall(4) variate on a 2**18 grid; ``(S - 131070) * sqrt(3) / 65536`` has mean 0 and
  variance 1 (up to the grid), is symmetric and bounded at about ±3.46;
* ``mean + std * z`` is formed in float32 with one rounding per operation.

The tails are lighter than a Gaussian's, which is harmless for weights; the stress profiles put outliers in
explicitly, where they belong.

Each tensor is keyed by ``(seed, name)``, so adding a tensor never changes another one, and two subjects that name a
weight the same way (or map names onto one canonical layout) receive the same values.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

_IRWIN_HALL_CENTRE = 2 * 65535  # E[S] for four uniform integers in [0, 65535]
_IRWIN_HALL_SCALE = math.sqrt(3.0) / 65536.0
_CHUNK = 1 << 22


def derive_seed(seed: int, *parts: str) -> int:
    """A 128-bit seed derived from a base seed and names (stable across Python versions and platforms)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:16], "little")


def _fill(out: np.ndarray, seed: int, key: tuple[str, ...], mean: float, std: float) -> None:
    bitgen = np.random.PCG64(derive_seed(seed, *key))
    scale = np.float32(std * _IRWIN_HALL_SCALE)
    offset = np.float32(mean)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        parts = bitgen.random_raw(stop - start).astype("<u8", copy=False).view("<u2").reshape(-1, 4)
        total = parts[:, 0].astype(np.int32)
        total += parts[:, 1]
        total += parts[:, 2]
        total += parts[:, 3]
        total -= _IRWIN_HALL_CENTRE
        chunk = total.astype(np.float32)  # exact: |total| < 2**18
        chunk *= scale
        chunk += offset
        out[start:stop] = chunk


def normal(shape: Sequence[int], seed: int, *key: str, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Float32 tensor with the given mean and standard deviation, identical on every machine for the same arguments.

    Every step is an exact integer operation or one IEEE-rounded float32 operation (multiply, then add), so the
    result does not depend on the instruction set.
    """
    out = np.empty(math.prod(shape), dtype=np.float32)
    _fill(out, seed, tuple(key), mean, std)
    return torch.from_numpy(out).reshape(tuple(shape))
