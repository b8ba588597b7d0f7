"""Deterministic kernels for whole-model runs, and the ops torch could not make deterministic.

The sequences' rule is bit for bit, so a run must give the same bits twice. Some CUDA kernels add with atomics in no
fixed order (``scatter_reduce`` with ``mean``/``sum``, ``index_add``, ``scatter_add_``, ``cumsum``): a ToMe-style
token merge written with ``scatter_reduce`` gives two fresh processes different last bits on an H100
(docs/workloads.md). Every whole-model run therefore samples under ``torch.use_deterministic_algorithms(True,
warn_only=True)``: torch picks its deterministic kernel where it has one and warns where it has none; those warnings
are collected so a verdict can say *which* op made a difference noise rather than a state leak.

Two settings of the mode are left out on purpose:

* cuBLAS's workspace warning: torch warns for every matmul unless ``CUBLAS_WORKSPACE_CONFIG`` is set before cuBLAS
  starts, which cannot be done for a process that already ran block cases, and setting it only in the fresh worker
  would give the two sides different workspaces. One stream with a fixed workspace is deterministic in practice (the
  H100 runs in docs/workloads.md are bit-equal across processes).
* ``fill_uninitialized_memory`` (NaN-filling ``torch.empty``): kept off, so the mode changes kernel choice only and not
  what the subject's code reads.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch

_ALERT = re.compile(r"^(?P<op>.+?) does not have a deterministic implementation")
_CUBLAS = "CuBLAS"


@contextlib.contextmanager
def deterministic(alerts: list[str]) -> Iterator[None]:
    """Run the block with torch's deterministic kernels; append the name of every op torch reported as having none
    (once per op, in first-seen order) to ``alerts``."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    for warning in caught:
        text = str(warning.message)
        if _CUBLAS in text:
            continue
        match = _ALERT.match(text)
        if match:
            if match["op"] not in alerts:
                alerts.append(match["op"])
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno, source=warning.source)
