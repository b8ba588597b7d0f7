"""Whole-model cases: the matrix rows of the sequences and their verdicts.

A case is ``<family>.model`` in one precision under the subject's reference backend, after one sequence, with or
without a patch. Its verdict:

* **state leak** (failed) when the target's sampled latent is not bit-for-bit the one a fresh worker process samples
  with the same spec: the reason gives how far apart, and what differed in the process state as the target started
  (this process's snapshot against the worker's);
* **non-finite** (failed) when a value went bad at any step: the first step, block, module and tensor;
* **patch budget** (failed) for a patched ``isolated`` case whose latent sits farther from the unpatched run's than
  the patch's declared ``BUDGET_REL_L2``;
* **kernel not run** (failed) when the backend's function was never called;
* **nondeterministic** (failed) instead of state leak when the latents differ and torch reported ops it has no
  deterministic kernel for (``workloads.determinism``), in this run or the fresh worker's: the bits cannot tell a leak
  from those ops' noise, and the reason names the ops.
"""

from __future__ import annotations

import time

import torch

from ..case import Case
from ..compare import Failure
from ..results import CaseResult
from .base import WholeModels
from .patches import Patch, PatchError, load_patch
from .lifecycle import judged, leftover, mib, not_judged_reason
from .sequences import FRESH, REPEAT, SEED_ROWS, SEQUENCES, TARGET, RunSpec, compare_bits, describe, run_sequence, run_worker
from .state import differences

COMPONENT = f"{TARGET}.model"
PRECISIONS = ("fp32", "bf16", "fp16")


def sequence_cases(subject: str, backend: str, patches: tuple[str, ...]) -> list[Case]:
    cases = []
    for patch in ("none", *patches):
        for precision in PRECISIONS:
            for sequence in SEQUENCES:
                if sequence == REPEAT and patch != "none":
                    continue
                cases.append(Case(subject, TARGET, COMPONENT, "tiny", precision, backend, "nominal", sequence=sequence, patch=patch))
    return cases


