"""ComfyUI's own transformer blocks: one spec per component, one adapter that builds, feeds and names them.

Blocks are built from the checkout's classes with the ``comfy.ops`` class of the precision (``ops.plan``). Inputs come
from the checkout's own model class, built with no blocks and one block shell on the meta device, run on the
profile's raw inputs until the block is called: RoPE tables, modulation vectors and masks are whatever this version
builds (they differ between versions; hand-built ones would be wrong for some).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ...families import flux, get_family, qwen, wan
from ...families.common import apply_outliers, outlier_channels, scale_modulation
from ...precision import Precision
from ...boundaries import GuardSpy
from ...profiles import Profile
from ..base import ABSENT, BuiltComponent, ComponentAdapter, ComponentInputs, SubjectError
from ..capture import accepted_kwargs, capture_block_inputs
from .loader import ComfyUI
from ...checkpoints.cases import CheckpointWeights
from .ops import load_as_stored, plan, prepare_state_dict

# ComfyUI's FLUX blocks repair fp16 overflow with torch.nan_to_num(x, nan=0, posinf=65504, neginf=-65504).
NAN_TO_NUM_SPY = (GuardSpy(torch, "nan_to_num", "torch.nan_to_num"),)


@dataclass(frozen=True)
class BlockSpec:
    component: str
    module: str
    model_class: str
    block_list: str
    empty_model: Callable[[ComfyUI, object, torch.dtype, object], dict]  # (comfy, dims, dtype, device) -> kwargs, no blocks
    make_block: Callable[[object, object, torch.dtype, object, type], torch.nn.Module]  # (module, dims, dtype, device, ops)
    model_call: Callable[[object], tuple[tuple, dict]]  # raw -> (args, kwargs) of the model's forward
    outputs: Callable[[object, Mapping[str, int]], dict]
    streams: Callable[[Mapping[str, int]], dict]  # sizes -> {stream: (keyword, token slice)}
    modulation: str  # the keyword of the conditioning vector the modulation linears read
    after_blocks: tuple[str, ...]
    attention_sites: tuple[tuple[str, str], ...]
    dims: Callable[[str], object]
    raw: Callable[[str, Profile, int], object]
    canonical_shapes: Callable[[str], dict] | None
    guards: tuple[GuardSpy, ...] = ()
    guard_note: Callable[[Precision | None], str | None] = lambda precision: None


def _fp16_note(text: str) -> Callable[[Precision | None], str | None]:
    return lambda precision: text if precision is not None and precision.compute_dtype == torch.float16 else None


# -- Qwen-Image -------------------------------------------------------------------------------------------------------
def _qwen_model(comfy: ComfyUI, d: qwen.QwenDims, dtype, device) -> dict:
    return dict(
        patch_size=d.patch_size,
        in_channels=d.in_channels,
        out_channels=d.out_channels,
        num_layers=0,
        attention_head_dim=d.head_dim,
        num_attention_heads=d.heads,
        joint_attention_dim=d.joint_attention_dim,
        axes_dims_rope=d.axes_dims_rope,
        final_layer=False,
        dtype=dtype,
        device=device,
        operations=comfy.ops.disable_weight_init,
    )


QWEN = BlockSpec(
    component="qwen.block",
    module="comfy.ldm.qwen_image.model",
    model_class="QwenImageTransformer2DModel",
    block_list="transformer_blocks",
    empty_model=_qwen_model,
    make_block=lambda m, d, dtype, device, ops: m.QwenImageTransformerBlock(
        dim=d.dim, num_attention_heads=d.heads, attention_head_dim=d.head_dim, dtype=dtype, device=device, operations=ops
    ),
    model_call=lambda raw: ((raw.latent, raw.timestep, raw.context), {"ref_latents": list(raw.references)} if raw.references else {}),
    outputs=lambda out, sizes: {"txt": out[0], "img": out[1]},
    streams=lambda sizes: {"img": ("hidden_states", None), "txt": ("encoder_hidden_states", None)},
    modulation="temb",
    after_blocks=("norm_out.", "proj_out."),
    attention_sites=(("comfy.ldm.qwen_image.model", "optimized_attention_masked"),),
    dims=lambda scale: qwen.DIMS[scale],
    raw=qwen.raw_inputs,
    canonical_shapes=None,  # the canonical layout: taken from the classes
)


# -- FLUX -------------------------------------------------------------------------------------------------------------
def _flux_model(comfy: ComfyUI, d: flux.FluxDims, dtype, device) -> dict:
    module = importlib.import_module("comfy.ldm.flux.model")
    params = dict(
        in_channels=d.in_channels,
        out_channels=d.in_channels,
        vec_in_dim=d.vec_dim,
        context_in_dim=d.context_dim,
        hidden_size=d.dim,
        mlp_ratio=d.mlp_ratio,
        num_heads=d.heads,
        depth=0,
        depth_single_blocks=0,
        axes_dim=list(d.axes_dim),
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=d.guidance_embed,
    )
    fields = {f.name for f in dataclasses.fields(module.FluxParams)}
    unknown = sorted(f.name for f in dataclasses.fields(module.FluxParams) if f.name not in params and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown:
        raise SubjectError(f"this ComfyUI's FluxParams needs fields the suite does not know: {unknown}")
    params = {k: v for k, v in params.items() if k in fields}
    model = dict(dtype=dtype, device=device, operations=comfy.ops.disable_weight_init, **params)
    if "final_layer" in inspect.signature(module.Flux.__init__).parameters:  # (2024-08 on; before, Flux always has one)
        model["final_layer"] = False
    return model


def _flux_call(raw: flux.RawInputs) -> tuple[tuple, dict]:
    return (raw.latent, raw.timestep, raw.context), {"y": raw.pooled, "guidance": raw.guidance}


def _flux_spec(component: str, block_list: str, make_block, outputs, streams, note: str) -> BlockSpec:
    return BlockSpec(
        component=component,
        module="comfy.ldm.flux.model",
        model_class="Flux",
        block_list=block_list,
        empty_model=_flux_model,
        make_block=make_block,
        model_call=_flux_call,
        outputs=outputs,
        streams=streams,
        modulation="vec",
        after_blocks=("final_layer.",),
        attention_sites=(("comfy.ldm.flux.math", "optimized_attention"),),
        dims=lambda scale: flux.DIMS[scale],
        raw=flux.raw_inputs,
        canonical_shapes=lambda scale, c=component: flux.weight_shapes(c, scale),
        guards=NAN_TO_NUM_SPY,
        guard_note=_fp16_note(note),
    )


def _flux_layers():
    return importlib.import_module("comfy.ldm.flux.layers")


FLUX_DOUBLE = _flux_spec(
    "flux.double",
    "double_blocks",
    lambda m, d, dtype, device, ops: _flux_layers().DoubleStreamBlock(
        d.dim, d.heads, mlp_ratio=d.mlp_ratio, qkv_bias=True, dtype=dtype, device=device, operations=ops
    ),
    lambda out, sizes: {"img": out[0], "txt": out[1]},
    lambda sizes: {"img": ("img", None), "txt": ("txt", None)},
    "ComfyUI replaces NaN/Inf in the text stream with 0/+-65504 (torch.nan_to_num) at the end of DoubleStreamBlock in fp16",
)
FLUX_SINGLE = _flux_spec(
    "flux.single",
    "single_blocks",
    lambda m, d, dtype, device, ops: _flux_layers().SingleStreamBlock(
        d.dim, d.heads, mlp_ratio=d.mlp_ratio, dtype=dtype, device=device, operations=ops
    ),
    lambda out, sizes: {"txt": out[:, : sizes["text_tokens"]], "img": out[:, sizes["text_tokens"]:]},
    lambda sizes: {"txt": ("x", slice(0, sizes["text_tokens"])), "img": ("x", slice(sizes["text_tokens"], None))},
    "ComfyUI replaces NaN/Inf in the joint stream with 0/+-65504 (torch.nan_to_num) at the end of SingleStreamBlock in fp16",
)


# -- WAN --------------------------------------------------------------------------------------------------------------
def _wan_model(comfy: ComfyUI, d: wan.WanDims, dtype, device) -> dict:
    return dict(
        model_type="i2v" if d.cross == "i2v" else "t2v",
        patch_size=d.patch_size,
        in_dim=d.in_dim,
        dim=d.dim,
        ffn_dim=d.ffn_dim,
        freq_dim=d.freq_dim,
        text_dim=d.text_dim,
        out_dim=d.out_dim,
        num_heads=d.heads,
        num_layers=0,
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
        dtype=dtype,
        device=device,
        operations=comfy.ops.disable_weight_init,
    )


def _wan_block(m, d: wan.WanDims, dtype, device, ops):
    return m.WanAttentionBlock(
        "i2v_cross_attn" if d.cross == "i2v" else "t2v_cross_attn",
        d.dim,
        d.ffn_dim,
        d.heads,
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
        operation_settings={"operations": ops, "device": device, "dtype": dtype},
    )


def _wan_call(raw: wan.RawInputs) -> tuple[tuple, dict]:
    return (raw.latent, raw.timestep, raw.context), ({"clip_fea": raw.clip} if raw.clip is not None else {})


def _wan_spec(component: str) -> BlockSpec:
    return BlockSpec(
        component=component,
        module="comfy.ldm.wan.model",
        model_class="WanModel",
        block_list="blocks",
        empty_model=_wan_model,
        make_block=_wan_block,
        model_call=_wan_call,
        outputs=lambda out, sizes: {"img": out},
        streams=lambda sizes: {"img": ("x", None)},
        modulation="e",
        after_blocks=("head.",),
        attention_sites=(("comfy.ldm.wan.model", "optimized_attention"),),
        dims=lambda scale, c=component: wan.DIMS[c][scale],
        raw=lambda scale, profile, seed, c=component: wan.raw_inputs(c, scale, profile, seed),
        canonical_shapes=lambda scale, c=component: wan.weight_shapes(c, scale),
    )


SPECS = {spec.component: spec for spec in (QWEN, FLUX_DOUBLE, FLUX_SINGLE, *(_wan_spec(c) for c in wan.COMPONENTS))}


class ComfyBlock(ComponentAdapter):
    def __init__(self, comfy: ComfyUI, spec: BlockSpec) -> None:
        self.comfy = comfy
        self.spec = spec
        self.component = spec.component
        self.attention_sites = spec.attention_sites
        self.family = get_family(spec.component.split(".")[0])
        try:
            self.module = importlib.import_module(spec.module)
        except ImportError as error:
            raise SubjectError(f"{ABSENT} ComfyUI {comfy.version}: no {spec.module} ({error})") from error
        self.model_cls = getattr(self.module, spec.model_class, None)
        if self.model_cls is None:
            raise SubjectError(f"{ABSENT} ComfyUI {comfy.version}: {spec.module} has no {spec.model_class}")
        self._probe()

    def _probe(self) -> None:
        """Build the model shell and the block on the meta device once, so a version whose signatures the adapter does
        not match is named at load with what differs, instead of failing every case."""
        dims = self.spec.dims("tiny")
        try:
            self._model(dims, torch.float32, "meta")
            self._block(dims, torch.float32, "meta", self.comfy.ops.disable_weight_init)
        except Exception as error:  # noqa: BLE001 - any failure to build is the reason this component cannot run
            raise SubjectError(
                f"the suite's adapter cannot build {self.component} on ComfyUI {self.comfy.version}: {type(error).__name__}: {error}"
            ) from error

    def _model(self, dims, dtype, device):
        return self.model_cls(**accepted_kwargs(self.model_cls.__init__, self.spec.empty_model(self.comfy, dims, dtype, device)))

    def _block(self, dims, dtype, device, ops):
        return self.spec.make_block(self.module, dims, dtype, device, ops)

    def residual_streams(self) -> tuple[str, ...]:
        return tuple(kwarg for kwarg, _ in self.spec.streams({"image_tokens": 0, "text_tokens": 0, "frames": 1}).values())

    def accepts_transformer_options(self) -> bool:
        block = self._block(self.spec.dims("tiny"), torch.float32, "meta", self.comfy.ops.disable_weight_init)
        return "transformer_options" in inspect.signature(block.forward).parameters

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        if self.spec.canonical_shapes is not None:
            return self.spec.canonical_shapes(scale)
        dims = self.spec.dims(scale)
        model = self._model(dims, torch.float32, "meta")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(self.spec.after_blocks)}
        block = self._block(dims, torch.float32, "meta", self.comfy.ops.disable_weight_init)
        shapes.update({k: tuple(v.shape) for k, v in block.state_dict().items()})
        return shapes

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        dims = self.spec.dims(scale)
        the_plan = plan(self.comfy, precision)
        block = self._block(dims, the_plan.dtype, device, the_plan.operations)
        wanted = block.state_dict().keys()
        stored = weights.as_stored_for(precision) if isinstance(weights, CheckpointWeights) else None
        if stored is not None:
            state, notes = load_as_stored(block, stored, the_plan, weights.block.checkpoint.format.label)
        else:
            state = {k: weights[k] for k in wanted if k in weights}
            state, notes = prepare_state_dict(block, state, the_plan)
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise KeyError(f"{self.component}: no weights for {missing}")
        block.load_state_dict(state, strict=True)
        block.eval()
        return BuiltComponent(
            module=block,
            call=lambda module, kwargs, sizes: self.spec.outputs(module(**kwargs), sizes),
            boundary_names=self.family.boundary_names[("comfyui", self.component)],
            input_probes=self.family.input_probes[("comfyui", self.component)],
            guards=self.spec.guards,
            notes=[the_plan.description, *notes],
            guard_note=self.spec.guard_note(precision),
        )

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        dims = self.spec.dims(scale)
        model = self._model(dims, torch.float32, "cpu")
        # One block, as a shell on the meta device: the capture stops at its pre-hook, before any of its math.
        shell = self._block(dims, torch.float32, "meta", self.comfy.ops.disable_weight_init)
        getattr(model, self.spec.block_list).append(shell)
        prefix = f"{self.spec.block_list}.0."
        embedder_keys = {k for k in model.state_dict() if not k.startswith((prefix, *self.spec.after_blocks))}
        missing = sorted(embedder_keys - set(weights))
        if missing:
            raise KeyError(f"{self.component}: synthetic weights lack embedder tensors {missing}")
        model.load_state_dict({k: weights[k] for k in embedder_keys}, strict=False)
        model.eval()
        raw = self.spec.raw(scale, profile, seed)
        args, kwargs = self.spec.model_call(raw)
        with torch.no_grad():
            captured = capture_block_inputs(shell, lambda: model(*args, **kwargs))
        sizes = profile.sizes_for(scale)
        sizes = {"image_tokens": sizes.image_tokens * (1 + profile.references), "text_tokens": sizes.text_tokens, "frames": sizes.frames}
        streams = self.spec.streams(sizes)
        captured = apply_outliers(captured, profile.outliers, streams)
        captured = scale_modulation(captured, self.spec.modulation, profile.modulation_scale)
        return ComponentInputs(kwargs=captured, sizes=sizes, outlier_channels=outlier_channels(profile.outliers, streams))
