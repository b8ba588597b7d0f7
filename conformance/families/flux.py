"""FLUX.1 (12B MMDiT): double-stream and single-stream blocks.

Canonical layout: the original (BFL) names ComfyUI keeps: ``img_attn.qkv`` fused q|k|v, ``img_mod.lin``,
``linear1`` = q|k|v|mlp of a single block. diffusers splits q/k/v and renames everything; ``to_diffusers`` maps a
canonical state dict onto diffusers' names (the mapping of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``,
per block, without its hard-coded 3072 width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..boundaries import InputProbe
from ..profiles import Profile
from ..synthetic import normal
from .common import CheckpointLayout, Family, FileModel, LayerInit, by_subject

NAME = "flux"
COMPONENTS = ("flux.double", "flux.single")


@dataclass(frozen=True)
class FluxDims:
    heads: int
    context_dim: int  # T5-XXL hidden: 4096
    vec_dim: int  # CLIP-L pooled: 768
    head_dim: int = 128
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    in_channels: int = 16  # latent channels; x 2x2 patch = 64 packed
    mlp_ratio: float = 4.0
    guidance_embed: bool = True  # FLUX.1-dev

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


DIMS = {
    "tiny": FluxDims(heads=2, context_dim=128, vec_dim=64),
    # FLUX.1-dev: hidden 3072 = 24 x 128, depth 19 double + 38 single, T5 4096, CLIP 768, guidance embed.
    "real": FluxDims(heads=24, context_dim=4096, vec_dim=768),
}

INIT = LayerInit(bias_std=0.02, norm_mean=1.0, norm_std=0.1, linear_gain=1.0)

OUTPUTS = ("txt", "img")
OUTPUT_STREAMS = {"txt": "txt", "img": "img"}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def embedder_shapes(dims: FluxDims) -> dict[str, tuple[int, ...]]:
    d = dims.dim
    shapes = {}
    shapes.update(_linear("img_in", d, dims.in_channels * 4))
    shapes.update(_linear("time_in.in_layer", d, 256))
    shapes.update(_linear("time_in.out_layer", d, d))
    shapes.update(_linear("vector_in.in_layer", d, dims.vec_dim))
    shapes.update(_linear("vector_in.out_layer", d, d))
    if dims.guidance_embed:
        shapes.update(_linear("guidance_in.in_layer", d, 256))
        shapes.update(_linear("guidance_in.out_layer", d, d))
    shapes.update(_linear("txt_in", d, dims.context_dim))
    return shapes


def block_shapes(component: str, dims: FluxDims) -> dict[str, tuple[int, ...]]:
    d, m, hd = dims.dim, dims.mlp_dim, dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if component == "flux.double":
        for stream in ("img", "txt"):
            shapes.update(_linear(f"{stream}_mod.lin", 6 * d, d))
            shapes.update(_linear(f"{stream}_attn.qkv", 3 * d, d))
            shapes[f"{stream}_attn.norm.query_norm.scale"] = (hd,)
            shapes[f"{stream}_attn.norm.key_norm.scale"] = (hd,)
            shapes.update(_linear(f"{stream}_attn.proj", d, d))
            shapes.update(_linear(f"{stream}_mlp.0", m, d))
            shapes.update(_linear(f"{stream}_mlp.2", d, m))
    elif component == "flux.single":
        shapes.update(_linear("linear1", 3 * d + m, d))
        shapes.update(_linear("linear2", d, d + m))
        shapes["norm.query_norm.scale"] = (hd,)
        shapes["norm.key_norm.scale"] = (hd,)
        shapes.update(_linear("modulation.lin", 3 * d, d))
    else:
        raise KeyError(component)
    return shapes


def weight_shapes(component: str, scale: str) -> dict[str, tuple[int, ...]]:
    dims = DIMS[scale]
    return {**block_shapes(component, dims), **embedder_shapes(dims)}


# -- canonical -> diffusers ------------------------------------------------------------------------------------------
EMBEDDER_TO_DIFFUSERS = {
    "img_in.": "x_embedder.",
    "txt_in.": "context_embedder.",
    "time_in.in_layer.": "time_text_embed.timestep_embedder.linear_1.",
    "time_in.out_layer.": "time_text_embed.timestep_embedder.linear_2.",
    "vector_in.in_layer.": "time_text_embed.text_embedder.linear_1.",
    "vector_in.out_layer.": "time_text_embed.text_embedder.linear_2.",
    "guidance_in.in_layer.": "time_text_embed.guidance_embedder.linear_1.",
    "guidance_in.out_layer.": "time_text_embed.guidance_embedder.linear_2.",
}
DOUBLE_TO_DIFFUSERS = {
    "img_mod.lin.": "norm1.linear.",
    "txt_mod.lin.": "norm1_context.linear.",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.": "attn.to_out.0.",
    "txt_attn.proj.": "attn.to_add_out.",
    "img_mlp.0.": "ff.net.0.proj.",
    "img_mlp.2.": "ff.net.2.",
    "txt_mlp.0.": "ff_context.net.0.proj.",
    "txt_mlp.2.": "ff_context.net.2.",
}
SINGLE_TO_DIFFUSERS = {
    "modulation.lin.": "norm.linear.",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2.": "proj_out.",
}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def to_diffusers(component: str, state: dict[str, torch.Tensor], dims: FluxDims) -> dict[str, torch.Tensor]:
    """Canonical (BFL/ComfyUI) block + embedder tensors -> diffusers names; fused projections split."""
    d, out = dims.dim, {}
    for key, tensor in state.items():
        renamed = _rename(key, EMBEDDER_TO_DIFFUSERS)
        if renamed is None and component == "flux.double":
            if key.startswith(("img_attn.qkv.", "txt_attn.qkv.")):
                suffix = key.rsplit(".", 1)[1]
                names = ("to_q", "to_k", "to_v") if key.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, part in zip(names, tensor.chunk(3, dim=0)):
                    out[f"attn.{name}.{suffix}"] = part
                continue
            renamed = _rename(key, DOUBLE_TO_DIFFUSERS)
        elif renamed is None and component == "flux.single":
            if key.startswith("linear1."):
                suffix = key.rsplit(".", 1)[1]
                q, k, v, mlp = tensor.split([d, d, d, dims.mlp_dim], dim=0)
                out[f"attn.to_q.{suffix}"], out[f"attn.to_k.{suffix}"], out[f"attn.to_v.{suffix}"] = q, k, v
                out[f"proj_mlp.{suffix}"] = mlp
                continue
            renamed = _rename(key, SINGLE_TO_DIFFUSERS)
        if renamed is None:
            raise KeyError(f"no diffusers name for FLUX tensor {key!r}")
        out[renamed] = tensor
    return out


# -- inputs -----------------------------------------------------------------------------------------------------------
@dataclass
class RawInputs:
    latent: torch.Tensor  # [1, 16, 2h, 2w]
    context: torch.Tensor  # [1, text_tokens, context_dim]
    pooled: torch.Tensor  # [1, vec_dim]
    timestep: torch.Tensor  # [1], sigma
    guidance: torch.Tensor  # [1]
    image_grid: tuple[int, int]

    def packed_latent(self) -> torch.Tensor:
        b, c, hh, ww = self.latent.shape
        x = self.latent.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


GUIDANCE = 3.5  # FLUX.1-dev's default distilled guidance


def raw_inputs(scale: str, profile: Profile, seed: int) -> RawInputs:
    dims, sizes = DIMS[scale], profile.sizes_for(scale)
    h, w = sizes.image_grid
    latent = normal((1, dims.in_channels, 2 * h, 2 * w), seed, NAME, "input", scale, "latent", std=profile.latent_std)
    context = normal((1, sizes.text_tokens, dims.context_dim), seed, NAME, "input", scale, "context", std=profile.context_std)
    pooled = normal((1, dims.vec_dim), seed, NAME, "input", scale, "pooled", std=profile.context_std)
    return RawInputs(latent, context, pooled, torch.tensor([profile.timestep]), torch.tensor([GUIDANCE]), (h, w))


def comfyui_pe_to_diffusers(pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``[B, 1, L, 64, 2, 2]`` rotations -> diffusers' ``(cos, sin)``, each ``[L, 128]`` repeat-interleaved."""
    cos = pe[0, 0, :, :, 0, 0].float().repeat_interleave(2, dim=-1)
    sin = pe[0, 0, :, :, 1, 0].float().repeat_interleave(2, dim=-1)
    return cos, sin


