"""Find a checkpoint's tensors without reading them: one safetensors file, or a diffusers folder (one file, or shards
named by ``*.safetensors.index.json``), indexed from headers only.

Every problem is one ``CheckpointError`` line naming the file and what is wrong. Pickle checkpoints (``.ckpt``,
``.pt``, ``.pth``, ``.bin``) are refused before a byte of them is read as pickle: unpickling runs code. GGUF files
are recognised by their magic and indexed from their own header (``checkpoints.gguf``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive: pickle inside
INDEX_SUFFIX = ".safetensors.index.json"

# safetensors dtype names -> torch dtypes (those a diffusion checkpoint holds)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint the suite cannot use: ``<file>: <what is wrong>``."""

    def __init__(self, path: Path | str, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = str(path)
        self.what = what


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it."""

    key: str
    file: Path
    dtype: str  # the safetensors name (F8_E4M3, BF16, ...)
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte offsets of its data in the file
    end: int = 0
    # a GGUF tensor in a block-quantized type (Q8_0, Q4_K, ...): its blocks' bytes, [rows, bytes per row]
    stored_shape: tuple[int, ...] | None = None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """How its bytes are read: the tensor's dtype, or bytes (uint8) for a block-quantized GGUF tensor."""
        return torch.uint8 if self.stored_shape is not None else DTYPES.get(self.dtype)

    @property
    def nbytes(self) -> int:
        dtype = self.torch_dtype
        return math.prod(self.stored_shape or self.shape) * (dtype.itemsize if dtype is not None else 0)


@dataclass
class TensorIndex:
    """Every tensor of a checkpoint by key, with the file holding it; nothing read but headers."""

    path: Path  # what the user named
    layout: str  # "single file", "diffusers folder", "diffusers sharded"
    files: tuple[Path, ...]
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)  # the (first) file's __metadata__
    config: dict | None = None  # a diffusers folder's config.json

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as stored. Tensors that lie back to back in a file (a block's do) are read as one run,
        with one positioned read into one page-aligned buffer whose views they are: no map of the file (``safe_open``
        maps all of it, which a 40 GB file cannot get on a host with less memory to commit) and no copy. The read
        bypasses the page cache where the file system allows (``O_DIRECT``): a 40 GB file would only evict the
        cache, and a cold buffered read of a 680 MB block takes 5x as long (docs/benchmarks.md)."""
        wanted: list[TensorEntry] = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                raise CheckpointError(self.path, f"has no tensor {key!r}")
            wanted.append(entry)
        out: dict[str, torch.Tensor] = {}
        for run in _runs(wanted):
            out.update(_read_run(run))
        return {entry.key: out[entry.key] for entry in wanted}


ALIGN = 4096  # O_DIRECT's offset, length and buffer alignment (the logical block size, 512 or 4096)
GAP = 1 << 20  # tensors closer than this in one file are read in one run, the bytes between them too


def _runs(entries: list[TensorEntry]) -> list[list[TensorEntry]]:
    runs: list[list[TensorEntry]] = []
    for entry in sorted(entries, key=lambda e: (str(e.file), e.begin)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.file == entry.file and 0 <= entry.begin - last.end <= GAP:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _read_run(run: list[TensorEntry]) -> dict[str, torch.Tensor]:
    file = run[0].file
    lo, hi = run[0].begin, max(e.end for e in run)
    start, stop = lo // ALIGN * ALIGN, -(-hi // ALIGN) * ALIGN
    if stop == start:  # only empty tensors, at an aligned offset
        return {e.key: torch.empty(e.shape, dtype=e.torch_dtype) for e in run}
    buffer = mmap.mmap(-1, stop - start)  # anonymous, page-aligned, uninitialised until read into
    view = memoryview(buffer)
    try:
        got = _pread(file, view, start, hi - start, direct=True)
    except OSError as error:
        raise CheckpointError(file, f"cannot be read ({error.strerror or error})") from None
    if got < hi - start:
        raise CheckpointError(file, f"ends inside tensor {next(e.key for e in run if e.end > start + got)}")
    data = torch.frombuffer(buffer, dtype=torch.uint8)
    out = {}
    for entry in run:
        piece = data[entry.begin - start : entry.end - start]
        dtype = entry.torch_dtype
        if (entry.begin - start) % dtype.itemsize:  # a misaligned tensor (the format allows it): its own copy
            piece = piece.clone()
        out[entry.key] = piece.view(dtype).reshape(entry.stored_shape or entry.shape)
    return out


def _pread(file: Path, view: memoryview, offset: int, needed: int, direct: bool) -> int:
    """Bytes read into ``view`` from ``offset`` on, until ``needed`` or the end of the file."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        fd = os.open(file, flags)
    except OSError:
        if not direct:
            raise
        return _pread(file, view, offset, needed, direct=False)  # a file system without O_DIRECT (tmpfs)
    try:
        done = 0
        while done < needed:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError:
                if not direct or done:
                    raise
                return _pread(file, view, offset, needed, direct=False)  # O_DIRECT refused for this file or buffer
            if n <= 0:
                break
            done += n
        return done
    finally:
        os.close(fd)


def index_checkpoint(path: Path | str) -> TensorIndex:
    """The checkpoint at ``path`` (a file or a folder), indexed; ``CheckpointError`` with one line otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        return _index_folder(path)
    return _index_file(path)


def _magic(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(4)


def _refuse_non_safetensors(path: Path) -> None:
    head = _magic(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or head == ZIP_MAGIC or head[:1] == b"\x80":
        raise CheckpointError(
            path,
            "a pickle checkpoint: refused, never unpickled (loading one runs the code inside it); convert it to "
            "safetensors where it came from, or point the suite at the .safetensors file",
        )


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The header of a safetensors file (8-byte little-endian length, then JSON), checked as safetensors checks it:
    known dtypes, each tensor's bytes its shape's, the data contiguous and ending where the file ends."""
    _refuse_non_safetensors(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"truncated: {size} bytes, shorter than a safetensors header's length field")
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, 100 * 2**20):
            raise CheckpointError(path, f"corrupt header: its length field says {length} bytes, the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(path, f"corrupt header (not a safetensors file, or damaged): {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start, entries, covered = 8 + length, {}, []
    for key, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt header: tensor {key!r} lacks dtype, shape or data_offsets") from None
        entry = TensorEntry(key, path, dtype, shape, data_start + begin, data_start + end)
        if entry.torch_dtype is None:
            raise CheckpointError(path, f"tensor {key!r} has dtype {dtype}, which the suite does not read")
        if end - begin != entry.nbytes:
            raise CheckpointError(path, f"corrupt header: tensor {key!r} {list(shape)} {dtype} needs {entry.nbytes} bytes, its offsets give {end - begin}")
        entries[key] = entry
        covered.append((begin, end))
    covered.sort()
    position = 0
    for begin, end in covered:
        if begin != position:
            raise CheckpointError(path, f"corrupt header: tensor data is not contiguous at byte {position}")
        position = end
    if data_start + position > size:
        raise CheckpointError(path, f"truncated: its header names {data_start + position} bytes, the file has {size}")
    if data_start + position < size:
        raise CheckpointError(path, f"corrupt: {size - data_start - position} bytes after the last tensor")
    if not entries:
        raise CheckpointError(path, "holds no tensors")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _index_file(path: Path) -> TensorIndex:
    if path.name.endswith(INDEX_SUFFIX):
        return _index_sharded(path)
    if _magic(path) == GGUF_MAGIC:
        from .gguf import index_gguf

        return index_gguf(path)
    entries, metadata = _read_header(path)
    return TensorIndex(path, "single file", (path,), entries, metadata)


def _index_sharded(index_path: Path) -> TensorIndex:
    try:
        weight_map: Mapping[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(index_path, f"not a diffusers shard index (needs a 'weight_map'): {error}") from None
    folder = index_path.parent
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(index_path, f"names shard {shard}, which is not in {folder}")
        shard_entries, shard_metadata = _read_header(shard_path)
        metadata = metadata or shard_metadata
        listed = {k for k, v in weight_map.items() if v == shard}
        missing, extra = sorted(listed - set(shard_entries)), sorted(set(shard_entries) - listed)
        if missing:
            raise CheckpointError(shard_path, f"lacks {len(missing)} tensors the index puts in it, e.g. {missing[:3]}")
        if extra:
            raise CheckpointError(shard_path, f"holds {len(extra)} tensors the index does not list, e.g. {extra[:3]}")
        entries.update(shard_entries)
    config = _config(folder)
    return TensorIndex(index_path, "diffusers sharded", tuple(folder / s for s in shards), entries, metadata, config)


def _config(folder: Path) -> dict | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except ValueError as error:
        raise CheckpointError(config, f"not JSON: {error}") from None


def _index_folder(folder: Path) -> TensorIndex:
    """A diffusers model folder (or a pipeline folder holding ``transformer/``): its index, else its one file."""
    if (folder / "transformer").is_dir() and not any(folder.glob("*.safetensors")):
        folder = folder / "transformer"
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CheckpointError(folder, f"holds {len(indexes)} shard indexes ({', '.join(p.name for p in indexes)}); name the one to test")
    if indexes:
        return _index_sharded(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > 1:
        raise CheckpointError(folder, f"holds {len(files)} candidate files ({', '.join(p.name for p in files)}) and no shard index; name the file to test")
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(folder, f"holds only pickle checkpoints ({', '.join(pickles)}): refused, never unpickled; convert them to safetensors")
        raise CheckpointError(folder, "holds no .safetensors file and no shard index")
    index = _index_file(files[0])
    return TensorIndex(folder, "diffusers folder", index.files, index.entries, index.metadata, _config(folder))
