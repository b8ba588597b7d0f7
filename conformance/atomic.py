"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``, so that a reader (or a killed
run) never sees half a report, golden or ratchet. ``tempfile.mkstemp`` creates its file for the owner only (0600);
``publish`` gives it the permissions an ordinary ``open(path, "w")`` would have before it replaces the target, so a
report directory stays readable by the CI artifact uploader or a colleague."""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp_path: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``tmp_path`` the mode a new file would get (0666 minus the umask) and move it over ``target``."""
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, target)