class SequenceRunner:
    """Runs whole-model cases for one subject; keeps the fresh-worker references and the loaded patches."""

    def __init__(self, models: WholeModels, worker: list[str], patch_specs: dict[str, str]) -> None:
        self.models = models
        self.worker = worker
        self.patch_specs = patch_specs  # case patch name -> module:callable
        self._patches: dict[str, Patch] = {}
        self._references: dict[RunSpec, tuple[torch.Tensor, dict[str, str], list[str], float]] = {}
        self.device = getattr(models, "device", torch.device("cpu"))
        self.runs_done = 0  # whole-model runs of this process: the first may leave workspaces behind (lifecycle)

    def patch(self, name: str) -> Patch | None:
        if name == "none":
            return None
        if name not in self._patches:
            self._patches[name] = load_patch(self.patch_specs.get(name, name))
        return self._patches[name]

    def reference(self, spec: RunSpec) -> tuple[torch.Tensor, dict[str, str], list[str], float]:
        """The target sampled in a fresh worker: latent, process state, nondeterministic ops, seconds."""
        if spec not in self._references:
            start = time.perf_counter()
            latent, state, alerts = run_worker(self.worker, spec)
            self._references[spec] = (latent, state, alerts, time.perf_counter() - start)
        return self._references[spec]

    def unsupported(self, case: Case) -> str | None:
        if case.sequence == REPEAT and not judged(self.device):
            return not_judged_reason(self.device)
        try:
            patch = self.patch(case.patch)
        except PatchError as error:
            return str(error)
        if patch is None:
            return None
        handle = self.models.build(TARGET, torch.float32, 0)
        return patch.unsupported(handle)

    def run(self, case: Case) -> CaseResult:
        start = time.perf_counter()
        reason = self.unsupported(case)
        if reason:
            label = "lifecycle" if case.sequence == REPEAT else f"patch {case.patch}"
            return CaseResult(case, "skipped", reason=f"{label}: {reason}", seconds=time.perf_counter() - start)
        spec = RunSpec(case.precision, case.backend, self.patch(case.patch))
        reference, reference_state, reference_alerts, reference_seconds = self.reference(spec)
        run = run_sequence(self.models, case.sequence, spec, self.worker)
        bits = compare_bits(reference, run.latent)
        failures: list[Failure] = []
        notes = [f"seed row {SEED_ROWS[case.sequence]}; {spec.steps} euler steps, cfg 2, {self.models.subject} {self.models.version} model management and sampler"]
        notes += self.models.notes
        state_vs_fresh = differences(reference_state, run.state_at_target)
        nondeterministic = list(dict.fromkeys(run.nondeterministic + reference_alerts))
        if not bits["bit_equal"]:
            differs = (
                f"{TARGET} after {case.sequence} differs from {TARGET} in a fresh worker process: {bits['differing']} values, "
                f"max |diff| {bits['max_abs_diff']:.3g}, rel-L2 {bits['rel_l2']:.3g}"
            )
            if nondeterministic:
                failures.append(Failure(
                    "nondeterministic",
                    f"{differs}; torch has no deterministic kernel for {', '.join(nondeterministic)}, which ran: the bits cannot "
                    "tell a state leak from that op's noise",
                    at=nondeterministic[0], metric="rel_l2", value=bits["rel_l2"],
                ))  # fmt: skip
            else:
                where = "; ".join(state_vs_fresh[:6]) or "no watched global differs (the leak is elsewhere: cached tensors inside objects, C-level state)"
                failures.append(Failure(
                    "state_leak", f"{differs}; this process differs from the fresh one as {TARGET} starts in: {where}",
                    at=state_vs_fresh[0].split(":")[0] if state_vs_fresh else None, metric="rel_l2", value=bits["rel_l2"],
                ))  # fmt: skip
        else:
            if state_vs_fresh:
                notes.append("process state differs from a fresh worker's, outputs equal: " + "; ".join(state_vs_fresh[:6]))
            if nondeterministic:
                notes.append(f"outputs equal, although torch has no deterministic kernel for {', '.join(nondeterministic)}")
        if run.first_bad is not None:
            bad = run.first_bad
            failures.append(Failure(
                "nonfinite",
                f"first non-finite value at step {bad['step']}, {bad['block'] or 'outside the blocks'}, {bad['in_block'] or bad['module']} "
                f"({bad['tensor']}: {bad['count']} values, {bad['nan']} NaN, {bad['dtype']})",
                at=bad["module"],
            ))  # fmt: skip
        expected = self.models.expected_kernels(case.backend)[:1]
        if case.sequence != FRESH and expected and not run.calls.as_dict().get(expected[0]):
            failures.append(Failure("kernel_not_run", f"{expected[0]} was never called (calls: {run.calls.as_dict()})", metric="calls"))
        failures += self._memory_failures(case, run)
        if run.target_memory and run.target_memory[0].allocated is not None:
            notes.append(f"{TARGET} memory, allocated / reserved / largest free block: " + "; ".join(
                f"{p.label} {mib(p.allocated)} / {mib(p.reserved)} / {mib(p.largest_free_block)}" for p in run.target_memory
            ))  # fmt: skip
        self.runs_done += 1 + len(run.ran) + len(run.repeats)
        metrics = {"rel_l2": bits["rel_l2"], "max_abs": bits["max_abs_diff"], "differing": bits["differing"]}
        budget = None
        if spec.patch is not None and case.sequence == "isolated":
            plain, *_ = self.reference(RunSpec(case.precision, case.backend))
            against_plain = compare_bits(plain, run.latent)
            metrics["rel_l2_vs_unpatched"] = against_plain["rel_l2"]
            if spec.patch.budget_rel_l2 is not None:
                budget = {"rel_l2": spec.patch.budget_rel_l2, "against": "the unpatched run (fresh worker)"}
                if not against_plain["rel_l2"] <= spec.patch.budget_rel_l2:
                    failures.append(Failure(
                        "patch_budget",
                        f"patch {case.patch}: rel-L2 {against_plain['rel_l2']:.3g} against the unpatched run, budget {spec.patch.budget_rel_l2:.3g}",
                        metric="rel_l2_vs_unpatched", value=against_plain["rel_l2"],
                    ))  # fmt: skip
            notes.append(f"patch {case.patch}: rel-L2 {against_plain['rel_l2']:.3g} against the unpatched run")
        outcome = "failed" if failures else "passed"
        reason = failures[0].message if failures else f"bit for bit equal to {TARGET} in a fresh worker process"
        return CaseResult(
            case,
            outcome,
            reason=reason,
            metrics=metrics,
            stats={**run.summary, "sequence": describe(run), "state_vs_fresh": state_vs_fresh, "reference_seconds": round(reference_seconds, 3)},
            first_nonfinite=run.first_bad,
            backend_calls=run.calls.as_dict(),
            budget=budget,
            seconds=time.perf_counter() - start,
            forward_seconds=run.target_seconds,
            failures=[f.message for f in failures],
            failure_kinds=[f.as_dict() for f in failures],
            notes=notes,
        )

    def _memory_failures(self, case: Case, run) -> list[Failure]:
        """The lifecycle rules on CUDA (``workloads.lifecycle``): nothing left allocated after unload, from the
        process's second whole-model run on; no growth over the repeated runs."""
        if not judged(self.device) or case.sequence == FRESH:
            return []
        failures = []
        left = leftover(run.target_memory)
        if self.runs_done + len(run.ran) > 0 and left:
            failures.append(Failure("memory_leftover", f"{TARGET}: {mib(left)} still allocated after {self.models.subject} unloaded it ({left} bytes)", metric="allocated", value=left))
        if run.repeats:
            baseline = run.target_memory[-1].allocated
            after = [points[-1].allocated for points in run.repeats]
            worst = max(after)
            if worst > baseline:
                grown_at = after.index(worst) + 2
                failures.append(Failure(
                    "memory_growth", f"allocated after unload grew by {mib(worst - baseline)} over {len(after) + 1} runs (first at run {grown_at})",
                    metric="allocated", value=worst - baseline,
                ))  # fmt: skip
        return failures
