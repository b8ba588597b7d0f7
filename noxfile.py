"""Sessions: `nox -s suite` runs the conformance suite, `nox -s tests` runs the harness' own tests.

Each session's virtualenv sees the system site-packages, so a torch that is already installed (a GPU runner's CUDA
build) is used as is. Where there is none, the session installs ``$CONFORMANCE_TORCH`` (default ``torch==2.13.0``,
the CPU build on the project's machines) before anything else, so no dependency can pull an unpinned torch.
Arguments after ``--`` go to pytest: ``nox -s suite -- -m qwen_fp16 --scale real``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

VENV = ["--system-site-packages"]
TORCH = os.environ.get("CONFORMANCE_TORCH", "torch==2.13.0")
CI_CONSTRAINTS = "constraints/ci.txt"


def _install(session: nox.Session, constraints: bool) -> None:
    found = session.run(
        "python", "-c", "import importlib.util; print(importlib.util.find_spec('torch') is not None)", silent=True
    )
    if "True" not in str(found):
        session.log(f"no torch found: installing {TORCH}")
        session.install(TORCH)
    else:
        session.run("python", "-c", "import torch; print('using torch', torch.__version__)")
    args = ["-e", ".[test,comfyui]"]
    if constraints:
        args += ["-c", CI_CONSTRAINTS]
    session.install(*args)


@nox.session(venv_params=VENV)
def suite(session: nox.Session) -> None:
    """The conformance suite (reports in reports/latest unless --report-dir is given)."""
    _install(session, constraints=False)
    session.run("pytest", "suites", *session.posargs, success_codes=[0, 5])


@nox.session(venv_params=VENV)
def tests(session: nox.Session) -> None:
    """The harness' own tests, with the CI pins (stable goldens)."""
    _install(session, constraints=True)
    session.run("pytest", "tests", "--hypothesis-profile=ci", *session.posargs, success_codes=[0, 5])
