"""WAN 2.1 / 2.2 video DiT blocks: text-to-video, image-to-video (CLIP image cross-attention), TI2V-5B.

Components:

* ``wan.t2v``: WAN 2.1 T2V block; at real scale the 14B dims, which WAN 2.2 A14B's two experts share.
* ``wan.i2v``: WAN 2.1 I2V 14B block, with the image cross-attention over 257 CLIP tokens (``k_img``/``v_img``).
* ``wan.ti2v``: WAN 2.2 TI2V-5B block: 3072 wide, per-frame (ComfyUI) / per-token (diffusers) modulation.

Canonical layout: the original Wan-AI names ComfyUI keeps (``self_attn.q``, ``cross_attn.k_img``, ``norm3`` = the
affine cross-attention norm, ``modulation``). diffusers' own converter (``convert_wan_transformer_to_diffusers``, pure
renaming) maps them; note its norm swap: original ``norm3`` is diffusers' ``norm2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..boundaries import InputProbe
from ..profiles import Profile
from ..synthetic import normal
from .common import CheckpointLayout, Family, FileModel, LayerInit, by_subject

NAME = "wan"
COMPONENTS = ("wan.t2v", "wan.i2v", "wan.ti2v")
CLIP_TOKENS = 257
CLIP_DIM = 1280


@dataclass(frozen=True)
class WanDims:
    dim: int
    ffn_dim: int
    heads: int
    in_dim: int
    out_dim: int
    text_dim: int
    cross: str  # "t2v" or "i2v"
    per_frame_timesteps: bool = False  # WAN 2.2 TI2V: the first latent frame (the conditioning image) has t = 0
    head_dim: int = 128
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)


DIMS = {
    "wan.t2v": {
        "tiny": WanDims(dim=256, ffn_dim=1024, heads=2, in_dim=16, out_dim=16, text_dim=128, cross="t2v"),
        # Wan2.1-T2V-14B = Wan2.2-T2V-A14B experts: 5120 = 40 x 128, ffn 13824, 40 layers.
        "real": WanDims(dim=5120, ffn_dim=13824, heads=40, in_dim=16, out_dim=16, text_dim=4096, cross="t2v"),
    },
    "wan.i2v": {
        "tiny": WanDims(dim=256, ffn_dim=1024, heads=2, in_dim=36, out_dim=16, text_dim=128, cross="i2v"),
        # Wan2.1-I2V-14B-480p: in 36 = 16 latent + 4 mask + 16 condition channels, CLIP image tokens 257 x 1280.
        "real": WanDims(dim=5120, ffn_dim=13824, heads=40, in_dim=36, out_dim=16, text_dim=4096, cross="i2v"),
    },
    "wan.ti2v": {
        "tiny": WanDims(dim=256, ffn_dim=1024, heads=2, in_dim=48, out_dim=48, text_dim=128, cross="t2v", per_frame_timesteps=True),
        # Wan2.2-TI2V-5B: 3072 = 24 x 128, ffn 14336, 30 layers, 48 latent channels (Wan2.2 VAE).
        "real": WanDims(dim=3072, ffn_dim=14336, heads=24, in_dim=48, out_dim=48, text_dim=4096, cross="t2v", per_frame_timesteps=True),
    },
}

INIT = LayerInit(bias_std=0.02, norm_mean=1.0, norm_std=0.1, linear_gain=1.0)
# ComfyUI runs WAN in fp16 by default on NVIDIA (supported_inference_dtypes [fp16, bf16, fp32]); fp8 WAN weights are
# manual-cast to fp16 (comfy/supported_models.py, WAN21_T2V; commit 11b1f27c). diffusers' fp8 path follows the same.
FP8_COMPUTE_DTYPE = torch.float16

OUTPUTS = ("img",)
OUTPUT_STREAMS = {"img": "img"}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def block_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    d = dims.dim
    shapes: dict[str, tuple[int, ...]] = {"modulation": (1, 6, d)}
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v", "o"):
            shapes.update(_linear(f"{attn}.{proj}", d, d))
        shapes[f"{attn}.norm_q.weight"] = (d,)
        shapes[f"{attn}.norm_k.weight"] = (d,)
    if dims.cross == "i2v":
        shapes.update(_linear("cross_attn.k_img", d, d))
        shapes.update(_linear("cross_attn.v_img", d, d))
        shapes["cross_attn.norm_k_img.weight"] = (d,)
    shapes["norm3.weight"] = (d,)
    shapes["norm3.bias"] = (d,)
    shapes.update(_linear("ffn.0", dims.ffn_dim, d))
    shapes.update(_linear("ffn.2", d, dims.ffn_dim))
    return shapes


def embedder_shapes(dims: WanDims) -> dict[str, tuple[int, ...]]:
    d = dims.dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, dims.in_dim, *dims.patch_size),
        "patch_embedding.bias": (d,),
    }
    shapes.update(_linear("text_embedding.0", d, dims.text_dim))
    shapes.update(_linear("text_embedding.2", d, d))
    shapes.update(_linear("time_embedding.0", d, dims.freq_dim))
    shapes.update(_linear("time_embedding.2", d, d))
    shapes.update(_linear("time_projection.1", 6 * d, d))
    if dims.cross == "i2v":
        shapes["img_emb.proj.0.weight"] = (CLIP_DIM,)
        shapes["img_emb.proj.0.bias"] = (CLIP_DIM,)
        shapes.update(_linear("img_emb.proj.1", CLIP_DIM, CLIP_DIM))
        shapes.update(_linear("img_emb.proj.3", d, CLIP_DIM))
        shapes["img_emb.proj.4.weight"] = (d,)
        shapes["img_emb.proj.4.bias"] = (d,)
    return shapes


def weight_shapes(component: str, scale: str) -> dict[str, tuple[int, ...]]:
    dims = DIMS[component][scale]
    return {**block_shapes(dims), **embedder_shapes(dims)}


def to_diffusers(component: str, state: dict[str, torch.Tensor], dims: WanDims) -> dict[str, torch.Tensor]:
    """Canonical names -> diffusers', with diffusers' own converter (block keys get a temporary ``blocks.0.``)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    block_keys = set(block_shapes(dims))
    staged = {(f"blocks.0.{k}" if k in block_keys else k): v for k, v in state.items()}
    converted = convert_wan_transformer_to_diffusers(staged)
    return {k.removeprefix("blocks.0."): v for k, v in converted.items()}


