"""Whole tiny models through diffusers' own classes: ``QwenImageTransformer2DModel``, ``FluxTransformer2DModel`` and
``WanTransformer3DModel`` built from a tiny config, sampled by ``FlowMatchEulerDiscreteScheduler`` in the loop each
family's pipeline runs.

No checkpoint is read: the model is made from its config in float32 on the CPU and its weights are seeded per key
(``base.seeded_state_dict``: N(0, 0.02), ones for norm scales), then cast the way ``from_pretrained(torch_dtype=...)``
casts a checkpoint: every floating tensor to the case's dtype except those of the class's ``_keep_in_fp32_modules``
(WAN: ``rope``, ``time_embedder``, ``scale_shift_table``, ``norm1-3``), which stay float32; buffers the model computes
itself (WAN's RoPE tables) keep the dtype they were made in, as they do there.

The pipelines themselves (``QwenImagePipeline``, ``FluxPipeline``, ``WanPipeline``) need their text encoders and
VAEs (``transformers``); the denoising loop is written here as their ``__call__`` writes it, keyword for keyword:
the latents packed and the timesteps made the same way, the transformer called once for the conditional and once for
the unconditional prediction inside ``cache_context("cond" | "uncond")``, the guidance combined as each pipeline
combines it (Qwen's true CFG with its norm rescale, FLUX's true CFG with the guidance embedding, WAN's CFG), and
``scheduler.step``. Conditioning tensors are synthetic, of the encoders' shapes; the noise is drawn on the CPU by
diffusers' ``randn_tensor``.

diffusers has no model manager: a deployment holds the pipeline and moves it to the device (``pipe.to(device)``,
``load`` here); a model is released by dropping it, and caches are cleared with ``gc.collect()`` and
``torch.cuda.empty_cache()`` (``unload`` and ``clear`` here; ``loaded_models`` is None).
No offloading: ``enable_model_cpu_offload`` is a pipeline method on accelerate's hooks (accelerate is not installed
with the suite), and ``diffusers.hooks.apply_group_offloading``, which would work on the bare transformer, is what a
deployment opts into for a model that does not fit. These fit, as the ComfyUI cases load theirs whole: the model is
moved to the device whole, as ``pipe.to(device)`` does.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import CallCounter
from .base import Sampled, StepObserver, WholeModels, seeded_state_dict

CFG = 2.0  # classifier-free guidance, as the ComfyUI cases' cfg
FLUX_GUIDANCE = 3.5  # FLUX's distilled guidance embedding (FluxPipeline's guidance_scale)


@dataclass(frozen=True)
class TinyModel:
    """One family's whole tiny model: its diffusers class and config, latent and conditioning shapes, scheduler."""

    model_class: str  # in diffusers.models
    config: dict
    latent: tuple[int, ...]  # the noise the pipeline's prepare_latents draws, before any packing
    context: tuple[int, ...]  # the text encoder's prompt_embeds
    pooled: int | None  # FLUX's pooled text vector (pooled_projections), None where the family has none
    scheduler: dict  # FlowMatchEulerDiscreteScheduler's config


TINY = {
    "qwen": TinyModel(
        "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
             joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
        (1, 1, 16, 16, 16), (1, 8, 64), None, dict(use_dynamic_shifting=True),
    ),  # fmt: skip
    "flux": TinyModel(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
             joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14)),
        (1, 16, 16, 16), (1, 8, 64), 32, dict(use_dynamic_shifting=True),
    ),  # fmt: skip
    "wan": TinyModel(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
             freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
        (1, 16, 3, 16, 16), (1, 8, 64), None, dict(shift=3.0),  # WAN 2.1's flow shift at 480p
    ),  # fmt: skip
}


