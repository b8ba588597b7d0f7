"""Hypothesis strategies for tensors whose values sit on the edges of their float format, in awkward layouts.

The guarded kernels (``conformance/kernels``) classify values by the dtype's edges, so that is where their bugs would be: NaN,
±inf, ±0, the smallest and the largest subnormal, the smallest normal, the largest finite value, and the values just
above it that a conversion rounds back to it or up to inf. Element values mix those with floats of the dtype's width
and floats anywhere in float64 (which round, overflow or flush when converted). Shapes have 1 to 3 dimensions of odd
sizes and at most 300 elements. Layouts are contiguous, transposed (dense but permuted: a kernel may read it in
place), a strided slice (not dense: it must be copied or read with strides) and offset by one element in its storage
(a pointer no vector load may assume aligned).

Values are drawn as float64 and converted with torch, so the tensor holds what torch's rounding makes of them, on
whichever device the test asks for; tests compute their expectations from the tensor itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
MAX_ELEMENTS = 300
HYPOTHESIS_WIDTH = {torch.float16: 16, torch.float32: 32, torch.float64: 64}  # bfloat16: no such width; 32 rounds to it


def top_spacing(dtype: torch.dtype) -> float:
    """The distance between the dtype's largest finite value and the one below it."""
    info = torch.finfo(dtype)
    return math.ldexp(info.eps, math.frexp(info.max)[1] - 1)


def edge_values(dtype: torch.dtype) -> tuple[float, ...]:
    """The dtype's edges, both signs, as float64: converting ``max + spacing/4`` gives max, ``max + spacing/2`` gives inf
    (a tie, rounded to the even neighbour: max's last mantissa bit is odd)."""
    info = torch.finfo(dtype)
    smallest_subnormal = info.smallest_normal * info.eps
    spacing = top_spacing(dtype)
    magnitudes = (
        0.0,
        smallest_subnormal,
        info.smallest_normal - smallest_subnormal,  # the largest subnormal
        info.smallest_normal,
        1.0,
        info.max - spacing,
        info.max,
        info.max + spacing / 4,
        info.max + spacing / 2,
        math.inf,
    )
    return (math.nan, *magnitudes, *(-m for m in magnitudes))


def element_values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """One element: an edge of ``dtype``, a float of its width, or any float64 (rounded on conversion)."""
    width = HYPOTHESIS_WIDTH.get(dtype, 32)
    return st.one_of(
        st.sampled_from(edge_values(dtype)),
        st.floats(width=width, allow_nan=True, allow_infinity=True, allow_subnormal=True),
        st.floats(allow_nan=True, allow_infinity=True),
    )


def shapes(max_elements: int = MAX_ELEMENTS) -> st.SearchStrategy[tuple[int, ...]]:
    """1 to 3 dimensions, each between 1 and what keeps the product within ``max_elements``."""
    return st.one_of(
        st.tuples(st.integers(1, max_elements)),
        st.tuples(*[st.integers(1, math.isqrt(max_elements))] * 2),
        st.tuples(*[st.integers(1, round(max_elements ** (1 / 3)))] * 3),
    )


def storage_size(shape: tuple[int, ...], layout: str) -> int:
    """How many elements the storage under a ``layout`` view of ``shape`` holds."""
    numel = math.prod(shape)
    return {"contiguous": numel, "transposed": numel, "strided": 2 * numel, "offset": numel + 1}[layout]


def view_as_layout(storage: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A view of the 1-D ``storage`` (``storage_size`` elements) with ``shape``, laid out as ``layout`` says."""
    numel = math.prod(shape)
    if layout == "contiguous":
        return storage.view(shape)
    if layout == "transposed":  # stored with the dimensions reversed, viewed back: dense, not contiguous
        return storage.view(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "strided":  # every other element of a last dimension twice as long: not dense
        return storage.view(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "offset":  # starts one element into its storage
        return storage[1 : numel + 1].view(shape)
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


@st.composite
def tensors(
    draw,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    shape: st.SearchStrategy[tuple[int, ...]] | None = None,
    layout: st.SearchStrategy[str] | None = None,
) -> torch.Tensor:
    """A ``dtype`` tensor on ``device`` with edge-heavy values, an odd shape and one of the ``LAYOUTS``."""
    drawn_shape = draw(shape if shape is not None else shapes())
    drawn_layout = draw(layout if layout is not None else st.sampled_from(LAYOUTS))
    values = draw(arrays(np.float64, storage_size(drawn_shape, drawn_layout), elements=element_values(dtype)))
    storage = torch.from_numpy(values).to(device=device).to(dtype)
    return view_as_layout(storage, drawn_shape, drawn_layout)


def float_tensors(dtypes: tuple[torch.dtype, ...] = DTYPES, device: str | torch.device = "cpu") -> st.SearchStrategy[torch.Tensor]:
    """``tensors`` of any of ``dtypes``."""
    return st.sampled_from(dtypes).flatmap(lambda dtype: tensors(dtype, device))
