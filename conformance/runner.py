"""The engine: runs one case from fixtures to verdict, and keeps what cases share (weights, inputs, goldens).

Data flows one way: synthetic weights and the profile -> the subject builds the component in the case's precision and
captures its inputs -> probes watch the forward under the forced backend -> outputs are compared with the golden ->
the verdict (``compare.judge``) -> a ``CaseResult``. The forwards and their caches are ``forward.ForwardRunner``'s,
the goldens ``golden_source.GoldenSource``'s; this module judges a case from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import compare
from .backends import XCHECK
from .boundaries import first_nonfinite, first_saturated, summarize
from .case import Case
from .checkpoints.cases import AS_STORED_NOTE, describe_scale
from .expectations import ExpectedFailure, expected_failure_for
from .families import component_family, component_profiles, family_precision, get_family, is_vae
from .forward import ForwardRun, ForwardRunner
from .golden_source import GoldenSource
from .goldens import Golden, GoldenError, GoldenKey, GoldenStore
from .guards import get_policy
from .inputs import InputCheck
from .precision import Precision, get_precision
from .results import CaseResult
from .save_stage import save_like_comfyui
from .subjects.base import ComponentInputs, Subject


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
    patch_specs: Mapping[str, str] = field(default_factory=dict)  # whole-model cases: patch name -> module:callable


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


class Engine(ForwardRunner, GoldenSource):
    def __init__(self, subject: Subject, options: EngineOptions) -> None:
        self.subject = subject
        self.options = options
        self.init_forwards()
        self.init_goldens()
        self._reference: dict[tuple, dict | None] = {}
        self._partner: Subject | None = None
        self._sequences = None

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

    def sequences(self):
        """The whole-model cases' runner (``conformance.workloads.cases``), made on first use."""
        if self._sequences is None:
            from .workloads.cases import SequenceRunner

            models, worker = self.subject.whole_models()
            self._sequences = SequenceRunner(models, worker, dict(self.options.patch_specs))
        return self._sequences

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
        if case.kind == "sequence":
            return self.sequences().run(case)
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
        weights = describe_scale(case.scale, case.component)
        if weights is not None:  # a block of a checkpoint file (--weights)
            weights["as_stored"] = any(n.startswith(AS_STORED_NOTE) for n in run.notes)  # what this build loaded
            stats["weights"] = weights
            notes.insert(0, f"block {weights['block']} of {weights['file']} ({weights['variant']}, {weights['format']})")
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


