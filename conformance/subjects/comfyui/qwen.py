"""ComfyUI's Qwen-Image block (``comfy.ldm.qwen_image.model.QwenImageTransformerBlock``) and the model that feeds it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch

from ...families import qwen
from ...families.common import apply_outliers
from ...precision import Precision
from ...profiles import Profile
from ..base import BuiltComponent, ComponentInputs, SubjectError
from ..capture import accepted_kwargs, capture_block_inputs
from .loader import ComfyUI
from .ops import plan, prepare_state_dict

MODEL_MODULE = "comfy.ldm.qwen_image.model"
BLOCK_PREFIX = "transformer_blocks.0."
AFTER_BLOCKS = ("norm_out.", "proj_out.")
# The names the model module imported its attention function under (rebinding comfy.ldm.modules.attention is not enough).
ATTENTION_SITES = ((MODEL_MODULE, "optimized_attention_masked"),)


def _call_block(block, inputs):
    txt, img = block(**inputs)
    return {"txt": txt, "img": img}


class QwenBlock:
    component = "qwen.block"
    family = qwen.FAMILY
    attention_sites = ATTENTION_SITES

    def __init__(self, comfy: ComfyUI) -> None:
        self.comfy = comfy
        try:
            self.module = importlib.import_module(MODEL_MODULE)
        except ImportError as error:
            raise SubjectError(f"ComfyUI {comfy.version} has no Qwen-Image model ({MODEL_MODULE}): {error}") from error

    def _model_kwargs(self, dims: qwen.QwenDims, num_layers: int, dtype, device) -> dict:
        return accepted_kwargs(
            self.module.QwenImageTransformer2DModel.__init__,
            dict(
                patch_size=dims.patch_size,
                in_channels=dims.in_channels,
                out_channels=dims.out_channels,
                num_layers=num_layers,
                attention_head_dim=dims.head_dim,
                num_attention_heads=dims.heads,
                joint_attention_dim=dims.joint_attention_dim,
                axes_dims_rope=dims.axes_dims_rope,
                final_layer=False,
                dtype=dtype,
                device=device,
                operations=self.comfy.ops.disable_weight_init,
            ),
        )

    def _block(self, dims: qwen.QwenDims, dtype, device, operations):
        return self.module.QwenImageTransformerBlock(
            dim=dims.dim,
            num_attention_heads=dims.heads,
            attention_head_dim=dims.head_dim,
            dtype=dtype,
            device=device,
            operations=operations,
        )

    def accepts_transformer_options(self) -> bool:
        import inspect

        return "transformer_options" in inspect.signature(self.module.QwenImageTransformerBlock.forward).parameters

    def weight_shapes(self, scale: str) -> dict[str, tuple[int, ...]]:
        dims = qwen.DIMS[scale]
        model = self.module.QwenImageTransformer2DModel(**self._model_kwargs(dims, 1, torch.float32, "meta"))
        shapes = {}
        for key, tensor in model.state_dict().items():
            if key.startswith(BLOCK_PREFIX):
                shapes[key[len(BLOCK_PREFIX):]] = tuple(tensor.shape)
            elif not key.startswith(AFTER_BLOCKS):
                shapes[key] = tuple(tensor.shape)
        return shapes

    def build(self, scale: str, precision: Precision | None, weights: Mapping[str, torch.Tensor], device) -> BuiltComponent:
        dims = qwen.DIMS[scale]
        the_plan = plan(self.comfy, precision)
        block = self._block(dims, the_plan.dtype, device, the_plan.operations)
        wanted = block.state_dict().keys()
        state = {k: weights[k] for k in wanted if k in weights}
        state, notes = prepare_state_dict(block, state, the_plan)
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise KeyError(f"no weights for {missing}")
        block.load_state_dict(state, strict=True)
        block.eval()
        return BuiltComponent(
            module=block,
            call=_call_block,
            boundary_names=qwen.BOUNDARY_NAMES,
            input_probes=qwen.INPUT_PROBES,
            notes=[the_plan.description, *notes],
            guard_note=None,  # ComfyUI's Qwen block has no fp16 guard (0.3.50 - 0.3.64)
        )

    def inputs(self, scale: str, profile: Profile, weights: Mapping[str, torch.Tensor], seed: int) -> ComponentInputs:
        dims = qwen.DIMS[scale]
        model = self.module.QwenImageTransformer2DModel(**self._model_kwargs(dims, 0, torch.float32, "cpu"))
        # One block, as a shell on the meta device: the capture stops at its pre-hook, before any of its math.
        model.transformer_blocks.append(self._block(dims, torch.float32, "meta", self.comfy.ops.disable_weight_init))
        embedder_keys = {k for k in model.state_dict() if not k.startswith((BLOCK_PREFIX, *AFTER_BLOCKS))}
        missing = sorted(embedder_keys - set(weights))
        if missing:
            raise KeyError(f"synthetic weights lack embedder tensors {missing}")
        model.load_state_dict({k: weights[k] for k in embedder_keys}, strict=False)
        model.eval()
        raw = qwen.raw_inputs(scale, profile, seed)
        with torch.no_grad():
            kwargs = capture_block_inputs(model.transformer_blocks[0], lambda: model(raw.latent, raw.timestep, raw.context))
        kwargs = apply_outliers(kwargs, profile.outliers, qwen.STREAMS)
        h, w = raw.image_grid
        return ComponentInputs(kwargs=kwargs, sizes={"image_tokens": h * w, "text_tokens": raw.context.shape[1]})