# -- inputs -----------------------------------------------------------------------------------------------------------
@dataclass
class RawInputs:
    latent: torch.Tensor  # [1, in_dim, frames, 2h, 2w]
    context: torch.Tensor  # [1, 512, text_dim]
    clip: torch.Tensor | None  # [1, 257, 1280] (i2v)
    timestep: torch.Tensor  # [1] or, with per-frame timesteps, [1, frames]; in the model's 0..1000 units
    frames: int
    image_grid: tuple[int, int]

    @property
    def tokens_per_frame(self) -> int:
        return self.image_grid[0] * self.image_grid[1]


def raw_inputs(component: str, scale: str, profile: Profile, seed: int) -> RawInputs:
    dims, sizes = DIMS[component][scale], profile.sizes_for(scale)
    h, w = sizes.image_grid
    frames = sizes.frames
    latent = normal((1, dims.in_dim, frames, 2 * h, 2 * w), seed, NAME, "input", component, scale, "latent", std=profile.latent_std)
    context = normal((1, sizes.text_tokens, dims.text_dim), seed, NAME, "input", scale, "context", std=profile.context_std)
    clip = None
    if dims.cross == "i2v":
        clip = normal((1, CLIP_TOKENS, CLIP_DIM), seed, NAME, "input", scale, "clip", std=profile.context_std)
    t = profile.timestep * 1000.0  # WAN is a 1000-step flow model: ComfyUI ModelSamplingDiscreteFlow, diffusers' scheduler
    if dims.per_frame_timesteps:
        timestep = torch.full((1, frames), t)
        timestep[:, 0] = 0.0  # TI2V: the first latent frame is the clean conditioning image
    else:
        timestep = torch.tensor([t])
    return RawInputs(latent, context, clip, timestep, frames, (h, w))


