"""The suite's run-wide state and hooks, once a pytest run asks for the suite (``conformance.plugin.activate``):
markers, the case matrix, running cases and the report hooks. Lives on ``config.stash``.

Results travel through pytest's own reports, so that one process and many (pytest-xdist) write the same reports:
the process that ran a case attaches its result to the test report (``report.conformance``, a JSON-able dict);
``pytest_runtest_logreport`` in the process that writes the reports (the only process, or the xdist controller)
receives it, appends it to ``results.jsonl`` at once (an interrupted run keeps what finished) and keeps it for
results.json, summary.md, junit.xml and report.html at the end.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import functools
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from .backends import BACKENDS, XCHECK
from .case import Case
from .families import FAMILIES
from .guards import GUARD_NAMES
from .captures import captured
from .axes import SCALES, SUBJECTS
from .machine import align_onednn_isa
from .matrix import build_matrix
from .paths import DEFAULT_REPORT_DIR, EXPECTED_FAILURES_FILE, GOLDEN_DIR, local_golden_store
from .options import SESSION, UsageError, option
from .precision import PRECISIONS
from .progress import Progress
from .results import CaseResult
from .scales import case_scale, file_scale
from .rundir import JSONL_FILE
from .tiers import in_tier

PRECISION_MARKERS = tuple(dict.fromkeys(p.marker for p in PRECISIONS.values()))
VARIANT_MARKERS = tuple(p.name for p in PRECISIONS.values() if p.name != p.marker)  # fp8_e4m3, fp8_scaled, ...
GUARDS = GUARD_NAMES
OTHER_MARKERS = {
    "vae": "VAE decoder cases",
    "gpu": "needs a CUDA device",
    "real": "real-dimension cases (--scale real)",
    "checkpoint": "cases on the blocks of a checkpoint file (--weights PATH)",
    "guard": "cases run under a guard policy",
    "sequence": "whole tiny models after a sequence of other families in one process (conformance.workloads)",
    "patch": "whole-model cases with a third-party patch installed (--conformance-patch, fixtures/patches/)",
    "lifecycle": "repeated and mixed-model runs in one process",
    "bench": "benchmarks (pytest-benchmark); not part of the default run",
    XCHECK: "cross-implementation check: same weights and inputs through two subjects' components, fp32",
    "conformance(kind)": "a test that takes the `case` fixture; kind is 'block', 'vae' or 'sequence'",
    "xdist_group(name)": "pytest-xdist --dist loadgroup: cases that share a golden run in one worker",
}


def start(config: pytest.Config) -> ConformanceSession:
    """The suite's state for this run: markers registered, options validated, the session on ``config.stash``."""
    align_onednn_isa()  # before torch runs a bf16 kernel (conformance.machine)
    for family in FAMILIES:
        config.addinivalue_line("markers", f"{family}: {family} components")
        for marker in PRECISION_MARKERS + VARIANT_MARKERS:
            config.addinivalue_line("markers", f"{family}_{marker}: {family} components in {marker}")
    for marker in PRECISION_MARKERS:
        config.addinivalue_line("markers", f"{marker}: cases in {marker}")
    for name in VARIANT_MARKERS:
        config.addinivalue_line("markers", f"{name}: cases in the {name} variant of {PRECISIONS[name].marker} ({PRECISIONS[name].description})")
    for backend in BACKENDS.values():
        config.addinivalue_line("markers", f"{backend.name}: attention backend {backend.name} ({backend.description})")
    for name, description in OTHER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    session = ConformanceSession(config)
    session.validate()
    config.stash[SESSION] = session
    config.pluginmanager.register(session, "conformance-session")  # its hooks: the reports' receiving end
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if session.is_worker and workers:
        # Each worker gets its share of the cores; torch's default (every core) oversubscribes them n-fold.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
    return session


def worker_device(value: str, worker: str | None, device_count: int) -> str:
    """The device of a pytest-xdist worker: with ``--conformance-device auto`` or ``cuda`` and several GPUs, worker ``gwN`` runs
    on ``cuda:{N mod count}`` (one worker per GPU with ``-n <count>``); otherwise the option as given."""
    if value not in ("auto", "cuda") or worker is None or device_count < 2:
        return value
    return f"cuda:{int(worker.removeprefix('gw')) % device_count}"


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


