"""The pytest plugin: options, markers, the case matrix, the ``conformance`` fixture and the report hooks.

Registered through the ``pytest11`` entry point ``conformance.plugin`` and, for a plain checkout, by the root
``conftest.py`` (pytest skips the second registration: same name). Run-wide state lives on ``config.stash``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from pathlib import Path

import pytest
import torch

from .backends import BACKENDS, XCHECK
from .case import Case
from .families import FAMILIES
from .guards import GUARD_NAMES
from .matrix import SCALES, build_matrix
from .paths import DEFAULT_REPORT_DIR, EXPECTED_FAILURES_FILE, GOLDEN_DIR, local_golden_store
from .precision import PRECISIONS
from .results import CaseResult

PRECISION_MARKERS = tuple(dict.fromkeys(p.marker for p in PRECISIONS.values()))
SUBJECTS = ("diffusers", "comfyui")
GUARDS = GUARD_NAMES
OTHER_MARKERS = {
    "vae": "VAE decoder cases",
    "gpu": "needs a CUDA device",
    "real": "real-dimension cases (--scale real)",
    "guard": "cases run under a guard policy",
    "lifecycle": "repeated and mixed-model runs in one process",
    "bench": "benchmarks (pytest-benchmark); not part of the default run",
    XCHECK: "cross-implementation check: same weights and inputs through two subjects' components, fp32",
    "conformance(kind)": "a test that takes the `case` fixture; kind is 'block' or 'vae'",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "numerical conformance of diffusion-model components")
    group.addoption("--subject", choices=SUBJECTS, default=None, help="implementation under test (default: comfyui when a checkout is given, else diffusers)")
    group.addoption("--comfyui", default=None, metavar="PATH", help="ComfyUI checkout to test (default: $COMFYUI_PATH)")
    group.addoption("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    group.addoption("--scale", default="tiny", help=f"comma-separated scales: {', '.join(SCALES)} (default: tiny)")
    group.addoption("--profile", default=None, help="comma-separated input profiles (default: every profile of the family)")
    group.addoption("--guard", default="none", help=f"comma-separated guard policies, or 'all' (available: {', '.join(GUARDS)})")
    group.addoption("--report-dir", default=None, help=f"where results.json, summary.md and junit.xml go (default: {DEFAULT_REPORT_DIR})")
    group.addoption("--update-goldens", action="store_true", help="recompute the goldens the selected cases use; every change is reported")
    group.addoption("--golden-dir", default=None, help=f"committed golden store (default: {GOLDEN_DIR})")
    group.addoption("--golden-store", default=None, help="local store for real-scale goldens (default: $CONFORMANCE_GOLDEN_STORE or ~/.cache/diffusion-conformance/golden)")
    group.addoption("--expectations", default=None, help="ratchet file from a baseline run: a case worse than its expectation fails")
    group.addoption("--save-outputs", action="store_true", help="save every case's outputs (float32 safetensors) under <report-dir>/outputs, for the upgrade gate")


def pytest_configure(config: pytest.Config) -> None:
    for family in FAMILIES_ALL:
        config.addinivalue_line("markers", f"{family}: {family} components")
        for marker in PRECISION_MARKERS:
            config.addinivalue_line("markers", f"{family}_{marker}: {family} components in {marker}")
    for marker in PRECISION_MARKERS:
        config.addinivalue_line("markers", f"{marker}: cases in {marker}")
    for backend, description in BACKENDS.items():
        config.addinivalue_line("markers", f"{backend}: attention backend {backend} ({description})")
    for name, description in OTHER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    session = ConformanceSession(config)
    session.validate()
    config.stash[SESSION] = session


# Markers exist for families the suite is growing into, so that `-m flux` is never a typo error.
FAMILIES_ALL = tuple(dict.fromkeys((*FAMILIES, "qwen", "flux", "wan")))


class UsageError(pytest.UsageError):
    pass


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


class ConformanceSession:
    """Run-wide state: the subject, the engine, the results; created lazily so harness tests pay nothing."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[CaseResult] = []
        self.case_by_nodeid: dict[str, Case] = {}
        self.started = _dt.datetime.now(_dt.UTC)
        self._subject = None
        self._engine = None
        self._matrix = None

    # -- options -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check option values before collection, so a typo is a usage error, not a collection error."""
        self.device, self.scales, self.guards  # noqa: B018 - each property raises UsageError on a bad value
        if self.subject_name == "comfyui" and not self.comfyui_path:
            raise UsageError("--subject comfyui needs a checkout: --comfyui PATH or COMFYUI_PATH")
        if self.comfyui_path:
            self._refuse_comfyui_conftests(Path(self.comfyui_path).expanduser().resolve())

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
        profiles = _split(self.opt("--profile"))
        if profiles:
            from .profiles import load_profiles

            known = {name for family in (*FAMILIES, "vae") for name in load_profiles(family)}
            unknown = [p for p in profiles if p not in known]
            if unknown:
                raise UsageError(f"--profile: no family defines {unknown}; known: {', '.join(sorted(known))}")

    def opt(self, name: str):
        return self.config.getoption(name)

    @property
    def comfyui_path(self) -> str | None:
        return self.opt("--comfyui") or os.environ.get("COMFYUI_PATH") or None

    @property
    def subject_name(self) -> str:
        return self.opt("--subject") or ("comfyui" if self.comfyui_path else "diffusers")

    @property
    def device(self) -> torch.device:
        value = self.opt("--device")
        if value == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {value}: this torch ({torch.__version__}) sees no CUDA device")
        return device

    @property
    def scales(self) -> tuple[str, ...]:
        scales = _split(self.opt("--scale")) or ("tiny",)
        unknown = [s for s in scales if s not in SCALES]
        if unknown:
            raise UsageError(f"--scale: unknown {unknown}; choose from {', '.join(SCALES)}")
        return scales

    @property
    def guards(self) -> tuple[str, ...]:
        guards = _split(self.opt("--guard")) or ("none",)
        if guards == ("all",):
            return GUARDS
        unknown = [g for g in guards if g not in GUARDS]
        if unknown:
            raise UsageError(f"--guard: unknown {unknown}; available: {', '.join(GUARDS)}")
        return guards

    @property
    def report_dir(self) -> Path:
        value = self.opt("--report-dir")
        return Path(value) if value else self.config.rootpath / DEFAULT_REPORT_DIR

    @property
    def golden_dir(self) -> Path:
        value = self.opt("--golden-dir")
        return Path(value) if value else GOLDEN_DIR

    @property
    def golden_store(self) -> Path:
        value = self.opt("--golden-store")
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
            profiles = _split(self.opt("--profile"))
            self._matrix = build_matrix(self.subject, self.device, self.scales, profiles, self.guards)
        return self._matrix

    def golden_command(self, key) -> str:
        parts = ["pytest suites", f"--subject {key.subject}", f"--scale {key.scale}", f"--profile {key.profile}"]
        if key.subject == "comfyui":
            parts.append(f"--comfyui {self.comfyui_path}")
        if self.opt("--golden-dir"):
            parts.append(f"--golden-dir {self.opt('--golden-dir')}")
        if self.opt("--golden-store"):
            parts.append(f"--golden-store {self.opt('--golden-store')}")
        family = key.component.split(".")[0]
        parts.append(f"-m '{family} and fp32 and {self.subject.reference_backend}' --update-goldens")
        return " ".join(parts)

    def progress(self, message: str) -> None:
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
                    update_goldens=self.opt("--update-goldens"),
                    ratchet=load_ratchet(self.opt("--expectations")),
                    expected_failures=declared,
                    progress=self.progress,
                    golden_command=self.golden_command,
                    outputs_dir=self.report_dir / "outputs" if self.opt("--save-outputs") else None,
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
            self.results.append(CaseResult(case, "error", reason=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start))
            raise
        self.results.append(result)
        if result.outcome == "failed":
            pytest.fail(f"{case.id}: {result.reason}", pytrace=False)
        if result.outcome == "xfailed":
            pytest.xfail(result.reason)
        return result

    def run_info(self) -> dict:
        from .report import environment

        info = self._subject.info().as_dict() if self._subject else {"name": self.subject_name}
        changes = [c.describe() for c in self._engine.golden_changes] if self._engine else []
        return {
            "started": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": str(self.device),
            **environment(),
            "subject": info,
            "subject_settings": self._subject.settings() if self._subject else {},
            "packages": self._subject.packages() if self._subject else {},
            "options": {
                "subject": self.subject_name,
                "comfyui": self.comfyui_path,
                "scale": list(self.scales),
                "profile": self.opt("--profile"),
                "guard": list(self.guards),
                "markexpr": self.config.getoption("markexpr") or None,
                "keyword": self.config.getoption("keyword") or None,
                "update_goldens": self.opt("--update-goldens"),
                "save_outputs": self.opt("--save-outputs"),
                "expectations": self.opt("--expectations"),
            },
            "golden_stores": {"committed": str(self.golden_dir), "local": str(self.golden_store)},
            "golden_changes": changes,
            "golden_identity": self._engine.identity() if self._engine else None,
            "golden_seconds": round(self._engine.golden_seconds, 2) if self._engine else 0.0,
            "report_dir": str(self.report_dir),
        }


