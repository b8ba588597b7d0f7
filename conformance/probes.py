"""Probes: forward hooks that watch every boundary of a component while it runs.

Each probed tensor yields four numbers, computed on the tensor's device without a host sync: the count of non-finite
values, the count of NaNs, the largest finite magnitude and the count of values sitting exactly at the dtype's
largest finite value (what a ±65504 clip or an fp8 saturating cast leaves behind). The numbers of one forward are
brought to the host in one transfer when the caller asks for them.

Boundaries are

* the output of every submodule (post-hooks fire when a module finishes, so their firing order is execution order and
  a child is seen before the parent that contains it);
* the component's own inputs (boundary ``input``): a bad value found there entered the component, it was not born
  in it;
* named inputs the subject declares (pre-hooks), for tensors no module returns: the attention kernel's result as it
  enters the output projection, the residual stream after an in-line ``x + gate * y`` as it enters the next norm.

* the inputs of the subject's own guards (``torch.nan_to_num`` in ComfyUI's FLUX blocks, ``Tensor.clip`` in diffusers'):
  a guard runs in-line in a block's forward, so without a spy an overflow it repairs leaves no trace but saturated
  values (or zeros, for NaN). The spy records the tensor before the guard and how many values the guard changed,
  attributed to the module whose forward called it.

The first record, in firing order, holding a non-finite value names the module where the bad value was born.

Cost. Statistics are read in one batch after the forward (``kernels.finite_stats_many``: one read of every tensor,
one launch per dtype on CUDA), not by a kernel per output launched from its hook: a hook keeps a reference and the
tensor's version counter, and the one host sync comes when ``records()`` is called. The hooks are two global module
hooks (``torch.nn.modules.module.register_module_forward_hook``) filtered by a cached path map, not two per module,
so entering the probes costs the same for 10 modules or 1000. A tensor changed in place after its boundary is marked
``changed_in_place`` (its numbers are of the later values) and is not taken as the first non-finite.

Inputs are the exception: blocks update their inputs and residual streams in place (ComfyUI's FLUX does ``img +=
...``), so the component's inputs and the declared intermediate inputs are read when they are seen, unless this very
module was seen before to leave them unchanged; then they join the end-of-forward batch, still guarded by their
version counters. Pending tensors are read early once they hold 1 GiB, to bound the memory held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import functools
import sys
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .kernels import finite_stats, finite_stats_many

ROOT = "block"
INPUT = "input"


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """``[nonfinite, nan, max finite |x|, saturated]`` as a float64 tensor on ``x``'s device (no host sync): the fused
    check of ``conformance.kernels`` (one read of ``x`` with Triton on CUDA, torch elsewhere)."""
    return finite_stats(x)


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


@dataclass
class BoundaryRecord:
    order: int
    boundary: str
    module: str
    tensor: str
    dtype: str
    shape: list[int]
    nonfinite: int
    nan: int
    max_abs: float
    saturated: int
    headroom: float | None  # dtype max / max finite |x|; None when the tensor is all zeros
    touched: int | None = None  # for a guard's input: how many values the guard changed
    # the tensor was changed in place after this boundary and before its statistics were read: they describe the
    # later values (the probes read module outputs in one batch, see Probes)
    changed_in_place: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _floating_tensors(obj, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield name, obj
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _floating_tensors(item, f"{name}[{i}]")
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from _floating_tensors(item, f"{name}.{key}")


@dataclass(slots=True)
class _Pending:
    boundary: str
    module: str
    tensor: str
    dtype: torch.dtype
    shape: torch.Size | list[int]
    stats: tuple[int, int] | None  # (batch, row) in Probes._batches; None until its batch is read
    touched: torch.Tensor | None = None
    tensor_ref: torch.Tensor | None = None  # held until its statistics are read
    version: int = 0
    changed_in_place: bool = False
    is_input: bool = False  # an input boundary deferred because its root was seen to leave it unchanged
    source: nn.Module | None = None  # the module whose output this is (for relabelling, see Probes._resolve)


# Deferred outputs are read in one batch at the end of the forward, or earlier once they hold this many bytes.
FLUSH_BYTES = 1 << 30

# Per root module: which of its input boundaries ("input" for the component's own) a forward was seen to leave
# unchanged (True) or to update in place (False). Unchanged ones are read with the end-of-forward batch.
_KEEPS_INPUTS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
# Per root module: its module count, {submodule: path} and the label tables built from it, rebuilt when the count
# changes. Entering the probes is on the critical path (the GPU is idle before the forward's first kernel).
_PATHS: weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[nn.Module, str], list]] = weakref.WeakKeyDictionary()


def _paths(root: nn.Module) -> tuple[dict[nn.Module, str], list]:
    """``{submodule: path}`` of ``root`` and the cache of label tables that goes with it. Not checked against the
    module tree here: a module the map lacks is resolved after the forward (``Probes._resolve``)."""
    cached = _PATHS.get(root)
    if cached is not None:
        return cached[1], cached[2]
    paths = {module: path for path, module in root.named_modules(remove_duplicate=True)}
    _PATHS[root] = (len(paths), paths, [])
    return paths, _PATHS[root][2]


def _labels(root: nn.Module, boundary_names: Mapping[str, str], root_label: str) -> tuple[dict[nn.Module, str], dict]:
    """``{submodule: path}`` and ``{submodule: (boundary, module name)}`` for the records of its outputs."""
    paths, tables = _paths(root)
    for names, label, labels in tables:
        if names is boundary_names and label == root_label:
            return paths, labels
    labels = {module: (boundary_names.get(path, path or root_label), path or root_label) for module, path in paths.items()}
    tables.append((boundary_names, root_label, labels))
    return paths, labels


@dataclass
class Probes:
    """Context manager installing the hooks on ``root``. Use ``records()`` after the forward."""

    root: nn.Module
    boundary_names: Mapping[str, str] = field(default_factory=dict)
    input_probes: tuple[InputProbe, ...] = ()
    guards: tuple[GuardSpy, ...] = ()
    enabled: bool = True
    root_label: str = ROOT  # how the root module is named in records ("block"; a VAE's is "vae")
    scope: str = "all"  # "all": every module, the declared inputs and the guards; "io": the root's inputs and outputs only
    _handles: list = field(default_factory=list, init=False)
    _pending: list[_Pending] = field(default_factory=list, init=False)
    _restore: list = field(default_factory=list, init=False)
    _inputs_recorded: bool = field(default=False, init=False)
    _module_paths: dict = field(default_factory=dict, init=False)
    _labels: dict = field(default_factory=dict, init=False)  # module -> (boundary, module name) of its output
    _own_hooks: set = field(default_factory=set, init=False)
    _deferred: list[_Pending] = field(default_factory=list, init=False)
    _batches: list[torch.Tensor] = field(default_factory=list, init=False)  # [k, 4] statistics, read back once
    _watched_inputs: list = field(default_factory=list, init=False)  # (boundary, tensor, version) of inputs read now
    _deferred_bytes: int = field(default=0, init=False)

    def _display(self, path: str) -> str:
        return path or self.root_label

    def _record(self, boundary: str, module: str, tensor_name: str, tensor: torch.Tensor, source: nn.Module | None = None) -> None:
        """Note a boundary tensor; its statistics are read later, in one batch (``_flush``): a hook only keeps a
        reference, so watching every module costs one read of each output and not a kernel launch per output."""
        pending = _Pending(boundary, module, tensor_name, tensor.dtype, tensor.shape, None, None, tensor, tensor._version, False, False, source)
        self._pending.append(pending)
        self._deferred.append(pending)
        self._deferred_bytes += tensor.nbytes
        if self._deferred_bytes > FLUSH_BYTES:
            self._flush()

    def _record_input(self, boundary: str, module: str, named: list[tuple[str, torch.Tensor]]) -> None:
        """An input boundary: read now, unless this root was seen to leave this boundary's tensors unchanged (then
        deferred like an output, its version counter still checked). A tensor read now is remembered, so that the
        end of the forward can tell whether the block updated it in place."""
        if not named:
            return
        if _KEEPS_INPUTS.get(self.root, {}).get(boundary):
            for name, tensor in named:
                self._record(boundary, module, name, tensor)
                self._pending[-1].is_input = True
            return
        rows = self._read([t for _, t in named])
        for (name, tensor), row in zip(named, rows):
            self._pending.append(_Pending(boundary, module, name, tensor.dtype, list(tensor.shape), row))
            self._watched_inputs.append((boundary, tensor, tensor._version))

    def _flush(self) -> None:
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        if not deferred:
            return
        for pending in deferred:
            pending.changed_in_place = pending.tensor_ref._version != pending.version
            if pending.changed_in_place and pending.is_input:  # no longer unchanged: read it on sight next time
                _KEEPS_INPUTS.setdefault(self.root, {})[pending.boundary] = False
        for pending, row in zip(deferred, self._read([p.tensor_ref for p in deferred])):
            pending.stats, pending.tensor_ref = row, None

    def _read(self, tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Launch the statistics of ``tensors`` (one batch per device, no host sync); their (batch, row) places."""
        places: list[tuple[int, int] | None] = [None] * len(tensors)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        for indices in by_device.values():
            self._batches.append(finite_stats_many([tensors[i] for i in indices]))
            for row, i in enumerate(indices):
                places[i] = (len(self._batches) - 1, row)
        return places

    def _global_output_hook(self, module, _args, output):
        if module not in self._own_hooks:
            self._output_hook(module, _args, output)

    def _own_output_hook(self, module, _args, output):
        self._output_hook(module, _args, output)

    def _output_hook(self, module, _args, output):
        # Runs after every module of the forward: kept to a dict lookup and an append for the usual tensor output.
        labels = self._labels.get(module)
        if labels is None:
            # not in the cached map: a module added to the component since (a guard's replacement layer) or one
            # outside it; records() resolves it against the component's modules, off the forward's critical path
            labels = (None, module)
        if type(output) is torch.Tensor:
            if output.is_floating_point():
                self._record(labels[0], labels[1], "output", output, module)
            return
        for tensor_name, tensor in _floating_tensors(output, "output"):
            self._record(labels[0], labels[1], tensor_name, tensor, module)

    def _resolve(self) -> None:
        """Give the records of modules missing from the cached path map their names (rebuilding the map), and drop
        those of modules outside the component."""
        if not any(p.boundary is None for p in self._pending):
            return
        _PATHS.pop(self.root, None)  # the tree changed: every output is named again from the fresh map
        self._module_paths, self._labels = _labels(self.root, self.boundary_names, self.root_label)
        for pending in self._pending:
            if pending.source is not None:
                labels = self._labels.get(pending.source)
                pending.boundary, pending.module = labels if labels is not None else (None, None)
        self._pending = [p for p in self._pending if p.boundary is not None]

    def _running_module(self) -> str:
        """The innermost module of the component whose forward is on the call stack (where a guard was called from);
        the root's label when there is none. Walks the frames only when a guard fires, so hooks stay cheap."""
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                labels = self._labels.get(owner)
                if labels is not None:
                    return labels[1]
            frame = frame.f_back
        return self.root_label

    def _guard(self, spy: GuardSpy, original):
        def guarded(*args, **kwargs):
            out = original(*args, **kwargs)
            tensor = args[0] if args else None
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and isinstance(out, torch.Tensor):
                # outside every module: the component's own code around its modules (a VAE's decode clamps there)
                module = self._running_module()
                changed = (out != tensor) & ~(torch.isnan(out) & torch.isnan(tensor))
                self._batches.append(tensor_stats(tensor).reshape(1, -1))
                place = (len(self._batches) - 1, 0)
                self._pending.append(_Pending(f"input of {spy.label}", module, spy.label, tensor.dtype, list(tensor.shape), place, changed.sum()))
            return out

        return guarded

    def record_inputs(self, kwargs: Mapping[str, object]) -> None:
        """Record the component's inputs where the call does not go through the root's ``forward`` (a VAE's
        ``decode``); the root's pre-hook then records nothing more."""
        if self.enabled:
            self._inputs_recorded = True
            self._root_input_hook(self.root, (), kwargs, explicit=True)

    def record_outputs(self, outputs: Mapping[str, object]) -> None:
        """The call's outputs, as the root's post-hook would record them (for a call that bypasses ``forward``)."""
        if self.enabled:
            for name, value in outputs.items():
                for tensor_name, tensor in _floating_tensors(value, name):
                    self._record(self.boundary_names.get("", self.root_label), self.root_label, tensor_name, tensor)

    def _root_input_hook(self, _module, args, kwargs, explicit: bool = False):
        if self._inputs_recorded and not explicit:
            return
        named = list(_floating_tensors(list(args), "args")) if args else []
        for key, value in kwargs.items():
            if type(value) is torch.Tensor:  # the usual case, without the generator
                if value.is_floating_point():
                    named.append((key, value))
            elif value is not None:
                named.extend(_floating_tensors(value, key))
        self._record_input("component input", INPUT, named)

    def _pre_hook(self, probe: InputProbe):
        def hook(_module, args):
            if probe.index < len(args) and isinstance(args[probe.index], torch.Tensor):
                # read now: these are the block's own intermediate values (a residual stream), which its code may
                # go on updating in place (ComfyUI's FLUX does `img += ...`)
                self._record_input(probe.boundary, self._display(probe.produced_by), [(probe.tensor, args[probe.index])])

        return hook

    def __enter__(self) -> Probes:
        self._pending.clear()
        self._deferred, self._deferred_bytes, self._batches, self._watched_inputs = [], 0, [], []
        self._inputs_recorded = False
        if not self.enabled:
            return self
        self._handles.append(self.root.register_forward_pre_hook(self._root_input_hook, with_kwargs=True))
        if self.scope == "io":
            self._module_paths = {self.root: ""}
            self._labels = {self.root: (self.boundary_names.get("", self.root_label), self.root_label)}
            self._handles.append(self.root.register_forward_hook(self._output_hook))
            return self
        self._module_paths, self._labels = _labels(self.root, self.boundary_names, self.root_label)
        by_path = {path: module for module, path in self._module_paths.items()} if self.input_probes else {}
        for probe in self.input_probes:
            if probe.module not in by_path:
                raise KeyError(f"input probe on {probe.module!r}: no such module in {type(self.root).__name__}")
            self._handles.append(by_path[probe.module].register_forward_pre_hook(self._pre_hook(probe)))
        # Global hooks run before a module's own forward hooks; a module that has its own (one that edits its output)
        # gets a hook of its own after them, so that its recorded output is the one its caller receives.
        self._own_hooks = {module for module in self._module_paths if module._forward_hooks}
        for module in self._own_hooks:
            self._handles.append(module.register_forward_hook(self._own_output_hook))
        self._handles.append(torch.nn.modules.module.register_module_forward_hook(self._global_output_hook))
        for spy in self.guards:
            original = getattr(spy.owner, spy.attr)
            self._restore.append((spy.owner, spy.attr, original))
            setattr(spy.owner, spy.attr, self._guard(spy, original))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()

    def records(self) -> list[BoundaryRecord]:
        self._flush()
        self._resolve()
        if self._watched_inputs:
            learned = _KEEPS_INPUTS.setdefault(self.root, {})
            for boundary, tensor, version in self._watched_inputs:
                learned[boundary] = learned.get(boundary, True) and tensor._version == version
            self._watched_inputs = []
        if not self._pending:
            return []
        host = _to_host(self._batches)  # the one host sync
        stats = [host[batch][row] for batch, row in (p.stats for p in self._pending)]
        touched_at = [i for i, p in enumerate(self._pending) if p.touched is not None]
        touched = dict(zip(touched_at, torch.stack([self._pending[i].touched for i in touched_at]).cpu().tolist())) if touched_at else {}
        out = []
        for order, (pending, (nonfinite, nan, max_abs, saturated)) in enumerate(zip(self._pending, stats)):
            name, fmax = _dtype_facts(pending.dtype)
            out.append(
                BoundaryRecord(
                    order,
                    pending.boundary,
                    pending.module,
                    pending.tensor,
                    name,
                    list(pending.shape),
                    int(nonfinite),
                    int(nan),
                    max_abs,
                    int(saturated),
                    (fmax / max_abs) if max_abs > 0 else None,
                    int(touched[order]) if order in touched else None,
                    pending.changed_in_place,
                )
            )
        return out


@functools.cache
def _dtype_facts(dtype: torch.dtype) -> tuple[str, float]:
    return str(dtype).removeprefix("torch."), torch.finfo(dtype).max


def _to_host(batches: list[torch.Tensor]) -> list[list[list[float]]]:
    """The batches' statistics as lists, with one device-to-host copy per device (one, in practice)."""
    host: list = [None] * len(batches)
    by_device: dict[torch.device, list[int]] = {}
    for i, b in enumerate(batches):
        by_device.setdefault(b.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([batches[i] for i in indices]).cpu().tolist() if len(indices) > 1 else batches[indices[0]].cpu().tolist()
        start = 0
        for i in indices:
            host[i] = flat[start : start + len(batches[i])]
            start += len(batches[i])
    return host


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
