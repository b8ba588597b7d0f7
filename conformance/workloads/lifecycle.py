"""Memory lifecycle: what a model leaves behind once its subject has unloaded it.

Each whole-model run is measured at four points: before its build, after the subject loaded it (ComfyUI's
``load_models_gpu``), after sampling, and after the subject unloaded it (``unload_all_models`` + its cache clearing)
with every tensor of the run dropped. On CUDA a point holds the caching allocator's allocated and reserved bytes and
the largest free block inside the reserved segments (``torch.cuda.memory_snapshot``): reserved - allocated is memory
held but unused, and a largest free block much smaller than it is fragmentation (a request larger than the block
needs new memory from the driver though the total would fit).

Rules, on CUDA:

* **back to the start after unload**: allocated bytes after unload equal those before the build, to the byte, from the
  second run of a process on. Allocated bytes count live tensors exactly, so any tensor a model left behind shows;
  the first run may allocate workspaces that stay for the process (cuBLAS, cuDNN), which is why the level after a
  process's first run is the baseline of the runs after it (``repeat`` cases);
* **no growth over repeated runs**: over ``REPEATS`` runs of the same model, allocated after unload never exceeds the
  level after the first run.

On a CPU there is no allocator to ask: process RSS is recorded (psutil) but not judged (glibc keeps freed memory in
its arenas, so RSS after a free says nothing about what the subject still holds); the ``repeat`` cases skip there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

REPEATS = 50


@dataclass
class MemoryPoint:
    label: str
    allocated: int | None = None
    reserved: int | None = None
    largest_free_block: int | None = None
    rss: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _largest_free_block(device: torch.device) -> int:
    largest = 0
    for segment in torch.cuda.memory_snapshot():
        if segment.get("device") != (device.index or 0):
            continue
        for block in segment.get("blocks", ()):
            if block.get("state") == "inactive":
                largest = max(largest, int(block.get("size", 0)))
    return largest


def measure(device: torch.device, label: str) -> MemoryPoint:
    point = MemoryPoint(label)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        point.allocated = torch.cuda.memory_allocated(device)
        point.reserved = torch.cuda.memory_reserved(device)
        point.largest_free_block = _largest_free_block(device)
    try:
        import psutil

        point.rss = psutil.Process().memory_info().rss
    except ImportError:  # psutil is in the comfyui extra; without it there is no RSS column
        pass
    return point


def judged(device: torch.device) -> bool:
    return device.type == "cuda"


def not_judged_reason(device: torch.device) -> str:
    return f"memory lifecycle is judged on CUDA only; on {device.type} process RSS is recorded, not judged (glibc keeps freed memory in its arenas)"


def leftover(points: list[MemoryPoint]) -> int | None:
    """Allocated bytes after unload minus before the build (None where the device has no allocator to ask)."""
    start = next((p for p in points if p.label == "before build"), None)
    end = next((p for p in points if p.label == "after unload"), None)
    if start is None or end is None or start.allocated is None or end.allocated is None:
        return None
    return end.allocated - start.allocated


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"
