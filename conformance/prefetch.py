"""Goldens made ahead of the cases that need them, by a second process on the CPU.

On a CUDA run the goldens of a component whose float64 forward rounds in float32 somewhere stay on the CPU
(``Engine.golden_device``). A case's own work is on the device while the host's cores wait: a real-scale golden
(seconds of float64 on a many-core host) made when its first case arrives stops the matrix for that long. The
prefetcher is one process (``spawn``, so it shares no CUDA or ComfyUI state with the run) that walks the run's
CPU-made goldens in the order the cases will want them and creates the missing ones in the local store, through the
same ``Engine.golden`` and the same per-golden locks as the run. Whoever asks first makes a golden: the run waits for
one the prefetcher is making, the prefetcher skips one the run is making. A golden the prefetcher made carries the
run's id, so the run takes it without the recomputation it would spend on a golden made by a stranger
(``Engine._confirm``).

Stopping: the run stops the prefetcher when it ends (SIGTERM: a golden being written removes its temporary files; the
stores' writes are atomic and their locks die with the process), so an interrupted run leaves complete goldens only.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PrefetchSpec:
    """All the child needs to make the run's goldens as the run would (everything picklable)."""

    subject: str
    comfyui_path: str | None
    committed: Path
    local: Path
    identity: dict
    run_id: str
    keys: tuple[tuple[str, str, str], ...]  # (component, scale, profile), in the order the cases need them
    threads: int


@dataclass
class PrefetchLog:
    """What the prefetcher did, as the run's report tells it."""

    made: list[str] = field(default_factory=list)  # GoldenChange.describe() lines
    seconds: float = 0.0  # its float64 forwards
    errors: list[str] = field(default_factory=list)
    planned: int = 0


def threads_for_prefetch(cpu_count: int | None = None) -> int:
    """The cores the prefetcher may use: all but two (the run's own Python thread and its CPU-side work)."""
    return max(1, (cpu_count or os.cpu_count() or 1) - 2)


class GoldenPrefetch:
    def __init__(self, spec: PrefetchSpec) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._process = context.Process(target=_make_goldens, args=(spec, self._queue), name="conformance-golden-prefetch", daemon=True)
        self.log = PrefetchLog(planned=len(spec.keys))

    def start(self) -> None:
        self._process.start()

    def drain(self) -> PrefetchLog:
        """Collect what the prefetcher reported so far (non-blocking)."""
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except (queue_module.Empty, EOFError, OSError):
                return self.log
            if kind == "made":
                line, seconds = payload
                self.log.made.append(line)
                self.log.seconds += seconds
            elif kind == "error":
                self.log.errors.append(payload)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the prefetcher to finish its list; whether it has."""
        self._process.join(timeout)
        return not self._process.is_alive()

    def stop(self, timeout: float = 30.0) -> PrefetchLog:
        """End the prefetcher (it is done, or the run is): SIGTERM, then a kill after ``timeout`` seconds."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        log = self.drain()
        self._queue.close()
        return log


def _make_goldens(spec: PrefetchSpec, out) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: temporary files removed, locks released
    import torch

    from .goldens import GoldenBusy, GoldenStore
    from .runner import Engine, EngineOptions
    from .subjects import load_subject

    torch.set_num_threads(spec.threads)
    cpu = torch.device("cpu")
    try:
        subject = load_subject(spec.subject, comfyui_path=spec.comfyui_path, device=cpu)
    except Exception as error:  # the run meets the same error in its own cases, with its own message
        out.put(("error", f"prefetch: the subject did not load: {type(error).__name__}: {error}"))
        return
    engine = Engine(
        subject,
        EngineOptions(device=cpu, committed_store=GoldenStore(spec.committed, "committed"), local_store=GoldenStore(spec.local, "local"), run_id=spec.run_id, identity=spec.identity),
    )
    for component, scale, profile in spec.keys:
        before_changes, before_seconds = len(engine.golden_changes), engine.golden_seconds
        try:
            engine.golden(component, scale, profile, wait=False)
        except GoldenBusy:
            continue  # the run (or another process) is making it now
        except Exception as error:  # the case meets it again and reports it
            out.put(("error", f"prefetch {component}/{scale}/{profile}: {type(error).__name__}: {error}"))
            continue
        for change in engine.golden_changes[before_changes:]:
            out.put(("made", (f"{change.describe()} (made ahead by the prefetcher)", engine.golden_seconds - before_seconds)))
