"""One block of a 40 GB-class checkpoint: ``pytest benchmarks/test_checkpoint_bench.py -m bench``.

The file is ``fixtures/make_checkpoints.py``'s sparse Qwen-Image (the published header: 60 blocks of 3072 channels,
1933 tensors, 40.9 GB apparent, one hole on disk), written once per run. Timed: opening it (header, detection,
format), reading block 59 as stored (``read_block``: 680 MB of bf16, with its embedders; the process's first read
apart, in ``extra_info``), and dequantizing that
block to float32 (``BlockWeights.weights``, what the goldens are computed from). ``extra_info`` holds the bytes read
and the memory the read holds (resident set growth / block bytes); that ratio is asserted below 2 (the target;
the read holds the block once), the times are recorded (docs/benchmarks.md), never asserted.
"""

from __future__ import annotations

import gc
import os
import time

import pytest

from conformance.checkpoints import open_checkpoint, read_block
from tests.helpers import checkpoint_maker

pytestmark = pytest.mark.bench
BLOCK = 59


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    maker = checkpoint_maker()
    return maker.write_sparse(tmp_path_factory.mktemp("sparse") / maker.SPARSE_NAME)


def test_open(benchmark, sparse):
    checkpoint = benchmark(open_checkpoint, sparse)
    assert checkpoint.block_counts == {"qwen.block": 60}
    benchmark.extra_info.update(apparent_bytes=checkpoint.index.total_bytes(), tensors=len(checkpoint.index.entries))


@pytest.mark.skipif(not hasattr(os, "preadv") or not os.path.exists("/proc/self/statm"), reason="needs Linux (preadv, /proc/self/statm)")
def test_read_one_block(benchmark, sparse):
    checkpoint = open_checkpoint(sparse)
    held = []

    def read():
        held.clear()
        gc.collect()
        before = _rss()
        block = read_block(checkpoint, "qwen.block", BLOCK)
        held.append(_rss() - before)
        return block

    start = time.perf_counter()
    read()  # the process's first read: its buffer is memory the process never touched (docs/benchmarks.md)
    first = time.perf_counter() - start
    block = benchmark.pedantic(read, rounds=5, iterations=1, warmup_rounds=0)
    ratio = held[-1] / block.nbytes
    benchmark.extra_info.update(block_bytes=block.nbytes, rss_growth_bytes=held[-1], rss_over_block=round(ratio, 3), first_read_s=round(first, 3))
    assert ratio < 2.0, f"reading block {BLOCK} held {held[-1] / 1e6:.0f} MB for a {block.nbytes / 1e6:.0f} MB block"


def test_dequantize_one_block(benchmark, sparse):
    checkpoint = open_checkpoint(sparse)
    blocks = []

    def dequantize():
        blocks.clear()
        gc.collect()
        blocks.append(read_block(checkpoint, "qwen.block", BLOCK))
        return blocks[-1].weights

    weights = benchmark.pedantic(dequantize, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(float32_bytes=sum(t.numel() * 4 for t in weights.values()), stored_bytes=blocks[-1].nbytes)
