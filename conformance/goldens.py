"""Golden store: float64 reference outputs saved as float32 safetensors, with a manifest that makes them checkable.

A golden is the component run in float64 on CPU from the same synthetic weights and the same captured inputs as every
case it judges. The manifest records who made it (subject and version, torch, seed) and the sha256 of the file, of
the inputs and of the weights, so that

* a file changed by hand is detected (its hash no longer matches the manifest);
* weights that changed (their sha256) or inputs that drifted beyond float32 noise (their fingerprint: a new subject
  version building RoPE differently, say) are detected before any comparison is made;
* nothing is replaced silently: ``--update-goldens`` rewrites atomically (temporary file + rename) and reports, for
  every golden it touched, the old and new hash and the largest difference.

Goldens are keyed by subject and identity (version, commit, local changes). Two stores exist: ``golden/`` in the
repository holds tiny-scale goldens of the identities the project pins (diffusers of the CI constraints, the ComfyUI
releases it is tested on); a local store (``paths.local_golden_store``) receives, on demand, real-scale goldens (too
large to commit) and goldens of any identity the repository does not hold (a user's own checkout).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import publish

FORMAT = 1


@dataclass(frozen=True)
class GoldenKey:
    """A golden belongs to one implementation at one identity (version, commit, local changes): each is judged against
    its own float64 run. Whether two identities compute the same thing is the gate's question, not the golden's."""

    subject: str
    identity: str
    component: str
    scale: str
    profile: str

    @property
    def id(self) -> str:
        return f"{self.subject}@{self.identity}/{self.component}/{self.scale}/{self.profile}"

    @property
    def relpath(self) -> str:
        return f"{self.subject}/{self.identity}/{self.component}/{self.scale}/{self.profile}.safetensors"


class GoldenError(Exception):
    """A golden cannot be used; the message says why and what to run."""


class GoldenMissing(GoldenError):
    pass


class GoldenTampered(GoldenError):
    pass


class GoldenStale(GoldenError):
    pass


def flatten_tensors(obj, prefix: str = "") -> dict[str, object]:
    """Nested kwargs -> flat ``name -> tensor or plain value``; complex tensors become their real view."""
    out: dict[str, object] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix + ("@complex" if obj.is_complex() else "")] = torch.view_as_real(obj) if obj.is_complex() else obj
    elif isinstance(obj, Mapping):
        for key in obj:
            out.update(flatten_tensors(obj[key], f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            out.update(flatten_tensors(item, f"{prefix}.{i}"))
    elif obj is not None:
        out[prefix] = obj
    return out


def tensor_digest(obj) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor (and reprs of plain values), in name order."""
    h = hashlib.sha256()
    for name, value in sorted(flatten_tensors(obj).items()):
        h.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


# Inputs pass through the subject's embedders in float32 (matmuls, convolutions), whose last bits depend on the BLAS
# and the CPU: a golden made on one machine is checked on another. Their fingerprint is compared with a tolerance far
# below any real change (a different RoPE or timestep embedding differs by 1e-3 or more) and far above that noise.
FINGERPRINT_RTOL = 1e-5
_SAMPLES = 16


def input_fingerprint(obj) -> dict[str, dict]:
    """Per tensor: dtype, shape, L2 norm, max |x| and a few values at fixed positions."""
    out = {}
    for name, value in sorted(flatten_tensors(obj).items()):
        if not isinstance(value, torch.Tensor):
            out[name] = {"value": repr(value)}
            continue
        t = value.detach().to("cpu")
        flat = t.reshape(-1).double() if t.is_floating_point() else t.reshape(-1).long().double()
        n = flat.numel()
        picks = torch.linspace(0, max(n - 1, 0), min(_SAMPLES, n)).long() if n else torch.zeros(0, dtype=torch.long)
        finite = flat[torch.isfinite(flat)]
        entry = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            # over the finite values; NaN and Inf are counted (JSON has no NaN, and NaN != NaN would make every
            # comparison of a NaN-carrying input a change)
            "l2": float(torch.linalg.vector_norm(finite)) if finite.numel() else 0.0,
            "absmax": float(finite.abs().max()) if finite.numel() else 0.0,
            "sample": [float(v) if math.isfinite(v) else repr(float(v)) for v in flat[picks].tolist()],
        }
        nonfinite = n - finite.numel()
        if nonfinite:
            entry["nonfinite"] = {"nan": int(torch.isnan(flat).sum()), "inf": int(torch.isposinf(flat).sum()), "-inf": int(torch.isneginf(flat).sum())}
        out[name] = entry
    return out


def fingerprint_drift(recorded: Mapping[str, dict], current: Mapping[str, dict], rtol: float = FINGERPRINT_RTOL) -> list[str]:
    """What differs beyond float32 noise between two fingerprints (empty: the same inputs)."""
    problems = []
    for name in sorted(set(recorded) | set(current)):
        a, b = recorded.get(name), current.get(name)
        if a is None or b is None:
            problems.append(f"{name} {'appeared' if a is None else 'disappeared'}")
            continue
        if "value" in a or "value" in b:
            if a != b:
                problems.append(f"{name}: {a.get('value')} -> {b.get('value')}")
            continue
        if a["dtype"] != b["dtype"] or a["shape"] != b["shape"]:
            problems.append(f"{name}: {a['dtype']}{a['shape']} -> {b['dtype']}{b['shape']}")
            continue
        if a.get("nonfinite") != b.get("nonfinite"):
            problems.append(f"{name}: non-finite values {a.get('nonfinite') or 'none'} -> {b.get('nonfinite') or 'none'}")
            continue
        scale = max(a["absmax"], b["absmax"], 1e-30)
        samples = list(zip(a["sample"], b["sample"]))
        if any(isinstance(x, str) or isinstance(y, str) for x, y in samples) and any(x != y for x, y in samples if isinstance(x, str) or isinstance(y, str)):
            problems.append(f"{name}: non-finite values moved")
            continue
        worst = max(
            [abs(a["l2"] - b["l2"]) / max(a["l2"], b["l2"], 1e-30), abs(a["absmax"] - b["absmax"]) / scale]
            + [abs(x - y) / scale for x, y in samples if not isinstance(x, str) and not isinstance(y, str)]
        )
        if worst > rtol:
            problems.append(f"{name} differs by {worst:.2g} (relative)")
    return problems


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Golden:
    key: GoldenKey
    path: Path
    sha256: str
    outputs: dict[str, torch.Tensor]
    entry: dict
    store: GoldenStore

    def as_report(self) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "store": str(self.store.root), "id": self.key.id}


