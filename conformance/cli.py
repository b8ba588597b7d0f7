"""``python -m conformance``: the upgrade gate, the ratchet writer and the HTML report, for a shell or a CI job.

``gate`` takes two sides, each a report directory (holds ``results.json``) or a ComfyUI checkout (holds
``comfy/model_management.py``). A checkout is run through the suite first, in its own pytest process (ComfyUI can be
imported once per process), with ``--save-outputs`` so the gate can compare fp32 outputs; then the two report
directories are compared. gate.md, gate.html and gate.json go to ``--out``; the markdown summary is printed; the
exit code is the gate's (0 pass, 1 regressed, 3 semantics changed, 4 benchmark slowdown, 5 inconclusive: the runs
cannot answer; 2 usage or input error).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import conformance

from .atomic import write_text
from .gate import DEFAULT_FP32_RTOL
from .rundir import RESULTS_FILE, ReportDirError

REPO_ROOT = Path(conformance.__file__).resolve().parent.parent
DEFAULT_GATE_DIR = REPO_ROOT / "reports" / "gate"
EXIT_USAGE = 2


class CliError(Exception):
    """An input problem the user can fix; printed without a traceback, exit code 2."""


def is_report_dir(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file()


def is_comfyui_checkout(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file()


def suite_command(checkout: Path, report_dir: Path, suite_args: list[str]) -> list[str]:
    """The pytest command that runs the suite on one ComfyUI checkout (``--comfyui=PATH``: README, "Testing a ComfyUI checkout")."""
    return [sys.executable, "-m", "pytest", "suites", "-q", f"--comfyui={checkout}", "--save-outputs", "--report-dir", str(report_dir), *suite_args]


GATE_TIER = ["--conformance-profile", "nominal,massive"]  # what a checkout is run with unless --suite-args names profiles


def gate_suite_args(suite_args: list[str]) -> list[str]:
    """The gate tier: the nominal profile (where a change of the math shows, see gate.py) and ``massive`` (where fp16
    overflow regressions show), every family, precision and backend; the stress profiles are the nightly's. Any
    ``--conformance-profile`` in ``--suite-args`` replaces it."""
    if any(arg == "--conformance-profile" or arg.startswith("--conformance-profile=") for arg in suite_args):
        return suite_args
    return [*GATE_TIER, *suite_args]


class SuiteRun:
    """The suite running on one checkout in its own process (ComfyUI can be imported once per process), its output
    streamed to stderr with the side's label, so that stdout carries only the gate's summary."""

    def __init__(self, label: str, checkout: Path, report_dir: Path, suite_args: list[str], threads: int | None) -> None:
        self.label, self.checkout, self.report_dir = label, checkout, report_dir
        self.results = report_dir / RESULTS_FILE
        self.results.unlink(missing_ok=True)
        shutil.rmtree(report_dir / "outputs", ignore_errors=True)  # stale outputs would be compared as this run's
        report_dir.mkdir(parents=True, exist_ok=True)
        command = suite_command(checkout, report_dir, suite_args)
        print(f"[gate] {label}: {shlex.join(command)}", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # --comfyui names the checkout; nothing else may
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # two runs side by side share the cores instead of fighting for them
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pump = threading.Thread(target=self._stream, daemon=True)
        self.pump.start()

    def _stream(self) -> None:
        for line in self.proc.stdout:  # streamed: a real-scale run takes minutes
            sys.stderr.write(f"[{self.label}] {line}")

    def wait(self) -> Path:
        self.proc.wait()
        self.pump.join()
        # pytest: 0 all passed, 1 some failed (the gate's business); anything else means no usable run
        if self.proc.returncode not in (0, 1) or not self.results.is_file():
            raise CliError(f"the suite on {self.checkout} exited with {self.proc.returncode} and wrote no {self.results}; its output is above")
        return self.report_dir


def run_suite(checkout: Path, report_dir: Path, suite_args: list[str]) -> Path:
    """Run the suite on ``checkout`` into ``report_dir`` (emptied of an earlier run's results first)."""
    return SuiteRun(report_dir.name, checkout, report_dir, suite_args, None).wait()


def resolve_side(label: str, path: Path, out_dir: Path, suite_args: list[str]) -> Path:
    """One side's report directory: a report directory as is, a ratchet file converted, a checkout run."""
    from .expectations_io import is_expectations_file, results_from_expectations

    path = path.expanduser().resolve()
    if path.is_file() and is_expectations_file(path):
        side = out_dir / label
        side.mkdir(parents=True, exist_ok=True)
        write_text(side / RESULTS_FILE, json.dumps(results_from_expectations(path), indent=1) + "\n")
        print(f"[gate] {label}: the ratchet file {path} (no saved outputs: no fp32 semantics check on this side)", file=sys.stderr)
        return side
    if is_report_dir(path):
        if suite_args:
            print(f"[gate] {label}: {path} is a report directory; --suite-args ignored for it", file=sys.stderr)
        return path
    if is_comfyui_checkout(path):
        return run_suite(path, out_dir / label, gate_suite_args(suite_args))
    raise CliError(
        f"--{label} {path}: neither a report directory (no {RESULTS_FILE}), a ComfyUI checkout (no comfy/model_management.py)"
        " nor a ratchet file (python -m conformance expectations)"
    )


def resolve_sides(sides: list[tuple[str, Path]], out_dir: Path, suite_args: list[str], jobs: int) -> list[Path]:
    """Each side's report directory: as given, converted from a ratchet file, or run from a checkout. Checkouts run
    ``jobs`` at a time (two by default: both sides at once, each with half the cores)."""
    resolved: dict[str, Path] = {}
    pending = []
    for label, path in sides:
        path = path.expanduser().resolve()
        if is_comfyui_checkout(path) and not is_report_dir(path):
            pending.append((label, path))
        else:
            resolved[label] = resolve_side(label, path, out_dir, suite_args)
    threads = max(1, (os.cpu_count() or 2) // max(1, min(jobs, len(pending)))) if pending else None
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        runs = [SuiteRun(label, path, out_dir / label, gate_suite_args(suite_args), threads if len(batch) > 1 else None) for label, path in batch]
        for run in runs:
            resolved[run.label] = run.wait()
    return [resolved[label] for label, _ in sides]


def cmd_gate(args: argparse.Namespace) -> int:
    from .gate import compare_runs
    from .gate_report import gate_html, gate_markdown

    out_dir = Path(args.out).expanduser().resolve()
    suite_args = shlex.split(args.suite_args or "")
    started = time.monotonic()
    baseline, candidate = resolve_sides([("baseline", Path(args.baseline)), ("candidate", Path(args.candidate))], out_dir, suite_args, args.jobs)
    result = compare_runs(
        baseline,
        candidate,
        fp32_rtol=args.fp32_rtol,
        accept_semantics=args.accept_semantics,
        fail_on_benchmark_slowdown=args.fail_on_benchmark_slowdown,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "gate.md", gate_markdown(result))
    write_text(out_dir / "gate.html", gate_html(result))
    write_text(out_dir / "gate.json", json.dumps(result.as_dict(), indent=1) + "\n")
    print(gate_markdown(result, include_unchanged=False))
    print(f"gate report: {out_dir / 'gate.md'}, {out_dir / 'gate.html'}, {out_dir / 'gate.json'} ({time.monotonic() - started:.0f} s)")
    return result.exit_code


def cmd_expectations(args: argparse.Namespace) -> int:
    from .expectations_io import write_expectations

    out = Path(args.out)
    old = _ratchet_cases(out)
    if old is not None and not args.replace:
        raise CliError(f"{out} exists ({len(old)} cases); pass --replace to overwrite it (the changes are then listed)")
    path = write_expectations(Path(args.source), out)
    if old is None:
        print(f"expectations: {path}")
        return 0
    new = _ratchet_cases(path) or {}
    changed = sorted(i for i in set(old) & set(new) if old[i] != new[i])
    print(f"expectations: {path} replaced: {len(changed)} changed, {len(set(new) - set(old))} added, {len(set(old) - set(new))} removed")
    for case_id in changed[:50]:
        print(f"  {case_id}: rel_l2 {old[case_id].get('rel_l2')} -> {new[case_id].get('rel_l2')}, {old[case_id].get('outcome')} -> {new[case_id].get('outcome')}")
    return 0


def _ratchet_cases(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("cases") or {}
    except (OSError, ValueError, AttributeError):
        raise CliError(f"{path} exists and is not a ratchet file; not overwriting it") from None


def cmd_html(args: argparse.Namespace) -> int:
    from .html_report import render_html
    from .rundir import load_results

    report_dir = Path(args.report_dir)
    path = render_html(load_results(report_dir), Path(args.out) if args.out else report_dir)
    print(f"report: {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """What the suite reads from a checkpoint: its layout, family, variant, blocks and storage format (headers only)."""
    from .checkpoints import CheckpointError, open_checkpoint

    try:
        checkpoint = open_checkpoint(args.path)
    except CheckpointError as error:
        raise CliError(str(error)) from None
    print(json.dumps(checkpoint.describe(), indent=2))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gate = sub.add_parser("gate", help="compare a candidate run (or ComfyUI checkout) with a baseline", description=__doc__.split("\n\n")[1])
    gate.add_argument("--baseline", required=True, help="report directory, ComfyUI checkout or ratchet file")
    gate.add_argument("--candidate", required=True, help="report directory or ComfyUI checkout")
    gate.add_argument(
        "--fp32-rtol", type=_positive, default=DEFAULT_FP32_RTOL, help="fp32 outputs further than this rel-L2 from the baseline's change semantics (default 1e-5)"
    )
    gate.add_argument("--accept-semantics", action="store_true", help="semantics changes do not fail the gate (they are still reported)")
    gate.add_argument(
        "--fail-on-benchmark-slowdown", type=_fraction, default=None, metavar="FRACTION", help="fail when a benchmark's median is more than this fraction slower (default: report only)"
    )
    gate.add_argument("--out", default=str(DEFAULT_GATE_DIR), help=f"where gate.md, gate.html, gate.json and checkout runs go (default {DEFAULT_GATE_DIR})")
    gate.add_argument("--jobs", type=int, default=2, help="checkout runs at a time (default 2: both sides at once)")
    gate.add_argument("--suite-args", default="", help='extra pytest arguments for checkout runs, one string: --suite-args "-m qwen --scale tiny"')
    gate.set_defaults(func=cmd_gate)

    exp = sub.add_parser("expectations", help="write the ratchet file (--expectations) from a run")
    exp.add_argument("--from", dest="source", required=True, metavar="REPORT_DIR", help="report directory of the baseline run")
    exp.add_argument("--out", required=True, metavar="FILE", help="ratchet file to write, e.g. expectations/comfyui-0.3.64.json")
    exp.add_argument("--replace", action="store_true", help="overwrite an existing ratchet file (the changed cases are listed)")
    exp.set_defaults(func=cmd_expectations)

    page = sub.add_parser("html", help="write report.html for an existing report directory")
    page.add_argument("report_dir", help="report directory (holds results.json)")
    page.add_argument("--out", default=None, help="file or directory (default: the report directory)")
    page.set_defaults(func=cmd_html)

    inspect = sub.add_parser("inspect", help="say what the suite reads from a checkpoint file or diffusers folder (headers only)")
    inspect.add_argument("path", help="a .safetensors file, a shard index, or a diffusers model/pipeline folder")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def _glue_suite_args(argv: list[str]) -> list[str]:
    """``--suite-args "-m qwen"`` as one token: argparse would read a value that starts with '-' as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--suite-args" and i + 1 < len(argv):
            out.append(f"--suite-args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _glue_suite_args(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exit.code or 0)
    try:
        return args.func(args)
    except (CliError, ReportDirError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
