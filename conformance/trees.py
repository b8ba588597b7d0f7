"""Walking nested values: the tensors inside a component's keyword arguments and outputs.

A component takes and returns tensors nested in tuples, lists and mappings (ComfyUI's ``transformer_options``, a
rotary table as a tuple, a decoder's list of feature maps). Everything that looks inside such a value goes through
the two functions here: ``leaves`` names every value in it, ``map_tensors`` rebuilds it with each tensor replaced.
Other containers (a dataclass, a custom object) are leaves: what they hold is the component's own business.

(``torch.utils._pytree`` does the same walk but names paths its own way (``[0]['key']``); the names here are part of
stored goldens and of reports, so they are kept as they were.)
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator, Mapping

import torch

# The common non-container values of a block's keywords: passed without the ABC checks below (the probes walk every
# keyword of every call, on the host-bound start of a forward).
_SCALARS = frozenset({type(None), bool, int, float, str, types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial})


def leaves(obj, name: str = "", *, brackets: bool = False, tensors_only: bool = False) -> Iterator[tuple[str, object]]:
    """``(name, value)`` for every value nested in ``obj`` that is not a tuple, list or mapping, depth first in the
    containers' own order; ``None`` is passed over. A mapping's item is named ``name.key`` (``key`` at the top level);
    a sequence's item ``name.0``, or ``name[0]`` with ``brackets``. With ``tensors_only`` only tensors are yielded."""
    kind = type(obj)
    if kind in _SCALARS:
        if obj is not None and not tensors_only:
            yield name, obj
    elif isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from leaves(item, f"{name}[{i}]" if brackets else f"{name}.{i}", brackets=brackets, tensors_only=tensors_only)
    elif kind is dict or isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from leaves(item, f"{name}.{key}" if name else str(key), brackets=brackets, tensors_only=tensors_only)
    elif not tensors_only:
        yield name, obj


def tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor nested in ``obj``, in ``leaves``' order."""
    for _, tensor in leaves(obj, tensors_only=True):
        yield tensor


def floating_tensors(obj, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every floating tensor in ``obj`` (``name[0]``, ``name.key``): what the probes record of a
    value a module takes or returns."""
    for tensor_name, tensor in leaves(obj, name, brackets=True, tensors_only=True):
        if tensor.is_floating_point():
            yield tensor_name, tensor


def map_tensors(obj, fn: Callable[[torch.Tensor], object]):
    """``obj`` rebuilt with every tensor ``t`` in it replaced by ``fn(t)``; tuples stay tuples, lists lists, dicts
    become plain dicts, everything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(x, fn) for x in obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj
