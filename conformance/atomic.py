"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``, so that a reader (or a killed
run) never sees half a report, golden or ratchet. ``tempfile.mkstemp`` creates its file for the owner only (0600);
``publish`` gives it the permissions an ordinary ``open(path, "w")`` would have before it replaces the target, so a
report directory stays readable by the CI artifact uploader or a colleague."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp_path: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``tmp_path`` the mode a new file would get (0666 minus the umask) and move it over ``target``."""
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, target)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its directory; the temporary file is removed if the
    write fails. ``durable`` also fsyncs before the rename (a ratchet a CI job must never find truncated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
