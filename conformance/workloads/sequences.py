"""Sequences: model-family switches in one long-lived process, as the seed's repro matrix has them.

A sequence names what a process ran before the model under test (Qwen): other families, the subject's own cache
clearing, or a new worker process. The rule: Qwen after any sequence equals Qwen isolated **bit for bit** on the same
device and kernels. Anything else is a state leak, and the run says what differs: the outputs (max |diff|, rel-L2),
the process state that changed while the sequence's other models ran (``workloads.state``), and where Qwen's values
first went bad, if they did.

The reference is Qwen run in a fresh worker process (``python -m conformance.workloads.worker``): nothing ran before
it, so it is clean by construction. ``isolated`` is Qwen in this process with nothing before it in the case: a
difference there means the process was already changed by earlier cases (a patch that left a global behind).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import CallCounter
from .base import StepObserver, WholeModels
from .determinism import deterministic
from .lifecycle import REPEATS, MemoryPoint, measure
from .patches import Patch
from .state import differences, snapshot

CLEAR = "clear"
FRESH = "fresh-process"
REPEAT = f"qwen*{REPEATS}"
TARGET = "qwen"

# name -> what runs before the target; the seed's row (seeds/000) in the comment
SEQUENCES: dict[str, tuple[str, ...]] = {
    "isolated": (),  # A1-A3 (B1-B2 with a patch)
    "wan>qwen": ("wan",),  # C1
    "flux>qwen": ("flux",),  # C2
    "wan>flux>qwen": ("wan", "flux"),  # C3
    "wan>flux>clear>qwen": ("wan", "flux", CLEAR),  # D1
    FRESH: ("wan", "flux", FRESH),  # D2: the worker restarted before Qwen
    REPEAT: (),  # seeds 001/002: the same model loaded, sampled and unloaded REPEATS times (memory lifecycle)
}
SEED_ROWS = {"isolated": "A1-A3", "wan>qwen": "C1", "flux>qwen": "C2", "wan>flux>qwen": "C3", "wan>flux>clear>qwen": "D1", FRESH: "D2", REPEAT: "001/002"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEPS = 6  # euler steps, cfg 2: enough for a first-block cache to skip some (it compares consecutive steps)


@dataclass(frozen=True)
class RunSpec:
    precision: str
    backend: str
    patch: Patch | None = None
    steps: int = STEPS
    seed: int = 0

    def worker_args(self) -> list[str]:
        args = ["--precision", self.precision, "--backend", self.backend, "--steps", str(self.steps), "--seed", str(self.seed)]
        return args + (["--patch", self.patch.spec] if self.patch else [])


@dataclass
class ModelRun:
    family: str
    seconds: float
    nonfinite: bool
    memory: list[MemoryPoint] = field(default_factory=list)


@dataclass
class SequenceRun:
    latent: torch.Tensor
    first_bad: dict | None
    headroom: float | None
    boundaries: int
    calls: CallCounter
    state_changes: list[str]  # what changed in this process while the sequence's other models ran
    ran: list[ModelRun] = field(default_factory=list)
    loaded_models_after: int | None = None
    target_seconds: float = 0.0
    state_at_target: dict[str, str] = field(default_factory=dict)  # the snapshot taken as the target started
    target_memory: list[MemoryPoint] = field(default_factory=list)
    repeats: list[list[MemoryPoint]] = field(default_factory=list)  # the REPEAT row: every run's points
    summary: dict = field(default_factory=dict)  # boundaries.summarize over every step of the target
    nondeterministic: list[str] = field(default_factory=list)  # ops torch had no deterministic kernel for (target run)


def _run_model(
    models: WholeModels, family: str, spec: RunSpec, counter: CallCounter, observe: bool, device: torch.device | None = None,
    alerts: list[str] | None = None,
):
    """Build, load, sample, release and unload one model, as a workflow does; its latent (on the CPU), the observer,
    the sampling seconds and the memory at the lifecycle's four points (``workloads.lifecycle``). Sampling runs on
    torch's deterministic kernels; ops that have none are appended to ``alerts`` (``workloads.determinism``)."""
    device = device or getattr(models, "device", torch.device("cpu"))
    memory = [measure(device, "before build")]
    handle = models.build(family, DTYPES[spec.precision], spec.seed)
    if spec.patch is not None:
        handle = spec.patch.apply(handle)
    models.load(handle)
    memory.append(measure(device, "after load"))
    observer = StepObserver(models, models.diffusion_model(handle)) if observe else None
    start = time.perf_counter()
    with torch.no_grad(), models.backend(family, spec.backend, counter), deterministic(alerts if alerts is not None else []):
        if observer is not None:
            with observer.watching():
                sampled = models.sample(handle, family, spec.steps, spec.seed, observer)
        else:
            sampled = models.sample(handle, family, spec.steps, spec.seed)
    seconds = time.perf_counter() - start
    memory.append(measure(device, "after run"))
    latent = sampled.latent.to("cpu")
    if observer is not None:
        observer.root = None
    models.release(handle)
    del handle, sampled
    models.unload()
    gc.collect()
    memory.append(measure(device, "after unload"))
    return latent, observer, seconds, memory


