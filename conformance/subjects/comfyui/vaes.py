"""ComfyUI's VAE decoders: ``comfy.ldm.wan.vae.WanVAE`` (Wan 2.1, Qwen-Image), ``comfy.ldm.wan.vae2_2.WanVAE``
(Wan 2.2) and the FLUX autoencoder (``AutoencodingEngine`` with ``comfy.ldm.modules.diffusionmodules.model.Decoder``),
built with the arguments ``comfy.sd.VAE.__init__`` gives them, at the suite's tiny and real widths.

Only the decoding half is materialised (built on the meta device, encoder dropped). The full decode is what
``comfy.sd.VAE.decode`` calls: ``first_stage_model.decode(samples.to(vae_dtype))``; ``process_output`` and SaveImage's
cast are the save stage (``conformance.save_stage``). The tiled decode is ComfyUI's tiler, ``comfy.utils.
tiled_scale_multidim``, driven as ``VAE.decode_tiled_3d`` (Wan) and ``VAE.decode_tiled_`` (FLUX: three tilings,
averaged) drive it, with the upscale ratios ``VAE.__init__`` sets. ``comfy.sd`` itself is not imported: it pulls
torchvision and every text encoder.

Attention: every VAE attention module holds ``self.optimized_attention = vae_attention()``, chosen once at build time
from ComfyUI's flags; the suite replaces that attribute on each instance with the chosen function (the way a flag
would have chosen it) wrapped in a call counter. ComfyUI's pytorch and xformers VAE attention fall back to slice
attention on OOM with a log line; the fallback catcher turns that into a failure.

ComfyUI has no fp8 VAE path (``--fp16-vae``, ``--bf16-vae``, ``--fp32-vae`` only): fp8 cases skip with that reason.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...backends import BackendSupport, CallCounter
from ...families import vae
from ...precision import Precision
from ...profiles import Profile
from ..base import ABSENT, BuiltComponent, ComponentAdapter, ComponentInputs, SubjectError
from .attention import catch_fallbacks, spy_kernel
from .loader import ComfyUI

MODEL_PY = "comfy.ldm.modules.diffusionmodules.model"
# backend name -> the VAE attention function in comfy/ldm/modules/diffusionmodules/model.py (vae_attention's choices)
FUNCTIONS = {"sdpa": "pytorch_attention", "split": "normal_attention", "xformers": "xformers_attention"}
# ComfyUI's log line when pytorch/xformers VAE attention OOMs and it switches to slice attention.
FALLBACK = re.compile(r"OOMed: switched to slice attention")


def _wan21(comfy: ComfyUI, dims: vae.VaeDims) -> nn.Module:
    module = importlib.import_module("comfy.ldm.wan.vae")
    return module.WanVAE(dim=dims.base, z_dim=dims.z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)


def _wan22(comfy: ComfyUI, dims: vae.VaeDims) -> nn.Module:
    module = importlib.import_module("comfy.ldm.wan.vae2_2")
    return module.WanVAE(
        dim=dims.base, dec_dim=dims.dec_base, z_dim=dims.z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0
    )


def _flux(comfy: ComfyUI, dims: vae.VaeDims) -> nn.Module:
    autoencoder = importlib.import_module("comfy.ldm.models.autoencoder")
    ddconfig = {"double_z": True, "z_channels": dims.z_dim, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": dims.base, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": f"{MODEL_PY}.Encoder", "params": ddconfig},
        decoder_config={"target": f"{MODEL_PY}.Decoder", "params": ddconfig},
    )


@dataclass(frozen=True)
class VaeSpec:
    component: str
    module: str  # the model file (its absence means this version lacks the VAE)
    make: Callable[[ComfyUI, vae.VaeDims], nn.Module]
    decoder_parts: tuple[str, ...]
    # comfy.sd.VAE.__init__'s upscale_ratio / upscale_index_formula for this VAE (None: 2-D latents, a plain ratio)
    upscale_ratio: object
    index_formula: tuple[int, ...] | None
    boundary_names: Mapping[str, str]


WAN_NAMES = {
    "conv2": "post-quant convolution",
    "decoder.conv1": "first convolution",
    "decoder.middle": "mid block (with attention)",
    "decoder.middle.1": "mid-block attention",
    "decoder.head.0": "output norm",
    "decoder.head.2": "output convolution",
}
FLUX_NAMES = {
    "decoder.conv_in": "first convolution",
    "decoder.mid": "mid block",  # a plain container: its children are probed one by one
    "decoder.mid.attn_1": "mid-block attention",
    "decoder.norm_out": "output norm",
    "decoder.conv_out": "output convolution",
}

SPECS = {
    "qwen.vae": VaeSpec("qwen.vae", "comfy.ldm.wan.vae", _wan21, ("conv2.", "decoder."), (lambda a: max(0, a * 4 - 3), 8, 8), (4, 8, 8), WAN_NAMES),
    "wan.vae21": VaeSpec("wan.vae21", "comfy.ldm.wan.vae", _wan21, ("conv2.", "decoder."), (lambda a: max(0, a * 4 - 3), 8, 8), (4, 8, 8), WAN_NAMES),
    "wan.vae22": VaeSpec("wan.vae22", "comfy.ldm.wan.vae2_2", _wan22, ("conv2.", "decoder."), (lambda a: max(0, a * 4 - 3), 16, 16), (4, 16, 16), WAN_NAMES),
    "flux.vae": VaeSpec("flux.vae", "comfy.ldm.models.autoencoder", _flux, ("decoder.",), 8, None, FLUX_NAMES),
}


class ComfyVae(ComponentAdapter):
    def __init__(self, comfy: ComfyUI, spec: VaeSpec) -> None:
        self.comfy = comfy
        self.spec = spec
        self.component = spec.component
        try:
            importlib.import_module(spec.module)
        except ImportError as error:
            raise SubjectError(f"{ABSENT} ComfyUI {comfy.version}: no {spec.module} ({error})") from error
        try:  # build the decoder on the meta device once: a signature the adapter does not match is named here
            self._meta_model("tiny")
        except Exception as error:  # noqa: BLE001 - any failure to build is the reason this component cannot run
            raise SubjectError(
                f"the suite's adapter cannot build {self.component} on ComfyUI {comfy.version}: {type(error).__name__}: {error}"
            ) from error

    def _meta_model(self, scale: str) -> nn.Module:
        with torch.device("meta"):
            model = self.spec.make(self.comfy, vae.DIMS[self.component][scale])
        model.encoder = nn.Identity()  # decode never reads the encoder
        if hasattr(model, "conv1"):
            model.conv1 = nn.Identity()  # Wan's encoder-side 1x1 conv
        return model

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._meta_model(scale).state_dict().items() if k.startswith(self.spec.decoder_parts)}

    # -- precisions ------------------------------------------------------------------------------------------------
    def precision_support(self, precision: Precision, device: torch.device) -> tuple[str, ...]:
        if precision.kind == "native":
            return ()
        return (f"ComfyUI {self.comfy.version} has no fp8 VAE path (a VAE runs in --fp16-vae, --bf16-vae or --fp32-vae)",)

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        model = self._meta_model(scale)
        wanted = self.weight_shapes(scale)
        missing = sorted(set(wanted) - set(weights))
        if missing:
            raise KeyError(f"{self.component}: no weights for {missing[:5]}")
        model.load_state_dict({k: weights[k] for k in wanted}, strict=False, assign=True)
        dtype = torch.float64 if precision is None else precision.compute_dtype
        model = model.eval().to(device=device, dtype=dtype)  # VAE.__init__: first_stage_model.to(vae_dtype)
        notes = [f"first_stage_model in {str(dtype).removeprefix('torch.')}, as comfy.sd.VAE with that vae_dtype"]
        if precision is not None and precision.name == "fp16" and self.component == "flux.vae":
            notes.append("ComfyUI runs this VAE in fp16 only with --fp16-vae (its working dtypes are bf16, fp32)")
        return BuiltComponent(
            module=model,
            call=lambda module, kwargs, sizes: {"pixels": module.decode(kwargs["z"])},
            boundary_names=self._boundary_names(model),
            notes=notes,
            guard_note=None,
            tiled_call=self._tiled_call,
            inputs_at_call=True,
            root_label="vae",
        )

    def _boundary_names(self, model: nn.Module) -> dict[str, str]:
        names = {**self.spec.boundary_names, "": "decoded pixels"}
        for name, layer in model.named_modules():
            parts = name.split(".")
            if len(parts) == 3 and parts[:2] == ["decoder", "upsamples"]:
                names[name] = f"up path {parts[2]} ({type(layer).__name__})"
            elif len(parts) == 3 and parts[:2] == ["decoder", "up"]:
                names[name] = f"up block {parts[2]}"
        return names

    def _tiled_call(self, module, kwargs, sizes) -> dict[str, torch.Tensor]:
        """ComfyUI's tiler on the same model, as comfy.sd.VAE.decode_tiled_3d / decode_tiled_ call it, with tiles of 3/4
        of the latent overlapping by 1/4 (vae.tiling) and without process_output (the save stage applies it)."""
        utils = importlib.import_module("comfy.utils")
        z = kwargs["z"]
        dtype = next(module.parameters()).dtype
        tile, stride = vae.tiling(z.shape[-1], 1)
        overlap = tile - stride

        def decode_fn(a):
            return module.decode(a.to(dtype).to(z.device)).float()

        if self.spec.index_formula is not None:  # decode_tiled_3d
            out = utils.tiled_scale_multidim(
                z, decode_fn, tile=(999, tile, tile), overlap=(1, overlap, overlap), upscale_amount=self.spec.upscale_ratio,
                out_channels=3, index_formulas=self.spec.index_formula, output_device=z.device,
            )
        else:  # decode_tiled_: three tilings averaged
            ratio = self.spec.upscale_ratio
            out = (
                utils.tiled_scale(z, decode_fn, tile // 2, tile * 2, overlap, upscale_amount=ratio, output_device=z.device)
                + utils.tiled_scale(z, decode_fn, tile * 2, tile // 2, overlap, upscale_amount=ratio, output_device=z.device)
                + utils.tiled_scale(z, decode_fn, tile, tile, overlap, upscale_amount=ratio, output_device=z.device)
            ) / 3.0
        return {"pixels": out}  # float32, as ComfyUI's tiler returns it

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        latent = vae.raw_latent(self.component, scale, profile, seed)
        sizes = profile.sizes_for(scale)
        return ComponentInputs(kwargs={"z": latent}, sizes={"latent_pixels": sizes.image_tokens, "frames": sizes.frames})

    # -- attention -------------------------------------------------------------------------------------------------
    golden_backend = "split"  # normal_attention: slice attention, plain matmul + softmax, exact in float64

    def backend_support(self, backend: str, device: torch.device) -> BackendSupport:
        if backend not in FUNCTIONS:
            return BackendSupport(
                backend, (f"ComfyUI's VAE attention is one of {', '.join(f'{b} ({f})' for b, f in FUNCTIONS.items())} (vae_attention in {MODEL_PY})",)
            )
        if backend == "xformers":
            model_py = importlib.import_module(MODEL_PY)
            if device.type != "cuda":
                return BackendSupport(backend, ("needs a CUDA device",))
            if not hasattr(model_py, "xformers"):
                return BackendSupport(backend, ("ComfyUI did not enable xformers for VAEs at import (model_management.xformers_enabled_vae() is False)",))
        return BackendSupport(backend)

    def expected_kernels(self, backend: str) -> tuple[str, ...]:
        # xformers_attention replaces a NotImplementedError with slice attention silently: the package's own entry
        # point must have been called (and returned) for the case to count as xformers.
        kernels = (f"comfy:{FUNCTIONS[backend]}",)
        return kernels + ("xformers.ops.memory_efficient_attention",) if backend == "xformers" else kernels

    @contextlib.contextmanager
    def use_backend(self, module: nn.Module, backend: str, counter: CallCounter) -> Iterator:
        model_py = importlib.import_module(MODEL_PY)
        chosen = counter.wrap(f"comfy:{FUNCTIONS[backend]}", getattr(model_py, FUNCTIONS[backend]))
        sites = [m for m in module.modules() if hasattr(m, "optimized_attention")]
        saved = [m.optimized_attention for m in sites]
        for site in sites:
            site.optimized_attention = chosen
        try:
            with catch_fallbacks(counter, extra_patterns=(FALLBACK,)), spy_kernel(self.comfy, backend, counter):
                yield lambda kwargs: kwargs
        finally:
            for site, original in zip(sites, saved):
                site.optimized_attention = original
