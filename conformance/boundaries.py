"""Boundaries: what a probed forward watches, and the records of what it saw there.

Boundaries are

* the output of every submodule (recorded when a module's forward returns, so their order is execution order and a
  child is seen before the parent that contains it);
* the component's own inputs (boundary ``input``): a bad value found there entered the component, it was not born
  in it;
* named inputs the subject declares (``InputProbe``), for tensors no module returns: the attention kernel's result as
  it enters the output projection, the residual stream after an in-line ``x + gate * y`` as it enters the next norm;
* the inputs of the subject's own guards (``GuardSpy``: ``torch.nan_to_num`` in ComfyUI's FLUX blocks,
  ``Tensor.clip`` in diffusers'): a guard runs in-line in a block's forward, so without a spy an overflow it repairs
  leaves no trace but saturated values (or zeros, for NaN). The spy records the tensor before the guard and how many
  values the guard changed, attributed to the module whose forward called it.

Each boundary tensor yields four numbers (``BoundaryRecord``): the count of non-finite values, the count of NaNs, the
largest finite magnitude and the count of values sitting exactly at the dtype's largest finite value (what a ±65504
clip or an fp8 saturating cast leaves behind). The first record, in firing order, holding a non-finite value names
the module where the bad value was born (``first_nonfinite``).

How a root module's submodules are named in records (``output_labels``) is worked out once per module tree and kept
while the tree is unchanged, without holding the modules (``ModuleTree``): entering the probes is on the critical path (the GPU is idle before the forward's first
kernel). The recording itself is ``conformance.probes``.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

ROOT = "block"
INPUT = "input"


@dataclass(frozen=True)
class InputProbe:
    """Watch input ``index`` of the module at ``module`` and report it as ``boundary``, produced by ``produced_by``."""

    module: str
    index: int
    boundary: str
    produced_by: str
    tensor: str


@dataclass(frozen=True)
class GuardSpy:
    """A guard function of the subject, by where it is looked up at call time (``owner.attr``)."""

    owner: object
    attr: str
    label: str


class BoundaryRecord:
    """One boundary tensor of a forward and its statistics.

    ``Probes.records`` makes the records while the forward's statistics are still being computed, and the numbers are
    read from the forward's one host list when asked for (``_box``: the shared box the list lands in; ``_at`` and
    ``_touched_at``: where this record's four numbers and its guard count sit in it); the one synchronisation then only
    has to drop the list in the box.
    """

    FIELDS = ("order", "boundary", "module", "tensor", "dtype", "shape", "nonfinite", "nan", "max_abs", "saturated",
              "headroom", "touched", "changed_in_place")  # fmt: skip
    __slots__ = ("order", "boundary", "module", "tensor", "dtype", "shape", "changed_in_place", "_box", "_at", "_fmax", "_touched_at")

    def __init__(self, order: int, boundary: str, module: str, tensor: str, dtype: str, shape: list[int], changed_in_place: bool, box: list, at: int, fmax: float, touched_at: int | None) -> None:  # fmt: skip
        self.order, self.boundary, self.module, self.tensor, self.dtype, self.shape = order, boundary, module, tensor, dtype, shape
        # the tensor was changed in place after this boundary and before its statistics were read: they describe the
        # later values (the probes read module outputs in one batch, see Probes)
        self.changed_in_place = changed_in_place
        self._box, self._at, self._fmax, self._touched_at = box, at, fmax, touched_at

    @property
    def nonfinite(self) -> int:
        return int(self._box[0][self._at])

    @property
    def nan(self) -> int:
        return int(self._box[0][self._at + 1])

    @property
    def max_abs(self) -> float:
        """The largest finite magnitude (0 when there is none)."""
        return self._box[0][self._at + 2]

    @property
    def saturated(self) -> int:
        """Values sitting exactly at the dtype's largest finite value."""
        return int(self._box[0][self._at + 3])

    @property
    def headroom(self) -> float | None:
        """dtype max / max finite |x|; None when the tensor is all zeros."""
        max_abs = self.max_abs
        return self._fmax / max_abs if max_abs > 0 else None

    @property
    def touched(self) -> int | None:
        """For a guard's input: how many values the guard changed."""
        return None if self._touched_at is None else int(self._box[0][self._touched_at])

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BoundaryRecord) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"BoundaryRecord({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


