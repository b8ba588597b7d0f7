"""VAE decoders: the last step before pixels, where a NaN that entered becomes a black image.

Components (the family is the prefix, so `-m qwen` selects qwen.vae too):

* ``qwen.vae``: Qwen-Image's VAE, the Wan 2.1 architecture (diffusers has its own class, AutoencoderKLQwenImage);
* ``wan.vae21``: the Wan 2.1 VAE (WAN 2.1 and 2.2-A14B), 16 latent channels, 8x spatial, 4x temporal;
* ``wan.vae22``: the Wan 2.2 VAE (TI2V-5B), 48 latent channels, 16x spatial (2x2 unpatchify at the end);
* ``flux.vae``: the FLUX.1 autoencoder's decoder (LDM layout), 16 latent channels, 8x spatial.

Weights are synthetic and keyed by each subject's own tensor names: there is no cross-subject check for decoders.
Inputs are raw latents (what the decoder reads): the diffusion latent de-normalised with the VAE's own per-channel
statistics, then the profile's stressors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..boundaries import GuardSpy
from ..profiles import Profile
from ..synthetic import normal
from .common import Family, LayerInit

NAME = "vae"
COMPONENTS = ("qwen.vae", "wan.vae21", "wan.vae22", "flux.vae")

# Per-channel statistics of each VAE's latent space: ComfyUI comfy/latent_formats.py (Wan21, Wan22, Flux) = diffusers'
# AutoencoderKLWan / AutoencoderKLQwenImage config latents_mean/latents_std and FLUX's scaling/shift factors.
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916)
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


@dataclass(frozen=True)
class VaeDims:
    kind: str  # wan21 | wan22 | flux
    base: int  # base channels (Wan dim / LDM ch)
    z_dim: int
    dec_base: int | None = None  # Wan 2.2's decoder width
    spatial: int = 8
    video: bool = True

    @property
    def latent_mean(self) -> tuple[float, ...]:
        return {"wan21": WAN21_MEAN, "wan22": WAN22_MEAN}.get(self.kind, (FLUX_SHIFT,) * self.z_dim)

    @property
    def latent_std(self) -> tuple[float, ...]:
        return {"wan21": WAN21_STD, "wan22": WAN22_STD}.get(self.kind, (1 / FLUX_SCALE,) * self.z_dim)


DIMS = {
    # Real: Wan2.1 VAE dim 96 (diffusers AutoencoderKLWan defaults, ComfyUI comfy/sd.py ddconfig); Wan2.2 VAE dim 160,
    # decoder 256, z 48 (diffusers vae22 config; ComfyUI comfy.ldm.wan.vae2_2); FLUX ae ch 128, ch_mult 1,2,4,4, z 16.
    # Tiny: the same architectures at base width 16 (Wan: RMS norms, no group constraint) and 32 (FLUX: GroupNorm's 32
    # groups need a multiple of 32). Wan at 32 cost 1.5 s per half-precision decode of a 4x4 latent on an AVX2-only
    # CPU, at 16 0.4-0.5 s (docs/benchmarks.md, "CPU tier"); the pixels keep std 0.25-0.31.
    "qwen.vae": {"tiny": VaeDims("wan21", 16, 16), "real": VaeDims("wan21", 96, 16)},
    "wan.vae21": {"tiny": VaeDims("wan21", 16, 16), "real": VaeDims("wan21", 96, 16)},
    "wan.vae22": {"tiny": VaeDims("wan22", 16, 48, dec_base=16, spatial=16), "real": VaeDims("wan22", 160, 48, dec_base=256, spatial=16)},
    "flux.vae": {"tiny": VaeDims("flux", 32, 16, video=False), "real": VaeDims("flux", 128, 16, video=False)},
}

# Decoder weights: unit-variance convolutions, norm gains near 1, and an output convolution whose gain puts the
# synthetic decoder's pixels where a trained one's are: std ~0.3 of the [-1, 1] range, a few pixels at the clamp
# (measured at both scales, diffusers 0.42.1: Wan std 0.31-0.33, FLUX 0.34-0.35). The gain is keyed by the rank of the
# output convolution's weight, the one thing both subjects' key names share: Wan's causal 3-D conv is 5-D, FLUX's 2-D
# conv is 4-D (Wan: ``decoder.head.2`` in ComfyUI, ``decoder.conv_out`` in diffusers; FLUX: ``decoder.conv_out``).
OUTPUT_CONV_GAIN = {5: 1.0, 4: 0.6}
OUTPUT_CONVS = ("decoder.head.2.", "decoder.conv_out.")


@dataclass(frozen=True)
class VaeInit(LayerInit):
    def spec(self, key: str, shape) -> tuple[float, float]:
        if key.endswith("gamma"):  # Wan's RMS_norm gain, shaped [C, 1, 1(, 1)]
            return self.norm_mean, self.norm_std
        mean, std = super().spec(key, shape)
        if key.startswith(OUTPUT_CONVS) and key.endswith("weight"):
            std *= OUTPUT_CONV_GAIN[len(shape)]
        return mean, std


INIT = VaeInit(bias_std=0.02, norm_mean=1.0, norm_std=0.1, linear_gain=1.0)

OUTPUTS = ("pixels",)
OUTPUT_STREAMS: dict[str, str] = {}

# diffusers' Wan and Qwen VAEs clamp the decoded frames to [-1, 1] inside decode(): +-inf becomes +-1, NaN stays.
CLAMP_SPY = (GuardSpy(torch, "clamp", "torch.clamp"),)


def tiling(pixels: int, spatial: int) -> tuple[int, int]:
    """Tile size and stride, in pixels, for the tiled-decode check: 2 x 2 tiles of 3/4 of the image overlapping by 1/4
    (ComfyUI's default 512-pixel tiles overlap by 64; these latents are too small for that), whole latent pixels."""
    tile = max(pixels * 3 // 4 // spatial, 2) * spatial
    stride = max(pixels // 2 // spatial, 1) * spatial
    return tile, stride


def raw_latent(component: str, scale: str, profile: Profile, seed: int) -> torch.Tensor:
    """The decoder's input: ``z * std + mean`` per channel, ``z`` unit-variance (x the profile's scale), then the
    profile's non-finite values at fixed positions. Wan: ``[1, C, T, H, W]``; FLUX: ``[1, C, H, W]``."""
    dims, sizes = DIMS[component][scale], profile.sizes_for(scale)
    h, w = sizes.image_grid
    shape = (1, dims.z_dim, sizes.frames, h, w) if dims.video else (1, dims.z_dim, h, w)
    z = normal(shape, seed, NAME, "latent", dims.kind, scale, std=profile.latent_std)
    view = (1, -1) + (1,) * (len(shape) - 2)
    mean = torch.tensor(dims.latent_mean).reshape(view)
    std = torch.tensor(dims.latent_std).reshape(view)
    latent = (z.double() * std + mean).float()
    flat = latent.view(-1)
    for i, value in enumerate(profile.latent_nonfinite):
        flat[(i * 7919 + 13) % flat.numel()] = value  # fixed, spread-out positions
    return latent


# Decoders are not a family of their own: their cases carry their model's family (qwen.vae is a qwen case); this
# declaration holds what the harness needs of them as components (seeds, weight rule, profile file).
FAMILY = Family(name=NAME, components=COMPONENTS, init=INIT, output_streams=OUTPUT_STREAMS, boundary_names={}, input_probes={})
