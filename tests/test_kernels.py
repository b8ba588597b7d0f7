"""The guarded kernels agree with a float64 reference, exactly: counts as integers, the clamp's output bit for bit.

Every path is held to the same reference: torch on CPU (always), torch on CUDA, the triton kernels on CUDA, and the
triton kernels under triton's interpreter on CPU (``TRITON_INTERPRET=1`` with triton installed: the kernels' logic
checked without a GPU). The hypothesis tensors are small (one tile of the kernels); the seeded large tensors span
several tiles and programs, with specials in a few tiles only, so both the common-tile shortcut and the counting
path run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.kernels import (
    CLAMP_TILE_BYTES,
    TILE_BYTES,
    bit_patterns,
    clamp_with_stats,
    finite_stats,
    finite_stats_many,
    memory_order_view,
    select_impl,
    triton_available,
    triton_interpreter,
)
from conformance.probes import tensor_stats
from tests.strategies import DTYPES, LAYOUTS, edge_values, float_tensors, storage_size, top_spacing, view_as_layout

CUDA = torch.cuda.is_available()
TRITON_ON_CUDA = CUDA and triton_available()
INTERPRETED = triton_available() and triton_interpreter()
SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

PATHS = [
    pytest.param("cpu", "torch", id="torch-cpu"),
    pytest.param("cuda", "torch", id="torch-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
    pytest.param(
        "cuda", "triton", id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not TRITON_ON_CUDA, reason="needs CUDA and triton")]
    ),
    pytest.param(
        "cpu",
        "triton",
        id="triton-interpreter",
        marks=pytest.mark.skipif(not INTERPRETED, reason="needs triton and TRITON_INTERPRET=1 (the kernels on CPU, interpreted)"),
    ),
]
COMPILED_PATHS = PATHS[:3]  # the interpreter is too slow for tensors of 2**24 elements

LIMITS = st.one_of(
    st.none(),
    st.sampled_from([0.0, 1.0, 448.0, 65504.0, 65519.0, 65520.0, 1e5, 3.3895313892515355e38, math.inf]),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=True),
)
REPLACEMENTS = st.one_of(st.none(), st.sampled_from([0.0, -0.0, -1.0, 65504.0, 1e5, math.nan]), st.floats(allow_nan=False))


# -- the reference: float64, elementwise, written from the definitions ------------------------------------------------


def reference_stats(x: torch.Tensor) -> torch.Tensor:
    wide = x.detach().cpu().double()
    finite = torch.isfinite(wide)
    return torch.tensor(
        [
            float((~finite).sum()),
            float(torch.isnan(wide).sum()),
            float(wide.abs()[finite].max()) if bool(finite.any()) else 0.0,
            float((wide.abs() == torch.finfo(x.dtype).max).sum()),
        ],
        dtype=torch.float64,
    )


def rounded(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


def reference_clamp(x: torch.Tensor, limit: float | None, nan: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    wide = x.detach().cpu().double()
    bound = rounded(torch.finfo(x.dtype).max if limit is None else limit, x.dtype)
    out = torch.where(wide > bound, bound, torch.where(wide < -bound, -bound, wide))
    if nan is not None:
        out = torch.where(torch.isnan(wide), rounded(nan, x.dtype), out)
    touched = ((out != wide) & ~(torch.isnan(out) & torch.isnan(wide))).sum(dtype=torch.float64)
    return out.to(x.dtype), torch.cat([reference_stats(x), touched.reshape(1)])


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shape, dtype and bits, except that any NaN matches any NaN (payloads are not part of the contract)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    actual_nan, expected_nan = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(actual_nan, expected_nan)
    as_int = SAME_WIDTH_INT[actual.element_size()]
    assert torch.equal(actual.view(as_int)[~actual_nan], expected.view(as_int)[~expected_nan])


def on(device: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``device`` with its layout kept (``Tensor.to`` would make a strided slice contiguous)."""
    if x.device.type == device:
        return x
    moved = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
    return moved.copy_(x)


