"""Third-party patches, installed the way custom nodes install theirs.

A patch is ``module:callable``: a dotted module name, or the path of a ``.py`` file, and a function taking the
subject's model handle (ComfyUI: a ``ModelPatcher``) and returning the patched one, as a custom node's ``patch``
method does (``m = model.clone(); m.set_model_...(...); return m``). The module may declare

* ``BUDGET_REL_L2``: how far the patched output may sit from the unpatched one (rel-L2 of the sampled latent), with
  where the number comes from in its docstring or comment; without it the patched run is only held to finiteness
  and to the sequence rule;
* ``unsupported(model) -> str | None``: why this patch cannot be applied to this model (a version without the patch
  point it needs), for an honest skip.

``--conformance-patch module:callable`` adds a user's patch to the matrix; the suite's own examples are in
``fixtures/patches/`` (``BUILTIN``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..paths import FIXTURES_DIR

PATCHES_DIR = FIXTURES_DIR / "patches"
BUILTIN = {
    "first_block_cache": f"{PATCHES_DIR / 'first_block_cache.py'}:patch",
    "token_merge": f"{PATCHES_DIR / 'token_merge.py'}:patch",
    "diffusers_first_block_cache": f"{PATCHES_DIR / 'diffusers_first_block_cache.py'}:patch",
}


class PatchError(ValueError):
    """A patch spec that cannot be loaded: one line naming the spec and what is wrong."""


@dataclass(frozen=True)
class Patch:
    name: str
    spec: str
    module_name: str
    function: Callable
    budget_rel_l2: float | None
    _unsupported: Callable | None

    def apply(self, handle):
        patched = self.function(handle)
        if patched is None:
            raise PatchError(f"patch {self.spec} returned None; a patch returns the patched model (e.g. a clone)")
        return patched

    def unsupported(self, handle) -> str | None:
        return self._unsupported(handle) if self._unsupported else None


def _import(module_part: str):
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise PatchError(f"patch module {module_part}: no such file")
        name = f"conformance_patch_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as error:
        raise PatchError(f"patch module {module_part!r} cannot be imported: {error}") from error


def load_patch(spec: str) -> Patch:
    """A patch from ``module:callable`` or one of ``BUILTIN``'s names."""
    name = spec
    if spec in BUILTIN:
        spec = BUILTIN[spec]
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise PatchError(f"patch {spec!r}: expected module:callable (a dotted module or a .py file, then the function)")
    module = _import(module_part)
    function = getattr(module, attr, None)
    if not callable(function):
        raise PatchError(f"patch {spec}: {module_part} has no callable {attr!r}")
    budget = getattr(module, "BUDGET_REL_L2", None)
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise PatchError(f"patch {spec}: BUDGET_REL_L2 must be a positive number, not {budget!r}")
    if name == spec:
        name = Path(module_part).stem if module_part.endswith(".py") else module_part.rsplit(".", 1)[-1]
    return Patch(name, spec, module.__name__, function, budget, getattr(module, "unsupported", None))
