"""Family definitions: canonical layouts map onto diffusers' modules; inputs and streams are built as documented."""

from __future__ import annotations

import pytest
import torch

from conformance.families import flux, qwen, wan
from conformance.families.common import apply_outliers, synthetic_weights
from conformance.profiles import Outliers, load_profiles

from .helpers import diffusers_subject

BLOCKS = ["flux.double", "flux.single", "wan.t2v", "wan.i2v", "wan.ti2v"]


@pytest.mark.parametrize("component", BLOCKS)
def test_canonical_layout_maps_onto_diffusers_modules(component):
    """Every canonical tensor lands on a diffusers tensor of the same size, and every diffusers tensor is fed."""
    adapter = diffusers_subject()._adapter(component)
    spec = adapter.spec
    dims = spec.dims("tiny")
    canonical = {k: torch.zeros(s) for k, s in adapter.weight_shapes("tiny").items()}
    own = spec.to_own(canonical, dims)
    model_cls, _ = adapter._classes()
    from conformance.subjects.capture import accepted_kwargs

    with torch.device("meta"):
        model = model_cls(**accepted_kwargs(model_cls.__init__, spec.empty_model(dims)))
    block = adapter._block(dims, "meta")
    wanted = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    wanted.update({k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(spec.after_blocks)})
    assert {k: tuple(v.shape) for k, v in own.items()} == wanted


def test_flux_fused_projections_are_split_in_order():
    dims = flux.DIMS["tiny"]
    shapes = flux.weight_shapes("flux.double", "tiny")
    state = synthetic_weights(shapes, 0, "flux", flux.INIT)
    own = flux.to_diffusers("flux.double", state, dims)
    d = dims.dim
    assert torch.equal(own["attn.to_k.weight"], state["img_attn.qkv.weight"][d : 2 * d])
    assert torch.equal(own["attn.add_v_proj.bias"], state["txt_attn.qkv.bias"][2 * d :])
    single = flux.to_diffusers("flux.single", synthetic_weights(flux.weight_shapes("flux.single", "tiny"), 0, "flux", flux.INIT), dims)
    assert single["proj_mlp.weight"].shape == (dims.mlp_dim, d)


def test_wan_norm_swap_follows_diffusers_converter():
    dims = wan.DIMS["wan.i2v"]["tiny"]
    state = synthetic_weights(wan.weight_shapes("wan.i2v", "tiny"), 0, "wan", wan.INIT)
    own = wan.to_diffusers("wan.i2v", state, dims)
    assert torch.equal(own["norm2.weight"], state["norm3.weight"])  # the cross-attention norm
    assert torch.equal(own["scale_shift_table"], state["modulation"])
    assert torch.equal(own["attn2.add_k_proj.weight"], state["cross_attn.k_img.weight"])
    assert float(state["modulation"].std()) == pytest.approx(1 / dims.dim**0.5, rel=0.1)


def test_ti2v_conditioning_frame_has_timestep_zero():
    profile = load_profiles("wan")["nominal"]
    raw = wan.raw_inputs("wan.ti2v", "tiny", profile, 0)
    assert raw.timestep.tolist() == [[0.0, 500.0]]
    assert wan.raw_inputs("wan.t2v", "tiny", profile, 0).timestep.tolist() == [500.0]


def test_outliers_on_a_joint_stream_touch_only_their_tokens():
    x = torch.zeros(1, 10, 8)
    out = apply_outliers({"x": x}, (Outliers("txt", (3,), (6e4,)),), {"txt": ("x", slice(0, 4)), "img": ("x", slice(4, None))})
    assert torch.all(out["x"][:, :4, 3] == 6e4) and torch.all(out["x"][:, 4:, 3] == 0) and torch.all(x == 0)


def test_wan_fp8_computes_in_fp16_like_comfyui():
    from conformance.families import family_precision

    assert family_precision("fp8_e4m3", "wan").compute_dtype == torch.float16
    assert family_precision("fp8_e4m3", "flux").compute_dtype == torch.bfloat16
    assert family_precision("fp16", "wan").compute_dtype == torch.float16


def test_every_family_has_profiles_with_sizes_for_both_scales():
    for family in ("qwen", "flux", "wan"):
        for profile in load_profiles(family).values():
            assert profile.sizes_for("tiny").image_tokens > 0 and profile.sizes_for("real").image_tokens > 0
    assert qwen.OUTPUT_STREAMS and flux.OUTPUT_STREAMS and wan.OUTPUT_STREAMS
