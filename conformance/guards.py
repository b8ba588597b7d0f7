"""Guard policies: the known fixes for half-precision overflow, applied to a subject's block without editing its source.

A policy wraps one forward of a built block and counts what it did (``touched``, a device tensor: no host sync until
the probes' one sync at the end). What "touched" means differs by policy and is part of each one's description:

=================  =====================================================================================================
``clip``           every result of an op that can overflow (adds, products, matmuls, linears, SDPA) in fp16/bf16 is
                   clamped to the dtype's finite range: diffusers' ``clip(-65504, 65504)``, applied everywhere instead
                   of at the two places diffusers puts it. NaN passes through, as with diffusers' clip. The block's
                   half-precision inputs are saturated the same way (as the previous block's clip would have left
                   them). Touched: values clamped.
``nan_to_num``     every module's output (the block's included) goes through ``nan_to_num(nan=0, posinf=max,
                   neginf=-max)``: ComfyUI's FLUX guard, at every module boundary. Inputs likewise. Touched: values
                   replaced.
``fp32_residual``  the residual streams (the block's stream inputs and everything its own code adds to them) stay in
                   fp32; every submodule with weights gets its inputs cast to its compute dtype. Touched: residual
                   values beyond the half dtype's range, which an fp16/bf16 stream could not have held.
``upcast_attention`` every ``F.scaled_dot_product_attention`` call runs in fp32 on upcast q, k, v and is cast back
                   (ComfyUI's ``--force-upcast-attention`` for the SDPA path). Touched: attention output values
                   computed in fp32. Only backends that call torch SDPA.
``partial_fp16``   Qwen-Image only (ComfyUI PR #12522): the image Q and text K projections keep fp32 weights and
                   compute in fp32; their q/k norms hand fp16 back to the joint attention; everything else fp16.
                   Touched: projection outputs beyond fp16's range, which fp16 projections would have overflowed.
=================  =====================================================================================================

Policies apply to fp16 and bf16 cases of transformer blocks; fp32 and fp8 cases and decoders skip with a reason.
The kernels are ``conformance.kernels`` (one read and one write per clamp, Triton on CUDA).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import trees
from .backends import BACKENDS
from .kernels import clamp_with_stats

HALF = (torch.float16, torch.bfloat16)
NONE = "none"


@dataclass
class GuardRun:
    """What one guarded forward did: ``touched`` accumulates on the device; ``notes`` say how the policy was applied."""

    name: str
    device: torch.device
    touched: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, count: torch.Tensor) -> None:
        count = count.detach().to(torch.float64)
        self.touched = count if self.touched is None else self.touched + count

    def total(self) -> int:
        return 0 if self.touched is None else int(self.touched.item())


@dataclass(frozen=True)
class GuardContext:
    """What a policy may look at: the case and the block's anatomy (from its family)."""

    family: str
    component: str
    precision: str
    dtype: torch.dtype  # the case's activation dtype
    backend: str
    streams: tuple[str, ...]  # keyword names of the residual-stream inputs
    weights: Mapping[str, torch.Tensor] | None = None  # canonical fp32 weights (partial_fp16 reloads some in fp32)


class GuardPolicy(ABC):
    name: str
    description: str
    touched_means: str

    def support(self, family: str, component: str, precision: str, backend: str, is_vae: bool) -> str | None:
        """Why this policy cannot apply to such a case (None: it can)."""
        if is_vae:
            return "guard policies apply to transformer blocks"
        if precision not in ("fp16", "bf16"):
            return "guard policies target half-precision compute (fp16, bf16)"
        return None

    def prepare_inputs(self, kwargs: dict, full: Mapping[str, object], ctx: GuardContext, run: GuardRun) -> dict:
        """The block's inputs as this policy hands them over: ``kwargs`` cast to the case's dtype, ``full`` the same
        inputs before the cast (float32)."""
        return kwargs

    @abstractmethod
    def apply(self, module: nn.Module, ctx: GuardContext, run: GuardRun) -> contextlib.AbstractContextManager: ...


# -- clip ---------------------------------------------------------------------------------------------------------------
# Names of the torch functions / Tensor methods whose result can overflow: adds, products, matmuls, SDPA.
OVERFLOW_OPS = frozenset(
    {
        "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
        "mul", "mul_", "__mul__", "__rmul__", "__imul__", "addcmul", "addcmul_", "addmm", "baddbmm", "bmm", "mm",
        "matmul", "__matmul__", "linear", "einsum", "scaled_dot_product_attention",
    }
)  # fmt: skip


