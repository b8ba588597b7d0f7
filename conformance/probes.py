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

Cost. A module output's statistics are read in one batch after the forward (``kernels.finite_stats_many``: one read
of every output, one launch per dtype on CUDA), not by a kernel per output launched from its hook: a hook keeps a
reference and the tensor's version counter. A tensor its block changed in place after the boundary is marked
``changed_in_place`` (its numbers are of the later values) and is not taken as the first non-finite. The component's
inputs and the declared intermediate inputs, which blocks do update in place, are read when they are seen. Pending
outputs are read early once they hold 1 GiB, to bound the memory held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


@dataclass
class _Pending:
    boundary: str
    module: str
    tensor: str
    dtype: torch.dtype
    shape: list[int]
    stats: tuple[int, int] | None  # (batch, row) in Probes._batches; None until its batch is read
    touched: torch.Tensor | None = None
    tensor_ref: torch.Tensor | None = None  # held until its statistics are read
    version: int = 0
    changed_in_place: bool = False


# Deferred outputs are read in one batch at the end of the forward, or earlier once they hold this many bytes.
FLUSH_BYTES = 1 << 30


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
    _stack: list[str] = field(default_factory=list, init=False)
    _restore: list = field(default_factory=list, init=False)
    _inputs_recorded: bool = field(default=False, init=False)
    _deferred: list[_Pending] = field(default_factory=list, init=False)
    _batches: list[torch.Tensor] = field(default_factory=list, init=False)  # [k, 4] statistics, read back once
    _deferred_bytes: int = field(default=0, init=False)

    def _display(self, path: str) -> str:
        return path or self.root_label

    def _record(self, boundary: str, module: str, tensor_name: str, tensor: torch.Tensor) -> None:
        """Note a boundary tensor; its statistics are read later, in one batch (``_flush``): a hook only keeps a
        reference, so watching every module costs one read of each output and not a kernel launch per output."""
        pending = _Pending(boundary, module, tensor_name, tensor.dtype, list(tensor.shape), None, tensor_ref=tensor, version=tensor._version)
        self._pending.append(pending)
        self._deferred.append(pending)
        self._deferred_bytes += tensor.numel() * tensor.element_size()
        if self._deferred_bytes > FLUSH_BYTES:
            self._flush()

    def _record_now(self, boundary: str, module: str, named: list[tuple[str, torch.Tensor]]) -> None:
        """Read these tensors' statistics now (one batch): the component's inputs, which it may update in place."""
        if not named:
            return
        rows = self._read([t for _, t in named])
        for (name, tensor), row in zip(named, rows):
            self._pending.append(_Pending(boundary, module, name, tensor.dtype, list(tensor.shape), row))

    def _flush(self) -> None:
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        if not deferred:
            return
        for pending in deferred:
            pending.changed_in_place = pending.tensor_ref._version != pending.version
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

    def _post_hook(self, path: str):
        module_name = self._display(path)
        boundary = self.boundary_names.get(path, module_name)

        def hook(_module, _args, output):
            if self._stack:
                self._stack.pop()
            for tensor_name, tensor in _floating_tensors(output, "output"):
                self._record(boundary, module_name, tensor_name, tensor)

        return hook

    def _enter_hook(self, path: str):
        def hook(_module, _args):
            self._stack.append(path)

        return hook

    def _guard(self, spy: GuardSpy, original):
        def guarded(*args, **kwargs):
            out = original(*args, **kwargs)
            tensor = args[0] if args else None
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and isinstance(out, torch.Tensor):
                # outside every module: the component's own code around its modules (a VAE's decode clamps there)
                module = self._display(self._stack[-1] if self._stack else "")
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
        named = list(_floating_tensors(list(args), "args"))
        for key, value in kwargs.items():
            named.extend(_floating_tensors(value, key))
        self._record_now("component input", INPUT, named)

    def _pre_hook(self, probe: InputProbe):
        def hook(_module, args):
            if probe.index < len(args) and isinstance(args[probe.index], torch.Tensor):
                # read now: these are the block's own intermediate values (a residual stream), which its code may
                # go on updating in place (ComfyUI's FLUX does `img += ...`)
                self._record_now(probe.boundary, self._display(probe.produced_by), [(probe.tensor, args[probe.index])])

        return hook

    def __enter__(self) -> Probes:
        self._pending.clear()
        self._deferred, self._deferred_bytes, self._batches = [], 0, []
        self._inputs_recorded = False
        if not self.enabled:
            return self
        if self.scope == "io":
            self._handles.append(self.root.register_forward_pre_hook(self._root_input_hook, with_kwargs=True))
            self._handles.append(self.root.register_forward_hook(self._post_hook("")))
            return self
        modules = dict(self.root.named_modules())
        self._handles.append(self.root.register_forward_pre_hook(self._root_input_hook, with_kwargs=True))
        for probe in self.input_probes:
            if probe.module not in modules:
                raise KeyError(f"input probe on {probe.module!r}: no such module in {type(self.root).__name__}")
            self._handles.append(modules[probe.module].register_forward_pre_hook(self._pre_hook(probe)))
        for path, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(path)))
            self._handles.append(module.register_forward_hook(self._post_hook(path)))
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
        self._stack.clear()

    def records(self) -> list[BoundaryRecord]:
        self._flush()
        if not self._pending:
            return []
        host = _to_host(self._batches)  # the one host sync
        stats = [host[batch][row] for batch, row in (p.stats for p in self._pending)]
        touched_at = [i for i, p in enumerate(self._pending) if p.touched is not None]
        touched = dict(zip(touched_at, torch.stack([self._pending[i].touched for i in touched_at]).cpu().tolist())) if touched_at else {}
        out = []
        for order, (pending, (nonfinite, nan, max_abs, saturated)) in enumerate(zip(self._pending, stats)):
            fmax = torch.finfo(pending.dtype).max
            out.append(
                BoundaryRecord(
                    order=order,
                    boundary=pending.boundary,
                    module=pending.module,
                    tensor=pending.tensor,
                    dtype=str(pending.dtype).removeprefix("torch."),
                    shape=pending.shape,
                    nonfinite=int(nonfinite),
                    nan=int(nan),
                    max_abs=float(max_abs),
                    saturated=int(saturated),
                    headroom=(fmax / max_abs) if max_abs > 0 else None,
                    touched=int(touched[order]) if order in touched else None,
                    changed_in_place=pending.changed_in_place,
                )
            )
        return out


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