class ModuleTree:
    """A root module's submodules as the probes name them, cached per root while its tree is unchanged.

    Nothing here holds a module: the cache is a ``WeakKeyDictionary`` on the root, and a value that referenced the
    root or its submodules would keep the key alive for good (every probed model would stay in memory, its weights on
    the GPU, after its owner dropped it). Submodules are held by weak reference and tables are keyed by ``id``; the
    ``{module: path}`` map a ``Probes`` needs while installed is made from the weak references on each entry.
    """

    __slots__ = ("refs", "paths", "tables", "__weakref__")

    def __init__(self, root: nn.Module) -> None:
        self.refs: dict[int, weakref.ref] = {}
        self.paths: dict[int, str] = {}
        for path, module in root.named_modules(remove_duplicate=True):
            self.refs[id(module)] = weakref.ref(module)
            self.paths[id(module)] = path
        self.tables: list = []  # (boundary names, root label, {id(module): (boundary, module name)})

    def matches(self, modules: list[nn.Module]) -> bool:
        refs = self.refs
        return len(modules) == len(refs) and all((ref := refs.get(id(m))) is not None and ref() is m for m in modules)

    def modules(self) -> dict[nn.Module, str]:
        return {ref(): self.paths[key] for key, ref in self.refs.items()}


# Entering the probes is on the critical path (the GPU is idle before the forward's first kernel): the tree of a
# root is walked once, then only compared with the module tree.
_TREES: weakref.WeakKeyDictionary[nn.Module, ModuleTree] = weakref.WeakKeyDictionary()


def module_tree(root: nn.Module, check: bool = False) -> ModuleTree:
    """The cached ``ModuleTree`` of ``root``; with ``check``, compared with the module tree first (a walk of it) and
    made again if a module was added or replaced."""
    tree = _TREES.get(root)
    if tree is not None and check and not tree.matches(list(root.modules())):
        tree = None
    if tree is None:
        tree = _TREES[root] = ModuleTree(root)
    return tree


def output_labels(root: nn.Module, boundary_names: Mapping[str, str], root_label: str, check: bool = False) -> tuple[dict[nn.Module, str], dict[int, tuple[str, str]], ModuleTree]:
    """``{submodule: path}``, ``{id(submodule): (boundary, module name)}`` for the records of its outputs, and the tree."""
    tree = module_tree(root, check)
    for names, label, labels in tree.tables:
        if names is boundary_names and label == root_label:
            return tree.modules(), labels, tree
    labels = {key: (boundary_names.get(path, path or root_label), path or root_label) for key, path in tree.paths.items()}
    tree.tables.append((boundary_names, root_label, labels))
    return tree.modules(), labels, tree


# Per root module: (its tree, the input probes, {id(module): the probes on it}) of the last plan made; one per root,
# a rebuilt tree or other probes replace it.
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def probed_modules(root: nn.Module, tree: ModuleTree, input_probes: tuple[InputProbe, ...]) -> dict[int, tuple[InputProbe, ...]]:
    """``{id(module): (probe, ...)}`` for the declared input probes; KeyError naming a probe whose module is missing."""
    cached = _PROBED.get(root)
    if cached is not None and cached[0]() is tree and cached[1] == input_probes:
        return cached[2]
    by_path = {path: key for key, path in tree.paths.items()}
    found: dict[int, list[InputProbe]] = {}
    for probe in input_probes:
        if probe.module not in by_path:
            raise KeyError(f"input probe on {probe.module!r}: no such module in {type(root).__name__}")
        found.setdefault(by_path[probe.module], []).append(probe)
    plan = {key: tuple(probes) for key, probes in found.items()}
    _PROBED[root] = (weakref.ref(tree), input_probes, plan)
    return plan


@functools.cache
def dtype_facts(dtype: torch.dtype) -> tuple[str, float]:
    return str(dtype).removeprefix("torch."), torch.finfo(dtype).max


def first_nonfinite(records: list[BoundaryRecord]) -> dict | None:
    """The first record holding a non-finite value; records whose tensor was changed in place after the boundary are
    passed over (their statistics describe later values)."""
    for record in records:
        if record.nonfinite and not record.changed_in_place:
            return {
                "boundary": record.boundary,
                "module": record.module,
                "tensor": record.tensor,
                "count": record.nonfinite,
                "nan": record.nan,
                "dtype": record.dtype,
            }
    return None


def first_saturated(records: list[BoundaryRecord]) -> BoundaryRecord | None:
    return next((r for r in records if r.saturated), None)


def summarize(records: list[BoundaryRecord]) -> dict:
    """Case-level stats: the extremes over every probed boundary."""
    if not records:
        return {"max_abs_value": None, "headroom": None, "saturated": 0, "nonfinite": 0, "boundaries": 0}
    worst = max(records, key=lambda r: r.max_abs)
    headrooms = [r.headroom for r in records if r.headroom is not None]
    guard_inputs = [r for r in records if r.touched is not None]
    return {
        "max_abs_value": worst.max_abs,
        "max_abs_at": f"{worst.module} {worst.tensor}",
        "headroom": min(headrooms) if headrooms else None,
        "saturated": sum(r.saturated for r in records),
        "nonfinite": sum(r.nonfinite for r in records),
        "boundaries": len(records),
        "subject_guard_touched": sum(r.touched for r in guard_inputs) if guard_inputs else None,
    }
