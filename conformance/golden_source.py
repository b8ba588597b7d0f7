"""The engine's goldens: which identity a run's goldens are keyed by, and each golden loaded, or created once under
its store's lock, or confirmed when another process created it meanwhile; the inputs the subject builds here checked
against a golden's stored ones.

``GoldenSource`` is one half of ``runner.Engine``: it reads ``self.subject`` and ``self.options``
(``runner.EngineOptions``) and runs its float64 forwards through ``forward.ForwardRunner``.
"""

from __future__ import annotations

import time

import torch

from .captures import captured
from .scales import WEIGHTS_TAG, case_scale, file_scale
from .forward import _LRU, cuda_numerics
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
from .machine import cpu_path
from .subjects.base import ComponentInputs


class GoldenSource:
    """Goldens of the run's subject, with their caches."""

    def init_goldens(self) -> None:
        self.golden_changes: list[GoldenChange] = []
        self._goldens = _LRU(8)
        self._identity: dict | None = None
        self._file_digests: dict[tuple[str, str, str], str] = {}
        self._input_checks: dict[str, InputCheck] = {}
        self._golden_devices: dict[str, torch.device] = {}
        self.golden_seconds = 0.0  # float64 forwards spent creating or confirming goldens

    def store_for(self, key: GoldenKey) -> GoldenStore:
        """Tiny goldens of an identity the repository holds (or is asked to hold, with --conformance-update-goldens) live in the
        committed store; everything else (real scale, a checkpoint's blocks, a capture's inputs) is created on demand in
        the local store."""
        committed = self.options.committed_store
        if key.scale == "tiny" and not captured(key.profile) and (self.options.update_goldens or committed.has_identity(key.subject, key.identity)):
            return committed
        return self.options.local_store

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
        """A block of a file (``--weights``) is keyed by its weights too (``<scale>+w<digest>``): two files with one
        header (two fine-tunes saved by one tool) have the same scale name, not the same goldens."""
        if file_scale(scale):
            scale = f"{scale}{WEIGHTS_TAG}{self._weights_sha(component, scale, profile)[:8]}"
        return GoldenKey(self.subject.name, self.identity()["identity"], component, scale, profile)

    def _weights_sha(self, component: str, scale: str, profile: str) -> str:
        """The digest goldens record of the weights they were made from; a file block's (hundreds of MB at real size)
        computed once, since its golden key carries it too."""
        if not file_scale(scale):
            return tensor_digest(self.weights(component, scale, profile))
        key = (component, scale, profile)
        if key not in self._file_digests:
            self._file_digests[key] = tensor_digest(self.weights(component, scale, profile))
        return self._file_digests[key]

    def golden(self, component: str, scale: str, profile: str, wait: bool = True) -> Golden:
        """The golden of a component: loaded, or created once under the store's per-golden lock. A golden that
        appeared while this process waited for the lock is checked, never replaced: its outputs are recomputed from
        its stored inputs and must agree (``outputs_agree``), else ``GoldenConflict``. Without ``wait``, a golden
        another process is creating raises ``GoldenBusy``."""
        key = self.golden_key(component, scale, profile)
        if key.id in self._goldens:
            return self._goldens[key.id]
        store = self.store_for(key)
        weights_sha = self._weights_sha(component, scale, profile)
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
        with cuda_numerics(device, golden=True):
            run = self.forward(key.component, case_scale(key.scale), None, backend, inputs, device=device, probes=False)
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
        built = self.inputs(key.component, case_scale(key.scale), key.profile)
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
            built = self.inputs(golden.key.component, case_scale(golden.key.scale), golden.key.profile)
            self._input_checks[golden.key.id] = compare_inputs(golden.inputs.kwargs, built.kwargs, golden.inputs.outlier_channels)
        return self._input_checks[golden.key.id]

