"""Sessions, each writing its reports into its own directory under reports/:

* ``suite``   the default run of the conformance suite (reports/suite)
* ``tests``   the harness' own tests, then the benchmarks as a smoke test (reports/tests: junit.xml) - what CI runs
* ``nightly`` the full matrix: every family, component, precision, available backend, profile and guard, with the fp32
              outputs saved so the run can serve as a gate baseline (reports/nightly); on CPU or GPU
* ``gpu``     the nightly tier on CUDA at tiny and real scale (reports/gpu)
* ``bench``   pytest-benchmark over benchmarks/ (reports/suite/benchmark.json: next to the suite's results, where the
              gate reads it when given reports/suite as a side)
* ``gate``    the upgrade gate: ``nox -s gate -- --baseline A --candidate B`` (reports/gate); exits with the gate's
              own code (0 pass, 1 regressed, 3 semantics changed, 4 inconclusive benchmarks, 5 inconclusive, 2 usage)

Each session's virtualenv sees the system site-packages, so a torch that is already installed (a GPU runner's CUDA
build) is used as is. Where there is none, the session installs ``$CONFORMANCE_TORCH`` (default ``torch==2.13.0``,
the CPU build on the project's machines) before anything else, so no dependency can pull an unpinned torch.
Arguments after ``--`` go to pytest: ``nox -s suite -- -m qwen_fp16 --scale real``.

The suite sessions spread their cases over pytest-xdist workers (``-n auto`` on a CPU: one per core, each with its
share of the threads; on CUDA one per GPU, worker i on ``cuda:i``), cases that share a golden in one worker
(``--dist loadgroup``); ``-- -n 0`` runs them in one process. Reports are the same either way.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nox

nox.options.sessions = ["tests"]
REPORTS = "reports"
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
    args = ["-e", ".[test,bench,html,comfyui,gguf]"]
    if constraints:
        args += ["-c", CI_CONSTRAINTS]
    session.install(*args)


@nox.session(venv_params=VENV)
def suite(session: nox.Session) -> None:
    """The conformance suite, default selection (reports/suite; --report-dir in the arguments wins)."""
    _install(session, constraints=False)
    session.run("python", "-m", "pytest", "suites", *_workers(session), "--report-dir", f"{REPORTS}/suite", *session.posargs, success_codes=[0, 5])


def _workers(session: nox.Session) -> list[str]:
    """pytest-xdist arguments: one worker per GPU where there are several, one per core on a CPU; the user's ``-n``
    (after ``--``) wins."""
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in session.posargs):
        return []
    gpus = session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True)
    gpus = int(str(gpus).strip().splitlines()[-1]) if gpus else 0
    if gpus == 1:
        return []  # one GPU: one process (workers sharing a device are measured in docs/benchmarks.md)
    return ["-n", str(gpus) if gpus > 1 else "auto", "--dist", "loadgroup"]


# The Triton kernels run under Triton's interpreter on a CPU (TRITON_INTERPRET=1). A CPU torch has no triton; this
# pinned one is installed for that step only where torch is a CPU build (a CUDA torch brings its own).
TRITON_FOR_CPU = "triton==3.8.0"


@nox.session(venv_params=VENV)
def tests(session: nox.Session) -> None:
    """The harness' own tests with the CI pins (stable goldens), the kernel tests under Triton's interpreter, then the
    benchmarks once each, untimed (smoke)."""
    _install(session, constraints=True)
    session.run("python", "-m", "pytest", "tests", "-n", "auto", "--hypothesis-profile=ci", f"--junitxml={REPORTS}/tests/junit.xml", *session.posargs, success_codes=[0, 5])
    cpu_torch = "None" in str(session.run("python", "-c", "import torch; print(torch.version.cuda)", silent=True))
    if cpu_torch:
        session.install(TRITON_FOR_CPU)
        session.run(
            "python", "-m", "pytest", "tests/test_kernels.py", "-q", f"--junitxml={REPORTS}/tests/junit-triton-interpreter.xml",
            env={"TRITON_INTERPRET": "1"},
        )  # fmt: skip
    session.run("python", "-m", "pytest", "benchmarks", "-m", "bench", "--benchmark-disable", "-q", success_codes=[0, 5])


@nox.session(venv_params=VENV)
def nightly(session: nox.Session) -> None:
    """The full matrix (reports/nightly): every profile, every guard, tiny scale on CPU, tiny and real on CUDA.
    With ``--comfyui PATH`` (or COMFYUI_PATH) the checkout is the subject. The run's fp32 outputs are kept
    (--save-outputs), so reports/nightly can be the baseline of tomorrow's gate."""
    _install(session, constraints=False)
    cuda = "True" in str(session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True))
    scale = "tiny,real" if cuda else "tiny"
    session.run(
        "python", "-m", "pytest", "suites", "--tier", "nightly", "--guard", "all", "--scale", scale, "--save-outputs",
        *_workers(session), "--report-dir", f"{REPORTS}/nightly", *session.posargs, success_codes=[0, 5],
    )  # fmt: skip
    session.log(f"reports: {REPORTS}/nightly (report.html, summary.md, results.json, junit.xml)")


@nox.session(venv_params=VENV)
def gpu(session: nox.Session) -> None:
    """The suite on CUDA, tiny and real scale (reports/gpu). Refuses to run without a GPU rather than run on CPU."""
    _install(session, constraints=False)
    session.run("python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'nox -s gpu: no CUDA device')")
    session.run(
        "python", "-m", "pytest", "suites", "--tier", "nightly", "--conformance-device", "cuda", "--scale", "tiny,real", *_workers(session),
        "--report-dir", f"{REPORTS}/gpu", *session.posargs, success_codes=[0, 5],
    )  # fmt: skip


@nox.session(venv_params=VENV)
def bench(session: nox.Session) -> None:
    """pytest-benchmark over benchmarks/ (reports/suite/benchmark.json, beside the suite's results.json: the gate
    compares medians from a side's report directory). On a CPU the small sizes run, as a smoke test."""
    _install(session, constraints=False)
    os.makedirs(f"{REPORTS}/suite", exist_ok=True)
    session.run(
        "python", "-m", "pytest", "benchmarks", "-m", "bench", f"--benchmark-json={REPORTS}/suite/benchmark.json", *session.posargs,
        success_codes=[0, 5],
    )  # fmt: skip


@nox.session(venv_params=VENV)
def gate(session: nox.Session) -> None:
    """The upgrade gate: ``nox -s gate -- --baseline A --candidate B [--accept-semantics] [--suite-args "..."]``,
    A and B ComfyUI checkouts or report directories (reports/gate unless --out is given)."""
    _install(session, constraints=False)
    if not session.posargs:
        session.error("usage: nox -s gate -- --baseline A --candidate B (ComfyUI checkouts or report directories)")
    # nox turns every failing code into 1; the gate's codes mean different things to a CI job (3: semantics changed,
    # accept or reject; 4: benchmarks inconclusive), so the session ends the process with the gate's own code.
    command = [os.path.join(session.bin, "python"), "-m", "conformance", "gate", "--out", f"{REPORTS}/gate", *session.posargs]
    session.log(" ".join(command))
    code = subprocess.call(command)
    if code:
        session.log(f"gate exit code {code}")
        sys.stdout.flush()
        os._exit(code)