class ConformanceSession:
    """Run-wide state: the subject, the engine, the results; created lazily so harness tests pay nothing."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        self.results: list[CaseResult] = []  # every result received, in the process that writes the reports
        self.pending: list[CaseResult] = []  # results made here, not yet attached to a test report
        self.reported: set[str] = set()  # node ids whose result went out
        self.case_by_nodeid: dict[str, Case] = {}
        self.order: dict[str, int] = {}  # node id -> collection index, for the reports' order
        self.nodeid_of: dict[str, str] = {}  # case id -> node id of the received results
        self.started = _dt.datetime.now(_dt.UTC)
        self.run_id = uuid.uuid4().hex
        self.golden_change_lines: list[str] = []
        self.golden_seconds = 0.0
        self.remote_run: dict | None = None  # the subject as a worker saw it (the controller builds no subject)
        self.messages: list[str] = []  # a worker's progress lines, sent with its next report
        self.tracker: Progress | None = None
        self.outside_tier = 0  # cases of a larger tier, deselected
        self._sent_changes = 0
        self._sent_golden_seconds = 0.0
        self._run_sent = (False, False)
        self._jsonl = None
        self._subject = None
        self._engine = None
        self._matrix = None
        self.prefetch = None  # the golden prefetcher, while one runs
        self.prefetch_log = None  # what it did, once stopped

    # -- options -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values before collection, so a typo is a usage error, not a collection error."""
        self.device, self.scales, self.guards  # noqa: B018 - each property raises UsageError on a bad value
        if self.subject_name == "comfyui" and not self.comfyui_path:
            raise UsageError("--subject comfyui needs a checkout: --comfyui PATH or COMFYUI_PATH")
        if self.opt("comfyui"):  # COMFYUI_PATH alone is never read as a test path
            self._refuse_comfyui_conftests(Path(self.opt("comfyui")).expanduser().resolve())
        if self.comfyui_path and not Path(self.comfyui_path).expanduser().is_dir():
            raise UsageError(f"--comfyui / COMFYUI_PATH: {self.comfyui_path} is not a directory")
        profiles = tuple(p for p in self.profiles or () if p not in self.captured_profiles)
        if profiles:
            from .profiles import load_profiles

            known = {name for family in (*FAMILIES, "vae") for name in load_profiles(family)}
            unknown = [p for p in profiles if p not in known]
            if unknown:
                raise UsageError(f"--conformance-profile: no family defines {unknown}; known: {', '.join(sorted(known))}")
        self.patch_specs  # noqa: B018 - raises UsageError naming a patch that cannot be loaded
        expectations = self.opt("expectations")
        if expectations:
            from .expectations import load_ratchet

            try:
                load_ratchet(Path(expectations))
            except FileNotFoundError:
                raise UsageError(f"--expectations: {expectations} does not exist (write one with: python -m conformance expectations --from REPORT_DIR --out FILE)") from None
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise UsageError(f"--expectations: {expectations} is not a ratchet file ({type(error).__name__}: {error})") from None

    @functools.cached_property
    def patch_specs(self) -> dict[str, str]:
        """Case patch name -> ``module:callable``: the suite's example patches and every ``--conformance-patch``."""
        from .workloads.patches import BUILTIN, PatchError, load_patch

        specs = dict(BUILTIN)
        for spec in self.opt("patch") or []:
            try:
                patch = load_patch(spec)
            except PatchError as error:
                raise UsageError(f"--conformance-patch: {error}") from None
            specs[patch.name] = spec
        return specs

    def _refuse_comfyui_conftests(self, checkout: Path) -> None:
        """When the plugin comes from the checkout's conftest.py (not installed), pytest reads ``--comfyui PATH`` as a
        test path before the option exists and loads ComfyUI's own tests/conftest.py, whose autouse fixture creates
        directories in the working directory. Stop before anything runs."""
        for plugin in self.config.pluginmanager.get_plugins():
            origin = getattr(plugin, "__file__", None)
            if origin and Path(origin).resolve().is_relative_to(checkout):
                raise UsageError(
                    f"pytest loaded {origin} from the ComfyUI checkout because '--comfyui {checkout}' was read as a "
                    "test path; write --comfyui=PATH, set COMFYUI_PATH, or install the suite (pip install -e .)"
                )

    def opt(self, name: str):
        """An option's value by its key in ``conformance.options.OPTIONS`` (``"device"`` for --conformance-device)."""
        return option(self.config, name)

    @property
    def comfyui_path(self) -> str | None:
        return self.opt("comfyui") or os.environ.get("COMFYUI_PATH") or None

    @property
    def subject_name(self) -> str:
        return self.opt("subject") or ("comfyui" if self.comfyui_path else "diffusers")

    @property
    def device(self) -> torch.device:
        value = self.opt("device")
        if self.is_worker and torch.cuda.is_available():
            value = worker_device(value, os.environ.get("PYTEST_XDIST_WORKER"), torch.cuda.device_count())
        if value == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--conformance-device {value}: this torch ({torch.__version__}) sees no CUDA device")
        return device

    @property
    def tier(self) -> str:
        """``--tier``; without it ``default``, unless ``-m``/``-k`` select (then the expression is the selection)."""
        chosen = self.opt("tier")
        if chosen:
            return chosen
        return "nightly" if (self.config.getoption("markexpr") or self.config.getoption("keyword")) else "default"

    @functools.cached_property
    def captured_profiles(self) -> tuple[str, ...]:
        """``--conformance-profile captured:PATH``: each record of the capture file registered as a profile
        (``conformance.captures``)."""
        from .captures import CaptureError, register_capture

        names = []
        for word in _split(self.opt("profile")) or ():
            if word.startswith("captured:"):
                try:
                    names += register_capture(word.removeprefix("captured:"))
                except CaptureError as error:
                    raise UsageError(f"--conformance-profile: {error}") from None
        return tuple(names)

    @property
    def profiles(self) -> tuple[str, ...] | None:
        """The profiles asked for (None: every profile of each component), captures by their records' names."""
        words = _split(self.opt("profile"))
        if not words:
            return None
        return tuple(w for w in words if not w.startswith("captured:")) + self.captured_profiles

    @functools.cached_property
    def checkpoint(self):
        """``--weights``: the file opened and a scale registered per chosen block (``checkpoints.cases``); None
        without it. A file the suite cannot use is one usage error naming the file and what is wrong."""
        path = self.opt("weights")
        if not path:
            if self.opt("block"):
                raise UsageError("--block needs --weights PATH (the checkpoint whose blocks to test)")
            return None
        if self.opt("scale") != "tiny" or any(a.startswith(("--scale", "--conformance-scale")) for a in self.config.invocation_params.args):
            raise UsageError("--weights gives the scales (one per chosen block of the file); leave --scale out")
        from .checkpoints import CheckpointError
        from .checkpoints.cases import register_file

        try:
            checkpoint, names = register_file(path, self.opt("block"))
        except CheckpointError as error:
            raise UsageError(f"--weights: {error}") from None
        return checkpoint, tuple(names)

    @property
    def scales(self) -> tuple[str, ...]:
        if self.checkpoint is not None:
            return self.checkpoint[1]
        scales = _split(self.opt("scale")) or ("tiny",)
        unknown = [s for s in scales if s not in SCALES]
        if unknown:
            raise UsageError(f"--scale: unknown {unknown}; choose from {', '.join(SCALES)}")
        return scales

    @property
    def guards(self) -> tuple[str, ...]:
        guards = _split(self.opt("guard")) or ("none",)
        if guards == ("all",):
            return GUARDS
        unknown = [g for g in guards if g not in GUARDS]
        if unknown:
            raise UsageError(f"--guard: unknown {unknown}; available: {', '.join(GUARDS)}")
        return guards

    @property
    def report_dir(self) -> Path:
        value = self.opt("report_dir")
        return Path(value) if value else self.config.rootpath / DEFAULT_REPORT_DIR

    @property
    def golden_dir(self) -> Path:
        value = self.opt("golden_dir")
        return Path(value) if value else GOLDEN_DIR

    @property
    def golden_store(self) -> Path:
        value = self.opt("golden_store")
        return Path(value).expanduser() if value else local_golden_store()

    # -- lazily built pieces -------------------------------------------------------------------------------------
    @property
    def subject(self):
        if self._subject is None:
            from .subjects import SubjectError, load_subject

            try:
                self._subject = load_subject(self.subject_name, comfyui_path=self.comfyui_path, device=self.device)
            except SubjectError as error:
                raise UsageError(str(error)) from error
        return self._subject

    def matrix(self):
        if self._matrix is None:
            profiles = self.profiles
            if self.checkpoint is not None and self.checkpoint[0].subject_detection is None:
                self._detect_checkpoint(self.checkpoint[0])
            self._matrix = build_matrix(self.subject, self.device, self.scales, profiles, self.guards, tuple(self.patch_specs))
        return self._matrix

    def golden_command(self, key) -> str:
        found, record = file_scale(case_scale(key.scale)), captured(key.profile)
        scale = f"--weights {found.path} --block {found.block}" if found else f"--scale {key.scale}"
        profile = f"--conformance-profile captured:{record.path}" if record else f"--conformance-profile {key.profile}"
        parts = ["pytest suites", f"--subject {key.subject}", scale, profile]
        if key.subject == "comfyui":
            parts.append(f"--comfyui {self.comfyui_path}")
        if self.opt("golden_dir"):
            parts.append(f"--golden-dir {self.opt('golden_dir')}")
        if self.opt("golden_store"):
            parts.append(f"--golden-store {self.opt('golden_store')}")
        family = key.component.split(".")[0]
        parts.append(f"-m '{family} and fp32 and {self.subject.reference_backend}' --conformance-update-goldens")
        return " ".join(parts)

    def progress(self, message: str) -> None:
        if self.is_worker:  # a worker's output is not shown: the line goes with its next report
            self.messages.append(f"[{os.environ.get('PYTEST_XDIST_WORKER', 'worker')}] {message}")
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"[conformance] {message}")

    @property
    def engine(self):
        if self._engine is None:
            from .expectations import ExpectationsError, load_expected_failures, load_ratchet
            from .goldens import GoldenStore
            from .runner import Engine, EngineOptions

            try:
                declared = load_expected_failures(EXPECTED_FAILURES_FILE)
            except ExpectationsError as error:
                pytest.exit(f"conformance: {error}", returncode=pytest.ExitCode.USAGE_ERROR)
            self._engine = Engine(
                self.subject,
                EngineOptions(
                    device=self.device,
                    committed_store=GoldenStore(self.golden_dir, "committed"),
                    local_store=GoldenStore(self.golden_store, "local"),
                    update_goldens=self.opt("update_goldens"),
                    ratchet=load_ratchet(self.opt("expectations")),
                    expected_failures=declared,
                    progress=self.progress,
                    golden_command=self.golden_command,
                    outputs_dir=self.report_dir / "outputs" if self.opt("save_outputs") else None,
                    run_id=self.run_id,
                    patch_specs=self.patch_specs,
                ),
            )
        return self._engine

    # -- running a case ------------------------------------------------------------------------------------------
    def check(self, case: Case) -> CaseResult:
        """Run ``case``, record its result, and turn the verdict into the test's outcome."""
        start = time.perf_counter()
        try:
            result = self.engine.run(case)
        except Exception as error:
            self.pending.append(CaseResult(case, "error", reason=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start, device=str(self.device)))
            raise
        result.device = str(self.device)
        self.pending.append(result)
        if result.outcome == "failed":
            pytest.fail(f"{case.id}: {result.reason}", pytrace=False)
        if result.outcome == "xfailed":
            pytest.xfail(result.reason)
        if result.outcome == "skipped":  # a reason only running could find (a patch without the patch point it needs)
            pytest.skip(result.reason)
        return result

    # -- results on their way to the reports ---------------------------------------------------------------------
    def payload(self, nodeid: str) -> dict:
        """What goes with the test report of ``nodeid``: its results and what changed in the run since the last one."""
        results, self.pending = self.pending, []
        self.reported.add(nodeid)
        payload = {"nodeid": nodeid, "results": [r.as_dict() for r in results], "messages": self.messages, "outside_tier": self.outside_tier}
        self.messages = []
        if self._engine is not None:
            changes = self._engine.golden_changes
            payload["golden_changes"] = [c.describe() for c in changes[self._sent_changes :]]
            self._sent_changes = len(changes)
            payload["golden_seconds"] = self._engine.golden_seconds - self._sent_golden_seconds
            self._sent_golden_seconds = self._engine.golden_seconds
        known = (self._subject is not None, self._engine is not None)
        if known[0] and known != self._run_sent:  # once with the subject, again when the engine gives the identity
            payload["run"] = self.subject_run_info()
            self._run_sent = known
        return payload

    def receive(self, payload: dict) -> None:
        """A report's payload, in the process that writes the reports."""
        for message in payload.get("messages", ()):
            self.progress(message)
        if "run" in payload and (self.remote_run is None or self.remote_run["golden_identity"] is None):
            self.remote_run = payload["run"]
            self.append_jsonl({"run_update": payload["run"]})
        self.golden_change_lines += payload.get("golden_changes", ())
        self.outside_tier = max(self.outside_tier, payload.get("outside_tier", 0))  # a worker's deselection
        self.golden_seconds += payload.get("golden_seconds", 0.0)
        for document in payload["results"]:
            result = CaseResult.from_dict(document)
            self.results.append(result)
            self.nodeid_of[result.id] = payload["nodeid"]
            self.append_jsonl(document)
            if self.tracker is not None:
                self.tracker.finished(result.id, result.outcome)

    def append_jsonl(self, document: dict) -> None:
        """``results.jsonl``: a header line, then one line per case as it finishes, flushed, so a run killed halfway
        leaves every finished case (``python -m conformance html DIR`` renders it)."""
        if self._jsonl is None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (self.report_dir / JSONL_FILE).open("w")
            header = {"schema_version": 1, "run": {"run_id": self.run_id, "started": self.started.isoformat(timespec="seconds"), "options": self.options_info()}}
            self._jsonl.write(json.dumps(header) + "\n")
        self._jsonl.write(json.dumps(document) + "\n")
        self._jsonl.flush()

    # hooks of the registered session (hooks without a config argument reach the run's state this way)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        payload = getattr(report, "conformance", None)
        if payload is not None and not self.is_worker:
            self.receive(payload)

    def expect(self, nodeids) -> None:
        """The run's selection is known: order of the reports and totals of the progress lines."""
        self.order = {nodeid: i for i, nodeid in enumerate(nodeids)}
        case_ids = [n.rsplit("[", 1)[1].split("]", 1)[0] for n in nodeids if n.endswith("]") or "]@" in n]
        case_ids = [c for c in case_ids if c.split("-", 1)[0] in SUBJECTS]
        if case_ids:
            self.tracker = Progress(self.progress)
            self.tracker.expect(case_ids)

    def prefetch_wanted(self) -> tuple[bool, str]:
        """Whether this process prefetches goldens, and why (or why not)."""
        mode = self.opt("prefetch_goldens")
        if mode == "off":
            return False, "--prefetch-goldens off"
        if self.is_worker or getattr(self.config.option, "dist", "no") != "no":
            return False, "under pytest-xdist each worker runs an unknown share of the cases (goldens are made as they are needed)"
        if mode == "on":
            return True, "--prefetch-goldens on"
        if self.device.type != "cuda":
            return False, "a CPU run's cases use every core themselves"
        return True, "a CUDA run leaves the host's cores idle"

    def start_prefetch(self, items) -> None:
        """Start the golden prefetcher for the collected cases' missing goldens that are made on the CPU (those made on
        the GPU take milliseconds), in the order the cases need them."""
        if not self.case_by_nodeid or self.opt("update_goldens"):
            return
        wanted, _why = self.prefetch_wanted()
        if not wanted:
            return
        from .prefetch import GoldenPrefetch, PrefetchSpec, threads_for_prefetch

        keys: dict[tuple[str, str, str], None] = {}
        for item in items:
            case = self.case_by_nodeid.get(item.nodeid)
            if case is None or case.backend == XCHECK or case.kind == "sequence" or item.get_closest_marker("skip") is not None:
                continue
            if file_scale(case.scale) or captured(case.profile):  # registered in this process only: the run makes them
                continue
            keys.setdefault((case.component, case.scale, case.profile), None)
        engine = self.engine
        missing = []
        for component, scale, profile in keys:
            key = engine.golden_key(component, scale, profile)
            store = engine.store_for(key)
            if store is engine.options.local_store and store.entry(key) is None and engine.golden_device(component).type == "cpu":
                missing.append((component, scale, profile))
        if not missing:
            return
        spec = PrefetchSpec(
            subject=self.subject_name, comfyui_path=self.comfyui_path, committed=self.golden_dir, local=self.golden_store,
            identity=dict(engine.identity()), run_id=self.run_id, keys=tuple(missing), threads=threads_for_prefetch(),
        )  # fmt: skip
        self.prefetch = GoldenPrefetch(spec)
        self.prefetch.start()
        self.progress(f"making {len(missing)} missing goldens ahead of their cases in a second process ({spec.threads} CPU threads)")

    def stop_prefetch(self) -> None:
        if self.prefetch is not None:
            self.prefetch_log = self.prefetch.stop()
            self.prefetch = None
            self.golden_change_lines += self.prefetch_log.made
            for error in self.prefetch_log.errors:
                self.progress(error)

    def subject_run_info(self) -> dict:
        """The parts of the run record only a process that built the subject knows."""
        return {
            "device": str(self.device),
            "subject": self._subject.info().as_dict(),
            "subject_settings": self._subject.settings(),
            "packages": self._subject.packages(),
            "golden_identity": self._engine.identity() if self._engine else None,
            "weights_detection": self.checkpoint[0].subject_detection if self.opt("weights") and self.checkpoint else None,
        }

    def run_notes(self) -> list[str]:
        """What the reader of the reports must know about this run as a whole."""
        from .machine import half_precision_path

        notes = []
        if self.outside_tier:
            notes.append(f"{self.outside_tier} cases of a larger tier than '{self.tier}' were not run (--tier nightly runs every case)")
        half = [r for r in self.results if r.outcome != "skipped" and r.case.precision != "fp32" and (r.device or "cpu") == "cpu"]
        slow = half_precision_path() if half else None
        if slow:
            notes.append(f"{len(half)} half-precision cases ran on the CPU: {slow}")
        if any(r.outcome != "skipped" and (r.device or "cpu").startswith("cuda") for r in self.results):
            notes.append(
                "on CUDA every forward ran float32 matmuls and convolutions in IEEE float32 (TF32 off, also cuDNN's, which "
                "PyTorch leaves on by default); half-precision kernels as PyTorch and the subject set them"
            )
        return notes

    def options_info(self) -> dict:
        return {
            "tier": self.tier,
            "subject": self.subject_name,
            "comfyui": self.comfyui_path,
            "scale": list(self.scales),
            "weights": self.opt("weights"),
            "block": self.opt("block"),
            "profile": self.opt("profile"),
            "guard": list(self.guards),
            "markexpr": self.config.getoption("markexpr") or None,
            "keyword": self.config.getoption("keyword") or None,
            "update_goldens": self.opt("update_goldens"),
            "save_outputs": self.opt("save_outputs"),
            "expectations": self.opt("expectations"),
            "workers": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) or getattr(self.config.option, "numprocesses", None) or None,
        }

    def prefetch_info(self) -> dict:
        log = self.prefetch_log
        wanted, why = self.prefetch_wanted()
        if log is None:
            return {"ran": False, "why": why if not wanted else "no missing golden of the selection is made on the CPU (the run's device makes the others)"}
        return {"ran": True, "why": why, "planned": log.planned, "made": len(log.made), "seconds": round(log.seconds, 2), "errors": log.errors}

    def _detect_checkpoint(self, checkpoint) -> None:
        """The subject's own detection of the ``--weights`` file, recorded with it; a disagreement is a usage error."""
        from .checkpoints import CheckpointError

        try:
            checkpoint.subject_detection = self.subject.detect_checkpoint(checkpoint)
        except CheckpointError as error:
            raise UsageError(f"--weights: {error}") from None

    def weights_info(self) -> dict:
        """``--weights``: the file as the suite read it and the block each file scale stands for."""
        checkpoint, names = self.checkpoint
        if checkpoint.subject_detection is None and self.remote_run and self.remote_run.get("weights_detection"):
            checkpoint.subject_detection = self.remote_run["weights_detection"]  # a worker ran the subject's detection
        return {**checkpoint.describe(), "file_id": file_scale(names[0]).file_id, "scales": {n: {"block": file_scale(n).block, "components": list(file_scale(n).components)} for n in names}}

    def run_info(self) -> dict:
        from .report import environment

        if self._subject is not None:
            subject = self.subject_run_info()
        else:
            subject = self.remote_run or {"device": str(self.device), "subject": {"name": self.subject_name}, "subject_settings": {}, "packages": {}, "golden_identity": None}
        return {
            "run_id": self.run_id,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": subject["device"],
            **environment(),
            "subject": subject["subject"],
            "subject_settings": subject["subject_settings"],
            "packages": subject["packages"],
            "options": self.options_info(),
            **({"weights": self.weights_info()} if self.opt("weights") else {}),
            "golden_stores": {"committed": str(self.golden_dir), "local": str(self.golden_store)},
            "golden_changes": self.golden_change_lines,
            "golden_identity": subject["golden_identity"],
            "golden_seconds": round(self.golden_seconds, 2),
            "golden_prefetch": self.prefetch_info(),
            "outside_tier": self.outside_tier,
            "notes": self.run_notes(),
            "report_dir": str(self.report_dir),
        }


