"""Capture a block's exact inputs from the implementation's own model.

Hand-built RoPE tables, timestep embeddings and masks drift between versions of an implementation (ComfyUI changed the
Qwen text RoPE ids between 0.3.50 and 0.3.51). The model itself always builds them right, so the suite runs the
implementation's own model class, with one layer and synthetic embedder weights, up to the first block: a forward
pre-hook takes the keyword arguments the block receives and stops the forward there, before any block math runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("block inputs captured")
        self.args = args
        self.kwargs = kwargs


def capture_block_inputs(block: nn.Module, run_model: Callable[[], object]) -> dict[str, object]:
    """Run ``run_model`` until ``block`` is called; return the block's arguments as keyword arguments."""

    def hook(_module, args, kwargs):
        raise _Captured(args, dict(kwargs))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_model()
    except _Captured as captured:
        names = list(inspect.signature(block.forward).parameters)
        kwargs = dict(zip(names, captured.args))
        kwargs.update(captured.kwargs)
        return kwargs
    finally:
        handle.remove()
    raise RuntimeError(f"the model finished without calling {type(block).__name__}: nothing to capture")


def accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
    """Only the keyword arguments ``fn`` accepts (signatures move between versions)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}
