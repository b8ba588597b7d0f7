"""A component's inputs as data: stored with its golden, compared element-wise with what the subject builds today.

A golden is made from the inputs the subject built on the machine that made it. Those inputs come out of the
subject's embedders in float32 (matmuls, convolutions), whose last bits depend on the CPU's instruction set and BLAS
path, so the same code builds slightly different inputs on another machine. Cases therefore run on the golden's
*stored* inputs (bit for bit), and whether the subject still builds the same inputs is a separate check with a rule
set from the measured embedder noise (``fixtures/budgets.toml [inputs]``, measurement in ``docs/noise/``).

Storage: nested keyword arguments become a flat ``name -> tensor`` map plus a JSON structure that rebuilds them
(tuples, lists, dicts, None and plain numbers kept; complex tensors stored as their real view).

Comparison: per tensor, rel-L2 and max-abs relative to the tensor's largest stored magnitude; for a residual stream
whose profile holds a few channels at 1e4+ (massive activations), the other channels are also measured on their own
(``bulk``): the outlier channels are set by the profile and would hide a change in the rest.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from .paths import BUDGETS_FILE

_TENSOR, _COMPLEX, _TUPLE, _LIST, _DICT = "tensor", "complex", "tuple", "list", "dict"


def pack(kwargs: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], dict]:
    """``kwargs`` -> (flat tensors by name, a JSON-able structure that ``unpack`` turns back into ``kwargs``)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, name: str):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu")
            if t.is_complex():
                tensors[name] = torch.view_as_real(t).contiguous()
                return {_COMPLEX: name}
            tensors[name] = t.contiguous()
            return {_TENSOR: name}
        if isinstance(obj, Mapping):
            return {_DICT: {str(k): walk(v, f"{name}.{k}" if name else str(k)) for k, v in obj.items()}}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{name}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return {_LIST: [walk(v, f"{name}.{i}") for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, str)) or (isinstance(obj, float) and math.isfinite(obj)):
            return {"value": obj}
        raise TypeError(f"input {name!r} is a {type(obj).__name__}; stored inputs hold tensors, containers and plain values")

    structure = walk(dict(kwargs), "")
    return tensors, structure


def unpack(tensors: Mapping[str, torch.Tensor], structure: dict) -> dict[str, object]:
    """The inverse of ``pack``."""

    def build(node):
        if _TENSOR in node:
            return tensors[node[_TENSOR]]
        if _COMPLEX in node:
            return torch.view_as_complex(tensors[node[_COMPLEX]].contiguous())
        if _DICT in node:
            return {k: build(v) for k, v in node[_DICT].items()}
        if _TUPLE in node:
            return tuple(build(v) for v in node[_TUPLE])
        if _LIST in node:
            return [build(v) for v in node[_LIST]]
        return node["value"]

    return build(structure)


def tensor_names(structure: dict) -> list[str]:
    """Every tensor name a structure refers to, in order."""
    out: list[str] = []

    def walk(node):
        for key in (_TENSOR, _COMPLEX):
            if key in node:
                out.append(node[key])
        for key in (_TUPLE, _LIST):
            for child in node.get(key, ()):
                walk(child)
        for child in node.get(_DICT, {}).values():
            walk(child)

    walk(structure)
    return out


@dataclass(frozen=True)
class InputRule:
    """How far today's inputs may be from the stored ones and still count as the same inputs (embedder noise)."""

    rel_l2: float
    max_abs_rel: float
    provenance: str


@cache
def input_rule(path: Path = BUDGETS_FILE) -> InputRule:
    with path.open("rb") as handle:
        data = tomllib.load(handle)["inputs"]
    return InputRule(float(data["rel_l2"]), float(data["max_abs_rel"]), " ".join(str(data.get("provenance", "")).split()))


@dataclass(frozen=True)
class TensorDiff:
    """One input tensor, stored against built: ``part`` is ``all`` or ``bulk`` (the non-outlier channels)."""

    name: str
    part: str
    rel_l2: float | None  # None when not comparable (shape, dtype or non-finite pattern differ: see ``problem``)
    max_abs: float | None
    max_abs_rel: float | None
    problem: str | None = None

    @property
    def label(self) -> str:
        name = self.name
        return name if self.part == "all" else f"{name}/{self.part}"

    def as_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs, "max_abs_rel": self.max_abs_rel, **({"problem": self.problem} if self.problem else {})}


