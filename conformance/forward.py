"""The engine's forwards: synthetic weights and inputs of a component, its modules built once per precision and
kept while cases share them, and one forward of it under a backend, a guard and the probes.

``ForwardRunner`` is one half of ``runner.Engine``; it reads ``self.subject`` and ``self.options``
(``runner.EngineOptions``) and keeps its caches in the attributes ``init_forwards`` sets.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import captures
from .backends import CallCounter
from .boundaries import BoundaryRecord
from .families import component_family, component_profiles, family_of
from .families.common import apply_weight_stress, synthetic_weights
from .guards import GuardContext, GuardRun, get_policy
from .machine import align_onednn_isa
from .precision import PRECISIONS, Precision
from .probes import Probes
from .scales import file_scale, size_class
from .subjects.base import BuiltComponent, ComponentInputs, Subject, clone_tensors


@dataclass
class ForwardRun:
    outputs: dict[str, torch.Tensor]
    records: list[BoundaryRecord]
    calls: CallCounter
    seconds: float
    notes: list[str]
    guard_note: str | None
    tiled_outputs: dict[str, torch.Tensor] | None = None
    guard: GuardRun | None = None  # the guard policy's record, when one was applied


# Before torch runs a bf16 kernel: keep oneDNN on the instruction set ATEN_CPU_CAPABILITY chose (conformance.machine).
align_onednn_isa()


# The CUDA settings a forward pins, as (namespace, attribute): TF32 for every forward, reduced-precision reductions
# as well for a golden's (float64 uses neither; a float32 op inside a subject's float64 forward would).
_TF32 = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"))
_REDUCED_REDUCTIONS = (
    (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"),
    (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"),
)


@contextlib.contextmanager
def cuda_numerics(device: torch.device, golden: bool = False):
    """On CUDA, float32 matmuls and convolutions in IEEE float32 while the context is open; for a golden's forward
    also no reduced-precision reductions. PyTorch leaves cuDNN's TF32 on by default (and no subject turns it off), so a
    case's float32 convolution would round its inputs to 10 mantissa bits: the fp32 decoders then err 100x their
    budget, which is float32's (docs/gpu-notes.md). A case's half precision is left to PyTorch's defaults and the
    subject's settings: those are the kernels a deployment runs."""
    if device.type != "cuda":
        yield
        return
    settings = _TF32 + (_REDUCED_REDUCTIONS if golden else ())
    saved = [getattr(owner, attr) for owner, attr in settings]
    for owner, attr in settings:
        setattr(owner, attr, False)
    try:
        yield
    finally:
        for (owner, attr), value in zip(settings, saved):
            setattr(owner, attr, value)


