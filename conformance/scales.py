"""The scale axis: the synthetic scales (``tiny``, ``real``: ``axes.SCALES``) and, with ``--weights``, one scale per
block of a checkpoint file (``conformance.checkpoints.cases``).

A file scale is named ``b<N>@<file id>`` (``b30@3fa9c1d2``: block 30 of the file whose headers hash to 3fa9c1d2...),
so its cases, its goldens (``<component>/b30@3fa9c1d2/<profile>``) and ``-k b30`` selections name the block and the
file. Its dims are the file's, registered in the family's dims table under that name; its inputs take the token
counts of ``sizes_from`` (the profile's tiny sizes unless a capture brings its own). Kept free of torch: profiles and
families consult it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .axes import SCALES


@dataclass
class FileScale:
    name: str
    path: str  # the file or folder as given
    file_id: str  # sha256 of the files' sizes and headers (``checkpoints.cases.file_id``)
    block: int
    components: tuple[str, ...]  # the components that have this block
    sizes_from: str = "tiny"
    checkpoint: object = field(default=None, repr=False)  # the opened ``checkpoints.Checkpoint``
    dequantized: dict[str, list[str]] = field(default_factory=dict)  # component -> how its block was dequantized


FILE_SCALES: dict[str, FileScale] = {}


def register(scale: FileScale) -> None:
    if scale.name in SCALES:
        raise ValueError(f"{scale.name!r} is a synthetic scale")
    FILE_SCALES[scale.name] = scale


def clear() -> None:
    """Forget the registered file scales, and their dims in the families' tables (the end of a session)."""
    from .families import get_family

    for name, scale in FILE_SCALES.items():
        layout = get_family(scale.checkpoint.family).checkpoint
        for component in scale.components:
            layout.dims_by_scale(component).pop(name, None)
    FILE_SCALES.clear()


def file_scale(scale: str) -> FileScale | None:
    return FILE_SCALES.get(scale)


def sizes_scale(scale: str) -> str:
    """The synthetic scale whose profile sizes ``scale``'s inputs take."""
    found = FILE_SCALES.get(scale)
    return found.sizes_from if found else scale


def applies(scale: str, component: str) -> bool:
    """Whether ``component`` has cases at ``scale`` (a file scale: only the file's components holding that block)."""
    found = FILE_SCALES.get(scale)
    return found is None or component in found.components


def size_class(scale: str) -> str:
    """``tiny`` or ``real``: which module cache and which golden store a scale's cases use (a file's are local)."""
    return "tiny" if scale == "tiny" else "real"


WEIGHTS_TAG = "+w"  # a file scale's goldens: <scale>+w<digest of the block's weights> (golden_source.golden_key)


def case_scale(golden_scale: str) -> str:
    """The scale of the cases a golden key's scale serves (a file scale's carries its weights' digest)."""
    return golden_scale.split(WEIGHTS_TAG, 1)[0]
