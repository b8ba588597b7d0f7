"""Golden store: the exact inputs a component was run on and its float64 outputs for them, with a manifest.

A golden is a pair. Its *inputs* are the keyword arguments the subject's own model built for the block, stored bit
for bit (float32, as captured; every case casts them to its own dtype). Its *outputs* are the component run on them
in float64 (on the CPU, or on a CUDA run's GPU where the forward is float64 throughout: ``Engine.golden_device``),
stored as float32. Cases run on the stored inputs, so a verdict does not depend on the machine
that runs it; whether the subject still builds the same inputs is the engine's separate check
(``conformance.inputs``).

Files of a store::

    manifest.json                                   who made each golden, the sha256 of every file and tensor
    <subject>/<identity>/<component>/<scale>/<profile>.safetensors   the outputs; the inputs' structure in metadata
    inputs/<sha[:2]>/<sha>.safetensors              one input tensor each, named by its digest

Input tensors are stored once per store by content: the text embedding or RoPE table a dozen goldens share is one
file (real-scale inputs are tens of MB each).

Nothing is lost or replaced behind anyone's back:

* a golden is created under a lock of its own (``creating``): a second process asking for it waits, then finds it,
  recomputes its outputs from the stored inputs and fails loudly (``GoldenConflict``) if they differ beyond float64
  noise; it never writes;
* ``write`` refuses to replace an existing golden unless asked to (``--conformance-update-goldens``), and then reports the old and
  new hash and the largest difference; every file is written atomically (temporary file + rename);
* a file whose hash differs from the manifest, or an input tensor whose bytes differ from its name, fails its cases.

Goldens are keyed by subject and identity (``SubjectInfo.identity``: version + commit, or version + source hash).
``golden/`` in the repository holds tiny-scale goldens of the identities the project pins; a local store
(``paths.local_golden_store``) receives real-scale goldens and those of any other identity, on demand.

Cross-machine equality of goldens is a tolerance (``outputs_agree``): float64 sums ordered differently by another BLAS
or thread count differ by ~1e-16 of the terms, which after rounding to float32 moves an element by at most one
float32 ulp (and values near zero by float64 noise of the output's scale). On one machine a golden is reproduced
bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import publish
from .inputs import digest, pack, tensor_names, unpack
from .trees import leaves

FORMAT = 2
INPUTS_DIR = "inputs"
LOCKS_DIR = ".locks"
REQUIRED_FIELDS = ("file", "sha256", "outputs", "inputs", "subject", "torch", "seed", "backend", "weights_sha256", "machine", "created")


@dataclass(frozen=True)
class GoldenKey:
    """A golden belongs to one implementation at one identity: each is judged against its own float64 run. Whether
    two identities compute the same thing is the gate's question, not the golden's."""

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


class GoldenBusy(GoldenError):
    """Another process holds the golden's lock and the caller asked not to wait (the prefetcher moves on)."""


class GoldenConflict(GoldenError):
    """Two creators of one golden computed different outputs: one of the two machines or trees is not what it says."""


def flatten_tensors(obj, prefix: str = "") -> dict[str, object]:
    """Nested kwargs -> flat ``name -> tensor or plain value``; complex tensors become their real view."""
    out: dict[str, object] = {}
    for name, value in leaves(obj, prefix):
        if isinstance(value, torch.Tensor) and value.is_complex():
            out[name + "@complex"] = torch.view_as_real(value)
        else:
            out[name] = value
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# float64 noise of a golden, relative to the output's largest magnitude, on top of one float32 ulp (module docstring)
FLOAT64_NOISE = 1e-12


def outputs_agree(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[bool, dict[str, float]]:
    """Whether two goldens' outputs are the same float64 computation (see the module docstring); and per output the
    largest difference in float32 ulps of the element."""
    if set(a) != set(b):
        return False, {name: float("inf") for name in set(a) ^ set(b)}
    worst: dict[str, float] = {}
    ok = True
    for name in sorted(a):
        x, y = a[name].to(torch.float32), b[name].to(torch.float32)
        if x.shape != y.shape:
            ok, worst[name] = False, float("inf")
            continue
        same_nan = torch.equal(torch.isnan(x), torch.isnan(y))
        x64, y64 = x.double().nan_to_num(0.0), y.double().nan_to_num(0.0)
        ulp = (torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs()).double().nan_to_num(0.0)
        diff = (x64 - y64).abs()
        scale = float(x64.abs().max()) if x.numel() else 0.0
        allowed = ulp + FLOAT64_NOISE * scale
        worst[name] = float((diff / ulp.clamp_min(torch.finfo(torch.float64).tiny)).max()) if x.numel() else 0.0
        if not same_nan or bool((diff > allowed).any()):
            ok = False
    return ok, worst


@dataclass
class StoredInputs:
    """A golden's inputs: the keyword arguments, the token counts and the profile's outlier channels."""

    kwargs: dict[str, object]
    sizes: dict[str, int]
    outlier_channels: dict[str, list[int]]
    sha256: str  # over the tensors' digests and the structure: equal for bit-identical inputs


@dataclass
class Golden:
    key: GoldenKey
    path: Path
    sha256: str
    outputs: dict[str, torch.Tensor]
    inputs: StoredInputs
    entry: dict
    store: GoldenStore

    def as_report(self) -> dict:
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "store": str(self.store.root),
            "id": self.key.id,
            "inputs_sha256": self.inputs.sha256,
            "made_on": self.entry.get("machine"),
            "made_with_torch": self.entry.get("torch"),
        }


