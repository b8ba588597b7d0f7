"""Probes: recording wrappers that watch every boundary of a component while it runs (what a boundary is, and the
records they yield: ``conformance.boundaries``).

Cost. Statistics are read in one batch after the forward (``kernels.HostStats``: one read of every tensor, one
launch per dtype on CUDA, the numbers stored straight into pinned host memory), not by a kernel per output:
recording keeps a reference and the tensor's version counter, and the one host sync comes when ``records()`` is
called. Recording is a wrapper in front of each module's ``forward`` (an instance attribute, removed on exit), not a
forward hook: any hook sends every call of a module through torch's slow ``_call_impl`` path, which costs more than
the recording. A tensor changed in place after its boundary is marked ``changed_in_place`` (its numbers are of the
later values) and is not taken as the first non-finite. The probes can stay installed over many forwards (a
sampler's steps): each ``records()`` returns what was seen since the last one.

Inputs are the exception: blocks update their inputs and residual streams in place (ComfyUI's FLUX does ``img +=
...``), so the component's inputs and the declared intermediate inputs are read when they are seen, unless this very
module was seen before to leave them unchanged; then they join the end-of-forward batch, still guarded by their
version counters. For the component's own inputs the start of the forward then keeps only the call and the inputs'
version counters, and the inputs are noted at the end (the start of a block's forward is host-bound: every
microsecond of Python there is wall time). Pending tensors are read early once they hold 1 GiB, to bound the memory
held.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .boundaries import INPUT, ROOT, BoundaryRecord, GuardSpy, InputProbe, dtype_facts, output_labels, probed_modules
from .kernels import HostStats, finite_stats
from .trees import floating_tensors


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """``[nonfinite, nan, max finite |x|, saturated]`` as a float64 tensor on ``x``'s device (no host sync): the fused
    check of ``conformance.kernels`` (one read of ``x`` with Triton on CUDA, torch elsewhere)."""
    return finite_stats(x)


def read_key(tensor: torch.Tensor) -> tuple:
    """What makes two tensors one read: the same elements of the same memory in the same dtype (a dropout in eval or
    an identity returns its input)."""
    if tensor.is_contiguous():
        return tensor.data_ptr(), tensor.numel(), tensor.dtype
    return tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride()


class _Named(NamedTuple):
    """Where a boundary seen outside a module's output sits: named when it was seen."""

    boundary: str
    module: str
    is_input: bool  # a component or declared input (read on sight once a forward is seen to update it in place)


@dataclass(slots=True)
class _Seen:
    """A boundary tensor recorded and not yet read: the cheapest thing a wrapper can append, held until the flush.
    ``source`` is the module whose output it is (named by ``records()`` from the path map the wrappers were made
    from), or a ``_Named``."""

    source: nn.Module | _Named
    tensor_name: str
    tensor: torch.Tensor
    version: int  # the tensor's version counter at the boundary


@dataclass(slots=True)
class _Read:
    """A boundary whose statistics are on their way to the host (the tensor is no longer held); ``at`` and
    ``touched_at`` index the forward's host list of numbers (``HostStats``)."""

    source: nn.Module | _Named
    tensor_name: str
    dtype: torch.dtype
    shape: torch.Size
    changed_in_place: bool
    at: int
    touched_at: int | None = None  # a guard's input: where its count of changed values sits


_MISSING = object()


# Deferred outputs are read in one batch at the end of the forward, or earlier once they hold this many bytes.
FLUSH_BYTES = 1 << 30