# -- properties ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None)
@given(x=float_tensors())
def test_finite_stats_matches_reference(device, impl, x):
    stats = finite_stats(on(device, x), impl=impl)
    assert stats.dtype == torch.float64 and stats.device.type == device
    assert torch.equal(stats.cpu(), reference_stats(x))


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None)
@given(x=float_tensors(), limit=LIMITS, nan=REPLACEMENTS)
def test_clamp_with_stats_matches_reference(device, impl, x, limit, nan):
    out, stats = clamp_with_stats(on(device, x), limit=limit, nan=nan, impl=impl)
    expected_out, expected_stats = reference_clamp(x, limit, nan)
    assert out.device.type == device
    assert_same_values(out, expected_out)
    assert torch.equal(stats.cpu(), expected_stats)


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None)
@given(x=float_tensors(DTYPES + (torch.float64,)))
def test_finite_stats_equals_probes_tensor_stats(device, impl, x):
    """So that the probes could compute their stats with ``finite_stats``."""
    if impl == "triton" and x.dtype == torch.float64:
        impl = "auto"  # float64 has no kernel; auto takes the torch path
    x = on(device, x)
    assert torch.equal(finite_stats(x, impl=impl), tensor_stats(x))


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None, max_examples=25)
@given(xs=st.lists(float_tensors(), min_size=1, max_size=6), big=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_finite_stats_many_matches_reference_per_tensor(device, impl, xs, big, seed):
    """The probes' one-launch read of many outputs: row ``i`` is exactly the reference stats of tensor ``i``, whatever
    the mix of dtypes, layouts and sizes (``big`` adds tensors of several tiles next to the small ones)."""
    xs = list(xs) + [_seeded_tensor(DTYPES[(seed + k) % len(DTYPES)], 3 * TILE_BYTES // 2 + k, seed + k, 3, "cpu") for k in range(big)]
    stats = finite_stats_many([on(device, x) for x in xs], impl=impl)
    assert stats.shape == (len(xs), 4) and stats.dtype == torch.float64 and stats.device.type == device
    assert torch.equal(stats.cpu(), torch.stack([reference_stats(x) for x in xs]))


def test_finite_stats_many_of_nothing_and_of_mixed_devices():
    assert finite_stats_many([]).shape == (0, 4)
    if CUDA:
        with pytest.raises(ValueError, match="several devices"):
            finite_stats_many([torch.zeros(2), torch.zeros(2, device="cuda")])


def _seeded_tensor(dtype, numel, seed, specials, device):
    """Normal values scaled to the dtype's range, with a few edge values planted at seeded positions."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator, dtype=torch.float64) * 100.0
    edges = torch.tensor(edge_values(dtype), dtype=torch.float64)
    positions = torch.randint(numel, (specials,), generator=generator)
    values[positions] = edges[torch.randint(len(edges), (specials,), generator=generator)]
    return values.to(device=device, dtype=dtype)


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None, max_examples=15)
@given(
    dtype=st.sampled_from(DTYPES),
    tiles=st.integers(1, 7),
    remainder=st.integers(0, 9),
    seed=st.integers(0, 2**32 - 1),
    specials=st.integers(0, 6),
    limit=LIMITS,
    nan=REPLACEMENTS,
)
def test_several_tiles_match_reference(device, impl, dtype, tiles, remainder, seed, specials, limit, nan):
    """Tensors of several kernel tiles (each program strides over more than one), specials in a few of them."""
    numel = tiles * (TILE_BYTES // dtype.itemsize) - 5 + remainder
    x = _seeded_tensor(dtype, numel, seed, specials, device)
    assert torch.equal(finite_stats(x, impl=impl).cpu(), reference_stats(x))
    out, stats = clamp_with_stats(x, limit=limit, nan=nan, impl=impl)
    expected_out, expected_stats = reference_clamp(x, limit, nan)
    assert_same_values(out, expected_out)
    assert torch.equal(stats.cpu(), expected_stats)


def test_the_clamps_statistics_rows_are_aligned_as_its_direct_launch_assumes():
    """The direct launch reuses a kernel specialised on 16-byte aligned pointers: every row handed out must be one."""
    from conformance.kernels.clamp import STATS_SLOTS_PER_CHUNK, _stats_rows

    rows = _stats_rows(torch.device("cpu"))
    assert len(rows) == STATS_SLOTS_PER_CHUNK and all(r.shape == (5,) and r.is_contiguous() for r in rows)
    assert all(r.data_ptr() % 16 == 0 for r in rows)
    assert len({r.data_ptr() for r in rows}) == len(rows)  # no two calls share a row


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_ON_CUDA, reason="needs CUDA and triton")
@settings(deadline=None)
@given(x=float_tensors(), limit=LIMITS, nan=REPLACEMENTS)
def test_a_repeated_guard_call_takes_the_remembered_plan_and_agrees(x, limit, nan):
    """A guard's second call with the same dtype, bound and replacement skips the checks (``_CLAMP_PLANS``) and
    gives what the checked call gave, and the reference."""
    from conformance.kernels import _CLAMP_PLANS, TRITON_DTYPES

    x = x.cuda()
    expected_out, expected_stats = reference_clamp(x, limit, nan)
    first = clamp_with_stats(x, limit=limit, nan=nan)
    key = (x.dtype, limit, None if nan is None else float(nan).hex())
    assert (key in _CLAMP_PLANS) == (x.dtype in TRITON_DTYPES)
    again = clamp_with_stats(x, limit=limit, nan=nan)
    for out, stats in (first, again):
        assert_same_values(out, expected_out)
        assert torch.equal(stats.cpu(), expected_stats)


@pytest.mark.parametrize(("device", "impl"), PATHS)
@settings(deadline=None)
@given(x=float_tensors(dtypes=(torch.float16,)), nan=st.sampled_from([0.0, None]))
def test_default_clamp_is_the_subjects_fp16_guards(device, impl, x, nan):
    """``limit=None`` on fp16 is diffusers' ``clip(-65504, 65504)``; with ``nan=0`` it is ComfyUI's ``nan_to_num``."""
    x = on(device, x)
    out, _ = clamp_with_stats(x, nan=nan, impl=impl)
    if nan is None:
        assert_same_values(out, x.clip(-65504, 65504))
    else:
        assert_same_values(out, torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0))


# -- examples: the edges by name -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "impl"), PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensor(device, impl, dtype):
    x = torch.empty(0, 3, dtype=dtype, device=device)
    assert finite_stats(x, impl=impl).tolist() == [0.0, 0.0, 0.0, 0.0]
    out, stats = clamp_with_stats(x, nan=0.0, impl=impl)
    assert out.shape == x.shape and out.dtype == dtype
    assert stats.tolist() == [0.0] * 5


@pytest.mark.parametrize(("device", "impl"), PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_nan(device, impl, dtype):
    x = torch.full((5, 7), math.nan, dtype=dtype, device=device)
    assert finite_stats(x, impl=impl).tolist() == [35.0, 35.0, 0.0, 0.0]  # the max of no finite value is 0
    out, stats = clamp_with_stats(x, impl=impl)
    assert bool(torch.isnan(out).all()) and stats.tolist() == [35.0, 35.0, 0.0, 0.0, 0.0]  # NaN left NaN: untouched
    out, stats = clamp_with_stats(x, nan=0.0, impl=impl)
    assert not bool(out.any()) and stats[4].item() == 35.0


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_fp16_overflow_is_inf_and_its_clip_is_saturated(device, impl):
    x = torch.tensor([1.0, 70000.0, -70000.0, 65520.0, 65519.0, 65504.0, -65504.0], device=device).to(torch.float16)
    assert x.tolist()[1:5] == [math.inf, -math.inf, math.inf, 65504.0]  # 65520 is the tie that rounds to inf
    assert finite_stats(x, impl=impl).tolist() == [3.0, 0.0, 65504.0, 3.0]
    out, stats = clamp_with_stats(x, impl=impl)
    assert out.tolist() == [1.0, 65504.0, -65504.0, 65504.0, 65504.0, 65504.0, -65504.0]
    assert stats.tolist() == [3.0, 0.0, 65504.0, 3.0, 3.0]


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_nan_replacement_counts_as_touched(device, impl):
    x = torch.tensor([math.nan, 2.0, -math.nan, -0.0, math.inf], dtype=torch.float16, device=device)
    out, stats = clamp_with_stats(x, nan=0.0, impl=impl)
    assert out.tolist() == [0.0, 2.0, 0.0, -0.0, 65504.0]
    assert stats.tolist() == [3.0, 2.0, 2.0, 0.0, 3.0]


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_replacement_keeps_its_sign(device, impl):
    x = torch.tensor([math.nan], dtype=torch.bfloat16, device=device)
    for nan in (0.0, -0.0, 0.0, -0.0):  # alternating: a conversion cache must not take -0.0 for 0.0
        out, _ = clamp_with_stats(x, nan=nan, impl=impl)
        assert torch.signbit(out).item() == (math.copysign(1.0, nan) < 0)


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_limit_keeps_the_sign_of_zero(device, impl):
    x = torch.tensor([3.0, -3.0, 0.0, -0.0, math.nan], dtype=torch.float32, device=device)
    for limit in (0.0, -0.0):
        out, stats = clamp_with_stats(x, limit=limit, impl=impl)
        assert torch.signbit(out[:4]).tolist() == [False, True, False, True] and math.isnan(out[4].item())
        assert stats[4].item() == 2.0


@pytest.mark.parametrize(("device", "impl"), PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("remainder", [0, 1, -1], ids=["whole-tiles", "one-over", "one-short"])
def test_clamp_tiles_and_the_partial_tile(device, impl, dtype, remainder):
    """The clamp kernel's tiles: clean ones are stored as read (only their max kept), a tile holding a value beyond the
    bound or the dtype's max is clamped and counted element by element, and a partial last tile is always counted,
    masked. Five whole tiles (uneven over the interpreter's three programs) plus a partial one, specials in the first,
    a middle and the last whole tile and at both ends of the partial one."""
    block = CLAMP_TILE_BYTES // dtype.itemsize
    numel = 5 * block + (remainder % block)
    x = _seeded_tensor(dtype, numel, 7, 0, device)
    x[0] = math.inf
    x[2 * block + 3] = 5000.0  # beyond the bound of 1000 below, finite
    x[5 * block - 1] = math.nan  # the last element of the last whole tile
    x[5 * block :] = 0.5
    if numel > 5 * block:
        x[5 * block] = -3000.0
        x[-1] = -math.inf
    for limit, nan in ((None, None), (1000.0, 0.0), (None, -1.0)):
        out, stats = clamp_with_stats(x, limit=limit, nan=nan, impl=impl)
        expected_out, expected_stats = reference_clamp(x, limit, nan)
        assert_same_values(out, expected_out)
        assert torch.equal(stats.cpu(), expected_stats)


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_clamp_launches_count_only_their_own(device, impl):
    """The clamp's accumulators and completion counter are kept per device and stream and put back to zero by each
    launch's last program: a launch after one that counted a great deal (or one of another dtype) counts only its own
    tensor."""
    block = CLAMP_TILE_BYTES // 2
    busy = torch.full((3 * block + 7,), math.inf, dtype=torch.float16, device=device)
    busy[1] = math.nan
    clean = _seeded_tensor(torch.float16, 2 * block + 3, 11, 0, device)
    other = _seeded_tensor(torch.bfloat16, block + 5, 12, 4, device)
    for x in (busy, clean, busy, other, clean, busy[:5]):
        out, stats = clamp_with_stats(x, nan=0.0, impl=impl)
        expected_out, expected_stats = reference_clamp(x, None, 0.0)
        assert_same_values(out, expected_out)
        assert torch.equal(stats.cpu(), expected_stats)


@pytest.mark.parametrize(("device", "impl"), COMPILED_PATHS)
def test_counts_are_exact_past_float32_precision(device, impl):
    numel = 2**24 + 3  # float32 counts would round this to 2**24 + 4
    x = torch.full((numel,), math.inf, dtype=torch.float16, device=device)
    x[0] = math.nan
    assert finite_stats(x, impl=impl).tolist() == [numel, 1.0, 0.0, 0.0]
    _, stats = clamp_with_stats(x, impl=impl)
    assert stats[4].item() == numel - 1


@pytest.mark.parametrize(("device", "impl"), PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_clamp_takes_every_layout(device, impl, layout):
    shape = (3, 5, 7)
    storage = torch.arange(storage_size(shape, layout), dtype=torch.float32, device=device) - 50
    x = view_as_layout(storage, shape, layout)
    out, _ = clamp_with_stats(x, limit=10.0, impl=impl)
    assert_same_values(out, x.clamp(-10.0, 10.0))
    if memory_order_view(x) is not None:
        assert out.stride() == x.stride()  # a dense input's layout is kept


# -- dispatch, arguments, layouts --------------------------------------------------------------------------------------


def test_auto_takes_torch_on_cpu():
    assert select_impl(torch.ones(3), "auto") == "torch"
    assert select_impl(torch.ones(3), "torch") == "torch"


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs the kernels on CPU")
def test_forced_triton_refuses_where_it_cannot_run():
    with pytest.raises(RuntimeError, match="impl='triton'"):
        finite_stats(torch.ones(3), impl="triton")


@pytest.mark.skipif(not TRITON_ON_CUDA, reason="needs CUDA and triton")
@pytest.mark.gpu
def test_auto_takes_triton_on_cuda_for_kernel_dtypes():
    assert select_impl(torch.ones(3, device="cuda", dtype=torch.float16)) == "triton"
    assert select_impl(torch.ones(3, device="cuda", dtype=torch.float64)) == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        select_impl(torch.ones(3, device="cuda", dtype=torch.float64), "triton")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="impl"):
        finite_stats(torch.ones(3), impl="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        finite_stats(torch.ones(3, dtype=torch.int32))
    for limit in (-1.0, math.nan):
        with pytest.raises(ValueError, match="limit"):
            clamp_with_stats(torch.ones(3), limit=limit)


def test_memory_order_view_reads_dense_layouts_in_place():
    base = torch.arange(60.0).view(3, 4, 5)
    for dense in (base, base.permute(2, 0, 1), base.transpose(0, 1), base[1], torch.tensor(7.0)):
        flat = memory_order_view(dense)
        assert flat is not None and flat.data_ptr() == dense.data_ptr()
        assert torch.equal(flat.sort().values, dense.flatten().sort().values)
    for sparse in (base[:, ::2], base[..., 1:], base[:1].expand(3, 4, 5)):
        assert memory_order_view(sparse) is None


def test_bit_patterns_are_the_dtype_edges():
    assert (bit_patterns(torch.float16).max, bit_patterns(torch.float16).infinity) == (0x7BFF, 0x7C00)
    assert (bit_patterns(torch.bfloat16).max, bit_patterns(torch.bfloat16).infinity) == (0x7F7F, 0x7F80)
    assert (bit_patterns(torch.float32).max, bit_patterns(torch.float32).infinity) == (0x7F7FFFFF, 0x7F800000)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_edge_values_round_where_they_say(dtype):
    info = torch.finfo(dtype)
    spacing = top_spacing(dtype)
    assert rounded(info.max - spacing, dtype) == info.max - spacing < info.max
    assert rounded(info.max + spacing / 4, dtype) == info.max
    assert rounded(info.max + spacing / 2, dtype) == math.inf
    subnormals = torch.tensor(edge_values(dtype)[2:4], dtype=torch.float64).to(dtype).double()
    assert 0 < subnormals[0] < subnormals[1] < info.smallest_normal


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_are_what_they_say(layout):
    shape = (4, 6)
    x = view_as_layout(torch.arange(storage_size(shape, layout), dtype=torch.float32), shape, layout)
    assert x.shape == shape
    assert x.is_contiguous() == (layout in ("contiguous", "offset"))
    assert (memory_order_view(x) is not None) == (layout != "strided")
    assert (x.storage_offset() == 1) == (layout == "offset")


@pytest.mark.parametrize(("device", "impl"), COMPILED_PATHS)
def test_many_with_more_programs_than_one_reduction_chunk(device, impl):
    """On a GPU the grid reaches a thousand programs: the last program's reduction then reads several chunks of
    partials, per tensor. Checked against the torch path on large and small tensors together."""
    xs = [_seeded_tensor(dtype, numel, seed, 4, device) for seed, (dtype, numel) in enumerate(
        [(torch.float16, 2**23 + 11), (torch.float16, 5), (torch.float16, 3 * 2**20), (torch.bfloat16, 2**22)]
    )]  # fmt: skip
    assert torch.equal(finite_stats_many(xs, impl=impl).cpu(), torch.stack([reference_stats(x.cpu()) for x in xs]))
    assert torch.equal(finite_stats(xs[0], impl=impl).cpu(), reference_stats(xs[0].cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_ON_CUDA, reason="needs CUDA and triton")
def test_the_direct_launch_is_taken_and_agrees_with_tritons_own(monkeypatch):
    """After the first call of a specialisation, the check launches the compiled kernel directly (no launch hook is
    installed); its statistics equal those of triton's own launch path and the reference, for aligned and unaligned
    tensors of several dtypes in one batch."""
    from conformance.kernels import launch, stats

    torch.manual_seed(5)
    base = torch.randn(3 * 2**20 + 7, device="cuda", dtype=torch.float16)
    base[17] = math.inf
    base[2**20 + 3] = math.nan
    xs = [base, base[1:], torch.randn(4097, device="cuda", dtype=torch.bfloat16), base[5 : 2**20].view(-1, 1)]
    expected = torch.stack([reference_stats(x.cpu()) for x in xs])
    assert launch._no_launch_hooks()
    first = finite_stats_many(xs).cpu()
    assert stats._stats_launcher().compiled, "no compiled kernel was kept for the direct launch"
    direct = finite_stats_many(xs).cpu()
    monkeypatch.setattr(launch, "_no_launch_hooks", lambda: False)  # as with a profiler's hook: triton's own launch
    through_triton = finite_stats_many(xs).cpu()
    assert torch.equal(first, expected) and torch.equal(direct, expected) and torch.equal(through_triton, expected)


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_launches_sharing_the_scratch_each_read_their_own_table(device, impl):
    """Launches on one stream share the counters, table and partials: a table is copied only when it differs from the
    one the scratch holds, and each tensor's last program puts its counter back. Alternating sets (two tables, one of
    them repeated, and single tensors without a table) all agree with the reference."""
    a = [_seeded_tensor(torch.float16, numel, seed, 3, device) for seed, numel in enumerate((3 * 4096 + 5, 77, 8192))]
    b = [_seeded_tensor(torch.float16, numel, seed + 10, 3, device) for seed, numel in enumerate((5, 2 * 4096, 999, 4096 + 1))]
    for xs in (a, b, a, a, [b[1]], b, [a[0]], a):
        assert torch.equal(finite_stats_many(xs, impl=impl).cpu(), torch.stack([reference_stats(x.cpu()) for x in xs]))


@pytest.mark.parametrize(("device", "impl"), PATHS)
def test_host_stats_collects_launches_and_values_for_one_synchronisation(device, impl):
    """``HostStats``: the statistics of several launches (two dtypes, and float64 on the torch path) and single values
    land at the indices handed out; a collection larger than one chunk spans chunks; the next collection reuses the
    memory, and one abandoned with ``reset()`` leaves the next one right."""
    from conformance.kernels import HostStats

    host = HostStats()
    xs = [
        _seeded_tensor(torch.float16, 3 * 4096 + 5, 1, 3, device),
        _seeded_tensor(torch.bfloat16, 999, 2, 2, device),
        _seeded_tensor(torch.float16, 17, 3, 1, device),
        torch.tensor([1.0, math.inf, -2.5], dtype=torch.float64, device=device),
    ]
    for _ in range(2):
        places = host.stats_of(xs[:3], impl=impl) + host.stats_of(xs[3:])  # float64: always the torch path
        count = host.put(torch.tensor(42.0, dtype=torch.float64, device=device))
        many = host.stats_of([xs[2]] * 300, impl=impl)  # 1200 numbers: past the first chunk
        values = host.take()
        for x, at in zip(xs, places):
            assert values[at : at + 4] == reference_stats(x.cpu()).tolist()
        assert values[count] == 42.0
        assert all(values[at : at + 4] == reference_stats(xs[2].cpu()).tolist() for at in many)
    host.stats_of([xs[0]], impl=impl)
    host.reset()  # abandoned: its memory is set aside, not reused
    at = host.stats_of([xs[1]], impl=impl)[0]
    assert host.take()[at : at + 4] == reference_stats(xs[1].cpu()).tolist()


def test_a_requested_interpreter_run_does_not_skip_silently():
    """CI runs this file with TRITON_INTERPRET=1 and a pinned triton: then the interpreted kernels must run here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set: the kernels run interpreted only in CI's second step")
    assert triton_available() and INTERPRETED, "TRITON_INTERPRET=1 but triton is not importable: the kernel tests would all skip"