def comfyui_inputs_to_diffusers(component: str, kwargs: dict, text_tokens: int) -> dict:
    rotary = comfyui_pe_to_diffusers(kwargs["pe"])
    if component == "flux.double":
        img, txt = kwargs["img"], kwargs["txt"]
    else:
        joint = kwargs["x"]
        txt, img = joint[:, :text_tokens], joint[:, text_tokens:]
    return {"hidden_states": img, "encoder_hidden_states": txt, "temb": kwargs["vec"], "image_rotary_emb": rotary}


XCHECK_INPUTS = {("comfyui", "diffusers"): comfyui_inputs_to_diffusers}

# -- boundaries ---------------------------------------------------------------------------------------------------------
BOUNDARY_NAMES = {
    "comfyui": {
        "flux.double": {
            "": "block output",
            "img_mod": "img modulation",
            "txt_mod": "txt modulation",
            "img_attn.qkv": "img qkv projection",
            "txt_attn.qkv": "txt qkv projection",
            "img_attn.norm": "img qk norm",
            "txt_attn.norm": "txt qk norm",
            "img_attn.proj": "img attention output projection",
            "txt_attn.proj": "txt attention output projection",
            "img_mlp": "img mlp",
            "txt_mlp": "txt mlp",
        },
        "flux.single": {
            "": "block output",
            "modulation": "modulation",
            "linear1": "qkv + mlp-in projection",
            "norm": "qk norm",
            "linear2": "attention + mlp-out projection",
        },
    },
    "diffusers": {
        "flux.double": {
            "": "block output",
            "norm1": "img modulation + norm1",
            "norm1_context": "txt modulation + norm1",
            "attn": "attention",
            "attn.to_out.0": "img attention output projection",
            "attn.to_add_out": "txt attention output projection",
            "ff": "img mlp",
            "ff_context": "txt mlp",
        },
        "flux.single": {
            "": "block output",
            "norm": "modulation + norm",
            "attn": "attention",
            "proj_mlp": "mlp-in projection",
            "proj_out": "attention + mlp-out projection",
        },
    },
}