# Per root module: which of its input boundaries ("input" for the component's own) a forward was seen to leave
# unchanged (True) or to update in place (False). Unchanged ones are read with the end-of-forward batch.
_KEEPS_INPUTS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
@dataclass
class Probes:
    """Context manager installing the recording on ``root``. Use ``records()`` after each forward."""

    root: nn.Module
    boundary_names: Mapping[str, str] = field(default_factory=dict)
    input_probes: tuple[InputProbe, ...] = ()
    guards: tuple[GuardSpy, ...] = ()
    enabled: bool = True
    root_label: str = ROOT  # how the root module is named in records ("block"; a VAE's is "vae")
    scope: str = "all"  # "all": every module, the declared inputs and the guards; "io": the root's inputs and outputs only
    _handles: list = field(default_factory=list, init=False)
    _pending: list[_Seen | _Read] = field(default_factory=list, init=False)  # every boundary, in firing order
    _unflushed: int = field(default=0, init=False)  # index in _pending where the next flush starts
    _restore: list = field(default_factory=list, init=False)
    _inputs_recorded: bool = field(default=False, init=False)
    _module_paths: dict = field(default_factory=dict, init=False)
    _labels: dict = field(default_factory=dict, init=False)  # id(module) -> (boundary, module name) of its output
    _own_hooks: set = field(default_factory=set, init=False)
    _host: HostStats = field(default_factory=HostStats, init=False)  # where the statistics land, read back once
    _watched_inputs: list = field(default_factory=list, init=False)  # (boundary, tensor, version) of inputs read now
    _deferred_bytes: int = field(default=0, init=False)
    _keeps: dict = field(default_factory=dict, init=False)  # _KEEPS_INPUTS of this root
    _probes_at: dict = field(default_factory=dict, init=False)  # id(module) -> its declared input probes
    _wrapped: list = field(default_factory=list, init=False)  # (module, its forward instance attribute or _MISSING)
    _bare_tuples: dict = field(default_factory=dict, init=False)  # keyword -> the last tuple found to hold no float
    # The root's inputs noted at the end of the forward (``_note_root_call``): this root was seen to leave them
    # unchanged and they are top-level tensors. Then the start of the forward only keeps the call and the versions.
    _defer_inputs: bool = field(default=False, init=False)
    _flat_inputs: bool = field(default=False, init=False)  # the last walk of the root's inputs found no nested tensor
    _root_call: tuple | None = field(default=None, init=False)  # (args, kwargs, their tensors' versions at the start)

    def _display(self, path: str) -> str:
        return path or self.root_label

    def _record(self, source, tensor_name: str, tensor: torch.Tensor) -> None:
        """Note a boundary tensor; its statistics are read later, in one batch (``_flush``): recording only keeps a
        reference and the tensor's version counter, so watching every module costs one read of each output and not a
        kernel launch per output."""
        self._pending.append(_Seen(source, tensor_name, tensor, tensor._version))
        self._deferred_bytes += tensor.nbytes
        if self._deferred_bytes > FLUSH_BYTES:
            self._flush()

    def _record_input(self, boundary: str, module: str, named: list[tuple[str, torch.Tensor]]) -> None:
        """An input boundary: read now, unless this root was seen to leave this boundary's tensors unchanged (then
        deferred like an output, its version counter still checked). A tensor read now is remembered, so that the
        end of the forward can tell whether the block updated it in place."""
        if not named:
            return
        source = _Named(boundary, module, True)
        if self._keeps.get(boundary):
            for name, tensor in named:
                self._record(source, name, tensor)
            return
        places = self._read([t for _, t in named])
        for (name, tensor), at in zip(named, places):
            self._pending.append(_Read(source, name, tensor.dtype, tensor.shape, False, at))
            self._watched_inputs.append((boundary, tensor, tensor._version))

    def _flush(self) -> None:
        """Read the statistics of every tensor recorded since the last flush, in one batch, and drop the references."""
        if self._root_call is not None:
            self._note_root_call()
        start, end = self._unflushed, len(self._pending)
        self._unflushed, self._deferred_bytes = end, 0
        # A tensor recorded twice (a dropout in eval or an identity returns its input) is read once: a quarter of
        # the bytes of a diffusers or ComfyUI Qwen block's outputs.
        pending, tensors, at, unique = self._pending, [], [], {}
        for i in range(start, end):
            entry = pending[i]
            if type(entry) is _Seen:
                key = read_key(entry.tensor)
                index = unique.get(key)
                if index is None:
                    index = unique[key] = len(tensors)
                    tensors.append(entry.tensor)
                at.append((i, index))
        if not tensors:
            return
        places = self._read(tensors)
        for i, index in at:
            seen = pending[i]
            changed = seen.tensor._version != seen.version
            if changed and type(seen.source) is _Named and seen.source.is_input:  # no longer unchanged: read on sight
                self._keeps[seen.source.boundary] = False
            pending[i] = _Read(seen.source, seen.tensor_name, seen.tensor.dtype, seen.tensor.shape, changed, places[index])

    def _read(self, tensors: list[torch.Tensor]) -> list[int]:
        """Launch the statistics of ``tensors`` (one launch per device and dtype, no host sync); where each tensor's
        four numbers will sit in the forward's host list (``HostStats``)."""
        device = tensors[0].device
        if all(t.device == device for t in tensors):
            return self._host.stats_of(tensors)
        places: list = [None] * len(tensors)
        grouped: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            grouped.setdefault(t.device, []).append(i)
        for members in grouped.values():
            for i, at in zip(members, self._host.stats_of([tensors[i] for i in members])):
                places[i] = at
        return places

    def _output_hook(self, module, _args, output):
        if type(output) is torch.Tensor:
            if output.is_floating_point():
                self._record(module, "output", output)
            return
        for tensor_name, tensor in floating_tensors(output, "output"):
            self._record(module, tensor_name, tensor)

    def _running_module(self) -> str:
        """The innermost module of the component whose forward is on the call stack (where a guard was called from);
        the root's label when there is none. Walks the frames only when a guard fires, so recording stays cheap."""
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                labels = self._labels.get(id(owner))
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
                at = self._host.stats_of([tensor])[0]
                touched_at = self._host.put(changed.sum(dtype=torch.float64))
                source = _Named(f"input of {spy.label}", module, False)
                self._pending.append(_Read(source, spy.label, tensor.dtype, tensor.shape, False, at, touched_at))
            return out

        return guarded

    def record_inputs(self, kwargs: Mapping[str, object]) -> None:
        """Record the component's inputs where the call does not go through the root's ``forward`` (a VAE's
        ``decode``); the root's wrapper then records nothing more."""
        if self.enabled:
            self._inputs_recorded = True
            self._record_root_inputs((), kwargs, explicit=True)

    def record_outputs(self, outputs: Mapping[str, object]) -> None:
        """The call's outputs, as the root's wrapper would record them (for a call that bypasses ``forward``)."""
        if self.enabled:
            source = _Named(self.boundary_names.get("", self.root_label), self.root_label, False)
            for name, value in outputs.items():
                for tensor_name, tensor in floating_tensors(value, name):
                    self._record(source, tensor_name, tensor)

    def _root_inputs(self, args, kwargs) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """``(name, tensor, top_level)`` for every top-level tensor argument of a root call (floating or not: the
        versions kept at a call's start are of these) and every floating tensor nested in the others, in order."""
        bare = self._bare_tuples
        for prefix, items in (("args", enumerate(args)), (None, kwargs.items())):
            for key, value in items:
                name = f"{prefix}[{key}]" if prefix else key
                if type(value) is torch.Tensor:  # the usual case, without the generator
                    yield name, value, True
                elif value is not None and bare.get(key) is not value:
                    found = False
                    for nested_name, tensor in floating_tensors(value, name):
                        found = True
                        yield nested_name, tensor, False
                    if not found and type(value) is tuple and all(type(item) is torch.Tensor for item in value):
                        # a tuple of tensors with nothing to read (diffusers' complex rotary tables): passed by
                        # identity next time, as the same tuple cannot hold other tensors nor its tensors change dtype
                        bare[key] = value

    def _record_root_inputs(self, args, kwargs, explicit: bool = False):
        if self._inputs_recorded and not explicit:
            return
        named, flat = [], all(type(a) is torch.Tensor for a in args)
        for name, tensor, top_level in self._root_inputs(args, kwargs):
            if tensor.is_floating_point():
                named.append((name, tensor))
            flat = flat and top_level
        self._flat_inputs = flat and not explicit
        self._record_input("component input", INPUT, named)

    def _note_root_call(self) -> None:
        """The root's inputs of a call whose start only kept them (``_defer_inputs``), as ``_record_root_inputs``
        would have recorded them, with the versions they had when the call began; ahead of everything recorded since
        (they are the forward's first boundary)."""
        args, kwargs, arg_versions, kwarg_versions = self._root_call
        self._root_call = None
        source, entries, versions = _Named("component input", INPUT, True), [], iter((*arg_versions, *kwarg_versions))
        for name, tensor, top_level in self._root_inputs(args, kwargs):
            if top_level:
                version = next(versions)
            else:  # a nested tensor, new since the last walk: its version now, and the next forward walks at its start
                version = tensor._version
                self._flat_inputs = False
            if tensor.is_floating_point():
                entries.append(_Seen(source, name, tensor, version))
        self._pending[self._unflushed : self._unflushed] = entries

    def _record_declared_inputs(self, module, args):
        for probe in self._probes_at[id(module)]:
            if probe.index < len(args) and isinstance(args[probe.index], torch.Tensor):
                # read now unless seen unchanged before: these are the block's own intermediate values (a residual
                # stream), which its code may go on updating in place (ComfyUI's FLUX does `img += ...`)
                self._record_input(probe.boundary, self._display(probe.produced_by), [(probe.tensor, args[probe.index])])

    def _start_forward(self) -> None:
        self._pending, self._unflushed = [], 0
        self._deferred_bytes, self._watched_inputs = 0, []
        self._inputs_recorded, self._root_call = False, None
        self._defer_inputs = self._flat_inputs and self._keeps.get("component input", False)

    def __enter__(self) -> Probes:
        self._start_forward()
        self._host.reset()
        if not self.enabled:
            return self
        self._keeps = _KEEPS_INPUTS.setdefault(self.root, {})
        if self.scope == "io":
            self._module_paths = {self.root: ""}
            self._labels = {id(self.root): (self.boundary_names.get("", self.root_label), self.root_label)}
            self._probes_at = {}
        else:
            self._module_paths, self._labels, tree = output_labels(self.root, self.boundary_names, self.root_label, check=True)
            self._probes_at = probed_modules(self.root, tree, self.input_probes) if self.input_probes else {}
        # A module with forward hooks of its own (one that edits its output) is recorded by a hook registered after
        # them, so that its recorded output is the one its caller receives; every other module through its forward.
        self._own_hooks = {module for module in self._module_paths if module._forward_hooks}
        for module in self._module_paths:
            self._wrap_forward(module)
        for module in self._own_hooks:
            self._handles.append(module.register_forward_hook(self._output_hook))
        if self.scope != "io":
            for spy in self.guards:
                original = getattr(spy.owner, spy.attr)
                self._restore.append((spy.owner, spy.attr, original))
                setattr(spy.owner, spy.attr, self._guard(spy, original))
        return self

    def _wrap_forward(self, module: nn.Module) -> None:
        """Put a recording wrapper in front of ``module.forward`` (as an instance attribute, restored on exit).

        Not a forward hook: any hook sends a module's call through torch's slow path (``Module._call_impl`` building
        its hook lists, closures and sets), which costs more than the recording itself, and the forward of a large
        block is host-bound in stretches, so every microsecond there is a microsecond of wall time. A wrapper costs one
        Python call. The root's wrapper records the component's inputs before its forward; a module with declared
        input probes has them read before its forward; every module but those with hooks of their own has its output
        recorded after it."""
        forward = module.forward  # the bound method, or an instance attribute someone set before us
        self._wrapped.append((module, module.__dict__.get("forward", _MISSING)))
        probes, state = self._probes_at.get(id(module)), self
        root = module is self.root
        outputs = module not in self._own_hooks
        tensor_type = torch.Tensor  # a closure variable: no global and attribute lookups in the calls below

        def probed_forward(*args, **kwargs):
            if root and not state._inputs_recorded:
                if state._defer_inputs:  # the forward's start is on the critical path: keep the call, note it later
                    state._inputs_recorded = True
                    state._root_call = (
                        args, kwargs, [a._version for a in args if type(a) is tensor_type] if args else (),
                        [v._version for v in kwargs.values() if type(v) is tensor_type],
                    )  # fmt: skip
                else:
                    state._record_root_inputs(args, kwargs)
            if probes is not None:
                state._record_declared_inputs(module, args)
            output = forward(*args, **kwargs)
            if outputs:
                if type(output) is tensor_type:
                    if output.is_floating_point():  # _record, inlined: this runs once per module per forward
                        state._pending.append(_Seen(module, "output", output, output._version))
                        state._deferred_bytes += output.nbytes
                        if state._deferred_bytes > FLUSH_BYTES:
                            state._flush()
                else:
                    state._output_hook(module, args, output)
            return output

        module.__dict__["forward"] = probed_forward

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in reversed(self._wrapped):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._wrapped.clear()
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()
        self._module_paths, self._own_hooks = {}, set()  # hold no module once uninstalled (records() needs only ids)

    def flush(self) -> None:
        """Queue the statistics read of everything recorded so far (one launch per device and dtype) without waiting
        for it; ``records()`` does this itself. For a caller that wants the read queued at a point of its choosing,
        before its own work on the stream (a CUDA event after it, in the benchmarks)."""
        self._flush()

    def records(self) -> list[BoundaryRecord]:
        """The boundaries seen since the probes were entered, or since the last call, in firing order, with their
        statistics: the one host sync of a probed forward. Everything but the numbers is prepared while the
        statistics are on their way to the host. The recording stays installed: a loop of forwards (a sampler's steps)
        under one ``with Probes(...)`` calls this after each forward."""
        self._flush()
        if self._watched_inputs:
            learned = self._keeps
            for boundary, tensor, version in self._watched_inputs:
                learned[boundary] = learned.get(boundary, True) and tensor._version == version
            self._watched_inputs = []
        if not self._pending:
            self._start_forward()
            return []
        box: list = [None]  # the statistics on the host, once they have arrived
        out = []
        labels = self._labels
        for entry in self._pending:
            source = entry.source
            boundary, module = (source.boundary, source.module) if type(source) is _Named else labels[id(source)]
            name, fmax = dtype_facts(entry.dtype)
            out.append(BoundaryRecord(len(out), boundary, module, entry.tensor_name, name, list(entry.shape), entry.changed_in_place, box, entry.at, fmax, entry.touched_at))  # fmt: skip
        self._start_forward()
        box[0] = self._host.take()  # the one host sync
        return out


