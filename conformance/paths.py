"""Where the suite's data lives: next to the package in a checkout (also an editable install)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "fixtures"
PROFILES_DIR = FIXTURES_DIR / "profiles"
BUDGETS_FILE = FIXTURES_DIR / "budgets.toml"
EXPECTED_FAILURES_FILE = FIXTURES_DIR / "expected_failures.toml"
GOLDEN_DIR = REPO_ROOT / "golden"
DEFAULT_REPORT_DIR = Path("reports") / "latest"
SUITES_DIR = REPO_ROOT / "suites"
# A wheel (pip install . or git+...) holds the package only: the data above is not next to it.
NOT_A_CHECKOUT = (
    f"the conformance suite is installed without its data: {FIXTURES_DIR}, {GOLDEN_DIR} and {SUITES_DIR} are read next "
    "to the package, as in a checkout. Install it from a checkout in editable mode (git clone ... && pip install -e "
    "'.[comfyui]') and run pytest there"
)


def has_data() -> bool:
    return FIXTURES_DIR.is_dir() and GOLDEN_DIR.is_dir() and SUITES_DIR.is_dir()


def local_golden_store() -> Path:
    """Store for goldens too large to commit (real scale); ``CONFORMANCE_GOLDEN_STORE`` overrides it."""
    env = os.environ.get("CONFORMANCE_GOLDEN_STORE")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "diffusion-conformance" / "golden"
