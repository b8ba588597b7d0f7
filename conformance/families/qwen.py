"""Qwen-Image (20B MMDiT): dimensions, canonical weight layout, streams and boundaries.

diffusers and ComfyUI name the block's tensors identically (``img_mod.1.weight``, ``attn.to_q.weight``,
``img_mlp.net.0.proj.weight`` ...; the model prefixes them with ``transformer_blocks.N.``), so the canonical layout is
the identity for both subjects. Embedder tensors (``img_in``, ``txt_norm``, ``txt_in``,
``time_text_embed.timestep_embedder.linear_{1,2}``) are also shared names; they turn a profile into block inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..boundaries import InputProbe
from ..profiles import Profile
from ..synthetic import normal
from .common import CheckpointLayout, Family, FileModel, LayerInit, for_every_subject

NAME = "qwen"
COMPONENTS = ("qwen.block",)


@dataclass(frozen=True)
class QwenDims:
    heads: int
    joint_attention_dim: int  # width of the text encoder's hidden states (Qwen2.5-VL-7B: 3584)
    head_dim: int = 128
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 16
    patch_size: int = 2

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


DIMS = {
    # Real head_dim and RoPE axes with two heads: every code path of the real block at 1/144 of its cost.
    "tiny": QwenDims(heads=2, joint_attention_dim=128),
    # Qwen/Qwen-Image transformer/config.json: 24 heads x 128 = 3072, joint_attention_dim 3584, 60 layers.
    "real": QwenDims(heads=24, joint_attention_dim=3584),
}

# Synthetic weights: unit-variance-preserving linears (std 1/sqrt(fan_in), the scale of trained DiT linears at
# these widths: ~0.018 at 3072), small biases, RMSNorm gains near 1.
INIT = LayerInit(bias_std=0.02, norm_mean=1.0, norm_std=0.1, linear_gain=1.0)

# The residual streams of a block, by the keyword the block takes them under.
STREAMS = {"img": "hidden_states", "txt": "encoder_hidden_states"}

# The block returns (encoder_hidden_states, hidden_states): text first. Each output continues one stream.
OUTPUTS = ("txt", "img")
OUTPUT_STREAMS = {"txt": "txt", "img": "img"}

BOUNDARY_NAMES = {
    "": "block output",
    "img_mod": "img modulation",
    "txt_mod": "txt modulation",
    "img_norm1": "img norm1",
    "txt_norm1": "txt norm1",
    "attn.to_q": "img q projection",
    "attn.to_k": "img k projection",
    "attn.to_v": "img v projection",
    "attn.add_q_proj": "txt q projection",
    "attn.add_k_proj": "txt k projection",
    "attn.add_v_proj": "txt v projection",
    "attn.norm_q": "img q norm",
    "attn.norm_k": "img k norm",
    "attn.norm_added_q": "txt q norm",
    "attn.norm_added_k": "txt k norm",
    "attn": "attention",
    "attn.to_out.0": "img attention output projection",
    "attn.to_add_out": "txt attention output projection",
    "img_norm2": "img norm2",
    "txt_norm2": "txt norm2",
    "img_mlp": "img mlp",
    "txt_mlp": "txt mlp",
}

INPUT_PROBES = (
    InputProbe("attn.to_out.0", 0, "img attention kernel output", "attn", "attention output (img part)"),
    InputProbe("attn.to_add_out", 0, "txt attention kernel output", "attn", "attention output (txt part)"),
    InputProbe("img_norm2", 0, "img residual after attention", "", "hidden_states + gate1 * attn"),
    InputProbe("txt_norm2", 0, "txt residual after attention", "", "encoder_hidden_states + gate1 * attn"),
)


@dataclass
class RawInputs:
    """What the model receives before its embedders: the VAE latent, text-encoder states, timestep (sigma)."""

    latent: torch.Tensor  # [1, 16, 1, 2h, 2w]: what ComfyUI's model takes; diffusers takes it packed
    context: torch.Tensor  # [1, text_tokens, joint_attention_dim]
    timestep: torch.Tensor  # [1]
    image_grid: tuple[int, int]  # (h, w) in packed tokens
    references: tuple[torch.Tensor, ...] = ()  # edit-style reference latents, each shaped like ``latent``

    def packed_latent(self) -> torch.Tensor:
        """The image tokens: the latent, then each reference, packed and concatenated (Qwen-Image-Edit's sequence)."""
        return torch.cat([pack(x) for x in (self.latent, *self.references)], dim=1)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """2x2 patchify to [1, h*w, 64], channel order (c, dy, dx): diffusers' ``_pack_latents``, ComfyUI's ``process_img``."""
    b, c, _, hh, ww = latent.shape
    x = latent[:, :, 0].reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def raw_inputs(scale: str, profile: Profile, seed: int) -> RawInputs:
    """Profile -> model inputs. Keyed by scale and shape, not by profile name: stress profiles share nominal's base."""
    dims, sizes = DIMS[scale], profile.sizes_for(scale)
    h, w = sizes.image_grid
    latent_channels = dims.in_channels // (dims.patch_size * dims.patch_size)
    latent = normal((1, latent_channels, 1, 2 * h, 2 * w), seed, NAME, "input", scale, "latent", std=profile.latent_std)
    context = normal(
        (1, sizes.text_tokens, dims.joint_attention_dim), seed, NAME, "input", scale, "context", std=profile.context_std
    )
    references = tuple(
        normal(latent.shape, seed, NAME, "input", scale, "reference", str(i), std=profile.latent_std) for i in range(profile.references)
    )
    return RawInputs(latent, context, torch.tensor([profile.timestep], dtype=torch.float32), (h, w), references)


def comfyui_inputs_to_diffusers(component: str, kwargs: dict, text_tokens: int) -> dict:
    """ComfyUI's captured block inputs in diffusers' form, for the cross-implementation check.

    The streams and temb are the same tensors. ComfyUI's RoPE is ``[B, L_txt + L_img, 1, 64, 2, 2]`` rotation matrices
    ``[[cos, -sin], [sin, cos]]`` over the joint [text, image] sequence; diffusers takes ``(img_freqs, txt_freqs)``,
    complex ``cos + i sin`` of shape ``[L, 64]`` each.
    """
    pe = kwargs["image_rotary_emb"]
    txt_len = kwargs["encoder_hidden_states"].shape[1]
    freqs = torch.complex(pe[0, :, 0, :, 0, 0].float(), pe[0, :, 0, :, 1, 0].float())
    return {
        "hidden_states": kwargs["hidden_states"],
        "encoder_hidden_states": kwargs["encoder_hidden_states"],
        "encoder_hidden_states_mask": None,
        "temb": kwargs["temb"],
        "image_rotary_emb": (freqs[txt_len:], freqs[:txt_len]),
    }


# (subject, partner) -> input conversion. Weight layouts of the two subjects are identical for Qwen-Image.
XCHECK_INPUTS = {("comfyui", "diffusers"): comfyui_inputs_to_diffusers}


def describe_file(shapes) -> FileModel:
    """Qwen-Image's dims from a checkpoint's shapes (what ``comfy.model_detection`` reads: ``img_in``'s width, the
    head dim of the q norm, ``txt_in``'s input width)."""
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    dim, in_channels = shapes["img_in.weight"]
    out = shapes.get("proj_out.weight")
    dims = QwenDims(
        heads=dim // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1],
        head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out[0] // 4 if out else 16,
    )
    return FileModel(
        variant="Qwen-Image",
        dims={"qwen.block": dims},
        block_lists={"qwen.block": "transformer_blocks"},
        notes=("Qwen-Image and Qwen-Image-Edit(-2509) share every key and shape: the file cannot say which it is",),
    )


CHECKPOINT = CheckpointLayout(
    markers=("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"),
    describe=describe_file,
    dims_by_scale=lambda component: DIMS,
    after_blocks=("norm_out.", "proj_out."),
)


FAMILY = Family(
    name=NAME,
    components=COMPONENTS,
    init=INIT,
    output_streams=OUTPUT_STREAMS,
    boundary_names=for_every_subject(COMPONENTS, BOUNDARY_NAMES),
    input_probes=for_every_subject(COMPONENTS, INPUT_PROBES),
    xcheck_inputs=XCHECK_INPUTS,
    checkpoint=CHECKPOINT,
)
