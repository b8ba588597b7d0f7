"""diffusers' transformer blocks, one spec per component, one adapter that builds, feeds and names them.

Every block comes from diffusers' own classes; its inputs come from diffusers' own model class, built with no layers
and one block shell on the meta device, run on the profile's raw inputs until the block is called (``capture``).
Weights arrive in the family's canonical layout and are mapped onto diffusers' names by the family.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ...families import flux, get_family, qwen, wan
from ...families.common import apply_outliers, outlier_channels, scale_modulation
from ...precision import Precision
from ...boundaries import GuardSpy
from ...profiles import Profile
from ..base import BuiltComponent, ComponentAdapter, ComponentInputs
from ..capture import accepted_kwargs, capture_block_inputs
from .precision import apply_precision

# diffusers clips fp16 block outputs to +-65504 with Tensor.clip (Qwen: both streams; FLUX double: text; single: joint).
CLIP_SPY = (GuardSpy(torch.Tensor, "clip", "Tensor.clip"),)


@dataclass(frozen=True)
class BlockSpec:
    component: str
    module: str  # diffusers module holding both classes
    model_class: str
    block_class: str
    block_list: str  # attribute of the model holding the block
    empty_model: Callable[[object], dict]  # dims -> model kwargs with no blocks at all
    block_kwargs: Callable[[object], dict]
    model_call: Callable[[object, object], dict]  # (raw inputs, dims) -> model forward kwargs
    outputs: Callable[[object, Mapping[str, int]], dict]  # (block return, sizes) -> named outputs
    streams: Mapping[str, str]  # profile stream -> block keyword
    modulation: str  # the keyword of the conditioning vector the modulation linears read
    after_blocks: tuple[str, ...]  # model state keys after the blocks (never run by the capture)
    dims: Callable[[str], object]  # scale -> dims
    raw: Callable[[str, Profile, int], object]  # (scale, profile, seed) -> raw inputs
    to_own: Callable[[dict, object], dict]  # (canonical state, dims) -> diffusers names
    canonical_shapes: Callable[[str], dict]  # scale -> canonical keys and shapes
    guards: tuple[GuardSpy, ...] = ()
    guard_note: Callable[[Precision | None], str | None] = lambda precision: None
    keep_fp32: tuple[str, ...] = field(default=())


def _fp16_note(text: str) -> Callable[[Precision | None], str | None]:
    return lambda precision: text if precision is not None and precision.compute_dtype == torch.float16 else None


# -- Qwen-Image -------------------------------------------------------------------------------------------------------
def _qwen_model(d: qwen.QwenDims) -> dict:
    return dict(
        patch_size=d.patch_size,
        in_channels=d.in_channels,
        out_channels=d.out_channels,
        num_layers=0,
        attention_head_dim=d.head_dim,
        num_attention_heads=d.heads,
        joint_attention_dim=d.joint_attention_dim,
        axes_dims_rope=d.axes_dims_rope,
    )


def _qwen_call(raw: qwen.RawInputs, d) -> dict:
    h, w = raw.image_grid
    return dict(
        hidden_states=raw.packed_latent(),
        encoder_hidden_states=raw.context,
        encoder_hidden_states_mask=None,
        timestep=raw.timestep,
        img_shapes=[[(1, h, w)] * (1 + len(raw.references))],  # edit: each reference its own RoPE frame index
        return_dict=False,
    )


QWEN = BlockSpec(
    component="qwen.block",
    module="diffusers.models.transformers.transformer_qwenimage",
    model_class="QwenImageTransformer2DModel",
    block_class="QwenImageTransformerBlock",
    block_list="transformer_blocks",
    empty_model=_qwen_model,
    block_kwargs=lambda d: dict(dim=d.dim, num_attention_heads=d.heads, attention_head_dim=d.head_dim),
    model_call=_qwen_call,
    outputs=lambda out, sizes: {"txt": out[0], "img": out[1]},
    streams=qwen.STREAMS,
    modulation="temb",
    after_blocks=("norm_out.", "proj_out."),
    dims=lambda scale: qwen.DIMS[scale],
    raw=qwen.raw_inputs,
    to_own=lambda state, dims: dict(state),
    canonical_shapes=None,  # Qwen's canonical layout is diffusers' own: taken from the classes
    guards=CLIP_SPY,
    guard_note=_fp16_note("diffusers clips both streams to +-65504 at the end of QwenImageTransformerBlock in fp16"),
)


# -- FLUX -------------------------------------------------------------------------------------------------------------
def _flux_model(d: flux.FluxDims) -> dict:
    return dict(
        patch_size=1,
        in_channels=d.in_channels * 4,
        num_layers=0,
        num_single_layers=0,
        attention_head_dim=d.head_dim,
        num_attention_heads=d.heads,
        joint_attention_dim=d.context_dim,
        pooled_projection_dim=d.vec_dim,
        guidance_embeds=d.guidance_embed,
        axes_dims_rope=d.axes_dim,
    )


def _flux_call(raw: flux.RawInputs, d: flux.FluxDims) -> dict:
    h, w = raw.image_grid
    # FluxPipeline._prepare_latent_image_ids: (0, row, col) on the packed grid; text ids are zeros.
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=raw.packed_latent(),
        encoder_hidden_states=raw.context,
        pooled_projections=raw.pooled,
        timestep=raw.timestep,
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(raw.context.shape[1], 3),
        guidance=raw.guidance if d.guidance_embed else None,
        return_dict=False,
    )


def _flux_spec(component: str, block_class: str, block_list: str, block_kwargs, note: str) -> BlockSpec:
    return BlockSpec(
        component=component,
        module="diffusers.models.transformers.transformer_flux",
        model_class="FluxTransformer2DModel",
        block_class=block_class,
        block_list=block_list,
        empty_model=_flux_model,
        block_kwargs=block_kwargs,
        model_call=_flux_call,
        outputs=lambda out, sizes: {"txt": out[0], "img": out[1]},
        streams={"img": "hidden_states", "txt": "encoder_hidden_states"},
        modulation="temb",
        after_blocks=("norm_out.", "proj_out."),
        dims=lambda scale: flux.DIMS[scale],
        raw=flux.raw_inputs,
        to_own=lambda state, dims, c=component: flux.to_diffusers(c, state, dims),
        canonical_shapes=lambda scale, c=component: flux.weight_shapes(c, scale),
        guards=CLIP_SPY,
        guard_note=_fp16_note(note),
    )


FLUX_DOUBLE = _flux_spec(
    "flux.double",
    "FluxTransformerBlock",
    "transformer_blocks",
    lambda d: dict(dim=d.dim, num_attention_heads=d.heads, attention_head_dim=d.head_dim),
    "diffusers clips the text stream to +-65504 at the end of FluxTransformerBlock in fp16 (the image stream is not guarded)",
)
FLUX_SINGLE = _flux_spec(
    "flux.single",
    "FluxSingleTransformerBlock",
    "single_transformer_blocks",
    lambda d: dict(dim=d.dim, num_attention_heads=d.heads, attention_head_dim=d.head_dim, mlp_ratio=d.mlp_ratio),
    "diffusers clips the joint stream to +-65504 at the end of FluxSingleTransformerBlock in fp16",
)


# -- WAN --------------------------------------------------------------------------------------------------------------
def _wan_model(d: wan.WanDims) -> dict:
    return dict(
        patch_size=d.patch_size,
        num_attention_heads=d.heads,
        attention_head_dim=d.head_dim,
        in_channels=d.in_dim,
        out_channels=d.out_dim,
        text_dim=d.text_dim,
        freq_dim=d.freq_dim,
        ffn_dim=d.ffn_dim,
        num_layers=0,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=wan.CLIP_DIM if d.cross == "i2v" else None,
        added_kv_proj_dim=d.dim if d.cross == "i2v" else None,
    )


def _wan_call(raw: wan.RawInputs, d: wan.WanDims) -> dict:
    timestep = raw.timestep
    if timestep.ndim == 2:  # per-frame -> per-token, as diffusers' WAN 2.2 TI2V pipeline passes them
        timestep = timestep.repeat_interleave(raw.tokens_per_frame, dim=1)
    return dict(
        hidden_states=raw.latent,
        timestep=timestep,
        encoder_hidden_states=raw.context,
        encoder_hidden_states_image=raw.clip,
        return_dict=False,
    )


def _wan_spec(component: str) -> BlockSpec:
    return BlockSpec(
        component=component,
        module="diffusers.models.transformers.transformer_wan",
        model_class="WanTransformer3DModel",
        block_class="WanTransformerBlock",
        block_list="blocks",
        empty_model=_wan_model,
        block_kwargs=lambda d: dict(
            dim=d.dim,
            ffn_dim=d.ffn_dim,
            num_heads=d.heads,
            qk_norm="rms_norm_across_heads",
            cross_attn_norm=True,
            eps=1e-6,
            added_kv_proj_dim=d.dim if d.cross == "i2v" else None,
        ),
        model_call=_wan_call,
        outputs=lambda out, sizes: {"img": out},
        streams={"img": "hidden_states"},
        modulation="temb",
        after_blocks=("norm_out.", "proj_out.", "scale_shift_table"),
        dims=lambda scale, c=component: wan.DIMS[c][scale],
        raw=lambda scale, profile, seed, c=component: wan.raw_inputs(c, scale, profile, seed),
        to_own=lambda state, dims, c=component: wan.to_diffusers(c, state, dims),
        canonical_shapes=lambda scale, c=component: wan.weight_shapes(c, scale),
        keep_fp32=("scale_shift_table", "norm1", "norm2", "norm3"),  # WanTransformer3DModel._keep_in_fp32_modules
    )


SPECS = {spec.component: spec for spec in (QWEN, FLUX_DOUBLE, FLUX_SINGLE, *(_wan_spec(c) for c in wan.COMPONENTS))}


class DiffusersBlock(ComponentAdapter):
    def __init__(self, spec: BlockSpec) -> None:
        self.spec = spec
        self.component = spec.component
        self.family = get_family(spec.component.split(".")[0])

    def residual_streams(self) -> tuple[str, ...]:
        return tuple(self.spec.streams.values())

    def _classes(self):
        module = importlib.import_module(self.spec.module)
        return getattr(module, self.spec.model_class), getattr(module, self.spec.block_class)

    def _block(self, dims, device):
        _, block_cls = self._classes()
        with torch.device(device):
            return block_cls(**self.spec.block_kwargs(dims))

    def _keep_fp32(self, model_cls) -> tuple[str, ...]:
        return tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ()) or self.spec.keep_fp32

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        if self.spec.canonical_shapes is not None:
            return self.spec.canonical_shapes(scale)
        model_cls, _ = self._classes()
        dims = self.spec.dims(scale)
        with torch.device("meta"):
            model = model_cls(**accepted_kwargs(model_cls.__init__, self.spec.empty_model(dims)))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(self.spec.after_blocks)}
        shapes.update({k: tuple(v.shape) for k, v in self._block(dims, "meta").state_dict().items()})
        return shapes

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        dims = self.spec.dims(scale)
        block = self._block(dims, "meta")
        wanted = set(block.state_dict())
        own = self.spec.to_own(dict(weights), dims)
        missing = sorted(wanted - set(own))
        if missing:
            raise KeyError(f"{self.component}: no weights for diffusers tensors {missing}")
        block.load_state_dict({k: own[k] for k in wanted}, strict=True, assign=True)
        block.eval()
        model_cls, _ = self._classes()
        notes = apply_precision(block, precision, device, keep_fp32=self._keep_fp32(model_cls))
        return BuiltComponent(
            module=block,
            call=lambda module, kwargs, sizes: self.spec.outputs(module(**kwargs), sizes),
            boundary_names=self.family.boundary_names[("diffusers", self.component)],
            input_probes=self.family.input_probes[("diffusers", self.component)],
            guards=self.spec.guards,
            notes=notes,
            guard_note=self.spec.guard_note(precision),
        )

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        model_cls, _ = self._classes()
        dims = self.spec.dims(scale)
        # The embedders are built for real (they are small); the one block is a shell on the meta device: the capture
        # stops at its pre-hook, before any of its math.
        model = model_cls(**accepted_kwargs(model_cls.__init__, self.spec.empty_model(dims)))
        shell = self._block(dims, "meta")
        getattr(model, self.spec.block_list).append(shell)
        prefix = f"{self.spec.block_list}.0."
        embedder_keys = {k for k in model.state_dict() if not k.startswith((prefix, *self.spec.after_blocks))}
        own = self.spec.to_own({k: v for k, v in weights.items()}, dims)
        missing = sorted(embedder_keys - set(own))
        if missing:
            raise KeyError(f"{self.component}: synthetic weights lack embedder tensors {missing}")
        model.load_state_dict({k: own[k] for k in embedder_keys}, strict=False)
        model.eval()
        raw = self.spec.raw(scale, profile, seed)
        call = accepted_kwargs(model.forward, self.spec.model_call(raw, dims))
        with torch.no_grad():
            kwargs = capture_block_inputs(shell, lambda: model(**call))
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "encoder_hidden_states_mask"}
        sizes = _sizes(profile, scale)
        streams = {s: (key, None) for s, key in self.spec.streams.items()}
        kwargs = apply_outliers(kwargs, profile.outliers, streams)
        kwargs = scale_modulation(kwargs, self.spec.modulation, profile.modulation_scale)
        return ComponentInputs(kwargs=kwargs, sizes=sizes, outlier_channels=outlier_channels(profile.outliers, streams))


def _sizes(profile: Profile, scale: str) -> dict[str, int]:
    sizes = profile.sizes_for(scale)
    # edit-style references add image tokens of the same grid (only Qwen's profiles have them; its streams are not split)
    return {"image_tokens": sizes.image_tokens * (1 + profile.references), "text_tokens": sizes.text_tokens, "frames": sizes.frames}
