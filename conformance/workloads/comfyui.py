"""Whole tiny models through ComfyUI's own machinery: ``supported_models`` configs, ``model_base`` models in a
``ModelPatcher``, loaded by ``comfy.model_management``, sampled by ``comfy.sample.sample`` (the KSampler path).

No checkpoint is read: ``model_detection`` hard-codes the published widths, so the config object is made the way
``comfy.sd.load_diffusion_model_state_dict`` makes it, from a tiny ``unet_config`` (the same keys in 0.3.50 and
0.3.64), and the weights are seeded per key (``families.common.synthetic_weights``'s scales: N(0, 0.02), ones for
norm scales). ``set_inference_dtype(dtype, None)`` makes the weights and the compute the case's dtype: on a CPU
ComfyUI would otherwise choose float32 (``unet_manual_cast``).

ComfyUI imports packages at module level that the diffusion-model path never calls (``transformers`` for its text
encoders, ``torchvision`` for Cosmos, ``torchsde`` for the SDE samplers, ``scipy`` for one scheduler). Where one is
not installed, a placeholder module stands in for it (``placeholders``): importing works, and any use of it raises.
The run notes say which.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..backends import CallCounter
from ..subjects.comfyui import attention
from ..subjects.comfyui.loader import ComfyUI
from .base import Sampled, StepObserver, WholeModels, seeded_state_dict

# Packages ComfyUI imports at module level for parts the whole-model cases never run.
OPTIONAL_PACKAGES = ("transformers", "tokenizers", "sentencepiece", "torchvision", "torchsde", "scipy", "av", "kornia", "spandrel")


class _Placeholder(types.ModuleType):
    """An absent optional package: attributes are inert classes; calling one raises."""

    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*_args, **_kwargs):
            raise RuntimeError(f"{self.__name__}.{name} was called, but {self.__name__.split('.')[0]} is not installed (a placeholder stands in for it)")

        value = type(name, (), {"__init__": refuse, "__call__": refuse, "from_pretrained": classmethod(refuse)})
        setattr(self, name, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = frozenset(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module) -> None:
        pass


_PLACEHOLDERS: list[str] = []


def placeholders() -> list[str]:
    """Put placeholders behind every real import path for the optional packages not installed; the list of them."""
    if not _PLACEHOLDERS:
        missing = [name for name in OPTIONAL_PACKAGES if name not in sys.modules and importlib.util.find_spec(name) is None]
        if missing:
            sys.meta_path.append(_PlaceholderFinder(tuple(missing)))  # appended: an installed package always wins
        _PLACEHOLDERS.extend(missing or ["none"])
    return [name for name in _PLACEHOLDERS if name != "none"]


@dataclass(frozen=True)
class TinyModel:
    """One family's whole tiny model: its ``supported_models`` class, ``unet_config``, latent and conditioning."""

    config_class: str
    unet_config: dict
    latent: tuple[int, ...]
    context: tuple[int, ...]
    pooled: int | None  # FLUX's pooled text vector (``pooled_output``), None where the family has none
    block_lists: tuple[tuple[str, str], ...]  # (attribute of the diffusion model, patch name) of its block lists
    attention_sites: tuple[tuple[str, str], ...]


TINY = {
    "qwen": TinyModel(
        "QwenImage",
        dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
        (1, 16, 1, 16, 16), (1, 8, 64), None, (("transformer_blocks", "double_block"),),
        (("comfy.ldm.qwen_image.model", "optimized_attention_masked"),),
    ),  # fmt: skip
    "flux": TinyModel(
        "Flux",
        dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
             num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 14, 14], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
        (1, 16, 16, 16), (1, 8, 64), 32, (("double_blocks", "double_block"), ("single_blocks", "single_block")),
        (("comfy.ldm.flux.math", "optimized_attention"),),
    ),  # fmt: skip
    "wan": TinyModel(
        "WAN21_T2V",
        dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=64, ffn_dim=128, freq_dim=256,
             text_dim=64, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6),
        (1, 16, 3, 16, 16), (1, 8, 64), None, (("blocks", "double_block"),),
        (("comfy.ldm.wan.model", "optimized_attention"),),
    ),  # fmt: skip
}