def _real_builds_kept(device: torch.device) -> int:
    """Real-scale modules kept: every precision's, twice (base and stressed weights), on a CUDA device of 64 GiB or
    more (at most ~16 GB of weights), else one: a CPU runner's RAM holds the float64 golden build besides."""
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 64 * 2**30:
        return 2 * len(PRECISIONS)
    return 1


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class ForwardRunner:
    """Weights, inputs, builds and forwards, with the caches cases share."""

    def init_forwards(self) -> None:
        self._weights = _LRU(2)
        self._stressed = _LRU(1)
        self._inputs = _LRU(8)
        # Built modules, shared by the cases that differ only in backend, guard or a profile that leaves the weights
        # alone (backends, guards and probes attach and detach; a forward leaves the module as it found it:
        # tests/test_module_cache.py). Cases run profile by profile, precisions within, backends innermost: a module
        # per precision for the base weights and one stressed set stays live; at real scale only on a device that
        # holds them (all precisions of the largest real block, WAN i2v, are ~8 GB of weights), else one.
        self._built: dict[str, _LRU] = {"tiny": _LRU(2 * len(PRECISIONS)), "real": _LRU(_real_builds_kept(self.options.device))}
        self.phases: dict[str, float] = {}  # the current case's seconds per phase (build, forward, golden, ...)

    def weights(self, component: str, scale: str, profile: str | None = None) -> dict[str, torch.Tensor]:
        """Synthetic weights of a component; with a profile, after that profile's weight stresses (if any)."""
        key = (component, scale)
        if key not in self._weights and file_scale(scale):
            from .checkpoints.cases import read_weights

            found = file_scale(scale)
            self.options.progress(f"reading block {found.block} of {component} from {found.path}")
            self._weights.put(key, read_weights(scale, component, self.subject.weight_shapes(component, scale)))
        if key not in self._weights:
            family = component_family(component)
            shapes = self.subject.weight_shapes(component, scale)
            if scale != "tiny":
                self.options.progress(f"generating synthetic {scale} weights for {component} ({sum(map(_numel, shapes.values())) / 1e6:.0f} M values)")
            self._weights.put(key, synthetic_weights(shapes, self.options.seed, family.name, family.init))
        base = self._weights[key]
        stresses = [w for w in component_profiles(component)[profile].weights if w.applies(component)] if profile else ()
        if not stresses:
            return base
        stressed_key = (component, scale, profile)
        if stressed_key not in self._stressed:
            self._stressed.put(stressed_key, apply_weight_stress(base, stresses))
        return self._stressed[stressed_key]

    def inputs(self, component: str, scale: str, profile: str) -> ComponentInputs:
        key = (component, scale, profile)
        if key not in self._inputs and captures.captured(profile):
            kwargs, sizes = captures.inputs(profile)
            convert = component_family(component).xcheck_inputs.get(("comfyui", self.subject.name)) if self.subject.name != "comfyui" else None
            if convert is not None:  # a ComfyUI capture in the other subject's form (the cross-check's conversion)
                kwargs = convert(component, kwargs, sizes["text_tokens"])
            self._inputs.put(key, ComponentInputs(kwargs=kwargs, sizes=sizes, profile=profile))
        if key not in self._inputs:
            prof = component_profiles(component)[profile]
            built = self.subject.inputs(component, scale, prof, self.weights(component, scale, profile), self.options.seed)
            built.profile = profile
            self._inputs.put(key, built)
        return self._inputs[key]

    def forward(
        self,
        component: str,
        scale: str,
        precision: Precision | None,
        backend: str,
        inputs: ComponentInputs,
        device: torch.device | None = None,
        probes: bool = True,
        path: str | None = None,
        subject: Subject | None = None,
        tiled: bool = False,
        guard: str = "none",
    ) -> ForwardRun:
        """Build the component in ``precision`` (None: float64 golden), run it once under ``backend`` (and ``guard``)."""
        subject = subject or self.subject
        device = device or self.options.device
        weights = self.weights(component, scale, inputs.profile)
        built = self._build(subject, component, scale, precision, weights, device)
        dtype = torch.float64 if precision is None else precision.activation_dtype
        mark = time.perf_counter()
        kwargs = clone_tensors(subject.cast_inputs(inputs, dtype, device))
        self._add_phase("inputs", mark)
        counter = CallCounter()
        probe_set = Probes(built.module, built.boundary_names, built.input_probes, built.guards, enabled=probes, root_label=built.root_label)
        policy = get_policy(guard)
        guard_run = GuardRun(guard, device) if policy else None
        if policy:
            context = GuardContext(
                family_of(component), component, precision.name, dtype, backend, subject.residual_streams(component), weights
            )
            kwargs = policy.prepare_inputs(kwargs, subject.cast_inputs(inputs, torch.float32, device), context, guard_run)
        try:
            with torch.no_grad(), cuda_numerics(device), subject.use_backend(built.module, backend, counter, path=path, component=component) as prepare:
                kwargs = prepare(kwargs)
                with policy.apply(built.module, context, guard_run) if policy else contextlib.nullcontext(), probe_set:
                    _sync(device)
                    start = time.perf_counter()
                    if built.inputs_at_call:
                        probe_set.record_inputs(kwargs)
                    outputs = dict(built(kwargs, inputs.sizes))
                    if built.inputs_at_call:
                        probe_set.record_outputs(outputs)
                    _sync(device)
                    seconds = time.perf_counter() - start
                tiled_outputs = None
                if tiled and built.tiled_call is not None:
                    counts = counter.counts.copy()  # the calls of the case are those of the full decode
                    tiled_outputs = dict(built.tiled_call(built.module, clone_tensors(kwargs), inputs.sizes))
                    counter.counts = counts
            mark = time.perf_counter()
            records = probe_set.records()
            self._add_phase("probes", mark)
        finally:
            notes, guard_note = list(built.notes), built.guard_note
            del built, kwargs
        self.phases["forward"] = self.phases.get("forward", 0.0) + seconds
        return ForwardRun(outputs, records, counter, seconds, notes, guard_note, tiled_outputs, guard_run)

    def _build(self, subject: Subject, component: str, scale: str, precision: Precision | None, weights, device) -> BuiltComponent:
        """The component built in ``precision`` from ``weights`` on ``device``, from the cache where the same was
        built before (float64 golden modules are built once per golden and not kept)."""
        mark = time.perf_counter()
        if precision is None:
            built = subject.build(component, scale, precision, weights, device)
            self._add_phase("build", mark)
            return built
        cache = self._built[size_class(scale)]
        # id(weights) names these weights: the cache holds them with the module, so no other object can take the id
        key = (id(subject), id(weights), component, scale, precision.name, precision.compute_dtype, str(device))
        if key in cache:
            cache.move_to_end(key)
            return cache[key][1]
        if scale != "tiny" and cache and (cache.size == 1 or any(k[2] != component for k in cache)):
            # A real-dims block is GBs: free the kept ones (and anything a reference cycle holds) before another
            # component's is built, and give the CUDA cache back (a worker that kept it made the next one run out).
            cache.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        built = subject.build(component, scale, precision, weights, device)
        cache.put(key, (weights, built))
        self._add_phase("build", mark)
        return built

    def _add_phase(self, phase: str, since: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - since



def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