class _SaturatingMode(TorchFunctionMode):
    def __init__(self, run: GuardRun) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype in HALF and getattr(func, "__name__", "") in OVERFLOW_OPS:
            clamped, stats = clamp_with_stats(out)
            self.run.add(stats[4])
            name = func.__name__
            if (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
                out.copy_(clamped)  # in place: the caller holds ``out``
                return out
            return clamped
        return out


class Clip(GuardPolicy):
    name = "clip"
    description = "clamp every overflowing op's half-precision result to the dtype's finite range (diffusers' clip, everywhere)"
    touched_means = "values clamped to +-max"

    def prepare_inputs(self, kwargs, full, ctx, run):
        return _map_half(kwargs, lambda t: _counted(clamp_with_stats(t), run))

    def apply(self, module, ctx, run):
        return _SaturatingMode(run)


# -- nan_to_num ---------------------------------------------------------------------------------------------------------
class NanToNum(GuardPolicy):
    name = "nan_to_num"
    description = "nan_to_num(nan=0, posinf=max, neginf=-max) on every module's output (ComfyUI's FLUX guard, everywhere)"
    touched_means = "values replaced (NaN -> 0, +-inf -> +-max)"

    def prepare_inputs(self, kwargs, full, ctx, run):
        return _map_half(kwargs, lambda t: _counted(clamp_with_stats(t, nan=0.0), run))

    @contextlib.contextmanager
    def apply(self, module, ctx, run):
        def hook(_module, _args, output):
            return _map_outputs(output, lambda t: _counted(clamp_with_stats(t, nan=0.0), run) if t.dtype in HALF else t)

        handles = [m.register_forward_hook(hook) for m in module.modules()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# -- fp32_residual ------------------------------------------------------------------------------------------------------
class Fp32Residual(GuardPolicy):
    name = "fp32_residual"
    description = "residual streams in fp32; every submodule with weights computes in its own dtype on cast inputs"
    touched_means = "residual values beyond the half dtype's range, carried in fp32"

    def prepare_inputs(self, kwargs, full, ctx, run):
        out = dict(kwargs)
        for name in ctx.streams:
            value = full.get(name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                # a copy: blocks update their streams in place (ComfyUI's FLUX), and ``full`` may alias the cached inputs
                out[name] = value.to(device=kwargs[name].device, dtype=torch.float32, copy=True)
        return out

    @contextlib.contextmanager
    def apply(self, module, ctx, run):
        limit = torch.finfo(ctx.dtype).max
        swapped: dict[nn.Module, dict[str, torch.Tensor]] = {}

        def pre_hook(layer, args, kwargs):
            target = _compute_dtype(layer, ctx.dtype)
            cast = lambda t: t.to(target) if t.is_floating_point() and t.dtype != target and t.dtype in (*HALF, torch.float32) else t  # noqa: E731
            return trees.map_tensors(args, cast), trees.map_tensors(kwargs, cast)

        def norm_pre_hook(layer, args, kwargs):
            # A norm reading the fp32 stream normalises it in fp32 (its half gains upcast for the call): casting the
            # stream down first would turn the values only fp32 holds into inf. On half inputs (q/k norms after a
            # half projection) it runs as built.
            first = next(trees.tensors((args, kwargs)), None)
            if first is not None and first.dtype == torch.float32:
                params = dict(layer.named_parameters(recurse=False))
                if any(p.dtype in HALF for p in params.values()):
                    swapped[layer] = {name: p.data for name, p in params.items()}
                    for p in params.values():
                        p.data = p.data.float()
            return None

        def norm_post_hook(layer, _args, _output):
            for name, data in swapped.pop(layer, {}).items():
                getattr(layer, name).data = data

        def count_beyond(_module, _args, output):
            for t in trees.tensors(output):
                if t.dtype == torch.float32:
                    run.add((t.abs() > limit).sum())

        handles = []
        for name, layer in module.named_modules():
            if not name or not any(True for _ in layer.parameters(recurse=False)):
                continue
            if "norm" in type(layer).__name__.lower():
                handles.append(layer.register_forward_pre_hook(norm_pre_hook, with_kwargs=True))
                handles.append(layer.register_forward_hook(norm_post_hook))
            else:
                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(count_beyond))
        run.notes.append("norms reading the fp32 stream normalise it in fp32; every other weighted layer computes in its own dtype")
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, saved in swapped.items():
                for name, data in saved.items():
                    getattr(layer, name).data = data


# -- upcast_attention ---------------------------------------------------------------------------------------------------


class _UpcastSdpaMode(TorchFunctionMode):
    def __init__(self, run: GuardRun) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        query = args[0] if args else kwargs.get("query")
        if func is F.scaled_dot_product_attention and isinstance(query, torch.Tensor) and query.dtype in HALF:
            dtype = query.dtype
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            up_kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
            out = func(*up, **up_kwargs)
            self.run.add(torch.tensor(float(out.numel()), device=out.device))
            return out.to(dtype)
        return func(*args, **kwargs)


class UpcastAttention(GuardPolicy):
    name = "upcast_attention"
    description = "every torch SDPA call computed in fp32 on upcast q, k, v (ComfyUI --force-upcast-attention, SDPA path)"
    touched_means = "attention output values computed in fp32"

    def support(self, family, component, precision, backend, is_vae):
        reason = super().support(family, component, precision, backend, is_vae)
        if reason is None and not BACKENDS[backend].sdpa:
            return f"upcast_attention upcasts torch SDPA calls; the {backend} backend does not go through them"
        return reason

    def apply(self, module, ctx, run):
        return _UpcastSdpaMode(run)


# -- partial_fp16 -------------------------------------------------------------------------------------------------------
# (projections kept in fp32, the norms after them that hand the result back in the case's dtype)
PARTIAL_FP32 = {"qwen": (("attn.to_q", "attn.norm_q"), ("attn.add_k_proj", "attn.norm_added_k"))}


class PartialFp16(GuardPolicy):
    name = "partial_fp16"
    description = "Qwen-Image: image Q and text K projections in fp32, the rest fp16 (ComfyUI PR #12522)"
    touched_means = "projection outputs beyond fp16's range, computed in fp32"

    def support(self, family, component, precision, backend, is_vae):
        if family not in PARTIAL_FP32:
            return "partial_fp16 is defined for Qwen-Image (ComfyUI PR #12522: image Q and text K stay fp32)"
        if precision != "fp16":
            return "partial_fp16 is an fp16 policy"
        return super().support(family, component, precision, backend, is_vae)

    @contextlib.contextmanager
    def apply(self, module, ctx, run):
        limit = torch.finfo(ctx.dtype).max
        handles, restore = [], []
        for projection, norm in PARTIAL_FP32[ctx.family]:
            layer = module.get_submodule(projection)
            saved = {name: p.data for name, p in layer.named_parameters()}
            restore.append((layer, saved))
            for name, param in layer.named_parameters():
                source = ctx.weights.get(f"{projection}.{name}") if ctx.weights is not None else None
                param.data = (source if source is not None else param.data).to(device=param.device, dtype=torch.float32)
            handles.append(layer.register_forward_pre_hook(lambda _m, args: trees.map_tensors(args, lambda t: t.float() if t.is_floating_point() else t)))

            def count(_m, _a, output):
                run.add((output.abs() > limit).sum())

            handles.append(layer.register_forward_hook(count))
            handles.append(module.get_submodule(norm).register_forward_hook(lambda _m, _a, out, d=ctx.dtype: out.to(d)))
        run.notes.append(
            "fp32: " + ", ".join(p for p, _ in PARTIAL_FP32[ctx.family]) + " (weights reloaded from the fp32 canonical weights)"
        )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, saved in restore:
                for name, param in layer.named_parameters():
                    param.data = saved[name]


POLICIES: dict[str, GuardPolicy] = {p.name: p for p in (Clip(), NanToNum(), Fp32Residual(), UpcastAttention(), PartialFp16())}
GUARD_NAMES = (NONE, *POLICIES)


def get_policy(name: str) -> GuardPolicy | None:
    if name == NONE:
        return None
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown guard {name!r}; known: {', '.join(GUARD_NAMES)}") from None


def support_reason(guard: str, family: str, component: str, precision: str, backend: str, is_vae: bool) -> str | None:
    policy = get_policy(guard)
    return None if policy is None else policy.support(family, component, precision, backend, is_vae)


# -- helpers ------------------------------------------------------------------------------------------------------------
def _counted(result: tuple[torch.Tensor, torch.Tensor], run: GuardRun) -> torch.Tensor:
    out, stats = result
    run.add(stats[4])
    return out


def _map_half(kwargs: dict, fn) -> dict:
    """Apply ``fn`` to the half-precision tensors of ``kwargs`` (a value beyond the half range arrives as +-inf)."""
    return {k: fn(v) if isinstance(v, torch.Tensor) and v.dtype in HALF else v for k, v in kwargs.items()}


def _map_outputs(output, fn):
    return trees.map_tensors(output, lambda t: fn(t) if t.is_floating_point() else t)


def _compute_dtype(layer: nn.Module, activation: torch.dtype) -> torch.dtype:
    """The dtype a weighted layer computes in: its weights' when they are a compute dtype (WAN keeps norms in fp32),
    else the case's activation dtype (fp8-stored weights are cast up by the layer itself)."""
    for param in layer.parameters(recurse=False):
        if param.dtype in (*HALF, torch.float32):
            return param.dtype
        return activation
    return activation