SESSION = pytest.StashKey[ConformanceSession]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[SESSION]
    marker = metafunc.definition.get_closest_marker("conformance")
    kind = marker.kwargs.get("kind") if marker else None
    params = []
    for entry in session.matrix():
        if kind and entry.case.kind != kind:
            continue
        marks = [getattr(pytest.mark, name) for name in entry.case.markers()]
        if entry.skip_reason:
            marks.append(pytest.mark.skip(reason=entry.skip_reason))
        params.append(pytest.param(entry.case, id=entry.case.id, marks=marks))
    metafunc.parametrize("case", params)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[SESSION]
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("case"), Case):
            state.case_by_nodeid[item.nodeid] = callspec.params["case"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    """Cases that never reached ``check`` (skipped by the matrix, setup errors) still get a result."""
    state = item.config.stash[SESSION]
    case = state.case_by_nodeid.get(item.nodeid)
    if case is None or any(r.case == case for r in state.results):
        return
    if call.when == "setup" and call.excinfo is not None:
        if call.excinfo.errisinstance(pytest.skip.Exception):
            reason = str(call.excinfo.value.msg) if hasattr(call.excinfo.value, "msg") else str(call.excinfo.value)
            state.results.append(CaseResult(case, "skipped", reason=reason))
        else:
            state.results.append(CaseResult(case, "error", reason=f"{call.excinfo.typename}: {call.excinfo.value}"))


@pytest.fixture(scope="session")
def conformance(request: pytest.FixtureRequest) -> ConformanceSession:
    """The run's conformance session: ``conformance.check(case)`` runs a case and asserts its verdict."""
    return request.config.stash[SESSION]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(SESSION, None)
    if state is None or not state.results or hasattr(session.config, "workerinput"):
        return
    from .report import write_reports

    index = {case: i for i, case in enumerate(state.case_by_nodeid.values())}
    state.results.sort(key=lambda r: index.get(r.case, len(index)))
    state.written = write_reports(state.report_dir, state.run_info(), state.results)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(SESSION, None)
    if state is None or not state.results:
        return
    from .report import skip_summary, terminal_table

    terminalreporter.section("conformance")
    for line in terminal_table(state.results):
        terminalreporter.write_line(line)
    for line in skip_summary(state.results):
        terminalreporter.write_line(line)
    if state._engine and state._engine.golden_changes:
        terminalreporter.write_line("goldens written:")
        for change in state._engine.golden_changes:
            terminalreporter.write_line(f"  {change.describe()}")
    for path in getattr(state, "written", []):
        terminalreporter.write_line(f"report: {path}")

