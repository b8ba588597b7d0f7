"""diffusers' VAE decoders: AutoencoderKLQwenImage, AutoencoderKLWan (2.1 and 2.2 configs), AutoencoderKL (FLUX).

Only the decoding half is materialised (the VAE is built on the meta device, its decoder and post-quant convolution
are given memory and weights, the encoder is dropped). The component's call is the class's own ``decode``: the
per-frame loop with its causal cache, the 2.2 unpatchify, the final clamp. The VAEs call
``F.scaled_dot_product_attention`` directly (not diffusers' dispatcher): ``sdpa`` counts those calls, ``math`` also
pins the math kernel.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...backends import BackendSupport, CallCounter
from ...families import vae
from ...precision import Precision
from ...profiles import Profile
from ..base import BuiltComponent, ComponentAdapter, ComponentInputs
from .precision import apply_precision

DECODER_PARTS = ("decoder", "post_quant_conv")
BACKENDS = ("sdpa", "math")


def _wan_config(dims: vae.VaeDims) -> dict:
    config = dict(base_dim=dims.base, z_dim=dims.z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])
    if dims.kind == "wan22":
        # diffusers scripts/convert_wan_to_diffusers.py vae22_diffusers_config
        config.update(decoder_base_dim=dims.dec_base, is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    return config


def _flux_config(dims: vae.VaeDims) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[dims.base, dims.base * 2, dims.base * 4, dims.base * 4],
        layers_per_block=2,
        latent_channels=dims.z_dim,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


@dataclass(frozen=True)
class VaeSpec:
    component: str
    class_name: str
    config: object  # dims -> constructor kwargs


SPECS = {
    "qwen.vae": VaeSpec("qwen.vae", "AutoencoderKLQwenImage", _wan_config),
    "wan.vae21": VaeSpec("wan.vae21", "AutoencoderKLWan", _wan_config),
    "wan.vae22": VaeSpec("wan.vae22", "AutoencoderKLWan", _wan_config),
    "flux.vae": VaeSpec("flux.vae", "AutoencoderKL", _flux_config),
}

BOUNDARY_NAMES = {
    "post_quant_conv": "post-quant convolution",
    "decoder.conv_in": "first convolution",
    "decoder.mid_block": "mid block (with attention)",
    "decoder.mid_block.attentions.0": "mid-block attention",
    "decoder.norm_out": "output norm",
    "decoder.conv_norm_out": "output norm",
    "decoder.conv_out": "output convolution",
    "": "decoded pixels",
}


class DiffusersVae(ComponentAdapter):
    def __init__(self, spec: VaeSpec) -> None:
        self.spec = spec
        self.component = spec.component

    def _meta_vae(self, scale: str) -> nn.Module:
        dims = vae.DIMS[self.component][scale]
        cls = getattr(importlib.import_module("diffusers"), self.spec.class_name)
        with torch.device("meta"):
            model = cls(**self.spec.config(dims))
        model.encoder = nn.Identity()  # decode never reads the encoder
        if hasattr(model, "quant_conv"):
            model.quant_conv = nn.Identity() if model.quant_conv is not None else None
        return model

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._meta_vae(scale).state_dict().items() if k.startswith(DECODER_PARTS)}

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        model = self._meta_vae(scale)
        wanted = self.weight_shapes(scale)
        missing = sorted(set(wanted) - set(weights))
        if missing:
            raise KeyError(f"{self.component}: no weights for {missing[:5]}")
        model.load_state_dict({k: weights[k] for k in wanted}, strict=False, assign=True)
        model.eval()
        notes = apply_precision(model, precision, device)
        clamps = self.spec.class_name != "AutoencoderKL"
        return BuiltComponent(
            module=model,
            call=lambda module, kwargs, sizes: {"pixels": module.decode(kwargs["z"], return_dict=False)[0]},
            boundary_names=_boundary_names(model),
            guards=vae.CLAMP_SPY if clamps else (),
            notes=notes,
            guard_note="diffusers clamps the decoded frames to [-1, 1] at the end of decode()" if clamps else None,
            tiled_call=self._tiled_call,
            inputs_at_call=True,
            root_label="vae",
        )

    def _tiled_call(self, module, kwargs, sizes) -> dict[str, torch.Tensor]:
        """diffusers' own tiled decode, with tiles small enough to cut these latents into 2 x 2 tiles overlapping by a
        quarter of the image (vae.tiling)."""
        z = kwargs["z"]
        dims_spatial = getattr(module, "spatial_compression_ratio", 8)
        tile, stride = vae.tiling(z.shape[-2] * dims_spatial, dims_spatial)
        if self.spec.class_name == "AutoencoderKL":
            saved = (module.use_tiling, module.tile_sample_min_size, module.tile_latent_min_size, module.tile_overlap_factor)
            module.use_tiling, module.tile_sample_min_size, module.tile_latent_min_size = True, tile, tile // dims_spatial
            module.tile_overlap_factor = (tile - stride) / tile  # 1 - stride/tile rounds below and adds a pixel
            try:
                return {"pixels": module.decode(z, return_dict=False)[0]}
            finally:
                module.use_tiling, module.tile_sample_min_size, module.tile_latent_min_size, module.tile_overlap_factor = saved
        saved = (module.use_tiling, module.tile_sample_min_height, module.tile_sample_min_width, module.tile_sample_stride_height, module.tile_sample_stride_width)
        module.enable_tiling(tile, tile, stride, stride)
        try:
            return {"pixels": module.decode(z, return_dict=False)[0]}
        finally:
            (module.use_tiling, module.tile_sample_min_height, module.tile_sample_min_width, module.tile_sample_stride_height, module.tile_sample_stride_width) = saved

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        latent = vae.raw_latent(self.component, scale, profile, seed)
        sizes = profile.sizes_for(scale)
        return ComponentInputs(kwargs={"z": latent}, sizes={"latent_pixels": sizes.image_tokens, "frames": sizes.frames})

    # -- attention of the mid block --------------------------------------------------------------------------------
    def backend_support(self, backend: str, device: torch.device) -> BackendSupport:
        if backend in BACKENDS:
            return BackendSupport(backend)
        return BackendSupport(backend, (f"diffusers' VAEs call F.scaled_dot_product_attention directly: only {', '.join(BACKENDS)}",))

    def expected_kernels(self, backend: str) -> tuple[str, ...]:
        return ("torch.sdpa",)

    @contextlib.contextmanager
    def use_backend(self, module: nn.Module, backend: str, counter: CallCounter) -> Iterator:
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = counter.wrap("torch.sdpa", original)
        try:
            with contextlib.ExitStack() as stack:
                if backend == "math":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                yield lambda kwargs: kwargs
        finally:
            F.scaled_dot_product_attention = original


def _boundary_names(model: nn.Module) -> dict[str, str]:
    names = dict(BOUNDARY_NAMES)
    for name, _ in model.named_modules():
        if name.startswith("decoder.up_blocks.") and name.count(".") == 2:
            names[name] = f"up block {name.rsplit('.', 1)[1]}"
    return names