INPUT_PROBES = {
    "comfyui": {
        "flux.double": (
            InputProbe("img_attn.proj", 0, "img attention kernel output", "", "attention output (img part)"),
            InputProbe("txt_attn.proj", 0, "txt attention kernel output", "", "attention output (txt part)"),
            InputProbe("img_norm2", 0, "img residual after attention", "", "img + gate1 * attn"),
            InputProbe("txt_norm2", 0, "txt residual after attention", "", "txt + gate1 * attn"),
        ),
        "flux.single": (InputProbe("linear2", 0, "attention kernel output + mlp activation", "", "cat(attn, gelu(mlp))"),),
    },
    "diffusers": {
        "flux.double": (
            InputProbe("attn.to_out.0", 0, "img attention kernel output", "attn", "attention output (img part)"),
            InputProbe("attn.to_add_out", 0, "txt attention kernel output", "attn", "attention output (txt part)"),
            InputProbe("norm2", 0, "img residual after attention", "", "hidden_states + gate * attn"),
            InputProbe("norm2_context", 0, "txt residual after attention", "", "encoder_hidden_states + gate * attn"),
        ),
        "flux.single": (InputProbe("proj_out", 0, "attention kernel output + mlp activation", "", "cat(attn, gelu(mlp))"),),
    },
}


def describe_file(shapes) -> FileModel:
    """FLUX.1's dims from a checkpoint's shapes (as ``comfy.model_detection``: ``img_in`` = 4 x latent channels,
    ``vector_in``'s input = the pooled CLIP width, ``guidance_in`` present = dev, absent = schnell)."""
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    dim, packed = shapes["img_in.weight"]
    guidance = "guidance_in.in_layer.weight" in shapes
    dims = FluxDims(
        heads=dim // head_dim,
        context_dim=shapes["txt_in.weight"][1],
        vec_dim=shapes["vector_in.in_layer.weight"][1],
        head_dim=head_dim,
        in_channels=packed // 4,
        mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / dim,
        guidance_embed=guidance,
    )
    return FileModel(
        variant="FLUX.1-dev" if guidance else "FLUX.1-schnell",
        dims={"flux.double": dims, "flux.single": dims},
        block_lists={"flux.double": "double_blocks", "flux.single": "single_blocks"},
    )


CHECKPOINT = CheckpointLayout(
    markers=("double_blocks.0.img_attn.norm.key_norm.scale", "img_in.weight"),
    describe=describe_file,
    dims_by_scale=lambda component: DIMS,
    after_blocks=("final_layer.",),
    other_layouts={
        "single_transformer_blocks.0.attn.to_q.weight": "FLUX in diffusers' layout (x_embedder, transformer_blocks, "
        "single_transformer_blocks): the suite reads the original (BFL/ComfyUI) layout only so far",
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
    checkpoint=CHECKPOINT,
)