@dataclass
class InputCheck:
    """The inputs the subject builds now against the ones stored with the golden."""

    diffs: list[TensorDiff] = field(default_factory=list)
    rule: InputRule | None = None

    @property
    def identical(self) -> bool:
        return all(d.problem is None and d.rel_l2 == 0 and d.max_abs == 0 for d in self.diffs)

    def beyond_noise(self) -> list[TensorDiff]:
        rule = self.rule or input_rule()
        return [
            d
            for d in self.diffs
            if d.problem is not None or d.rel_l2 > rule.rel_l2 or d.max_abs_rel > rule.max_abs_rel
        ]

    def failure(self) -> str | None:
        """The case's failure message when the inputs differ beyond embedder noise (None: the same inputs)."""
        bad = self.beyond_noise()
        if not bad:
            return None
        rule = self.rule or input_rule()
        parts = [d.problem and f"{d.label}: {d.problem}" or f"{d.label} by rel-L2 {d.rel_l2:.3g}, max-abs {d.max_abs_rel:.3g} of its largest value" for d in bad[:4]]
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        return (
            f"the subject builds its inputs differently: {'; '.join(parts)}{more} (embedder noise allows rel-L2 "
            f"{rule.rel_l2:g}, max-abs {rule.max_abs_rel:g})"
        )

    def worst(self) -> dict:
        finite = [d for d in self.diffs if d.problem is None]
        if not finite:
            return {"rel_l2": None, "max_abs_rel": None}
        return {
            "rel_l2": max(d.rel_l2 for d in finite),
            "max_abs_rel": max(d.max_abs_rel for d in finite),
            "rel_l2_at": max(finite, key=lambda d: d.rel_l2).label,
        }

    def as_dict(self) -> dict:
        return {
            "identical": self.identical,
            "worst": self.worst(),
            "beyond_noise": [d.label for d in self.beyond_noise()],
            "tensors": {d.label: d.as_dict() for d in self.diffs},
        }


def _diff(name: str, part: str, stored: torch.Tensor, built: torch.Tensor) -> TensorDiff:
    a = stored.detach().to("cpu", torch.float64)
    b = built.detach().to("cpu", torch.float64)
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b):
        return TensorDiff(name, part, None, None, None, f"non-finite values at other places ({int((~finite_a).sum())} stored, {int((~finite_b).sum())} now)")
    if not bool(finite_a.all()):
        same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
        if not same_nan or not torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]):
            return TensorDiff(name, part, None, None, None, "non-finite values differ")
        a, b = a[finite_a], b[finite_a]
    diff = (a - b).flatten()
    norm = float(torch.linalg.vector_norm(a))
    d_norm = float(torch.linalg.vector_norm(diff))
    scale = float(a.abs().max()) if a.numel() else 0.0
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return TensorDiff(
        name,
        part,
        d_norm / norm if norm else (0.0 if d_norm == 0 else math.inf),
        max_abs,
        max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf),
    )


def compare_tensors(
    stored: Mapping[str, torch.Tensor], built: Mapping[str, torch.Tensor], outlier_channels: Mapping[str, list[int]] | None = None
) -> list[TensorDiff]:
    """Element-wise differences of two flat tensor maps (``pack``'s first value), bulk and outlier channels apart."""
    outlier_channels = outlier_channels or {}
    out: list[TensorDiff] = []
    for name in sorted(set(stored) | set(built)):
        a, b = stored.get(name), built.get(name)
        if a is None or b is None:
            out.append(TensorDiff(name, "all", None, None, None, "not built any more" if b is None else "new input"))
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(TensorDiff(name, "all", None, None, None, f"{a.dtype}{list(a.shape)} stored, {b.dtype}{list(b.shape)} now"))
            continue
        if not a.is_floating_point():
            equal = torch.equal(a, b)
            out.append(TensorDiff(name, "all", 0.0 if equal else None, 0.0 if equal else None, 0.0 if equal else None, None if equal else "integer values differ"))
            continue
        out.append(_diff(name, "all", a, b))
        channels = outlier_channels.get(name)
        if channels and a.dim() and a.shape[-1] > len(channels):
            keep = torch.ones(a.shape[-1], dtype=torch.bool)
            keep[list(channels)] = False
            out.append(_diff(name, "bulk", a[..., keep], b[..., keep]))
    return out


def compare_inputs(
    stored: Mapping[str, object], built: Mapping[str, object], outlier_channels: Mapping[str, list[int]] | None = None, rule: InputRule | None = None
) -> InputCheck:
    """The subject's inputs built now (``built``) against those stored with the golden (``stored``)."""
    (a, structure_a), (b, structure_b) = pack(stored), pack(built)
    diffs = compare_tensors(a, b, outlier_channels)
    if _plain(structure_a) != _plain(structure_b):
        diffs.append(TensorDiff("(structure)", "all", None, None, None, f"plain arguments differ: {_plain(structure_a)} stored, {_plain(structure_b)} now"))
    return InputCheck(diffs, rule)


def _plain(node):
    """A structure with tensor names blanked: what must match exactly besides the tensors (None, ints, nesting)."""
    if _TENSOR in node or _COMPLEX in node:
        return "T"
    if _DICT in node:
        return {k: _plain(v) for k, v in node[_DICT].items()}
    for key in (_TUPLE, _LIST):
        if key in node:
            return [_plain(v) for v in node[key]]
    return node.get("value")


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: the name of its blob in a golden store."""
    import hashlib

    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
