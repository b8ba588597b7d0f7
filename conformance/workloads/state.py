"""What a process carries from one model to the next: a snapshot of module globals and torch settings, and its diff.

A state leak is a difference in outputs; the snapshot says where it may come from. Each global of the watched
modules is reduced to a fingerprint that changes when the global is rebound or when a container it names grows or
shrinks: a function by its qualified name and where its code is (a patched attention function, an ops class swapped), a
container by its length and, where it holds tensors, their count and shapes (a module-level cache), a plain value by
its repr. Modules, classes defined in the module itself and private dunder names are left out. Nothing in a
fingerprint is an object identity, so a snapshot taken in a fresh worker process compares with one taken here.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

import torch

from ..trees import tensors


def _fingerprint(value) -> str | None:
    if isinstance(value, types.ModuleType):
        return None
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}{_defined_at(value)}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}{_defined_at(value)}"
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        try:
            held = list(tensors(value if not isinstance(value, (set, frozenset)) else list(value)))
        except RuntimeError:  # a dict changed size while being read (another thread): report it as changing
            return f"{type(value).__name__} (changing)"
        shapes = sorted({tuple(t.shape) for t in held})[:4]
        return f"{type(value).__name__} of {len(value)}" + (f", {len(held)} tensors {shapes}" if held else "")
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype} on {value.device}"
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum, torch.dtype, torch.device)):
        return repr(value)
    return type(value).__name__


def _defined_at(value) -> str:
    """Where a function's code is (a wrapper that copies the name of what it wraps is told apart by it), without
    object identities, so that two processes' snapshots compare."""
    code = getattr(value, "__code__", None)
    if code is None:
        return ""
    return f" ({code.co_filename.rsplit('/', 2)[-1]}:{code.co_firstlineno})"


def torch_settings() -> dict[str, str]:
    settings = {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "sdpa flash/mem_efficient/math": (
            torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
        ),  # fmt: skip
    }
    return {k: repr(v) for k, v in settings.items()}


def _watched(name: str):
    """The module ``name``, imported if it is not yet, or the class a registry keeps its state in (``module.Class``,
    its data attributes); None when neither exists."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    parent, _, attr = name.rpartition(".")
    owner = sys.modules.get(parent) if parent else None
    if owner is None and parent:
        try:
            owner = importlib.import_module(parent)
        except ImportError:
            return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, type) else None


def snapshot(module_names: tuple[str, ...]) -> dict[str, str]:
    """``{"module.global": fingerprint}`` for the watched modules (or registry classes) that exist, plus torch's
    settings."""
    out = torch_settings()
    for name in module_names:
        watched = _watched(name)
        if watched is None:
            continue
        is_class = isinstance(watched, type)
        for attr, value in list(vars(watched).items()):
            if attr.startswith("__"):
                continue
            if isinstance(value, type) and value.__module__ == name:
                continue
            if is_class and isinstance(value, (types.FunctionType, classmethod, staticmethod, property)):
                continue  # a class's methods are its code, not its state
            fingerprint = _fingerprint(value)
            if fingerprint is not None:
                out[f"{name}.{attr}"] = fingerprint
    return out


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per global that appeared, went or changed: ``name: before -> after``."""
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "(absent)"), after.get(key, "(absent)")
        if a != b:
            lines.append(f"{key}: {a} -> {b}")
    return lines
