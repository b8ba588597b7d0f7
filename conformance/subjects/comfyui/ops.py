"""Precision policies applied with ComfyUI's own ``comfy.ops`` classes, the way ComfyUI loads such a model.

| precision | ops class | module dtype | state dict |
|---|---|---|---|
| fp32/bf16/fp16 | ``disable_weight_init`` | that dtype | as is |
| fp8_e4m3 | ``manual_cast`` | float8_e4m3fn (every parameter, norms too, as with an fp8 checkpoint or ``--fp8_e4m3fn-unet``) | cast on load, unscaled |
| fp8_scaled | ``scaled_fp8_ops(override_dtype=e4m3)`` (legacy scaled fp8) | bfloat16, linears e4m3 | linear weights quantized per tensor + ``scale_weight`` |
| fp8_block | the suite's ``blockwise_fp8_ops`` on ``manual_cast`` | bfloat16, linears e4m3 | per 64-channel block + ``scale_weight`` [out, in/64, 1] |
| fp8_mm | ``fp8_ops`` (``torch._scaled_mm``) | float8_e4m3fn | cast on load, unscaled |
| golden | ``disable_weight_init`` | float64 | as is |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...precision import E4M3, Precision, QuantStats, quantize_blockwise, quantize_per_tensor, saturating_cast
from ...checkpoints.cases import AS_STORED_NOTE
from .loader import ComfyUI


def blockwise_fp8_ops(comfy: ComfyUI, block_size: int = 64):
    """Block-wise scaled fp8 linears on top of ComfyUI's ``manual_cast``.

    Checkpoint layout of block-wise scaled fp8 (musubi-tuner): ``<layer>.weight`` float8_e4m3fn and
    ``<layer>.scale_weight`` float32 of shape [out, in/block, 1]. As in ComfyUI's own ``scaled_fp8_ops``, the
    linear's parameters are created in e4m3 and the weight is dequantized in the compute dtype for each call.
    """
    manual_cast = comfy.ops.manual_cast
    cast_bias_weight = comfy.ops.cast_bias_weight

    class blockwise_fp8_op(manual_cast):
        class Linear(manual_cast.Linear):
            def __init__(self, *args, **kwargs):
                kwargs["dtype"] = E4M3
                super().__init__(*args, **kwargs)

            def reset_parameters(self):
                out_features, in_features = self.weight.shape
                if in_features % block_size:
                    raise ValueError(f"block-wise fp8: in_features {in_features} not a multiple of {block_size}")
                if not hasattr(self, "scale_weight"):
                    self.scale_weight = nn.Parameter(
                        torch.ones((out_features, in_features // block_size, 1), device=self.weight.device, dtype=torch.float32),
                        requires_grad=False,
                    )
                return None

            def forward_comfy_cast_weights(self, input):
                weight, bias = cast_bias_weight(self, input)
                out_features, in_features = weight.shape
                scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
                weight = (weight.view(out_features, in_features // block_size, block_size) * scale).view(out_features, in_features)
                return torch.nn.functional.linear(input, weight, bias)

    return blockwise_fp8_op


@dataclass
class OpsPlan:
    operations: type
    dtype: torch.dtype
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, QuantStats]] | None = None
    description: str = ""


def support_reasons(comfy: ComfyUI, precision: Precision, device: torch.device) -> list[str]:
    if precision.kind == "fp8_scaled" and not comfy.features.get("scaled_fp8_ops"):
        return [
            f"ComfyUI {comfy.version} has no scaled_fp8_ops; its mixed-precision quant ops (comfy_quant + weight_scale) "
            "are not driven by the suite yet"
        ]
    if precision.kind == "fp8_mm":
        if not comfy.features.get("fp8_ops"):
            return [f"ComfyUI {comfy.version} has no fp8_ops"]
        if not comfy.model_management.supports_fp8_compute(device):
            return [
                f"ComfyUI reports no fp8 compute on {device} (comfy.model_management.supports_fp8_compute: "
                "NVIDIA SM >= 8.9 or a listed AMD GPU)"
            ]
    return []


def plan(comfy: ComfyUI, precision: Precision | None) -> OpsPlan:
    ops = comfy.ops
    if precision is None:
        return OpsPlan(ops.disable_weight_init, torch.float64, description="golden: float64, disable_weight_init")
    if precision.kind == "native":
        return OpsPlan(ops.disable_weight_init, precision.compute_dtype, description="comfy.ops.disable_weight_init")
    if precision.kind == "fp8_storage":
        return OpsPlan(ops.manual_cast, E4M3, description="comfy.ops.manual_cast, every parameter stored as float8_e4m3fn")
    if precision.kind == "fp8_scaled":
        operations = ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=E4M3)
        return OpsPlan(operations, precision.compute_dtype, quantize_per_tensor, "comfy.ops.scaled_fp8_ops, per-tensor scale_weight")
    if precision.kind == "fp8_block":
        block = precision.block_size or 64
        return OpsPlan(
            blockwise_fp8_ops(comfy, block),
            precision.compute_dtype,
            lambda w: quantize_blockwise(w, block),
            f"suite blockwise_fp8_ops on comfy.ops.manual_cast, block {block}",
        )
    if precision.kind == "fp8_mm":
        return OpsPlan(ops.fp8_ops, E4M3, description="comfy.ops.fp8_ops (torch._scaled_mm), every parameter float8_e4m3fn")
    raise ValueError(f"no ComfyUI ops for precision kind {precision.kind!r}")


def prepare_state_dict(module: nn.Module, state: dict[str, torch.Tensor], the_plan: OpsPlan) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Quantize the linears' weights for scaled plans; for unscaled fp8 plans cast every parameter the module stores
    in e4m3 with ``saturating_cast`` (device-independent bits); other plans load as is (load_state_dict casts)."""
    if the_plan.quantize is None:
        if the_plan.dtype != E4M3:
            return state, []
        stored = module.state_dict()
        out, saturated = dict(state), 0
        for key, tensor in state.items():
            if stored[key].dtype == E4M3 and tensor.dtype != E4M3:
                out[key], stats = saturating_cast(tensor)
                saturated += stats.saturated
        return out, [f"parameters cast to float8_e4m3fn on the CPU, saturating ({saturated} values beyond +-448 stored as +-448)"]
    out = dict(state)
    saturated = flushed = layers = 0
    for name, layer in module.named_modules():
        if isinstance(layer, the_plan.operations.Linear) and hasattr(layer, "scale_weight"):
            q, scale, stats = the_plan.quantize(state[f"{name}.weight"])
            out[f"{name}.weight"] = q
            out[f"{name}.scale_weight"] = scale.reshape(layer.scale_weight.shape).float()
            saturated += stats.saturated
            flushed += stats.flushed_to_zero
            layers += 1
    return out, [f"{layers} linears quantized ({saturated} weights at the e4m3 max, {flushed} non-zero weights flushed to zero)"]


