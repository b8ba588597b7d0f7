"""The ComfyUI subject: a ComfyUI checkout of any version, imported from its directory without starting it."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ...backends import BackendSupport, CallCounter
from ...families import is_vae
from ...precision import Precision
from ...profiles import Profile
from ..base import BuiltComponent, ComponentInputs, Subject, SubjectError, SubjectInfo
from . import attention, ops
from .loader import load


class ComfyUISubject(Subject):
    name = "comfyui"
    reference_backend = "sdpa"
    golden_backend = "basic"  # attention_basic: plain einsum + softmax, exact in float64
    xcheck_partner = "diffusers"

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.device = device
        self.comfy = load(Path(path), device)
        from .blocks import SPECS, ComfyBlock
        from .vaes import SPECS as VAE_SPECS
        from .vaes import ComfyVae

        self._components = {}
        self.missing_components: dict[str, str] = {}
        adapters = [(c, ComfyBlock, spec) for c, spec in SPECS.items()] + [(c, ComfyVae, spec) for c, spec in VAE_SPECS.items()]
        for component, adapter, spec in adapters:
            try:
                self._components[component] = adapter(self.comfy, spec)
            except SubjectError as error:  # a version without this model: its components are not offered
                self.missing_components[component] = str(error)
        if not self._components:
            raise SubjectError(f"ComfyUI {self.comfy.version} at {self.comfy.path} offers none of the suite's components")
        self._info = SubjectInfo(
            name=self.name,
            version=self.comfy.version,
            commit=self.comfy.commit,
            path=str(self.comfy.path),
            dirty=self.comfy.dirty,
            diff_hash=self.comfy.diff_hash,
            source_hash=self.comfy.source_hash,
        )

    def info(self) -> SubjectInfo:
        return self._info

    def whole_models_reason(self) -> str | None:
        return None

    def detect_checkpoint(self, checkpoint) -> dict | None:
        from ...checkpoints import comfyui_detection

        return comfyui_detection(self.comfy, checkpoint)

    def whole_models(self):
        if getattr(self, "_whole_models", None) is None:
            from ...workloads.comfyui import ComfyWholeModels

            self._whole_models = ComfyWholeModels(self.comfy, self.device)
        return self._whole_models, ["--comfyui", str(self.comfy.path), "--device", str(self.device)]

    def settings(self) -> dict:
        return {**self.comfy.global_settings, "features": dict(self.comfy.features), "missing_components": self.missing_components}

    def packages(self) -> dict[str, str]:
        out = {}
        for dist in ("einops", "numpy", "psutil", "safetensors", "sageattention", "flash-attn", "xformers", "diffusers"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[dist] = importlib.metadata.version(dist)
        return out

    def profile_reason(self, component: str, profile: Profile) -> str | None:
        adapter = self.adapter_for(component)
        if profile.references and adapter is not None and adapter.model_cls is not None:
            import inspect

            forward = getattr(adapter.model_cls, "_forward", adapter.model_cls.forward)
            if "ref_latents" not in inspect.signature(forward).parameters:
                return f"ComfyUI {self.comfy.version}'s {adapter.model_cls.__name__} takes no ref_latents (edit-style reference images)"
        return None

    def xcheck_reason(self, component: str) -> str | None:
        if is_vae(component):
            return "xcheck: no cross-subject check for decoders (each subject's synthetic weights are keyed by its own tensor names)"
        return None

    def components(self) -> tuple[str, ...]:
        return tuple(self._components)

    def unavailable_components(self) -> dict[str, str]:
        return dict(self.missing_components)

    def adapter_for(self, component: str | None):
        return self._components.get(component)

    def _adapter(self, component: str):
        try:
            return self._components[component]
        except KeyError:
            raise SubjectError(f"ComfyUI {self.comfy.version} has no component {component!r}; it offers {', '.join(self._components)}") from None

    # -- precisions and backends ----------------------------------------------------------------------------------
    def precision_support(self, precision: Precision, device: torch.device, component: str | None = None) -> tuple[str, ...]:
        adapter = self.adapter_for(component)
        own = adapter.precision_support(precision, device) if adapter else None
        return own if own is not None else tuple(ops.support_reasons(self.comfy, precision, device))

    def backend_support(self, backend: str, device: torch.device, component: str | None = None) -> BackendSupport:
        adapter = self.adapter_for(component)
        own = adapter.backend_support(backend, device) if adapter else None
        return own if own is not None else attention.backend_support(self.comfy, backend, device)

    def expected_kernels(self, backend: str, precision: Precision | None = None, component: str | None = None) -> tuple[str, ...]:
        adapter = self.adapter_for(component)
        own = adapter.expected_kernels(backend) if adapter else None
        if own is not None:
            return own
        kernels = attention.expected_kernels(backend)
        if precision is not None and precision.kind == "fp8_mm":
            kernels += ("torch._scaled_mm",)
        return kernels

    def backend_paths(self, component: str, backend: str) -> tuple[str, ...]:
        adapter = self._adapter(component)
        if self.comfy.features.get("optimized_attention_override") and adapter.accepts_transformer_options():
            return ("rebind", "override")
        return ("rebind",)

    @contextlib.contextmanager
    def use_backend(self, module: nn.Module, backend: str, counter: CallCounter, path: str | None = None, component: str | None = None) -> Iterator:
        adapter = self._adapter(component or next(iter(self._components)))
        own = adapter.use_backend(module, backend, counter)
        if own is not None:
            with own as prepare:
                yield prepare
            return
        with contextlib.ExitStack() as stack:
            stack.enter_context(_count_scaled_mm(counter))
            prepare = stack.enter_context(attention.use_backend(self.comfy, adapter.attention_sites, backend, counter, path or "rebind"))
            yield prepare

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


@contextlib.contextmanager
def _count_scaled_mm(counter: CallCounter) -> Iterator[None]:
    """ComfyUI's fp8_linear calls ``torch._scaled_mm`` by attribute: count it, to prove the fp8 matmul ran."""
    original = getattr(torch, "_scaled_mm", None)
    if original is None:
        yield
        return
    torch._scaled_mm = counter.wrap("torch._scaled_mm", original)
    try:
        yield
    finally:
        torch._scaled_mm = original
