"""The Subject interface: everything version-specific about an implementation under test lives behind it.

A subject knows how to

* say what it is (``info``) and what it offers (``components``, ``backend_support``);
* build a component at a scale, in a precision, from a canonical state dict (``build``);
* turn an input profile into the component's exact inputs, using its own embedders (``inputs``);
* force an attention backend and count the kernel's calls (``use_backend``);
* name the boundaries the probes watch (carried by the built component).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends import BackendSupport, CallCounter
from ..precision import Precision
from ..boundaries import GuardSpy, InputProbe
from ..profiles import Profile
from ..trees import map_tensors


@dataclass(frozen=True)
class SubjectInfo:
    """What an implementation under test is. Its ``identity`` keys its goldens: version + git commit where the tree
    is a git checkout (+ a hash of the local changes, when there are any), else version + a hash of its sources
    (``sources.source_hash``). ``source_hash`` is always the content hash, so goldens made from a git checkout are
    found by a plain copy of the same tree (``GoldenStore.identity_with_sources``)."""

    name: str
    version: str
    commit: str | None = None
    path: str | None = None
    dirty: bool | None = None  # the checkout's sources differ from its commit
    diff_hash: str | None = None  # of those differences, when dirty
    source_hash: str | None = None  # of the sources themselves (sources.source_hash)

    @property
    def identity(self) -> str:
        """What goldens are keyed by, unless a store already holds goldens of the same sources under another name."""
        if self.commit:
            ident = f"{self.version}+g{self.commit[:10]}"
            if self.dirty:
                ident += f"-dirty{(self.diff_hash or '')[:8]}"
            return ident
        if self.source_hash:
            return f"{self.version}+s{self.source_hash[:10]}"
        return self.version

    @property
    def identity_source(self) -> str:
        if self.commit:
            return "git commit" + (" with local changes" if self.dirty else "")
        return "source hash" if self.source_hash else "version only"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "commit": self.commit,
            "path": self.path,
            "dirty": self.dirty,
            "source_hash": self.source_hash,
            "identity": self.identity,
            "identity_source": self.identity_source,
        }


@dataclass
class ComponentInputs:
    """A component's inputs as the implementation under test builds them: keyword arguments, float32, on CPU."""

    kwargs: dict[str, object]
    sizes: dict[str, int] = field(default_factory=dict)
    profile: str | None = None  # whose weight stresses the component is built with (set by the engine)
    # Channels the profile holds at massive values, by keyword: compared apart from the rest (``conformance.inputs``).
    outlier_channels: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class BuiltComponent:
    """A component ready to run: the module, how to call it, and what its probes should watch.

    ``call(module, kwargs, sizes)`` runs the module and names its outputs; ``sizes`` are the input's token counts
    (a joint-stream block needs the text length to split its output).
    """

    module: nn.Module
    call: Callable[[nn.Module, Mapping[str, object], Mapping[str, int]], Mapping[str, torch.Tensor]]
    boundary_names: Mapping[str, str] = field(default_factory=dict)
    input_probes: tuple[InputProbe, ...] = ()
    guards: tuple[GuardSpy, ...] = ()
    notes: list[str] = field(default_factory=list)
    guard_note: str | None = None  # the subject's own guard inside this component, if any (e.g. a ±65504 clip)
    tiled_call: Callable[[nn.Module, Mapping[str, object], Mapping[str, int]], Mapping[str, torch.Tensor]] | None = None
    # The call does not go through ``module.forward`` (a VAE's ``decode``): the probes record the inputs at the call.
    inputs_at_call: bool = False
    root_label: str = "block"  # the root module's name in the probes' records

    def __call__(self, inputs: Mapping[str, object], sizes: Mapping[str, int] | None = None) -> Mapping[str, torch.Tensor]:
        return self.call(self.module, inputs, sizes or {})


ABSENT = "absent from"  # skip-reason prefix of a component the subject's version does not have at all


class SubjectError(RuntimeError):
    """The subject cannot be loaded or does not offer what was asked."""