@dataclass
class GoldenChange:
    key: GoldenKey
    path: Path
    action: str  # created | updated | unchanged
    old_sha256: str | None
    new_sha256: str
    max_diff: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        if self.action == "created":
            return f"created {self.key.id} -> {self.path} (sha256 {self.new_sha256[:12]})"
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_diff.items()) or "n/a"
        old = (self.old_sha256 or "none")[:12]
        note = f" ({self.note})" if self.note else ""
        return f"{self.action} {self.key.id}: sha256 {old} -> {self.new_sha256[:12]}, max |new - old|: {diffs}{note}"


def _inputs_sha(structure: dict, digests: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps({"structure": structure, "tensors": dict(sorted(digests.items()))}, sort_keys=True).encode()).hexdigest()


def inputs_sha256(kwargs: Mapping[str, object]) -> str:
    """The identity of a set of inputs as a golden records it (``StoredInputs.sha256``)."""
    tensors, structure = pack(kwargs)
    return _inputs_sha(structure, {name: digest(t) for name, t in tensors.items()})


class GoldenStore:
    def __init__(self, root: Path, label: str) -> None:
        self.root = Path(root)
        self.label = label

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def _lock_path(self, name: str) -> Path:
        path = self.root / LOCKS_DIR / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock: held while the manifest and the input blobs are written."""
        with FileLock(self._lock_path("manifest")):
            yield

    @contextlib.contextmanager
    def creating(self, key: GoldenKey, on_wait: Callable[[str], None] | None = None, wait: bool = True) -> Iterator[None]:
        """One golden's lock: held from 'is it there?' to its write, so a golden is computed once however many
        processes ask for it at the same time. ``on_wait`` is told once when another process holds it; without
        ``wait``, ``GoldenBusy`` instead of waiting."""
        lock = FileLock(self._lock_path(key.relpath.replace("/", "__")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise GoldenBusy(f"golden {key.id}: another process is creating it") from None
            if on_wait is not None:
                on_wait(f"waiting for golden {key.id}: another process is creating it (lock {lock.lock_file})")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "goldens": {}}
        data = json.loads(self.manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise GoldenError(
                f"{self.manifest_path}: golden store format {data.get('format')!r}, this suite reads {FORMAT} (goldens with "
                f"their inputs); move the old store away, the goldens are recreated on demand"
            )
        return data

    def entry(self, key: GoldenKey) -> dict | None:
        return self.manifest()["goldens"].get(key.id)

    def has_identity(self, subject: str, identity: str) -> bool:
        """Whether this store holds any golden of that subject at that identity."""
        prefix = f"{subject}@{identity}/"
        return any(k.startswith(prefix) for k in self.manifest()["goldens"])

    def identity_with_sources(self, subject: str, version: str, source_hash: str | None) -> str | None:
        """The identity under which this store holds goldens of the same sources (a plain copy of a release finds
        the goldens of its git commit): matched by version and source hash."""
        if not source_hash:
            return None
        for entry in self.manifest()["goldens"].values():
            made_by = entry.get("subject") or {}
            if made_by.get("name") == subject and made_by.get("version") == version and made_by.get("source_hash") == source_hash:
                return made_by.get("identity")
        return None

    def siblings(self, key: GoldenKey) -> list[GoldenKey]:
        """Goldens of the same subject, component, scale and profile at other identities (newest first)."""
        goldens = self.manifest()["goldens"]
        out = []
        for golden_id, entry in goldens.items():
            subject, _, rest = golden_id.partition("@")
            identity, _, tail = rest.partition("/")
            if subject == key.subject and identity != key.identity and tail == f"{key.component}/{key.scale}/{key.profile}":
                out.append((entry.get("created", ""), GoldenKey(subject, identity, key.component, key.scale, key.profile)))
        return [k for _, k in sorted(out, key=lambda item: item[0], reverse=True)]

    def blob_path(self, tensor_digest_: str) -> Path:
        return self.root / INPUTS_DIR / tensor_digest_[:2] / f"{tensor_digest_}.safetensors"

    # -- reading ---------------------------------------------------------------------------------------------------
    def load(self, key: GoldenKey, weights_sha256: str, create_command: str) -> Golden:
        """Load a golden after checking the file's hash, its input tensors' hashes and the weights' hash."""
        entry = self.entry(key)
        path = self.root / key.relpath
        if entry is None or not path.exists():
            what = "no manifest entry" if entry is None else f"file {path} is missing"
            raise GoldenMissing(f"no golden for {key.id} in the {self.label} store {self.root} ({what}); create it with: {create_command}")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise GoldenTampered(
                f"golden {path} has sha256 {actual[:16]} but the manifest records {entry['sha256'][:16]}: the file was "
                f"changed outside --conformance-update-goldens. Restore it (git checkout) or regenerate it with: {create_command}"
            )
        made_by = f"{entry['subject']['name']} {entry['subject']['version']}, torch {entry['torch']}"
        if entry["weights_sha256"] != weights_sha256:
            raise GoldenStale(
                f"the weights of {key.id} (sha256 {weights_sha256[:16]}) differ from those its golden was made from "
                f"({entry['weights_sha256'][:16]}, {made_by}). If that is intended, regenerate with: {create_command}"
            )
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["golden"])
            outputs = {name.removeprefix("output."): handle.get_tensor(name) for name in handle.keys() if name.startswith("output.")}
        stored = meta["inputs"]
        tensors = {name: self._read_blob(d, key, create_command) for name, d in stored["tensors"].items()}
        inputs = StoredInputs(
            kwargs=unpack(tensors, stored["structure"]),
            sizes=dict(stored["sizes"]),
            outlier_channels={k: list(v) for k, v in stored["outlier_channels"].items()},
            sha256=_inputs_sha(stored["structure"], stored["tensors"]),
        )
        return Golden(key=key, path=path, sha256=actual, outputs=outputs, inputs=inputs, entry=entry, store=self)

    def _read_blob(self, tensor_digest_: str, key: GoldenKey, create_command: str) -> torch.Tensor:
        path = self.blob_path(tensor_digest_)
        if not path.exists():
            raise GoldenTampered(f"golden {key.id}: its input tensor {path} is missing from the store; restore it (git checkout) or regenerate with: {create_command}")
        tensor = load_file(str(path))["t"]
        if digest(tensor) != tensor_digest_:
            raise GoldenTampered(f"golden {key.id}: input tensor {path} does not hash to its name: changed outside --conformance-update-goldens")
        return tensor

    # -- writing ---------------------------------------------------------------------------------------------------
    def write(
        self,
        key: GoldenKey,
        outputs: Mapping[str, torch.Tensor],
        inputs: Mapping[str, object],
        sizes: Mapping[str, int],
        outlier_channels: Mapping[str, list[int]],
        meta: Mapping[str, object],
        replace: bool = False,
    ) -> GoldenChange:
        """Store the inputs and the float64 outputs (as float32), atomically, and report what changed. An existing
        golden is replaced only with ``replace`` (``--conformance-update-goldens``)."""
        out_tensors = {f"output.{name}": value.detach().to("cpu", torch.float32).contiguous() for name, value in outputs.items()}
        in_tensors, structure = pack(inputs)
        digests = {name: digest(t) for name, t in in_tensors.items()}
        stored = {
            "structure": structure,
            "tensors": dict(sorted(digests.items())),
            "sizes": dict(sorted(sizes.items())),
            "outlier_channels": {k: list(v) for k, v in sorted(outlier_channels.items())},
        }
        path = self.root / key.relpath
        with self._locked():
            manifest = self.manifest()
            old_entry = manifest["goldens"].get(key.id)
            old = load_file(str(path)) if path.exists() else None
            if (old_entry is not None or old is not None) and not replace:
                raise GoldenConflict(f"golden {key.id} exists in {self.root}; it is replaced only with --conformance-update-goldens")
            for name, tensor in in_tensors.items():
                self._write_blob(digests[name], tensor)
            # One metadata key, sorted JSON: safetensors writes a metadata map in hash order (bytes would vary).
            metadata = {"golden": json.dumps({"id": key.id, "format": FORMAT, "inputs": stored}, sort_keys=True)}
            new_sha = self._write_file(path, lambda tmp: save_file(out_tensors, tmp, metadata=metadata))
            entry = {
                "file": key.relpath,
                "sha256": new_sha,
                "outputs": {name: {"sha256": tensor_digest(t), "shape": list(t.shape)} for name, t in out_tensors.items()},
                "inputs": {"sha256": _inputs_sha(structure, digests), "tensors": {n: {"digest": digests[n], "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in sorted(in_tensors.items())}},
                **meta,
            }
            entry["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
            manifest["goldens"][key.id] = entry
            manifest["goldens"] = dict(sorted(manifest["goldens"].items()))
            self._write_file(self.manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n"))
            if old_entry is not None:
                self._prune_blobs(manifest)
        if old is None:
            return GoldenChange(key, path, "created", None, new_sha)
        diffs = {}
        for name, t in out_tensors.items():
            if name in old and old[name].shape == t.shape:
                diffs[name.removeprefix("output.")] = float((old[name].double() - t.double()).abs().max())
            else:
                diffs[name.removeprefix("output.")] = float("inf")
        return GoldenChange(key, path, "updated", old_entry["sha256"] if old_entry else None, new_sha, diffs)

    def _write_blob(self, tensor_digest_: str, tensor: torch.Tensor) -> None:
        path = self.blob_path(tensor_digest_)
        if path.exists() and digest(load_file(str(path))["t"]) == tensor_digest_:
            return  # content-addressed: the same bytes are already there
        self._write_file(path, lambda tmp: save_file({"t": tensor.contiguous()}, tmp))

    @staticmethod
    def _write_file(path: Path, write) -> str:
        """Write through a temporary file in the target's directory, fsync, rename; returns the file's sha256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            sha = file_sha256(Path(tmp))
            publish(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sha

    def _prune_blobs(self, manifest: dict) -> None:
        """Remove input tensors no golden refers to any more (after an update replaced a golden's inputs)."""
        referenced = {t["digest"] for e in manifest["goldens"].values() for t in e["inputs"]["tensors"].values()}
        for blob in (self.root / INPUTS_DIR).glob("*/*.safetensors"):
            if blob.stem not in referenced:
                blob.unlink()

    # -- checking the whole store -----------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every problem of the store: manifest fields, file hashes, loadability, input tensors present and intact,
        outputs as the manifest records them, files no entry names. Empty: every golden is usable."""
        problems: list[str] = []
        try:
            manifest = self.manifest()
        except (GoldenError, ValueError) as error:
            return [str(error)]
        referenced: set[str] = set()
        files: set[str] = set()
        for golden_id, entry in manifest["goldens"].items():
            missing = [f for f in REQUIRED_FIELDS if f not in entry]
            missing += [f"subject.{f}" for f in ("name", "version", "identity", "source_hash") if f not in (entry.get("subject") or {})]
            if missing:
                problems.append(f"{golden_id}: manifest entry lacks {missing}")
                continue
            path = self.root / entry["file"]
            files.add(entry["file"])
            if not path.is_file():
                problems.append(f"{golden_id}: {path} is missing")
                continue
            if file_sha256(path) != entry["sha256"]:
                problems.append(f"{golden_id}: {path} does not match its manifest sha256")
                continue
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = json.loads(handle.metadata()["golden"])
                    outputs = {n.removeprefix("output."): handle.get_tensor(n) for n in handle.keys()}
            except Exception as error:  # noqa: BLE001 - any unreadable file is a problem to report, not to raise
                problems.append(f"{golden_id}: {path} does not load ({type(error).__name__}: {error})")
                continue
            if meta.get("id") != golden_id or meta.get("format") != FORMAT:
                problems.append(f"{golden_id}: {path} says it is {meta.get('id')} (format {meta.get('format')})")
            for name, record in entry["outputs"].items():
                tensor = outputs.get(name.removeprefix("output."))
                if tensor is None or tensor_digest(tensor) != record["sha256"]:
                    problems.append(f"{golden_id}: output {name} differs from the manifest")
            stored = meta["inputs"]
            if set(tensor_names(stored["structure"])) != set(stored["tensors"]):
                problems.append(f"{golden_id}: the inputs' structure and tensor list disagree")
            for name, d in stored["tensors"].items():
                referenced.add(d)
                blob = self.blob_path(d)
                if not blob.is_file():
                    problems.append(f"{golden_id}: input {name} ({blob}) is missing")
                elif digest(load_file(str(blob))["t"]) != d:
                    problems.append(f"{golden_id}: input {name} ({blob}) does not hash to its name")
            if entry["inputs"]["sha256"] != _inputs_sha(stored["structure"], stored["tensors"]):
                problems.append(f"{golden_id}: the manifest's inputs sha256 does not match the file's inputs")
        for blob in (self.root / INPUTS_DIR).glob("*/*.safetensors"):
            if blob.stem not in referenced:
                problems.append(f"{blob}: an input tensor no golden refers to")
        for file in self.root.glob("*/*/*/*/*.safetensors"):
            rel = file.relative_to(self.root).as_posix()
            if rel not in files and not rel.startswith(INPUTS_DIR + "/"):
                problems.append(f"{file}: a golden file the manifest does not list")
        return problems