def comfyui_freqs_to_diffusers(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``[1, L, 1, 64, 2, 2]`` rotations -> diffusers' ``(cos, sin)``, each ``[1, L, 1, 128]`` interleaved."""
    cos = freqs[..., 0, 0].float().repeat_interleave(2, dim=-1)
    sin = freqs[..., 1, 0].float().repeat_interleave(2, dim=-1)
    return cos, sin


def comfyui_inputs_to_diffusers(component: str, kwargs: dict, text_tokens: int) -> dict:
    x, e = kwargs["x"], kwargs["e"]
    if e.ndim == 4 and e.shape[1] > 1:  # per-frame modulation [B, F, 6, D] -> per-token [B, S, 6, D]
        e = e.repeat_interleave(x.shape[1] // e.shape[1], dim=1)
    elif e.ndim == 4:
        e = e[:, 0]
    return {"hidden_states": x, "encoder_hidden_states": kwargs["context"], "temb": e, "rotary_emb": comfyui_freqs_to_diffusers(kwargs["freqs"])}


XCHECK_INPUTS = {("comfyui", "diffusers"): comfyui_inputs_to_diffusers}

# -- boundaries ---------------------------------------------------------------------------------------------------------
_COMFY_NAMES = {
    "": "block output",
    "norm1": "norm1 (self-attention input)",
    "self_attn": "self-attention",
    "self_attn.q": "self-attn q projection",
    "self_attn.k": "self-attn k projection",
    "self_attn.v": "self-attn v projection",
    "self_attn.o": "self-attn output projection",
    "norm3": "cross-attention norm",
    "cross_attn": "cross-attention",
    "cross_attn.o": "cross-attn output projection",
    "norm2": "norm2 (ffn input)",
    "ffn": "ffn",
}
_DIFFUSERS_NAMES = {
    "": "block output",
    "norm1": "norm1 (self-attention input)",
    "attn1": "self-attention",
    "attn1.to_q": "self-attn q projection",
    "attn1.to_k": "self-attn k projection",
    "attn1.to_v": "self-attn v projection",
    "attn1.to_out.0": "self-attn output projection",
    "norm2": "cross-attention norm",
    "attn2": "cross-attention",
    "attn2.to_out.0": "cross-attn output projection",
    "norm3": "norm3 (ffn input)",
    "ffn": "ffn",
}
BOUNDARY_NAMES = {"comfyui": {c: _COMFY_NAMES for c in COMPONENTS}, "diffusers": {c: _DIFFUSERS_NAMES for c in COMPONENTS}}

_COMFY_PROBES = (
    InputProbe("self_attn.o", 0, "self-attention kernel output", "self_attn", "attention output"),
    InputProbe("cross_attn.o", 0, "cross-attention kernel output", "cross_attn", "attention output"),
    InputProbe("norm3", 0, "residual after self-attention", "", "x + gate * self_attn"),
    InputProbe("norm2", 0, "residual after cross-attention", "", "x + cross_attn"),
)
_DIFFUSERS_PROBES = (
    InputProbe("attn1.to_out.0", 0, "self-attention kernel output", "attn1", "attention output"),
    InputProbe("attn2.to_out.0", 0, "cross-attention kernel output", "attn2", "attention output"),
    InputProbe("norm2", 0, "residual after self-attention", "", "hidden_states + gate * attn1"),
    InputProbe("norm3", 0, "residual after cross-attention", "", "hidden_states + attn2"),
)
INPUT_PROBES = {"comfyui": {c: _COMFY_PROBES for c in COMPONENTS}, "diffusers": {c: _DIFFUSERS_PROBES for c in COMPONENTS}}


def describe_file(shapes) -> FileModel:
    """WAN's dims and variant from a checkpoint's shapes, by ``comfy.model_detection``'s rules: width from
    ``head.modulation``, 128-wide heads, ``img_emb`` = 2.1 I2V (CLIP image tokens), 48 latent channels = 2.2 TI2V-5B,
    36 input channels without ``img_emb`` = 2.2 I2V-A14B."""
    dim = shapes["head.modulation"][-1]
    in_dim = shapes["patch_embedding.weight"][1]
    patch = tuple(shapes["patch_embedding.weight"][2:])
    out_dim = shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]) if "head.head.weight" in shapes else in_dim
    clip = "img_emb.proj.0.bias" in shapes
    ti2v = in_dim == 48 and out_dim == 48
    component = "wan.ti2v" if ti2v else "wan.i2v" if clip else "wan.t2v"
    dims = WanDims(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        heads=dim // 128,
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=shapes["text_embedding.0.weight"][1],
        cross="i2v" if clip else "t2v",
        per_frame_timesteps=ti2v,
        freq_dim=shapes["time_embedding.0.weight"][1],
        patch_size=patch,
    )
    size = {1536: "1.3B", 3072: "5B", 5120: "14B"}.get(dim, f"{dim} wide")
    if ti2v:
        variant, notes = f"WAN 2.2 TI2V {size}", ()
    elif clip:
        variant, notes = f"WAN 2.1 I2V {size}", ()
    elif in_dim == 36:
        variant, notes = f"WAN 2.2 I2V {size} (an expert)", ("its blocks are T2V-shaped: the image enters as latent channels",)
    else:
        variant, notes = f"WAN 2.1 T2V {size}", ("WAN 2.2 T2V-A14B's experts share every key and shape with WAN 2.1 T2V 14B",)
    return FileModel(variant=variant, dims={component: dims}, block_lists={component: "blocks"}, notes=notes)


CHECKPOINT = CheckpointLayout(
    markers=("head.modulation", "blocks.0.self_attn.q.weight"),
    describe=describe_file,
    dims_by_scale=lambda component: DIMS[component],
    after_blocks=("head.",),
    other_layouts={
        "condition_embedder.time_embedder.linear_1.weight": "WAN in diffusers' layout (condition_embedder, blocks.N.attn1): "
        "the suite reads the original (Wan-AI/ComfyUI) layout only so far",
    },
)


FAMILY = Family(
    name=NAME,
    components=COMPONENTS,
    init=INIT,
    output_streams=OUTPUT_STREAMS,
    boundary_names=by_subject(BOUNDARY_NAMES),
    input_probes=by_subject(INPUT_PROBES),
    xcheck_inputs=XCHECK_INPUTS,
    fp8_compute_dtype=FP8_COMPUTE_DTYPE,
    checkpoint=CHECKPOINT,
)
