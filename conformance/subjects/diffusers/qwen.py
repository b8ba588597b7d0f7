"""diffusers' Qwen-Image block (``QwenImageTransformerBlock``) and the model that feeds it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...families import qwen
from ...families.common import apply_outliers
from ...precision import Precision
from ...profiles import Profile
from ..base import BuiltComponent, ComponentInputs
from ..capture import accepted_kwargs, capture_block_inputs
from .precision import apply_precision

BLOCK_PREFIX = "transformer_blocks.0."


def _classes():
    from diffusers.models.transformers.transformer_qwenimage import (
        QwenImageTransformer2DModel,
        QwenImageTransformerBlock,
    )

    return QwenImageTransformer2DModel, QwenImageTransformerBlock


def _model_kwargs(dims: qwen.QwenDims) -> dict:
    model_cls, _ = _classes()
    return accepted_kwargs(
        model_cls.__init__,
        dict(
            patch_size=dims.patch_size,
            in_channels=dims.in_channels,
            out_channels=dims.out_channels,
            num_layers=1,
            attention_head_dim=dims.head_dim,
            num_attention_heads=dims.heads,
            joint_attention_dim=dims.joint_attention_dim,
            axes_dims_rope=dims.axes_dims_rope,
        ),
    )


def _call_block(block, inputs):
    txt, img = block(**inputs)
    return {"txt": txt, "img": img}


class QwenBlock:
    component = "qwen.block"
    family = qwen.FAMILY

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        model_cls, _ = _classes()
        with torch.device("meta"):
            model = model_cls(**_model_kwargs(qwen.DIMS[scale]))
        shapes = {}
        for key, tensor in model.state_dict().items():
            if key.startswith(BLOCK_PREFIX):
                shapes[key[len(BLOCK_PREFIX):]] = tuple(tensor.shape)
            elif not key.startswith(("norm_out.", "proj_out.")):  # after the block: never used
                shapes[key] = tuple(tensor.shape)
        return shapes

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        _, block_cls = _classes()
        dims = qwen.DIMS[scale]
        with torch.device("meta"):
            block = block_cls(dim=dims.dim, num_attention_heads=dims.heads, attention_head_dim=dims.head_dim)
        block_keys = set(block.state_dict())
        block.load_state_dict({k: v for k, v in weights.items() if k in block_keys}, strict=True, assign=True)
        block.eval()
        notes = apply_precision(block, precision, device)
        guard = None
        if precision is not None and precision.compute_dtype == torch.float16:
            guard = "diffusers clips both streams to +-65504 at the end of QwenImageTransformerBlock in fp16"
        return BuiltComponent(
            module=block,
            call=_call_block,
            boundary_names=qwen.BOUNDARY_NAMES,
            input_probes=qwen.INPUT_PROBES,
            notes=notes,
            guard_note=guard,
        )

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        model_cls, block_cls = _classes()
        dims = qwen.DIMS[scale]
        # The embedders are built for real (they are small); the one block is a shell on the meta device: the capture
        # stops at its pre-hook, before any of its math.
        model = model_cls(**{**_model_kwargs(dims), "num_layers": 0})
        with torch.device("meta"):
            model.transformer_blocks.append(
                block_cls(dim=dims.dim, num_attention_heads=dims.heads, attention_head_dim=dims.head_dim)
            )
        embedder_keys = {k for k in model.state_dict() if not k.startswith((BLOCK_PREFIX, "norm_out.", "proj_out."))}
        missing = sorted(embedder_keys - set(weights))
        if missing:
            raise KeyError(f"synthetic weights lack embedder tensors {missing}")
        model.load_state_dict({k: weights[k] for k in embedder_keys}, strict=False)
        model.eval()
        raw = qwen.raw_inputs(scale, profile, seed)
        h, w = raw.image_grid
        call = accepted_kwargs(
            model.forward,
            dict(
                hidden_states=raw.packed_latent(),
                encoder_hidden_states=raw.context,
                encoder_hidden_states_mask=None,
                timestep=raw.timestep,
                img_shapes=[[(1, h, w)]],
                return_dict=False,
            ),
        )
        with torch.no_grad():
            kwargs = capture_block_inputs(model.transformer_blocks[0], lambda: model(**call))
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "encoder_hidden_states_mask"}
        kwargs = apply_outliers(kwargs, profile.outliers, qwen.STREAMS)
        return ComponentInputs(kwargs=kwargs, sizes={"image_tokens": h * w, "text_tokens": raw.context.shape[1]})