# The hooks' work, called by conformance.plugin once the run has asked for the suite.
def generate_tests(session: ConformanceSession, metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("conformance")
    kind = marker.kwargs.get("kind") if marker else None
    params = []
    for entry in session.matrix():
        if kind and entry.case.kind != kind:
            continue
        marks = [getattr(pytest.mark, name) for name in entry.case.markers()]
        case = entry.case
        marks.append(pytest.mark.xdist_group(f"{case.subject}-{case.component}-{case.scale}-{case.profile}"))
        if entry.skip_reason:
            marks.append(pytest.mark.skip(reason=entry.skip_reason))
        params.append(pytest.param(entry.case, id=entry.case.id, marks=marks))
    metafunc.parametrize("case", params)


def modify_items(state: ConformanceSession, config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, outside = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if isinstance(case, Case):
            if not in_tier(case, state.tier, state.subject.reference_backend):
                outside.append(item)
                continue
            state.case_by_nodeid[item.nodeid] = case
        kept.append(item)
    if outside:
        config.hook.pytest_deselected(items=outside)
        items[:] = kept
        state.outside_tier = len(outside)


def collection_finished(state: ConformanceSession, session: pytest.Session) -> None:
    if not state.is_worker and state.case_by_nodeid:
        state.expect([item.nodeid for item in session.items])
    state.start_prefetch(session.items)


def attach_result(state: ConformanceSession, item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport) -> None:
    """Attach the case's result to the test report. Cases that never reached ``check`` (skipped by the matrix, setup
    errors) get one here."""
    case = state.case_by_nodeid.get(item.nodeid)
    if case is None or item.nodeid in state.reported:
        return
    if call.when == "setup" and call.excinfo is not None:
        if call.excinfo.errisinstance(pytest.skip.Exception):
            reason = str(call.excinfo.value.msg) if hasattr(call.excinfo.value, "msg") else str(call.excinfo.value)
            state.pending.append(CaseResult(case, "skipped", reason=reason))
        else:
            state.pending.append(CaseResult(case, "error", reason=f"{call.excinfo.typename}: {call.excinfo.value}"))
    if state.pending or state.messages:
        report.conformance = state.payload(item.nodeid)


def session_finished(state: ConformanceSession) -> None:
    state.stop_prefetch()
    if state.is_worker:
        return
    if state._jsonl is not None:
        state._jsonl.close()
    if not state.results:
        return
    from .report import write_reports

    state.results.sort(key=lambda r: state.order.get(state.nodeid_of.get(r.id, ""), len(state.order)))
    state.written = write_reports(state.report_dir, state.run_info(), state.results)


def terminal_summary(state: ConformanceSession, terminalreporter) -> None:
    if not state.results:
        return
    from .report import skip_summary, terminal_table

    terminalreporter.section("conformance")
    for line in terminal_table(state.results):
        terminalreporter.write_line(line)
    for line in skip_summary(state.results):
        terminalreporter.write_line(line)
    for note in state.run_notes():
        terminalreporter.write_line(f"note: {note}")
    if state.golden_change_lines:
        ahead = f"; {state.prefetch_log.seconds:.1f} s made ahead by the prefetcher" if state.prefetch_log else ""
        terminalreporter.write_line(f"goldens written ({state.golden_seconds:.1f} s of float64 forwards in the run{ahead}):")
        for line in state.golden_change_lines:
            terminalreporter.write_line(f"  {line}")
    for path in getattr(state, "written", []):
        terminalreporter.write_line(f"report: {path}")
