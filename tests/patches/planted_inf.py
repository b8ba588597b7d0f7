"""A planted non-finite value for diffusers' whole Qwen: a forward hook on ``transformer_blocks.1`` that writes inf
into its image-stream output at sampling step ``STEP`` (the pipeline loop calls the transformer twice a step, cond
then uncond, so the hook counts its calls). The step observer must place it at that step, that block, that module."""

from __future__ import annotations

STEP = 3
BLOCK = 1


def patch(model):
    calls = [0]

    def hook(module, args, output):
        step = calls[0] // 2
        calls[0] += 1
        if step != STEP:
            return None
        txt, img = output  # QwenImageTransformerBlock returns (encoder_hidden_states, hidden_states)
        img = img.clone()  # a new tensor, not an in-place write (which the probes would pass over as changed later)
        img[:, 0, 0] = float("inf")
        return txt, img

    model.transformer_blocks[BLOCK].register_forward_hook(hook)
    return model