def load_as_stored(module: nn.Module, stored: dict[str, torch.Tensor], the_plan: OpsPlan, label: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint block's tensors as the file stores them, for the ops ComfyUI picks for its format (a scaled fp8
    file: ``scaled_fp8_ops``, as ``comfy.ops.pick_operations`` with ``scaled_fp8`` set and no fp8 optimizations).
    Like ComfyUI's own loading, a linear the file leaves unscaled keeps the module's initial ``scale_weight`` (1) and
    activation scales the ops do not use are dropped; nothing is quantized again."""
    wanted = module.state_dict()
    state, defaulted = {}, []
    for key, initial in wanted.items():
        if key in stored:
            tensor = stored[key]
            state[key] = tensor.reshape(initial.shape) if key.endswith("scale_weight") else tensor
        elif key.endswith("scale_weight"):
            state[key] = initial
            defaulted.append(key)
    dropped = sorted(k for k in stored if k not in wanted and k.endswith(("scale_input", "input_scale")))
    notes = [f"{AS_STORED_NOTE} ({label}), loaded into {the_plan.description}"]
    if the_plan.quantize is None:
        state, cast_notes = prepare_state_dict(module, state, the_plan)
        notes += cast_notes
    if defaulted:
        notes.append(f"{len(defaulted)} linears without a scale in the file keep scale_weight 1, as ComfyUI loads them")
    if dropped:
        notes.append(f"{len(dropped)} activation scales unused by these ops ({dropped[0]} ...)")
    return state, notes
