"""Forcing a ComfyUI attention backend, proving its kernel ran, and catching ComfyUI's silent fallbacks.

Model files import their attention function by name at import time (``from comfy.ldm.modules.attention import
optimized_attention_masked``), so rebinding ``comfy.ldm.modules.attention.optimized_attention`` changes nothing for
them: the names the model modules hold are rebound instead (every version). From 0.3.60 the blocks also accept
``transformer_options={"optimized_attention_override": fn}``; that path is offered as a second way to force the same
backend, and the runner checks both agree bit for bit in fp32.

The spy counts calls of ComfyUI's backend function and, for the kernels that live in a package, of the package's
entry point (``sageattn``, ``flash_attn_func``, ``xformers.ops.memory_efficient_attention``). ComfyUI replaces a
failing sage or flash call with SDPA and only logs it; a logging handler turns those lines into fallbacks, which fail
the case with ComfyUI's own message.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Callable, Iterator

import torch

from ...backends import BACKENDS, BackendSupport, CallCounter, table_reasons
from .loader import ComfyUI

FUNCTIONS = {
    "basic": "attention_basic",
    "split": "attention_split",
    "sub_quad": "attention_sub_quad",
    "sdpa": "attention_pytorch",
    "xformers": "attention_xformers",
    "sage": "attention_sage",
    "flash": "attention_flash",
}
# Where ComfyUI holds a kernel package's entry point: (attribute on comfy.ldm.modules.attention, attribute in the
# package); None: patched elsewhere (xformers, through xformers.ops). The package itself is the backend's row.
PACKAGE_ATTRIBUTES = {
    "sage": ("sageattn", "sageattn"),
    "flash": ("flash_attn_func", "flash_attn_func"),
    "xformers": (None, None),
}

# ComfyUI's log lines when it silently replaces a kernel (comfy/ldm/modules/attention.py, comfy/ops.py).
FALLBACK_PATTERNS = (
    re.compile(r"Error running sage attention"),
    re.compile(r"Flash Attention failed"),
    re.compile(r"Exception during fp8 op"),
    re.compile(r"using pytorch attention instead", re.IGNORECASE),
)


def backend_support(comfy: ComfyUI, backend: str, device: torch.device) -> BackendSupport:
    attention = comfy.attention
    function = FUNCTIONS.get(backend)
    if function is None:
        return BackendSupport(backend, (f"not a ComfyUI attention function (ComfyUI {comfy.version})",))
    if not hasattr(attention, function):
        return BackendSupport(backend, (f"ComfyUI {comfy.version} has no {function}",))
    reasons = table_reasons(backend, device)
    if backend == "xformers" and not reasons and not comfy.features.get("xformers_enabled"):
        reasons.append("ComfyUI did not enable xformers at import (comfy.model_management.xformers_enabled() is False)")
    return BackendSupport(backend, tuple(reasons))


def expected_kernels(backend: str) -> tuple[str, ...]:
    kernel = BACKENDS[backend].kernel
    return (f"comfy:{FUNCTIONS[backend]}", *([kernel] if kernel else []))


class _FallbackCatcher(logging.Handler):
    def __init__(self, counter: CallCounter, patterns: tuple[re.Pattern, ...] = FALLBACK_PATTERNS) -> None:
        super().__init__(level=logging.INFO)
        self.counter = counter
        self.patterns = patterns

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(p.search(message) for p in self.patterns):
            self.counter.record_fallback(f"ComfyUI logged: {message}")


@contextlib.contextmanager
def catch_fallbacks(counter: CallCounter, extra_patterns: tuple[re.Pattern, ...] = ()) -> Iterator[None]:
    """Collect ComfyUI's fallback log lines (the fp8 one is logged at INFO) while the case runs."""
    root = logging.getLogger()
    handler = _FallbackCatcher(counter, FALLBACK_PATTERNS + tuple(extra_patterns))
    previous = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@contextlib.contextmanager
def _patched(obj, attr: str, value) -> Iterator[None]:
    missing = object()
    original = getattr(obj, attr, missing)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if original is missing:
            delattr(obj, attr)
        else:
            setattr(obj, attr, original)


@contextlib.contextmanager
def spy_kernel(comfy: ComfyUI, backend: str, counter: CallCounter) -> Iterator[None]:
    """Count calls into the kernel package, injecting the kernel where an older ComfyUI only imports it behind a flag."""
    if backend not in PACKAGE_ATTRIBUTES:
        yield
        return
    row = BACKENDS[backend]
    module_name = row.package[0]
    attr, package_attr = PACKAGE_ATTRIBUTES[backend]
    with contextlib.ExitStack() as stack:
        if backend == "xformers":
            ops = importlib.import_module("xformers.ops")
            stack.enter_context(_patched(ops, "memory_efficient_attention", counter.wrap(row.kernel, ops.memory_efficient_attention)))
        else:
            kernel = getattr(comfy.attention, attr, None)
            if kernel is None:
                kernel = getattr(importlib.import_module(module_name), package_attr)
            stack.enter_context(_patched(comfy.attention, attr, counter.wrap(row.kernel, kernel)))
        yield


def backend_function(comfy: ComfyUI, backend: str, counter: CallCounter) -> Callable:
    fn = getattr(comfy.attention, FUNCTIONS[backend])
    return counter.wrap(f"comfy:{FUNCTIONS[backend]}", fn)


@contextlib.contextmanager
def use_backend(
    comfy: ComfyUI, sites: tuple[tuple[str, str], ...], backend: str, counter: CallCounter, path: str
) -> Iterator[Callable[[dict], dict]]:
    """Force ``backend`` for the model modules' attention ``sites`` by ``path`` ("rebind" or "override").

    Yields a function that prepares the block's keyword arguments (the override path adds it to
    ``transformer_options``).
    """
    chosen = backend_function(comfy, backend, counter)
    with contextlib.ExitStack() as stack:
        stack.enter_context(catch_fallbacks(counter))
        stack.enter_context(spy_kernel(comfy, backend, counter))
        if path == "rebind":
            for module_name, attr in sites:
                stack.enter_context(_patched(importlib.import_module(module_name), attr, chosen))
            yield lambda kwargs: kwargs
        elif path == "override":

            def override(_default, *args, **kwargs):
                return chosen(*args, **kwargs)

            def prepare(kwargs: dict) -> dict:
                options = dict(kwargs.get("transformer_options") or {})
                options["optimized_attention_override"] = override
                return {**kwargs, "transformer_options": options}

            yield prepare
        else:
            raise ValueError(f"unknown backend path {path!r}")
