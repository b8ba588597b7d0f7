"""Import ComfyUI from a checkout without starting it, and find out what this version offers.

ComfyUI is not a package: its ``comfy`` modules are imported from the checkout's directory. ``comfy.cli_args`` parses
an empty argument list unless ``main.py`` enabled parsing, so its flags are set by mutating ``args`` before
``comfy.model_management`` is imported (the module reads them at import time):

* ``cpu`` when the suite runs on CPU (else ComfyUI asks CUDA for the current device and fails without one);
* ``disable_xformers`` unless xformers is importable with this torch (a broken wheel would fail the import);
* never ``use_sage_attention`` / ``use_flash_attention``: with the package missing ComfyUI calls ``exit()``. The sage
  and flash functions exist regardless; the kernels are injected where an older version only imports them behind
  the flag.

Only one checkout can be imported per process (``comfy`` is a top-level module name).
"""

from __future__ import annotations

import hashlib
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from ...backends import package_reasons
from ..base import SubjectError
from ..sources import source_hash


@dataclass
class ComfyUI:
    """An imported ComfyUI checkout: where, which version, its modules, and the features this version has."""

    path: Path
    version: str
    commit: str | None
    dirty: bool | None
    diff_hash: str | None
    source_hash: str
    model_management: ModuleType
    ops: ModuleType
    attention: ModuleType
    cli_args: ModuleType
    features: dict[str, bool] = field(default_factory=dict)
    global_settings: dict[str, object] = field(default_factory=dict)

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(name)


def read_version(path: Path) -> str:
    for candidate, pattern in (
        (path / "comfyui_version.py", r"__version__\s*=\s*['\"]([^'\"]+)['\"]"),
        (path / "pyproject.toml", r"^version\s*=\s*['\"]([^'\"]+)['\"]"),
    ):
        if candidate.exists():
            match = re.search(pattern, candidate.read_text(), re.MULTILINE)
            if match:
                return match.group(1)
    return "unknown"


def _git(path: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


# What a checkout's identity covers: the sources the adapters import and their neighbours (conformance.subjects.sources).
SOURCE_PARTS = ("comfy", "comfy_extras", "comfyui_version.py")


def git_state(path: Path) -> tuple[str | None, bool | None, str | None]:
    """(commit, dirty, hash of the changes) where the checkout is a git work tree; Nones otherwise.

    Only the Python sources of ``SOURCE_PARTS`` count: a checkout missing a large data file (a tokenizer) or with a
    custom node of its own computes the same blocks.
    """
    if not (path / ".git").exists():
        return None, None, None
    commit = (_git(path, "rev-parse", "HEAD") or "").strip() or None
    diff = _git(path, "diff", "HEAD", "--", *(f"{part}/*.py" if not part.endswith(".py") else part for part in SOURCE_PARTS))
    if commit is None or diff is None:
        return commit, None, None
    dirty = bool(diff.strip())
    return commit, dirty, hashlib.sha256(diff.encode()).hexdigest() if dirty else None


def _check_checkout(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise SubjectError(f"ComfyUI path {path} is not a directory")
    if not (path / "comfy" / "ldm").is_dir() or not (path / "comfy" / "model_management.py").exists():
        raise SubjectError(f"{path} is not a ComfyUI checkout: no comfy/ldm or comfy/model_management.py in it")
    return path


def load(path: Path, device: torch.device) -> ComfyUI:
    path = _check_checkout(path)
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        loaded_from = Path(next(iter(getattr(loaded, "__path__", [""])))).resolve().parent
        if loaded_from != path:
            raise SubjectError(f"ComfyUI from {loaded_from} is already imported in this process; one checkout per run (asked: {path})")
    elif str(path) not in sys.path:
        # Appended, not prepended: the checkout's other top-level names (tests, utils, app) must not shadow the
        # runner's own packages; the model code imports only ``comfy.*``.
        sys.path.append(str(path))

    cli_args = importlib.import_module("comfy.cli_args")
    args = cli_args.args
    args.cpu = device.type == "cpu"
    xformers_reasons = package_reasons("xformers")
    args.disable_xformers = bool(xformers_reasons) or device.type != "cuda"
    for flag in ("use_sage_attention", "use_flash_attention"):
        if getattr(args, flag, False):
            raise SubjectError(f"comfy.cli_args.args.{flag} is set; the suite forces backends itself")
    try:
        model_management = importlib.import_module("comfy.model_management")
        ops = importlib.import_module("comfy.ops")
        attention = importlib.import_module("comfy.ldm.modules.attention")
    except ImportError as error:
        raise SubjectError(
            f"importing ComfyUI from {path} failed: {error}. Its block tests need torch, numpy, einops, psutil and Pillow "
            f"(pip install -e '.[comfyui]')"
        ) from error

    commit, dirty, diff_hash = git_state(path)
    comfy = ComfyUI(
        path=path,
        version=read_version(path),
        commit=commit,
        dirty=dirty,
        diff_hash=diff_hash,
        source_hash=source_hash(path, SOURCE_PARTS),
        model_management=model_management,
        ops=ops,
        attention=attention,
        cli_args=cli_args,
    )
    comfy.features = {
        "optimized_attention_override": hasattr(attention, "wrap_attn"),
        "attention_registry": hasattr(attention, "REGISTERED_ATTENTION_FUNCTIONS"),
        "scaled_fp8_ops": hasattr(ops, "scaled_fp8_ops"),
        "mixed_precision_ops": hasattr(ops, "mixed_precision_ops") or hasattr(ops, "MixedPrecisionOps"),
        "fp8_ops": hasattr(ops, "fp8_ops"),
        "xformers_enabled": bool(model_management.xformers_enabled()),
    }
    comfy.global_settings = {
        "args.cpu": args.cpu,
        "args.disable_xformers": args.disable_xformers,
        "args.fast": sorted(str(f) for f in getattr(args, "fast", []) or []),
        "default attention": getattr(attention.optimized_attention, "__name__", str(attention.optimized_attention)),
        "force_upcast_attention_dtype": str(getattr(attention, "FORCE_UPCAST_ATTENTION_DTYPE", None)),
    }
    return comfy