class ComfyWholeModels(WholeModels):
    subject = "comfyui"
    families = tuple(TINY)
    block_lists = ("transformer_blocks", "double_blocks", "single_blocks", "blocks")

    def __init__(self, comfy: ComfyUI, device: torch.device) -> None:
        self.comfy = comfy
        self.device = device
        self.notes = [f"placeholders for absent packages ComfyUI imports but these cases never call: {', '.join(placeholders()) or 'none'}"]
        self.mm = comfy.model_management
        self.sample_module = importlib.import_module("comfy.sample")
        self.supported_models = importlib.import_module("comfy.supported_models")
        self.model_patcher = importlib.import_module("comfy.model_patcher")

    @property
    def version(self) -> str:
        return self.comfy.version

    def build(self, family: str, dtype: torch.dtype, seed: int):
        tiny = TINY[family]
        config = getattr(self.supported_models, tiny.config_class)(dict(tiny.unet_config))
        config.set_inference_dtype(dtype, None)
        model = config.get_model({}, "", device=None)
        model.load_model_weights(seeded_state_dict(model.diffusion_model, seed), "")
        return self.model_patcher.ModelPatcher(model, load_device=self.mm.get_torch_device(), offload_device=self.mm.unet_offload_device())

    def conditioning(self, family: str, seed: int):
        tiny = TINY[family]
        generator = torch.Generator().manual_seed(seed + 1)
        context = torch.randn(tiny.context, generator=generator)
        negative = torch.randn(tiny.context, generator=generator) * 0.1
        if tiny.pooled is None:
            return [[context, {}]], [[negative, {}]]
        pooled = torch.randn(1, tiny.pooled, generator=generator)
        return [[context, {"pooled_output": pooled, "guidance": 3.5}]], [[negative, {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]

    def sample(self, handle, family: str, steps: int, seed: int, observer: StepObserver | None = None) -> Sampled:
        latent = self.sample_module.fix_empty_latent_channels(handle, torch.zeros(TINY[family].latent))
        noise = self.sample_module.prepare_noise(latent, seed)
        positive, negative = self.conditioning(family, seed)
        callback = None if observer is None else (lambda step, _x0, _x, _total: observer.step_done(step))
        out = self.sample_module.sample(
            handle, noise, steps, 2.0, "euler", "simple", positive, negative, latent, denoise=1.0, disable_pbar=True, seed=seed, callback=callback
        )  # fmt: skip
        return Sampled(out)

    def diffusion_model(self, handle) -> torch.nn.Module:
        return handle.model.diffusion_model

    @contextlib.contextmanager
    def backend(self, family: str, backend: str, counter: CallCounter) -> Iterator[None]:
        with attention.use_backend(self.comfy, TINY[family].attention_sites, backend, counter, "rebind"):
            yield

    def expected_kernels(self, backend: str) -> tuple[str, ...]:
        return attention.expected_kernels(backend)

    def load(self, handle) -> None:
        self.mm.load_models_gpu([handle])

    def unload(self) -> None:
        self.mm.unload_all_models()
        self.mm.soft_empty_cache()

    def release(self, handle) -> None:
        """What a workflow does when it is done with a model: drop it (ComfyUI unloads it when memory is wanted)."""
        del handle

    def clear(self) -> None:
        """ComfyUI's own cache clearing, as the Unload Model / Memory Cleanup nodes do it."""
        self.mm.unload_all_models()
        self.mm.cleanup_models()
        gc.collect()
        self.mm.soft_empty_cache()

    def state_modules(self) -> tuple[str, ...]:
        """Where a state leak can sit: model management, the ops and attention modules, the families' model modules."""
        return (
            "comfy.model_management", "comfy.ops", "comfy.ldm.modules.attention", "comfy.ldm.flux.math", "comfy.ldm.flux.layers",
            "comfy.ldm.qwen_image.model", "comfy.ldm.wan.model", "comfy.samplers", "comfy.model_patcher",
        )  # fmt: skip

    def loaded_models(self) -> int:
        return len(self.mm.current_loaded_models)

    def patch_points(self, handle, family: str) -> dict[str, int]:
        """``{patch name: block count}`` of the model's per-block patch points (``patches_replace["dit"]``)."""
        model = self.diffusion_model(handle)
        return {name: len(getattr(model, attr)) for attr, name in TINY[family].block_lists if hasattr(model, attr)}


def for_version_reasons(comfy: ComfyUI) -> dict[str, str]:
    """Families whose whole model this ComfyUI cannot build, with the reason."""
    supported = importlib.import_module("comfy.supported_models")
    return {family: f"ComfyUI {comfy.version} has no comfy.supported_models.{tiny.config_class}" for family, tiny in TINY.items() if not hasattr(supported, tiny.config_class)}