def run_sequence(models: WholeModels, sequence: str, spec: RunSpec, worker: list[str] | None = None) -> SequenceRun:
    """Run ``sequence``'s models in this process, then the target (here, or in a new worker for ``fresh-process``)."""
    watched = models.state_modules() + spec_modules(spec)
    before = snapshot(watched)
    ran = []
    for step in SEQUENCES[sequence]:
        if step == CLEAR:
            models.clear()
        elif step == FRESH:
            break
        else:
            latent, _, seconds, memory = _run_model(models, step, spec, CallCounter(), observe=False)
            ran.append(ModelRun(step, seconds, not bool(torch.isfinite(latent).all()), memory))
    at_target = snapshot(watched)
    changes = differences(before, at_target)
    if sequence == FRESH:
        if worker is None:
            raise ValueError("fresh-process needs the worker command")
        start = time.perf_counter()
        latent, worker_state, alerts = run_worker(worker, spec)
        return SequenceRun(
            latent, None, None, 0, CallCounter(), changes, ran, None, time.perf_counter() - start, worker_state, nondeterministic=alerts,
        )  # fmt: skip
    counter = CallCounter()
    alerts: list[str] = []
    latent, observer, seconds, memory = _run_model(models, TARGET, spec, counter, observe=True, alerts=alerts)
    run = SequenceRun(
        latent, observer.first_bad(), observer.worst_headroom(), observer.boundaries(), counter, changes, ran, models.loaded_models(),
        seconds, at_target, memory, summary=observer.summary(), nondeterministic=alerts,
    )  # fmt: skip
    if sequence == REPEAT:
        for _ in range(REPEATS - 1):
            again, _, _, points = _run_model(models, TARGET, spec, CallCounter(), observe=False)
            run.repeats.append(points)
            if not torch.equal(again, latent):
                run.state_changes.append(f"run {len(run.repeats) + 1} of {REPEATS} sampled a different latent than the first")
    return run


def spec_modules(spec: RunSpec) -> tuple[str, ...]:
    return (spec.patch.module_name,) if spec.patch else ()


def run_worker(command: list[str], spec: RunSpec) -> tuple[torch.Tensor, dict[str, str], list[str]]:
    """The target sampled in a new process (``workloads.worker``), same spec: its latent, the process state the
    worker had as the target started, and the ops torch had no deterministic kernel for."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="conformance-worker-") as tmp:
        out = Path(tmp) / "latent.safetensors"
        env = {**os.environ, "CONFORMANCE_WORKER": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "conformance.workloads.worker", *command, *spec.worker_args(), "--threads", str(torch.get_num_threads()), "--out", str(out)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"the worker process failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        with safe_open(str(out), "pt") as f:
            metadata = f.metadata()
            return f.get_tensor("latent"), json.loads(metadata["state"]), json.loads(metadata["nondeterministic"])


def compare_bits(reference: torch.Tensor, latent: torch.Tensor) -> dict:
    """Bit-for-bit comparison, and how far apart when not equal."""
    equal = reference.dtype == latent.dtype and reference.shape == latent.shape and torch.equal(reference, latent)
    if equal:
        return {"bit_equal": True, "max_abs_diff": 0.0, "rel_l2": 0.0, "differing": 0}
    a, b = reference.double(), latent.double()
    diff = (a - b).abs()
    norm = float(a.norm())
    return {
        "bit_equal": False,
        "max_abs_diff": float(diff[torch.isfinite(diff)].max()) if torch.isfinite(diff).any() else float("nan"),
        "rel_l2": float((a - b).norm() / norm) if norm > 0 else float("nan"),
        "differing": int((a != b).sum()),
    }


def describe(run: SequenceRun) -> dict:
    return {
        "ran_before": [{"family": r.family, "seconds": round(r.seconds, 4), "nonfinite": r.nonfinite, "memory": [p.as_dict() for p in r.memory]} for r in run.ran],
        "target_memory": [p.as_dict() for p in run.target_memory],
        "repeats_after_unload": [p[-1].as_dict() for p in run.repeats],
        "state_changes": run.state_changes,
        "loaded_models_after": run.loaded_models_after,
        "target_seconds": round(run.target_seconds, 4),
        "boundaries": run.boundaries,
        "headroom": run.headroom,
        "nondeterministic_ops": run.nondeterministic,
    }

