"""The save stage as ComfyUI performs it: where a NaN finally becomes a black image and a numpy warning.

``comfy.sd.VAE.process_output`` maps decoded pixels to [0, 1] with ``torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)``
(NaN survives the clamp); ``nodes.SaveImage.save_images`` then does ``255. * image.cpu().numpy()`` and
``np.clip(i, 0, 255).astype(np.uint8)``, where numpy emits ``RuntimeWarning: invalid value encountered in cast`` and
writes NaN as 0 (black). Here the same operations run with numpy's warnings turned into errors, so a case whose pixels
would hit that warning fails with numpy's own message and the count of bad pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class SaveResult:
    ok: bool
    message: str | None  # numpy's warning, verbatim
    bad_pixels: int  # pixel positions with a non-finite value in any channel
    pixels: int
    black_pixels: int  # positions whose saved value is 0 in every channel

    def as_dict(self) -> dict:
        return asdict(self)


def process_output(pixels: torch.Tensor) -> torch.Tensor:
    """``comfy.sd.VAE.process_output``: decoded [-1, 1] to [0, 1]."""
    return torch.clamp((pixels.float() + 1.0) / 2.0, min=0.0, max=1.0)


def save_like_comfyui(pixels: torch.Tensor) -> SaveResult:
    """Channels are dimension 1 of ``pixels`` ([B, C, (T,) H, W]), as decoders return them."""
    image = process_output(pixels).movedim(1, -1)  # ComfyUI's IMAGE layout: channels last
    scaled = 255.0 * image.cpu().numpy()
    finite = np.isfinite(scaled)
    bad = int((~finite).any(axis=-1).sum())
    total = int(np.prod(scaled.shape[:-1]))
    message = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            saved = np.clip(scaled, 0, 255).astype(np.uint8)
        except RuntimeWarning as warning:
            message = f"RuntimeWarning: {warning}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                saved = np.clip(scaled, 0, 255).astype(np.uint8)
    black = int((saved == 0).all(axis=-1).sum())
    return SaveResult(ok=message is None, message=message, bad_pixels=bad, pixels=total, black_pixels=black)
