"""Pinned host memory the device writes statistics into, for probes that read them after a forward."""
# No `from __future__ import annotations` in this package: triton reads a kernel's `tl.constexpr` annotations, and
# evaluated ones are the form every triton version accepts.

import torch

from .common import STATS, _launch_groups
from .launch import _stream_key
from .reference import _torch_finite_stats
from .stats import _triton_stats_many

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
