"""The engine: runs one case from fixtures to verdict, and keeps what cases share (weights, inputs, goldens).

Data flows one way: synthetic weights and the profile -> the subject builds the component in the case's precision and
captures its inputs -> probes watch the forward under the forced backend -> outputs are compared with the golden ->
the verdict (``compare.judge``) -> a ``CaseResult``.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import compare
from .backends import XCHECK, CallCounter
from .case import Case
from .expectations import ExpectedFailure, expected_failure_for
from .families import component_family, component_profiles, family_of, family_precision, get_family, is_vae
from .guards import GuardContext, GuardRun, get_policy
from .families.common import apply_weight_stress, synthetic_weights
from .goldens import (
    Golden,
    GoldenChange,
    GoldenConflict,
    GoldenError,
    GoldenKey,
    GoldenMissing,
    GoldenStore,
    outputs_agree,
    tensor_digest,
)
from .inputs import InputCheck, compare_inputs
from .islands import Islands
from .machine import align_onednn_isa, cpu_path
from .precision import PRECISIONS, Precision, get_precision
from .probes import BoundaryRecord, Probes, first_nonfinite, first_saturated, summarize
from .results import CaseResult
from .save_stage import save_like_comfyui
from .subjects.base import BuiltComponent, ComponentInputs, Subject, clone_tensors


@dataclass
class EngineOptions:
    device: torch.device
    committed_store: GoldenStore
    local_store: GoldenStore
    update_goldens: bool = False
    seed: int = 0
    ratchet: Mapping[str, float] = field(default_factory=dict)
    expected_failures: list[ExpectedFailure] = field(default_factory=list)
    progress: Callable[[str], None] = lambda message: None
    golden_command: Callable[[GoldenKey], str] = lambda key: "pytest suites --conformance-update-goldens"
    outputs_dir: Path | None = None  # where each case's outputs are saved (float32 safetensors), for the upgrade gate
    run_id: str | None = None  # recorded with each golden made; this run's own goldens need no confirmation
    identity: Mapping[str, object] | None = None  # a golden identity already resolved by the run (the prefetcher's)


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
def _cuda_numerics(device: torch.device, golden: bool = False):
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


@dataclass
class _Gathered:
    """What ``Engine._evidence`` gathered for one case, in the order ``Engine._result`` reads it."""

    run: ForwardRun
    per_output: dict
    case_metrics: dict
    reference: dict | None
    evidence: compare.Evidence
    stats: dict
    nonfinite: dict | None
    save: object
    tiled: dict | None
    tiled_metrics: dict
    path_notes: list
    outputs_file: str | None
    inputs_file: str | None


class Engine:
    def __init__(self, subject: Subject, options: EngineOptions) -> None:
        self.subject = subject
        self.options = options
        self.golden_changes: list[GoldenChange] = []
        self._weights = _LRU(2)
        self._stressed = _LRU(1)
        self._inputs = _LRU(8)
        self._goldens = _LRU(8)
        # Built modules, shared by the cases that differ only in backend, guard or a profile that leaves the weights
        # alone (backends, guards and probes attach and detach; a forward leaves the module as it found it:
        # tests/test_module_cache.py). Cases run profile by profile, precisions within, backends innermost: a module
        # per precision for the base weights and one stressed set stays live; at real scale only on a device that
        # holds them (all precisions of the largest real block, WAN i2v, are ~8 GB of weights), else one.
        self._built: dict[str, _LRU] = {"tiny": _LRU(2 * len(PRECISIONS)), "real": _LRU(_real_builds_kept(options.device))}
        self.phases: dict[str, float] = {}  # the current case's seconds per phase (build, forward, golden, ...)
        self._reference: dict[tuple, dict | None] = {}
        self._partner: Subject | None = None
        self._identity: dict | None = None
        self._input_checks: dict[str, InputCheck] = {}
        self._golden_devices: dict[str, torch.device] = {}
        self.golden_seconds = 0.0  # float64 forwards spent creating or confirming goldens

    # -- shared fixtures -----------------------------------------------------------------------------------------
    def store_for(self, key: GoldenKey) -> GoldenStore:
        """Tiny goldens of an identity the repository holds (or is asked to hold, with --conformance-update-goldens) live in the
        committed store; everything else is created on demand in the local store."""
        committed = self.options.committed_store
        if key.scale == "tiny" and (self.options.update_goldens or committed.has_identity(key.subject, key.identity)):
            return committed
        return self.options.local_store

    def weights(self, component: str, scale: str, profile: str | None = None) -> dict[str, torch.Tensor]:
        """Synthetic weights of a component; with a profile, after that profile's weight stresses (if any)."""
        key = (component, scale)
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
        if key not in self._inputs:
            prof = component_profiles(component)[profile]
            built = self.subject.inputs(component, scale, prof, self.weights(component, scale, profile), self.options.seed)
            built.profile = profile
            self._inputs.put(key, built)
        return self._inputs[key]

    def identity(self) -> dict:
        """Which identity this run's goldens are keyed by, and how it was found (recorded in the run's report).

        The subject's own identity (version + commit, or version + source hash) where a store holds goldens of it;
        else the identity under which a store holds goldens of the same version and the same sources (a plain copy of
        a release finds the goldens made from its git checkout); else the subject's own, whose goldens are then
        created on demand."""
        if self._identity is None and self.options.identity is not None:
            self._identity = dict(self.options.identity)
        if self._identity is None:
            info = self.subject.info()
            natural = {"identity": info.identity, "natural": info.identity, "from": info.identity_source, "source_hash": info.source_hash}
            stores = (self.options.committed_store, self.options.local_store)
            resolved = natural
            if not self.options.update_goldens and not any(s.has_identity(self.subject.name, info.identity) for s in stores):
                for store in stores:
                    match = store.identity_with_sources(self.subject.name, info.version, info.source_hash)
                    if match:
                        resolved = {**natural, "identity": match, "from": f"source hash matches the goldens of {match} in the {store.label} store"}
                        break
            self._identity = resolved
        return self._identity

    def golden_key(self, component: str, scale: str, profile: str) -> GoldenKey:
        return GoldenKey(self.subject.name, self.identity()["identity"], component, scale, profile)

    def golden(self, component: str, scale: str, profile: str, wait: bool = True) -> Golden:
        """The golden of a component: loaded, or created once under the store's per-golden lock. A golden that
        appeared while this process waited for the lock is checked, never replaced: its outputs are recomputed from
        its stored inputs and must agree (``outputs_agree``), else ``GoldenConflict``. Without ``wait``, a golden
        another process is creating raises ``GoldenBusy``."""
        key = self.golden_key(component, scale, profile)
        if key.id in self._goldens:
            return self._goldens[key.id]
        store = self.store_for(key)
        weights_sha = tensor_digest(self.weights(component, scale, profile))
        command = self.options.golden_command(key)
        if not self.options.update_goldens:
            try:
                return self._goldens.put(key.id, store.load(key, weights_sha, command))
            except GoldenMissing:
                if store is not self.options.local_store:
                    raise
        with store.creating(key, on_wait=self.options.progress, wait=wait):
            try:
                existing = store.load(key, weights_sha, command)
            except GoldenMissing:
                existing = None
            except GoldenError:
                if not self.options.update_goldens:
                    raise
                existing = None
            if existing is not None and not self.options.update_goldens:
                if not self._made_by_this_run(existing):
                    self._confirm(existing, weights_sha)  # another process created it while this one waited
                return self._goldens.put(key.id, existing)
            golden = self._make_golden(key, store, existing, weights_sha, command)
        return self._goldens.put(key.id, golden)

    def golden_device(self, component: str) -> torch.device:
        """Where this run computes a component's float64 goldens: the run's CUDA device where the subject's float64
        forward has no float32 island another device may round differently (``conformance.islands``: a GPU-made golden
        then agrees with a CPU-made one within ``outputs_agree``, tests/test_goldens.py), else the CPU. Decided once
        per component, from a tiny forward."""
        if self.options.device.type != "cuda":
            return torch.device("cpu")
        if component not in self._golden_devices:
            islands = self.float32_islands(component)
            self._golden_devices[component] = torch.device("cpu") if islands else self.options.device
            if islands:
                self.options.progress(f"goldens of {component} on the CPU: its float64 forward rounds in float32 at {', '.join(islands)}")
        return self._golden_devices[component]

    def float32_islands(self, component: str) -> dict[str, int]:
        """The float32 ops of the component's float64 forward (tiny scale, nominal inputs, on the CPU) whose bits
        another device's kernels need not reproduce: ``"op (dtype)": count``."""
        return self.float32_ops(component).may_differ()

    def float32_ops(self, component: str) -> Islands:
        """Every low-precision op of the component's float64 forward (tiny scale, nominal inputs, on the CPU)."""
        inputs = self.inputs(component, "tiny", "nominal")  # built by the subject's embedders in float32: not the golden's
        mode = Islands()
        with mode:
            self.forward(component, "tiny", None, self.subject.golden_backend_for(component), inputs, device=torch.device("cpu"), probes=False)
        return mode

    def _golden_outputs(self, key: GoldenKey, inputs: ComponentInputs, why: str = "computing") -> dict[str, torch.Tensor]:
        backend = self.subject.golden_backend_for(key.component)
        device = self.golden_device(key.component)
        self.options.progress(f"{why} golden {key.id} in float64 on {device.type} ({backend} attention)")
        start = time.perf_counter()
        with _cuda_numerics(device, golden=True):
            run = self.forward(key.component, key.scale, None, backend, inputs, device=device, probes=False)
        outputs = {name: value.to("cpu") for name, value in run.outputs.items()}
        seconds = time.perf_counter() - start
        self.golden_seconds += seconds
        self.options.progress(f"golden {key.id}: {seconds:.1f} s")
        return outputs

    def _made_by_this_run(self, golden: Golden) -> bool:
        """A golden this run's prefetcher made while this process waited: the same code on the same CPU, so the
        recomputation ``_confirm`` would spend (seconds at real scale) could only find it equal."""
        return self.options.run_id is not None and golden.entry.get("run_id") == self.options.run_id

    def _confirm(self, golden: Golden, weights_sha: str) -> None:
        outputs = self._golden_outputs(golden.key, self._stored_inputs(golden), "another process created it; recomputing")
        agree, ulps = outputs_agree(golden.outputs, outputs)
        if not agree:
            raise GoldenConflict(
                f"golden {golden.key.id} was created by another process while this one waited, and this process "
                f"computes different outputs from the same stored inputs (worst, in float32 ulps: "
                f"{ {k: round(v, 1) for k, v in ulps.items()} }; made on {golden.entry.get('machine')}, here "
                f"{cpu_path()}): the two are not the same code or not the same float64 computation. Nothing was replaced."
            )
        self.golden_changes.append(GoldenChange(golden.key, golden.path, "confirmed", golden.sha256, golden.sha256, note="created by another process; recomputed here and equal within float64 noise"))

    def _make_golden(self, key: GoldenKey, store: GoldenStore, existing: Golden | None, weights_sha: str, command: str) -> Golden:
        built = self.inputs(key.component, key.scale, key.profile)
        inputs = built
        if existing is not None and not compare_inputs(existing.inputs.kwargs, built.kwargs, existing.inputs.outlier_channels).beyond_noise():
            # --conformance-update-goldens where the subject still builds the same inputs (within embedder noise): keep them, so
            # the golden's file only changes when its outputs do.
            inputs = self._stored_inputs(existing)
        elif existing is None:
            inputs = self._shared_inputs(key, built, weights_sha) or built
        outputs = self._golden_outputs(key, inputs)
        if existing is not None and inputs is not built and outputs_agree(existing.outputs, outputs)[0]:
            change = GoldenChange(key, existing.path, "unchanged", existing.sha256, existing.sha256, note="same inputs, outputs equal within float64 noise")
            self.golden_changes.append(change)
            self.options.progress(change.describe())
            return existing
        info = self.subject.info()
        meta = {
            "subject": {k: v for k, v in info.as_dict().items() if k != "path"},
            "torch": torch.__version__,
            "machine": cpu_path(),
            "seed": self.options.seed,
            "computed_in": f"float64 on {self.golden_device(key.component).type}",
            "stored_as": "float32",
            "backend": self.subject.golden_backend_for(key.component),
            "weights_sha256": weights_sha,
            **({"run_id": self.options.run_id} if self.options.run_id else {}),
        }
        change = store.write(key, outputs, inputs.kwargs, inputs.sizes, inputs.outlier_channels, meta, replace=self.options.update_goldens)
        self.golden_changes.append(change)
        self.options.progress(change.describe())
        return store.load(key, weights_sha, command)

    def _shared_inputs(self, key: GoldenKey, built: ComponentInputs, weights_sha: str) -> ComponentInputs | None:
        """The stored inputs of the same component at another identity, when the subject builds the same inputs
        within embedder noise: a new golden then shares them bit for bit, so the gate compares two identities' outputs
        on identical inputs (their inputs differ only where the subject builds them differently)."""
        for store in (self.options.committed_store, self.options.local_store):
            for sibling in store.siblings(key):
                try:
                    other = store.load(sibling, weights_sha, "")
                except GoldenError:
                    continue
                if not compare_inputs(other.inputs.kwargs, built.kwargs, other.inputs.outlier_channels).beyond_noise():
                    self.options.progress(f"{key.id}: the subject builds the inputs of {sibling.id} (within embedder noise); sharing them")
                    return self._stored_inputs(other)
        return None

    def _stored_inputs(self, golden: Golden) -> ComponentInputs:
        """A golden's stored inputs, as the component inputs every case of it runs on."""
        stored = golden.inputs
        return ComponentInputs(kwargs=stored.kwargs, sizes=dict(stored.sizes), profile=golden.key.profile, outlier_channels=stored.outlier_channels)

    def input_check(self, golden: Golden) -> InputCheck:
        """The inputs the subject builds on this machine against the golden's stored ones (cached per golden)."""
        if golden.key.id not in self._input_checks:
            built = self.inputs(golden.key.component, golden.key.scale, golden.key.profile)
            self._input_checks[golden.key.id] = compare_inputs(golden.inputs.kwargs, built.kwargs, golden.inputs.outlier_channels)
        return self._input_checks[golden.key.id]

    # -- one forward ---------------------------------------------------------------------------------------------
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
            with torch.no_grad(), _cuda_numerics(device), subject.use_backend(built.module, backend, counter, path=path, component=component) as prepare:
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
        cache = self._built["tiny" if scale == "tiny" else "real"]
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

    def _other_paths_agree(self, case: Case, precision: Precision, inputs: ComponentInputs, outputs: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """In fp32, every other way the subject offers to force the backend must give the same bits."""
        paths = self.subject.backend_paths(case.component, case.backend)
        failures, notes = [], []
        if precision.name != "fp32" or len(paths) < 2:
            return failures, notes
        for path in paths[1:]:
            other = self.forward(case.component, case.scale, precision, case.backend, inputs, probes=False, path=path)
            diffs = {name: float((other.outputs[name].double() - outputs[name].double()).abs().max()) for name in outputs}
            equal = all(torch.equal(other.outputs[name], outputs[name]) for name in outputs)
            calls = other.calls.as_dict()
            if not equal:
                failures.append(f"backend path {path} differs from {paths[0]} in fp32 (max |diff| {diffs})")
            elif not all(calls.get(k, 0) for k in self.subject.expected_kernels(case.backend, precision, case.component)):
                failures.append(f"backend path {path} never ran the backend (calls: {calls})")
            else:
                notes.append(f"{path} path: bitwise equal to {paths[0]} (calls {calls})")
        return failures, notes

    # -- one case ------------------------------------------------------------------------------------------------
    def _compare(self, case: Case, golden: Golden, outputs: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        missing = sorted(set(outputs) - set(golden.outputs))
        if missing:
            raise KeyError(f"golden {golden.key.id} has no output {missing} (it has {sorted(golden.outputs)})")
        return self._metrics_by_output(case, golden.outputs, outputs)

    def _tiled_evidence(
        self, case: Case, full: Mapping[str, torch.Tensor], tiled: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict | None, dict[str, dict[str, float]]]:
        """The subject's tiled decode against its own full decode, same precision: shapes, non-finite values the
        tiling added, and the difference (not a rounding comparison: tiles see less context, see budgets.toml)."""
        if tiled is None:
            return None, {}
        shapes = {name: (list(full[name].shape), list(tiled[name].shape)) for name in full}
        nonfinite = {name: (int((~torch.isfinite(full[name])).sum()), int((~torch.isfinite(tiled[name])).sum())) for name in full}
        same_shape = all(a == b for a, b in shapes.values())
        per_output = self._metrics_by_output(case, full, tiled) if same_shape else {}
        evidence = {
            "budget": compare.tiling_budget(),
            "metrics": compare.worst(per_output) if per_output else {},
            "shapes": {name: {"full": a, "tiled": b} for name, (a, b) in shapes.items()},
            "nonfinite": {name: {"full": a, "tiled": b} for name, (a, b) in nonfinite.items()},
        }
        return evidence, per_output

    def _metrics_by_output(
        self, case: Case, expected_outputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
    ) -> dict[str, dict[str, float]]:
        per_output: dict[str, dict[str, float]] = {}
        outliers = self.output_outlier_channels(case, outputs)
        for name, actual in outputs.items():
            expected = expected_outputs[name].to("cpu")
            per_output[name] = compare.metrics(expected, actual)
            outlier_channels = outliers.get(name)
            if outlier_channels:
                # With a few channels at 1e4+, the whole-tensor error is their rounding; judge the rest on its own too.
                keep = torch.ones(expected.shape[-1], dtype=torch.bool)
                keep[outlier_channels] = False
                per_output[f"{name}/bulk"] = compare.metrics(expected[..., keep], actual[..., keep.to(actual.device)])
        return per_output

    @staticmethod
    def output_outlier_channels(case: Case, outputs: Mapping[str, object]) -> dict[str, list[int]]:
        """Per output, the channels its profile holds at massive values (judged apart from the bulk)."""
        family = component_family(case.component)
        profile = component_profiles(case.component)[case.profile]
        out = {}
        for name in outputs:
            stream = family.output_streams.get(name)
            channels = sorted({c for o in profile.outliers if o.stream == stream for c in o.channels})
            if channels:
                out[name] = channels
        return out

    def reference_metrics(self, case: Case, golden: Golden) -> dict | None:
        """Metrics of the same case under the reference backend (cached): what the backend rule compares with."""
        ref = self.subject.reference_backend
        key = (case.component, case.scale, case.precision, case.profile, case.guard)
        if key not in self._reference:
            if not self.subject.backend_support(ref, self.options.device, case.component).available:
                self._reference[key] = None
            else:
                run = self.forward(
                    case.component, case.scale, family_precision(case.precision, case.family), ref,
                    self._stored_inputs(golden), probes=False, guard=case.guard,
                )  # fmt: skip
                self._reference[key] = {"backend": ref, "metrics": compare.worst(self._compare(case, golden, run.outputs))}
        return self._reference[key]

    def _save_outputs(self, case: Case, outputs: Mapping[str, torch.Tensor]) -> Path | None:
        if self.options.outputs_dir is None:
            return None
        from safetensors.torch import save_file

        self.options.outputs_dir.mkdir(parents=True, exist_ok=True)
        path = self.options.outputs_dir / f"{case.id}.safetensors"
        save_file({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in outputs.items()}, str(path))
        return path

    def _save_inputs(self, golden: Golden) -> str | None:
        """With --save-outputs, the stored inputs the cases ran on, once per set of inputs (the gate compares the two
        sides' inputs where they differ)."""
        if self.options.outputs_dir is None:
            return None
        from .inputs import pack

        path = self.options.outputs_dir / "inputs" / f"{golden.inputs.sha256}.safetensors"
        if not path.exists():
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tensors, _ = pack(golden.inputs.kwargs)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)
        return str(path.relative_to(self.options.outputs_dir))

    def partner(self) -> Subject:
        if self._partner is None:
            from .subjects import load_subject

            self._partner = load_subject(self.subject.xcheck_partner, device=self.options.device)
        return self._partner

    def run_xcheck(self, case: Case) -> CaseResult:
        """The same weights and the same inputs through this subject's block and the partner's, both in fp32."""
        start = time.perf_counter()
        partner = self.partner()
        family = get_family(case.family)
        convert = family.xcheck_inputs[(self.subject.name, partner.name)]
        precision = get_precision("fp32")
        inputs = self.inputs(case.component, case.scale, case.profile)
        ours = self.forward(case.component, case.scale, precision, self.subject.reference_backend, inputs, probes=False)
        partner_inputs = ComponentInputs(
            kwargs=convert(case.component, inputs.kwargs, inputs.sizes["text_tokens"]), sizes=dict(inputs.sizes), profile=inputs.profile
        )
        theirs = self.forward(case.component, case.scale, precision, partner.reference_backend, partner_inputs, probes=False, subject=partner)
        per_output = self._metrics_by_output(case, theirs.outputs, ours.outputs)
        case_metrics = compare.worst(per_output)
        verdict = compare.judge_xcheck(per_output, compare.xcheck_budget(), ours.calls.as_dict(), theirs.calls.as_dict())
        partner_info = partner.info()
        # Not judged, reported: how our inputs differ from the ones the partner builds itself from the same profile.
        own = partner.inputs(case.component, case.scale, component_profiles(case.component)[case.profile], self.weights(case.component, case.scale, case.profile), self.options.seed)
        input_diffs = _input_differences(partner_inputs.kwargs, own.kwargs)
        return CaseResult(
            case,
            verdict.outcome,
            reason=verdict.reason,
            metrics=case_metrics,
            metrics_by_output=per_output,
            reference={"subject": partner_info.as_dict(), "backend": partner.reference_backend, "inputs_vs_own": input_diffs},
            backend_calls={**ours.calls.as_dict(), **{f"{partner.name}/{k}": v for k, v in theirs.calls.as_dict().items()}},
            seconds=time.perf_counter() - start,
            forward_seconds=ours.seconds,
            failures=verdict.messages,
            failure_kinds=[f.as_dict() for f in verdict.failures],
            notes=[
                f"{self.subject.name} ({self.subject.reference_backend}) against {partner.name} {partner_info.version} "
                f"({partner.reference_backend}), same weights and inputs, fp32",
                f"inputs against those {partner.name} builds itself (rel-L2, not judged): "
                + ", ".join(f"{k} {v:.2g}" for k, v in input_diffs.items()),
            ],
            sizes=dict(inputs.sizes),
        )

    def run(self, case: Case) -> CaseResult:
        if case.backend == XCHECK:
            return self.run_xcheck(case)
        start = time.perf_counter()
        self.phases = {}
        precision = family_precision(case.precision, case.family)
        vae = is_vae(case.component)
        budget = compare.budget_for(case.precision, kind="vae" if vae else None, profile=case.profile)
        declared = expected_failure_for(case, self.options.expected_failures, self.subject.info().version)
        try:
            golden = self.golden(case.component, case.scale, case.profile)
        except GoldenError as error:
            return CaseResult(case, "failed", reason=str(error), failures=[str(error)], seconds=time.perf_counter() - start)
        # A golden created here ran its own float64 forward: all of it is the golden's time, none of it the case's.
        self.phases = {"golden": time.perf_counter() - start}
        inputs = self._stored_inputs(golden)
        mark = time.perf_counter()
        input_check = self.input_check(golden)
        self._add_phase("capture", mark)
        gathered = self._evidence(case, precision, golden, inputs, input_check)
        verdict = compare.judge(gathered.evidence, budget, declared)
        return self._result(case, gathered, verdict, golden, inputs, input_check, budget, declared, start)

    def _evidence(self, case: Case, precision, golden: Golden, inputs: ComponentInputs, input_check: InputCheck) -> "_Gathered":
        """Everything the verdict is judged on: the case's forward (and its other backend paths, its tiled decode),
        the comparison with the golden and the reference backend, the probes' first bad values, the save stage."""
        vae = is_vae(case.component)
        paths = self.subject.backend_paths(case.component, case.backend)
        run = self.forward(case.component, case.scale, precision, case.backend, inputs, path=paths[0], tiled=vae, guard=case.guard)
        path_failures, path_notes = self._other_paths_agree(case, precision, inputs, run.outputs)
        mark = time.perf_counter()
        per_output = self._compare(case, golden, run.outputs)
        case_metrics = compare.worst(per_output)
        self._add_phase("compare", mark)
        outputs_file = self._save_outputs(case, run.outputs)
        inputs_file = self._save_inputs(golden)
        if case.backend == self.subject.reference_backend:
            reference = None
            self._reference[(case.component, case.scale, case.precision, case.profile, case.guard)] = {
                "backend": case.backend,
                "metrics": case_metrics,
            }
        else:
            reference = self.reference_metrics(case, golden)
        save = save_like_comfyui(run.outputs["pixels"]) if vae else None
        tiled, tiled_metrics = self._tiled_evidence(case, run.outputs, run.tiled_outputs)
        nonfinite = first_nonfinite(run.records)
        output_nonfinite = sum(int((~torch.isfinite(t)).sum()) for t in run.outputs.values())
        saturated = first_saturated(run.records)
        stats = summarize(run.records)
        evidence = compare.Evidence(
            precision=case.precision,
            backend=case.backend,
            reference_backend=self.subject.reference_backend,
            metrics=case_metrics,
            reference_metrics=reference["metrics"] if reference else None,
            first_nonfinite=nonfinite,
            output_nonfinite=output_nonfinite,
            saturated=None
            if saturated is None
            else {"boundary": saturated.boundary, "module": saturated.module, "tensor": saturated.tensor, "count": saturated.saturated, "dtype": saturated.dtype},
            saturated_total=stats["saturated"],
            backend_calls=run.calls.as_dict(),
            expected_kernels=self.subject.expected_kernels(case.backend, precision, case.component),
            fallbacks=tuple(run.calls.fallbacks),
            expectation=self.options.ratchet.get(case.id),
            masked_by_guard=bool(nonfinite and not output_nonfinite and (run.guard_note or run.guard)),
            guard=case.guard,
            consistency_failures=tuple(path_failures),
            input_failure=input_check.failure(),
            save_stage=save.as_dict() if save else None,
            tiled=tiled,
        )
        return _Gathered(run, per_output, case_metrics, reference, evidence, stats, nonfinite, save, tiled, tiled_metrics, path_notes, outputs_file, inputs_file)

    def _result(self, case: Case, gathered: "_Gathered", verdict, golden: Golden, inputs: ComponentInputs, input_check: InputCheck, budget, declared, start: float) -> CaseResult:
        """The case's result record: the verdict with its numbers, the notes a reader needs, the golden's report."""
        run, per_output, case_metrics, reference, evidence = gathered.run, gathered.per_output, gathered.case_metrics, gathered.reference, gathered.evidence
        stats, nonfinite, save, tiled, tiled_metrics = gathered.stats, gathered.nonfinite, gathered.save, gathered.tiled, gathered.tiled_metrics
        path_notes, outputs_file, inputs_file = gathered.path_notes, gathered.outputs_file, gathered.inputs_file
        notes = list(run.notes) + path_notes + verdict.notes
        if run.guard_note:
            notes.append(f"subject guard: {run.guard_note}")
        if run.guard is not None:
            policy = get_policy(case.guard)
            touched = run.guard.total()
            stats["guard"] = {"name": case.guard, "touched": touched, "touched_means": policy.touched_means, "description": policy.description}
            notes.append(f"guard {case.guard}: {policy.description}; touched {touched} ({policy.touched_means})")
            notes.extend(f"guard {case.guard}: {n}" for n in run.guard.notes)
        if nonfinite:
            nonfinite = {**nonfinite, "entered": nonfinite["module"] == "input", "masked_by_guard": evidence.masked_by_guard}
        if outputs_file:
            notes.append(f"outputs saved to {outputs_file}")
        if save is not None:
            stats["save_stage"] = save.as_dict()
        if tiled is not None:
            per_output.update({f"tiled_vs_full/{k}": v for k, v in tiled_metrics.items()})
            stats["tiled"] = tiled
            if tiled["metrics"]:
                notes.append(f"tiled decode vs full decode: rel_l2 {tiled['metrics']['rel_l2']:.3g} (budget {tiled['budget']:.3g})")
        golden_report = golden.as_report()
        golden_report["inputs_check"] = input_check.as_dict()
        if not input_check.identical:
            worst_input = input_check.worst()
            notes.append(
                f"inputs built here differ from the golden's stored ones by rel-L2 {_fmt(worst_input['rel_l2'])} at "
                f"{worst_input.get('rel_l2_at')} (the case ran on the stored inputs)"
            )
        golden_report["created_this_run"] = any(c.key == golden.key and c.action in ("created", "updated") for c in self.golden_changes)
        return CaseResult(
            case,
            verdict.outcome,
            reason=verdict.reason,
            metrics=case_metrics,
            metrics_by_output=per_output,
            reference=reference,
            stats=stats,
            first_nonfinite=nonfinite,
            backend_calls=run.calls.as_dict(),
            golden=golden_report,
            seconds=time.perf_counter() - start,
            forward_seconds=run.seconds,
            budget={k: v for k, v in asdict(budget).items() if k != "provenance"},
            failures=verdict.messages,
            failure_kinds=[f.as_dict() for f in verdict.failures],
            expected_failure=declared.as_dict() if declared else None,
            inputs={
                "sha256": golden.inputs.sha256,
                "outlier_channels": golden.inputs.outlier_channels,
                "output_outlier_channels": self.output_outlier_channels(case, run.outputs),
                "file": inputs_file,
            },
            notes=notes,
            boundaries=[r.as_dict() for r in run.records],
            sizes=dict(inputs.sizes),
            phases=self._phases_of(start),
        )

    def _phases_of(self, start: float) -> dict[str, float]:
        """The case's seconds per phase; ``other`` is the rest (the verdict, saving, the report's record, Python)."""
        phases = dict(self.phases)
        phases["other"] = max(0.0, time.perf_counter() - start - sum(phases.values()))
        return phases


def _input_differences(ours: Mapping[str, object], theirs: Mapping[str, object]) -> dict[str, float]:
    """rel-L2 of each tensor input (complex as real pairs, tuples concatenated) where both sides have it."""
    from .goldens import flatten_tensors

    a, b = flatten_tensors(ours), flatten_tensors(theirs)
    out = {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.is_floating_point():
            out[name] = compare.metrics(y, x)["rel_l2"]
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