def _cast_one(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if tensor.is_complex():
        return tensor.to(device=device, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def cast_tensors(obj, dtype: torch.dtype, device: torch.device | str):
    """Floating tensors to ``dtype``, complex tensors to the matching complex dtype, everything to ``device``."""
    return map_tensors(obj, lambda t: _cast_one(t, dtype, device))


def clone_tensors(obj):
    """A deep copy of every tensor, so a component that updates its inputs in place cannot touch the originals."""
    return map_tensors(obj, torch.Tensor.clone)


class ComponentAdapter:
    """How a subject builds and runs one component; the parts a component may decide for itself, declared here. Each
    optional part returns None for "the subject's own rule" (a block's backends are the subject's attention table; a
    decoder's attention is one function of its own, so its adapter answers for backends and kernels itself)."""

    golden_backend: str | None = None  # the backend its goldens are computed with; None: the subject's
    model_cls: type | None = None  # the subject's model class, where a profile's needs are checked against it

    def residual_streams(self) -> tuple[str, ...]:
        """Keyword names of the residual-stream inputs (what the fp32_residual guard keeps in fp32)."""
        return ()

    def accepts_transformer_options(self) -> bool:
        """Whether the block takes ComfyUI's ``transformer_options`` (then the override path is offered)."""
        return False

    def precision_support(self, precision: Precision, device: torch.device) -> tuple[str, ...] | None:
        return None

    def backend_support(self, backend: str, device: torch.device) -> BackendSupport | None:
        return None

    def expected_kernels(self, backend: str) -> tuple[str, ...] | None:
        return None

    def use_backend(self, module: nn.Module, backend: str, counter: CallCounter) -> contextlib.AbstractContextManager | None:
        return None


class Subject(ABC):
    name: str
    reference_backend: str = "sdpa"  # a backend is judged against this one in the same precision
    golden_backend: str = "math"  # the backend goldens are computed with, in float64
    xcheck_partner: str | None = None  # another subject whose components this one is cross-checked against

    def adapter_for(self, component: str | None) -> ComponentAdapter | None:
        """The component's adapter, where the subject builds components through adapters (None otherwise)."""
        return None

    def golden_backend_for(self, component: str) -> str:
        """The backend a component's goldens are computed with (a VAE's attention offers other functions)."""
        adapter = self.adapter_for(component)
        return (adapter.golden_backend if adapter else None) or self.golden_backend

    def profile_reason(self, component: str, profile: Profile) -> str | None:
        """Why this subject cannot build ``profile``'s inputs for ``component`` (None: it can)."""
        return None

    def xcheck_reason(self, component: str) -> str | None:
        """Why ``component`` has no cross-subject check (None: it has one)."""
        return None

    def whole_models_reason(self) -> str | None:
        """Why this subject offers no whole-model cases here (None: ``whole_models`` gives them)."""
        return f"whole-model sequences are built for ComfyUI only so far ({self.name} has none)"

    def whole_models(self):
        """The subject's whole tiny models (``conformance.workloads.base.WholeModels``) and the arguments that make a
        fresh worker process load the same subject: ``(models, worker_args)``."""
        raise NotImplementedError(self.whole_models_reason())

    def detect_checkpoint(self, checkpoint) -> dict | None:
        """What the subject's own model detection makes of a checkpoint (``--weights``), which must agree with the
        suite's reading (``checkpoints.CheckpointError`` where not); None where the subject has no detection."""
        return None

    @abstractmethod
    def info(self) -> SubjectInfo: ...

    @abstractmethod
    def components(self) -> tuple[str, ...]: ...

    def unavailable_components(self) -> dict[str, str]:
        """Components of the suite this subject does not offer, each with its skip reason (starting with
        ``ABSENT`` when the version simply has no such model, else why the suite's adapter cannot build it)."""
        return {}

    @abstractmethod
    def backend_support(self, backend: str, device: torch.device, component: str | None = None) -> BackendSupport: ...

    def precision_support(self, precision: Precision, device: torch.device, component: str | None = None) -> tuple[str, ...]:
        """Reasons this subject cannot run ``precision`` on ``device`` (for ``component``); empty when it can."""
        return ()

    @abstractmethod
    def expected_kernels(self, backend: str, precision: Precision | None = None, component: str | None = None) -> tuple[str, ...]:
        """Labels in the call counter that must all be non-zero for ``backend`` (in ``precision``) to have run."""

    def backend_paths(self, component: str, backend: str) -> tuple[str, ...]:
        """Ways this subject can force a backend; the first is used, the others must agree bit for bit in fp32."""
        return ("default",)

    @abstractmethod
    def weight_shapes(self, component: str, scale: str) -> dict[str, tuple[int, ...]]:
        """Canonical keys and shapes of the component's weights, plus the embedder weights its inputs need."""

    @abstractmethod
    def build(
        self, component: str, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device: torch.device
    ) -> BuiltComponent:
        """``precision=None`` builds the float64 golden configuration."""

    @abstractmethod
    def inputs(
        self, component: str, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int
    ) -> ComponentInputs: ...

    @abstractmethod
    def use_backend(
        self, module: nn.Module, backend: str, counter: CallCounter, path: str | None = None, component: str | None = None
    ) -> contextlib.AbstractContextManager[Callable[[dict], dict]]:
        """Force ``backend`` while the context is open; yields a function that prepares the component's kwargs."""

    def residual_streams(self, component: str) -> tuple[str, ...]:
        """Keyword names of the block's residual-stream inputs (what the fp32_residual guard keeps in fp32)."""
        adapter = self.adapter_for(component)
        return adapter.residual_streams() if adapter else ()

    def cast_inputs(self, inputs: ComponentInputs, dtype: torch.dtype, device: torch.device) -> dict[str, object]:
        return cast_tensors(inputs.kwargs, dtype, device)

    def packages(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict:
        """Global settings of the subject that affect numerics (recorded in the report)."""
        return {}
