"""What a subject offers for whole-model cases (``WholeModels``), and how a sampling run is watched.

A subject's whole models are tiny (a few blocks, synthetic weights) but built, loaded, sampled and unloaded by the
subject's own classes and functions. The probes of the block suite sit on the whole diffusion model for the whole
run; the sampler's per-step callback closes each step, so a first bad value is placed by step, block and module.
"""

from __future__ import annotations

import contextlib
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..backends import CallCounter
from ..boundaries import BoundaryRecord, first_nonfinite, summarize
from ..probes import Probes


def seeded_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic weights for every key of ``module``, each from its own generator (independent of key order):
    N(0, 0.02), ones for norm scales (``families.common.synthetic_weights``'s scales), in the key's dtype."""
    out = {}
    for key, value in module.state_dict().items():
        generator = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))
        norm_scale = value.ndim == 1 and "norm" in key and key.endswith((".weight", ".scale"))
        tensor = torch.ones(value.shape) if norm_scale else torch.randn(value.shape, generator=generator) * 0.02
        out[key] = tensor.to(value.dtype)
    return out


@dataclass
class Sampled:
    latent: torch.Tensor


class WholeModels(ABC):
    """A subject's whole tiny models and its own model management."""

    subject: str
    families: tuple[str, ...]
    notes: list[str]

    @property
    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def build(self, family: str, dtype: torch.dtype, seed: int):
        """A handle on the whole model (ComfyUI: a ``ModelPatcher``), weights and compute in ``dtype``."""

    @abstractmethod
    def sample(self, handle, family: str, steps: int, seed: int, observer: StepObserver | None = None) -> Sampled: ...

    @abstractmethod
    def diffusion_model(self, handle) -> torch.nn.Module: ...

    @abstractmethod
    def backend(self, family: str, backend: str, counter: CallCounter) -> contextlib.AbstractContextManager: ...

    @abstractmethod
    def expected_kernels(self, backend: str) -> tuple[str, ...]: ...

    def load(self, handle) -> None:
        """Load the model the way the subject does before it samples (ComfyUI: ``load_models_gpu``); the default
        leaves it to ``sample``."""

    def unload(self) -> None:
        """Unload every model the way the subject does (the default: its cache clearing)."""
        self.clear()

    @abstractmethod
    def release(self, handle) -> None: ...

    @abstractmethod
    def clear(self) -> None:
        """The subject's own cache clearing (``...>clear>...`` in a sequence)."""

    @abstractmethod
    def state_modules(self) -> tuple[str, ...]:
        """Modules whose globals are snapshotted around a sequence (``workloads.state``)."""

    @abstractmethod
    def loaded_models(self) -> int | None:
        """How many models the subject's model manager holds (None: the subject has no model manager)."""

    block_lists: tuple[str, ...] = ()  # attributes of the diffusion model that hold its blocks (``blocks.7``)

    def block_of(self, path: str) -> tuple[str | None, str]:
        """``(block, module inside it)`` of a module path of the diffusion model; ``(None, path)`` outside blocks."""
        parts = path.split(".", 2)
        if len(parts) < 2 or parts[0] not in self.block_lists or not parts[1].isdigit():
            return None, path
        return f"{parts[0]}.{parts[1]}", parts[2] if len(parts) == 3 else ""


@dataclass
class StepRecord:
    step: int
    records: list[BoundaryRecord]


@dataclass
class StepObserver:
    """The probes on a whole diffusion model over a sampling run, closed step by step by the sampler's callback."""

    models: WholeModels
    root: torch.nn.Module
    steps: list[StepRecord] = field(default_factory=list)
    _probes: Probes | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[StepObserver]:
        with Probes(self.root, root_label="model") as probes:
            self._probes = probes
            try:
                yield self
            finally:
                self._probes = None

    def step_done(self, step: int) -> None:
        self.steps.append(StepRecord(step, self._probes.records()))

    def first_bad(self) -> dict | None:
        """The first non-finite value of the run: step, block, module and tensor (``None`` when every value was finite)."""
        for step in self.steps:
            found = first_nonfinite(step.records)
            if found is not None:
                block, inner = self.models.block_of(found["module"])
                return {**found, "step": step.step, "block": block, "in_block": inner}
        return None

    def worst_headroom(self) -> float | None:
        headrooms = [r.headroom for s in self.steps for r in s.records if r.headroom is not None]
        return min(headrooms) if headrooms else None

    def boundaries(self) -> int:
        return sum(len(s.records) for s in self.steps)

    def summary(self) -> dict:
        """The block suite's case-level stats (``boundaries.summarize``) over every step."""
        return summarize([r for s in self.steps for r in s.records])