@dataclass
class GoldenChange:
    key: GoldenKey
    path: Path
    action: str  # created | updated | unchanged
    old_sha256: str | None
    new_sha256: str
    max_diff: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if self.action == "created":
            return f"created {self.key.id} -> {self.path} (sha256 {self.new_sha256[:12]})"
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_diff.items()) or "n/a"
        old = (self.old_sha256 or "none")[:12]
        return f"{self.action} {self.key.id}: sha256 {old} -> {self.new_sha256[:12]}, max |new - old|: {diffs}"


class GoldenStore:
    def __init__(self, root: Path, label: str) -> None:
        self.root = Path(root)
        self.label = label

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "goldens": {}}
        data = json.loads(self.manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise GoldenError(f"{self.manifest_path}: manifest format {data.get('format')!r}, this suite reads {FORMAT}")
        return data

    def entry(self, key: GoldenKey) -> dict | None:
        return self.manifest()["goldens"].get(key.id)

    def has_identity(self, subject: str, identity: str) -> bool:
        """Whether this store holds any golden of that subject at that identity."""
        prefix = f"{subject}@{identity}/"
        return any(k.startswith(prefix) for k in self.manifest()["goldens"])

    def load(self, key: GoldenKey, inputs: Mapping[str, object], weights_sha256: str, create_command: str) -> Golden:
        """Load a golden after checking the file's hash, the weights' hash and the inputs' fingerprint."""
        entry = self.entry(key)
        path = self.root / key.relpath
        if entry is None or not path.exists():
            what = "no manifest entry" if entry is None else f"file {path} is missing"
            raise GoldenMissing(f"no golden for {key.id} in the {self.label} store {self.root} ({what}); create it with: {create_command}")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise GoldenTampered(
                f"golden {path} has sha256 {actual[:16]} but the manifest records {entry['sha256'][:16]}: the file was "
                f"changed outside --update-goldens. Restore it (git checkout) or regenerate it with: {create_command}"
            )
        made_by = f"{entry['subject']['name']} {entry['subject']['version']}, torch {entry['torch']}"
        if entry["weights_sha256"] != weights_sha256:
            raise GoldenStale(
                f"the weights of {key.id} (sha256 {weights_sha256[:16]}) differ from those its golden was made from "
                f"({entry['weights_sha256'][:16]}, {made_by}). If that is intended, regenerate with: {create_command}"
            )
        drift = fingerprint_drift(entry["inputs_fingerprint"], input_fingerprint(inputs))
        if drift:
            raise GoldenStale(
                f"the inputs of {key.id} differ from those its golden was made from ({made_by}): {'; '.join(drift[:4])}. "
                f"The subject now builds them differently. If that is intended, regenerate with: {create_command}"
            )
        tensors = load_file(str(path))
        outputs = {name.removeprefix("output."): t for name, t in tensors.items() if name.startswith("output.")}
        return Golden(key=key, path=path, sha256=actual, outputs=outputs, entry=entry, store=self)

    def write(self, key: GoldenKey, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> GoldenChange:
        """Store float64 outputs as float32, atomically, and report what changed. The inputs they came from are
        identified by the sha256 in ``meta`` (regenerated from the seed on every run, never stored)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, value in outputs.items():
            tensors[f"output.{name}"] = value.detach().to("cpu", torch.float32).contiguous()
        path = self.root / key.relpath
        with self._locked():
            manifest = self.manifest()
            old_entry = manifest["goldens"].get(key.id)
            old = load_file(str(path)) if path.exists() else None
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                # One metadata key: safetensors writes a metadata map in hash order, which would make the bytes vary.
                save_file(tensors, tmp, metadata={"golden": f"{key.id} (format {FORMAT})"})
                new_sha = file_sha256(Path(tmp))
                os.chmod(tmp, _umask_mode())
                publish(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            entry = {
                "file": key.relpath,
                "sha256": new_sha,
                "outputs": {
                    name: {"sha256": tensor_digest(t), "shape": list(t.shape)}
                    for name, t in tensors.items()
                    if name.startswith("output.")
                },
                **meta,
            }
            unchanged = old_entry is not None and {k: v for k, v in old_entry.items() if k != "created"} == entry
            if not unchanged:
                entry["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
                manifest["goldens"][key.id] = entry
                manifest["goldens"] = dict(sorted(manifest["goldens"].items()))
                _atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
        if old is None:
            return GoldenChange(key, path, "created", None, new_sha)
        diffs = {}
        for name, t in tensors.items():
            if name.startswith("output.") and name in old and old[name].shape == t.shape:
                diffs[name.removeprefix("output.")] = float((old[name].double() - t.double()).abs().max())
            elif name.startswith("output."):
                diffs[name.removeprefix("output.")] = float("inf")
        return GoldenChange(key, path, "unchanged" if unchanged else "updated", old_entry["sha256"] if old_entry else None, new_sha, diffs)
