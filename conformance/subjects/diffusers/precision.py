"""Precision policies applied the way diffusers does it.

Native dtypes: ``module.to(dtype)``. fp8 storage: diffusers' layerwise casting (``diffusers.hooks``) stores a leaf
layer's weights in fp8 and casts them to the compute dtype just before each call; its hook casts without a scale.
``ScaledLayerwiseCastingHook`` is the same mechanism (same hook registry, same leaf-layer classes, same skip patterns)
with a per-tensor scale, so e4m3's 448 ceiling does not clip real weights. Biases stay in the compute dtype.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...precision import Precision, QuantStats, dequantize, quantize_per_tensor

HOOK_NAME = "conformance_scaled_fp8"


def _hooks():
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return HookRegistry, ModelHook, _GO_LC_SUPPORTED_PYTORCH_LAYERS, DEFAULT_SKIP_MODULES_PATTERN


def _make_hook_class():
    _, ModelHook, _, _ = _hooks()

    class ScaledLayerwiseCastingHook(ModelHook):
        _is_stateful = False

        def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
            super().__init__()
            self.storage_dtype = storage_dtype
            self.compute_dtype = compute_dtype
            self.qweight: torch.Tensor | None = None
            self.scale: torch.Tensor | None = None
            self.stats: QuantStats | None = None

        def initialize_hook(self, module: nn.Module) -> nn.Module:
            self.qweight, self.scale, self.stats = quantize_per_tensor(module.weight.data, self.storage_dtype)
            module.weight.data = self.qweight
            return module

        def pre_forward(self, module: nn.Module, *args, **kwargs):
            module.weight.data = dequantize(self.qweight, self.scale, self.compute_dtype)
            return args, kwargs

        def post_forward(self, module: nn.Module, output):
            module.weight.data = self.qweight
            return output

    return ScaledLayerwiseCastingHook


def keep_in_fp32(module: nn.Module, patterns: tuple[str, ...]) -> int:
    """Parameters whose dotted name has a component in ``patterns`` back to float32, as ``from_pretrained`` keeps a
    model's ``_keep_in_fp32_modules`` (WAN: modulation tables and norms). Returns how many tensors."""
    kept = 0
    for name, param in module.named_parameters():
        if set(name.split(".")) & set(patterns):
            param.data = param.data.float()
            kept += 1
    return kept


def apply_precision(module: nn.Module, precision: Precision | None, device: torch.device, keep_fp32: tuple[str, ...] = ()) -> list[str]:
    """Cast ``module`` for ``precision`` (None: the float64 golden). Returns notes for the report."""
    # nn.Module.to, not ModelMixin.to: the latter warns about _keep_in_fp32_modules, which keep_fp32 handles here.
    if precision is None:
        nn.Module.to(module, device=device, dtype=torch.float64)
        return []
    nn.Module.to(module, device=device, dtype=precision.compute_dtype)
    notes = []
    if keep_fp32 and precision.compute_dtype != torch.float32:
        kept = keep_in_fp32(module, keep_fp32)
        if kept:
            notes.append(f"{kept} tensors kept in float32 ({', '.join(keep_fp32)}), as diffusers' from_pretrained keeps them")
    if not precision.is_fp8:
        return notes
    if precision.kind != "fp8_storage":
        raise ValueError(f"diffusers offers no {precision.kind} path")
    HookRegistry, _, leaf_layers, skip_patterns = _hooks()
    hook_class = _make_hook_class()
    saturated = flushed = quantized = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, leaf_layers) or any(re.search(p, name) for p in skip_patterns):
            continue
        hook = hook_class(precision.storage_dtype, precision.compute_dtype)
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, HOOK_NAME)
        quantized += 1
        saturated += hook.stats.saturated
        flushed += hook.stats.flushed_to_zero
    return notes + [
        f"{quantized} layers stored as {str(precision.storage_dtype).removeprefix('torch.')} with per-tensor scales "
        f"({saturated} weights at the format max, {flushed} non-zero weights flushed to zero)"
    ]
