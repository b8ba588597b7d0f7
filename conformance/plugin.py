"""The pytest plugin: the suite's options, and the suite itself only in a run that asks for it.

Registered through the ``pytest11`` entry point ``conformance.plugin`` and, for a plain checkout, by the root
``conftest.py`` (pytest skips the second registration: same name). Installed in an environment, it is loaded by every
pytest run there; it imports nothing heavy (no torch) and does nothing until the run asks for the suite
(``activate``): a suite option given on the command line, the suite's own checkout (its conftest), or a collected
test that takes the ``case`` fixture. ``COMFYUI_PATH`` is read only then.

Options: ``conformance.options``.

Results travel through pytest's own reports, so that one process and many (pytest-xdist) write the same reports:
the process that ran a case attaches its result to the test report (``report.conformance``, a JSON-able dict);
``pytest_runtest_logreport`` in the process that writes the reports (the only process, or the xdist controller)
receives it, appends it to ``results.jsonl`` at once (an interrupted run keeps what finished) and keeps it for
results.json, summary.md, junit.xml and report.html at the end (``conformance.session``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .axes import FAMILY_NAMES, SUBJECTS
from .options import OPTIONS, SESSION, UsageError, asked_on_command_line, names
from .paths import NOT_A_CHECKOUT, has_data

if TYPE_CHECKING:
    from .session import ConformanceSession


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "numerical conformance of diffusion-model components")
    for key, (_alias, kwargs) in OPTIONS.items():
        group.addoption(*names(key), dest=f"conformance_{key}", **kwargs)


def activate(config: pytest.Config) -> ConformanceSession:
    """The suite's session for this run, started on first use (imports torch and the harness)."""
    session = config.stash.get(SESSION, None)
    if session is None:
        if not has_data():
            raise UsageError(NOT_A_CHECKOUT)
        from .session import start

        session = start(config)
    return session


def active(config: pytest.Config) -> ConformanceSession | None:
    return config.stash.get(SESSION, None)


def _names_a_family(expression: str | None) -> bool:
    return bool(expression) and any(word.split("_")[0] in FAMILY_NAMES for word in expression.replace("(", " ").replace(")", " ").split())


def pytest_configure(config: pytest.Config) -> None:
    if asked_on_command_line(config):
        activate(config)  # validates the options before collection: a typo is one usage error
    elif not has_data() and _names_a_family(config.getoption("markexpr")):
        raise UsageError(NOT_A_CHECKOUT)  # `pytest -m qwen_fp16` with a wheel install: nothing to collect, say why


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        from .session import generate_tests

        generate_tests(activate(metafunc.config), metafunc)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = active(config)
    if state is not None:
        from .session import modify_items

        modify_items(state, config, items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    state = active(session.config)
    if state is not None:
        from .session import collection_finished

        collection_finished(state, session)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """pytest-xdist's controller collects nothing itself: the first worker's collection of suite cases starts the
    suite there (it receives the results) and gives order and totals."""
    if not any(nodeid.endswith("]") and nodeid.rsplit("[", 1)[1].split("-", 1)[0] in SUBJECTS for nodeid in ids if "[" in nodeid):
        return
    state = activate(node.config)
    if not state.order:
        state.expect(ids)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    state = active(item.config)
    if state is not None:
        from .session import attach_result

        attach_result(state, item, call, outcome.get_result())


@pytest.fixture(scope="session")
def conformance(request: pytest.FixtureRequest) -> ConformanceSession:
    """The run's conformance session: ``conformance.check(case)`` runs a case and asserts its verdict."""
    return activate(request.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = active(session.config)
    if state is not None:
        from .session import session_finished

        session_finished(state)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = active(config)
    if state is not None:
        from .session import terminal_summary

        terminal_summary(state, terminalreporter)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's file scales and captured profiles are registered process-wide (``conformance.scales``,
    ``conformance.captures``): forget them, so a later session in the same process starts from none."""
    if active(config) is not None:
        from . import captures, scales

        captures.clear()
        scales.clear()
