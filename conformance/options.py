"""The suite's command-line options, declared once: each is ``--conformance-<key>``, with its short alias where no
known plugin uses the short name (``--device`` is pytest-playwright's, ``--profile`` pytest-profiling's,
``--update-goldens`` pytest-golden's). Imports nothing heavy: every pytest run in an environment with the suite
installed loads this (``conformance.plugin``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .axes import SCALES, SUBJECTS, TIERS
from .paths import DEFAULT_REPORT_DIR, GOLDEN_DIR
from .prefetch import MODES as PREFETCH_MODES

if TYPE_CHECKING:
    from .session import ConformanceSession  # noqa: F401 (named in the stash key's type)

SESSION = pytest.StashKey["ConformanceSession"]()

# key -> (short alias or None where it clashes with a known plugin, argparse keywords); --conformance-<key> always
OPTIONS: dict[str, tuple[str | None, dict]] = {
    "subject": ("--subject", {"choices": SUBJECTS, "default": None, "help": "implementation under test (default: comfyui when a checkout is given, else diffusers)"}),
    "comfyui": ("--comfyui", {"default": None, "metavar": "PATH", "help": "ComfyUI checkout to test (default: $COMFYUI_PATH)"}),
    "device": (None, {"default": "auto", "help": "cpu, cuda, cuda:N or auto (CUDA when available)"}),
    "scale": ("--scale", {"default": "tiny", "help": f"comma-separated scales: {', '.join(SCALES)} (default: tiny)"}),
    "profile": (None, {"default": None, "help": "comma-separated input profiles (default: every profile of the family)"}),
    "tier": ("--tier", {"default": None, "choices": TIERS, "help": "default: blocks in full, decoders under the reference backend (the default run without -m/-k); nightly: everything"}),
    "guard": ("--guard", {"default": "none", "help": "comma-separated guard policies, or 'all' (docs/findings.md: Guards)"}),
    "report_dir": ("--report-dir", {"default": None, "help": f"where results.json, summary.md and junit.xml go (default: {DEFAULT_REPORT_DIR})"}),
    "update_goldens": (None, {"action": "store_true", "help": "recompute the goldens the selected cases use; every change is reported"}),
    "golden_dir": ("--golden-dir", {"default": None, "help": f"committed golden store (default: {GOLDEN_DIR})"}),
    "golden_store": ("--golden-store", {"default": None, "help": "local store for real-scale goldens (default: $CONFORMANCE_GOLDEN_STORE or ~/.cache/diffusion-conformance/golden)"}),
    "expectations": ("--expectations", {"default": None, "help": "ratchet file from a baseline run: a case worse than its expectation fails"}),
    "save_outputs": ("--save-outputs", {"action": "store_true", "help": "save every case's outputs (float32 safetensors) under <report-dir>/outputs, for the upgrade gate"}),
    "patch": ("--patch", {"action": "append", "default": [], "metavar": "MODULE:CALLABLE", "help": "a third-party patch installed on every model of the whole-model cases, as a custom node installs it (a dotted module or a .py file, then the function); repeatable (docs/workloads.md)"}),
    "weights": ("--weights", {"default": None, "metavar": "PATH", "help": "block cases on a checkpoint file or diffusers folder: its blocks replace the scale axis (docs/checkpoints.md)"}),
    "block": ("--block", {"default": None, "metavar": "N[,M...]", "help": "with --weights: the blocks to test, negative from the end (default: first, middle and last)"}),
    "prefetch_goldens": ("--prefetch-goldens", {"default": "auto", "choices": PREFETCH_MODES, "help": "make the run's missing goldens ahead of their cases in a second CPU process (auto: on a CUDA run without xdist)"}),
}  # fmt: skip


class UsageError(pytest.UsageError):
    pass


def names(key: str) -> list[str]:
    """The option's command-line names: the prefixed one, then its alias if it has one."""
    alias = OPTIONS[key][0]
    return [f"--conformance-{key.replace('_', '-')}"] + ([alias] if alias else [])


def option(config: pytest.Config, key: str):
    return config.getoption(f"conformance_{key}")


def asked_on_command_line(config: pytest.Config) -> bool:
    """Whether any of the suite's options was given (a value other than its default)."""
    return any(option(config, key) != kwargs.get("default", False) for key, (_alias, kwargs) in OPTIONS.items())
