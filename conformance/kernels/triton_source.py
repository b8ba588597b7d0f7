"""The triton kernels' sources, defined (and triton imported) on first use."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.
import functools
import types

import torch


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
