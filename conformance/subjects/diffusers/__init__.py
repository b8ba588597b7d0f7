"""The diffusers subject: the installed ``diffusers`` package, its own block classes, embedders and attention dispatcher."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ...backends import BACKENDS, BackendSupport, CallCounter, package_reasons
from ...precision import Precision
from ...profiles import Profile
from ..base import BuiltComponent, ComponentInputs, Subject, SubjectError, SubjectInfo
from ..sources import source_hash

# Suite backend name -> diffusers AttentionBackendName value.
BACKEND_NAMES = {
    "sdpa": "native",
    "math": "_native_math",
    "flash": "flash",
    "xformers": "xformers",
    "sage": "sage",
}


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers.models import attention_dispatch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SubjectError(f"the diffusers subject needs the diffusers package: {error}") from error
    return diffusers, attention_dispatch


class DiffusersSubject(Subject):
    name = "diffusers"
    reference_backend = "sdpa"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")  # where the whole-model cases run (blocks are given theirs)
        self._diffusers, self._dispatch = _import_diffusers()
        self._info: SubjectInfo | None = None
        from .blocks import SPECS, DiffusersBlock
        from .vaes import SPECS as VAE_SPECS
        from .vaes import DiffusersVae

        self._components = {component: DiffusersBlock(spec) for component, spec in SPECS.items()}
        self._components.update({component: DiffusersVae(spec) for component, spec in VAE_SPECS.items()})

    # -- what it is ---------------------------------------------------------------------------------------------
    def whole_models_reason(self) -> str | None:
        return None

    def whole_models(self):
        if getattr(self, "_whole_models", None) is None:
            from ...workloads.diffusers import DiffusersWholeModels

            self._whole_models = DiffusersWholeModels(self, self.device)
        return self._whole_models, ["--subject", "diffusers", "--device", str(self.device)]

    def info(self) -> SubjectInfo:
        if self._info is None:
            package = Path(self._diffusers.__file__).parent
            self._info = SubjectInfo(
                name=self.name, version=self._diffusers.__version__, path=str(package), source_hash=source_hash(package, (".",))
            )
        return self._info

    def packages(self) -> dict[str, str]:
        out = {}
        for dist in ("diffusers", "safetensors", "huggingface_hub", "xformers", "sageattention", "flash-attn"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[dist] = importlib.metadata.version(dist)
        return out

    def components(self) -> tuple[str, ...]:
        return tuple(self._components)

    def adapter_for(self, component: str | None):
        return self._components.get(component)

    def _adapter(self, component: str):
        try:
            return self._components[component]
        except KeyError:
            raise SubjectError(f"diffusers subject has no component {component!r}; it offers {', '.join(self._components)}") from None

    # -- backends ---------------------------------------------------------------------------------------------
    def backend_support(self, backend: str, device: torch.device, component: str | None = None) -> BackendSupport:
        adapter = self.adapter_for(component)
        own = adapter.backend_support(backend, device) if adapter else None
        if own is not None:
            return own
        if backend not in BACKEND_NAMES:
            return BackendSupport(backend, (f"not offered by diffusers {self._diffusers.__version__} (a ComfyUI attention function)",))
        row = BACKENDS[backend]
        reasons = package_reasons(*row.package) if row.package else []
        if not reasons:
            name = self._dispatch.AttentionBackendName(BACKEND_NAMES[backend])
            try:
                self._dispatch._check_attention_backend_requirements(name)
            except RuntimeError as error:
                reasons.append(str(error))
        reasons += row.device_reasons(device)
        return BackendSupport(backend, tuple(reasons))

    def precision_support(self, precision: Precision, device: torch.device, component: str | None = None) -> tuple[str, ...]:
        if precision.kind in ("native", "fp8_storage"):
            return ()
        return (f"not offered by diffusers {self._diffusers.__version__} (a ComfyUI fp8 path)",)

    def expected_kernels(self, backend: str, precision: Precision | None = None, component: str | None = None) -> tuple[str, ...]:
        adapter = self.adapter_for(component)
        own = adapter.expected_kernels(backend) if adapter else None
        if own is not None:
            return own
        return (f"diffusers:{BACKEND_NAMES[backend]}",)

    @contextlib.contextmanager
    def use_backend(
        self, module: nn.Module, backend: str, counter: CallCounter, path: str | None = None, component: str | None = None
    ) -> Iterator:
        """Pin every attention processor of ``module`` to the backend and count calls into its registry entry.

        The processors' ``_attention_backend`` attribute is what ``dispatch_attention_fn`` reads; the registry entry is
        the function it then calls. Constraint checks are on while the case runs, so an unsupported dtype or device
        raises diffusers' own error instead of misbehaving.
        """
        adapter = self.adapter_for(component)
        own = adapter.use_backend(module, backend, counter) if adapter else None
        if own is not None:
            with own as prepare:
                yield prepare
            return
        with self.pin_backend([module], backend, counter) as prepare:
            yield prepare

    @contextlib.contextmanager
    def pin_backend(self, modules: list[nn.Module], backend: str, counter: CallCounter) -> Iterator:
        """``use_backend`` for every attention processor of ``modules`` (a block, or whole transformers)."""
        registry = self._dispatch._AttentionBackendRegistry
        name = self._dispatch.AttentionBackendName(BACKEND_NAMES[backend])
        original_fn = registry._backends[name]
        original_checks = registry._checks_enabled
        processors = [
            m.processor for module in modules for m in module.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")
        ]  # fmt: skip
        previous = [p._attention_backend for p in processors]
        registry._backends[name] = counter.wrap(f"diffusers:{name.value}", original_fn)
        registry._checks_enabled = True
        for processor in processors:
            processor._attention_backend = name
        try:
            yield lambda kwargs: kwargs
        finally:
            registry._backends[name] = original_fn
            registry._checks_enabled = original_checks
            for processor, value in zip(processors, previous):
                processor._attention_backend = value

    # -- components ----------------------------------------------------------------------------------------------
    def weight_shapes(self, component: str, scale: str) -> dict[str, tuple[int, ...]]:
        return self._adapter(component).weight_shapes(scale)

    def build(
        self, component: str, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device: torch.device
    ) -> BuiltComponent:
        return self._adapter(component).build(scale, precision, weights, device)

    def inputs(
        self, component: str, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int
    ) -> ComponentInputs:
        return self._adapter(component).inputs(scale, profile, weights, seed)