def _cond_uncond(model, call: dict, cond: dict, uncond: dict, context: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional predictions, two forwards under the cache contexts the pipelines name
    (``"cond"``, ``"uncond"``), as every diffusers pipeline here calls its transformer."""
    with model.cache_context("cond", **(context or {})):
        noise_pred = model(**call, **cond)[0]
    with model.cache_context("uncond", **(context or {})):
        noise_uncond = model(**call, **uncond)[0]
    return noise_pred, noise_uncond


def calculate_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """``mu`` of the dynamic shift, as ``pipeline_flux.calculate_shift`` (and Qwen's copy of it) computes it."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def pack(latents: torch.Tensor) -> torch.Tensor:
    """2x2 patches to tokens, as ``FluxPipeline._pack_latents`` / ``QwenImagePipeline._pack_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` (``_unpack_latents``), back to ``(B, C, H, W)``."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


class DiffusersWholeModels(WholeModels):
    subject = "diffusers"
    families = tuple(TINY)
    block_lists = ("transformer_blocks", "single_transformer_blocks", "blocks")

    def __init__(self, subject, device: torch.device) -> None:
        """``subject``: the ``DiffusersSubject`` whose attention-backend machinery the cases use."""
        import diffusers

        self.diffusers = diffusers
        self.subject_impl = subject
        self.device = torch.device(device)
        self._models = importlib.import_module("diffusers.models")
        self._torch_utils = importlib.import_module("diffusers.utils.torch_utils")
        self._built: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # the models a backend is pinned on
        self.notes = [
            (
                f"diffusers {diffusers.__version__}: no model manager (a model is dropped; gc.collect and torch.cuda.empty_cache "
                "clear); FlowMatchEulerDiscreteScheduler in each family's pipeline loop, synthetic conditioning"
            )
        ]

    @property
    def version(self) -> str:
        return self.diffusers.__version__

    def build(self, family: str, dtype: torch.dtype, seed: int):
        tiny = TINY[family]
        model_cls = getattr(self._models, tiny.model_class)
        with torch.device("cpu"):
            model = model_cls(**tiny.config)
        keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
        state = {}
        for key, value in seeded_state_dict(model, seed).items():
            if value.is_floating_point():  # load_model_dict_into_meta's rule for from_pretrained(torch_dtype=dtype)
                value = value.to(torch.float32 if set(key.split(".")) & set(keep) else dtype)
            state[key] = value
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
        self._built.add(model)
        return model

    def load(self, handle) -> None:
        """What a deployment does before it samples: ``pipe.to(device)``, here for the one model."""
        handle.to(self.device)

    def conditioning(self, family: str, seed: int, dtype: torch.dtype) -> tuple[dict, dict]:
        """Synthetic encoder outputs for the prompt and the negative prompt: the pipeline's keyword arguments."""
        tiny = TINY[family]
        generator = torch.Generator().manual_seed(seed + 1)
        context = torch.randn(tiny.context, generator=generator)
        negative = torch.randn(tiny.context, generator=generator) * 0.1
        cond, uncond = {"encoder_hidden_states": context}, {"encoder_hidden_states": negative}
        if tiny.pooled is not None:
            pooled = torch.randn(1, tiny.pooled, generator=generator)
            cond["pooled_projections"], uncond["pooled_projections"] = pooled, torch.zeros_like(pooled)
        return tuple({k: v.to(self.device, dtype) for k, v in d.items()} for d in (cond, uncond))

    def _scheduler(self, family: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**TINY[family].scheduler)

    def _noise(self, family: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        return self._torch_utils.randn_tensor(TINY[family].latent, generator=generator, device=self.device, dtype=dtype)

    def sample(self, handle, family: str, steps: int, seed: int, observer: StepObserver | None = None) -> Sampled:
        done = (lambda step: observer.step_done(step)) if observer is not None else (lambda step: None)
        return Sampled(getattr(self, f"_sample_{family}")(handle, steps, seed, done))

    def _flow_timesteps(self, scheduler, steps: int, image_seq_len: int):
        """``retrieve_timesteps`` with the sigmas and ``mu`` QwenImagePipeline and FluxPipeline pass."""
        sigmas = np.linspace(1.0, 1 / steps, steps)
        config = scheduler.config
        mu = calculate_shift(
            image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )  # fmt: skip
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def _sample_qwen(self, model, steps: int, seed: int, done) -> torch.Tensor:
        """QwenImagePipeline.__call__'s loop, true CFG with a negative prompt (``true_cfg_scale``)."""
        dtype = model.dtype
        noise = self._noise("qwen", seed, dtype)  # (B, 1, C, H, W), as its prepare_latents draws it
        b, _, _, h, w = noise.shape
        latents = pack(noise[:, 0])
        img_shapes = [[(1, h // 2, w // 2)]] * b
        cond, uncond = self.conditioning("qwen", seed, dtype)
        scheduler = self._scheduler("qwen")
        for i, t in enumerate(self._flow_timesteps(scheduler, steps, latents.shape[1])):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            call = dict(hidden_states=latents, timestep=timestep / 1000, guidance=None, encoder_hidden_states_mask=None, img_shapes=img_shapes,
                        attention_kwargs={}, return_dict=False)  # fmt: skip
            noise_pred, neg_noise_pred = _cond_uncond(model, call, cond, uncond)
            comb_pred = neg_noise_pred + CFG * (noise_pred - neg_noise_pred)
            cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
            noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
            noise_pred = comb_pred * (cond_norm / noise_norm)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            done(i)
        return unpack(latents, h, w)[:, :, None]  # (B, C, 1, H, W), as QwenImagePipeline._unpack_latents

    def _sample_flux(self, model, steps: int, seed: int, done) -> torch.Tensor:
        """FluxPipeline.__call__'s loop: the guidance embedding and true CFG (``true_cfg_scale``, a negative prompt)."""
        dtype = model.dtype
        noise = self._noise("flux", seed, dtype)
        _, _, h, w = noise.shape
        latents = pack(noise)
        img_ids = torch.zeros(h // 2, w // 2, 3)  # FluxPipeline._prepare_latent_image_ids
        img_ids[..., 1] = img_ids[..., 1] + torch.arange(h // 2)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(self.device, dtype)
        cond, uncond = self.conditioning("flux", seed, dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3).to(self.device, dtype)
        guidance = torch.full([1], FLUX_GUIDANCE, device=self.device, dtype=torch.float32).expand(latents.shape[0])
        scheduler = self._scheduler("flux")
        for i, t in enumerate(self._flow_timesteps(scheduler, steps, latents.shape[1])):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            call = dict(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, txt_ids=txt_ids, img_ids=img_ids,
                        joint_attention_kwargs={}, return_dict=False)  # fmt: skip
            noise_pred, neg_noise_pred = _cond_uncond(model, call, cond, uncond)
            noise_pred = neg_noise_pred + CFG * (noise_pred - neg_noise_pred)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            done(i)
        return unpack(latents, h, w)

    def _sample_wan(self, model, steps: int, seed: int, done) -> torch.Tensor:
        """WanPipeline.__call__'s loop (WAN 2.1, one transformer): float32 latents, the input cast to the model's dtype."""
        transformer_dtype = model.dtype
        latents = self._noise("wan", seed, torch.float32)
        cond, uncond = self.conditioning("wan", seed, transformer_dtype)
        scheduler = self._scheduler("wan")
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps
        scheduler.set_begin_index(0)
        for i, t in enumerate(timesteps):
            latent_model_input = latents.to(transformer_dtype)
            timestep = t.expand(latents.shape[0])
            context = {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
            call = dict(hidden_states=latent_model_input, timestep=timestep, attention_kwargs=None, return_dict=False)
            noise_pred, noise_uncond = _cond_uncond(model, call, cond, uncond, context)
            noise_pred = noise_uncond + CFG * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            done(i)
        return latents

    def diffusion_model(self, handle) -> torch.nn.Module:
        return handle

    @contextlib.contextmanager
    def backend(self, family: str, backend: str, counter: CallCounter) -> Iterator[None]:
        """The subject's ``use_backend`` on whole transformers: every attention processor of the models built here and
        still alive pinned to the backend's registry entry, which is wrapped to count its calls."""
        with self.subject_impl.pin_backend(list(self._built), backend, counter):
            yield

    def expected_kernels(self, backend: str) -> tuple[str, ...]:
        return self.subject_impl.expected_kernels(backend)

    def release(self, handle) -> None:
        """What a deployment does when it is done with a model: drop it (diffusers holds no reference of its own)."""
        self._built.discard(handle)
        del handle

    def unload(self) -> None:
        """diffusers has nothing to unload a model with: once dropped, it goes with its cache clearing (``clear``)."""
        self.clear()

    def clear(self) -> None:
        """What a diffusers deployment does between models, having no model manager: collect the dropped models and
        return the CUDA caching allocator's free blocks."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def state_modules(self) -> tuple[str, ...]:
        """Where process-global state of diffusers lives: the attention dispatcher's module and its backend registry
        (the active backend, the registered functions, whether checks run), the attention and processor modules,
        the hook machinery and its block/processor registries, the families' model modules and the scheduler."""
        return (
            "diffusers.models.attention_dispatch", "diffusers.models.attention_dispatch._AttentionBackendRegistry",
            "diffusers.models.attention_processor", "diffusers.models.attention", "diffusers.models.embeddings",
            "diffusers.models.modeling_utils", "diffusers.hooks.hooks", "diffusers.hooks._helpers",
            "diffusers.hooks._helpers.AttentionProcessorRegistry", "diffusers.hooks._helpers.TransformerBlockRegistry",
            "diffusers.hooks.first_block_cache", "diffusers.hooks.group_offloading",
            "diffusers.models.transformers.transformer_qwenimage", "diffusers.models.transformers.transformer_flux",
            "diffusers.models.transformers.transformer_wan", "diffusers.schedulers.scheduling_flow_match_euler_discrete",
            "diffusers.utils.torch_utils",
        )  # fmt: skip

    def loaded_models(self) -> int | None:
        """None: diffusers has no model manager to ask."""
        return None
