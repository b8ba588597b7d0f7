"""Tiers: which cases a run holds when the user names no selection of their own.

* ``default``: what ``nox -s suite`` runs, minutes on a 2-core CPU of any instruction set: every block case (every
  family, component, precision, backend and profile the subject offers here); the decoders under the subject's
  reference backend, in fp32 on every profile and in every other precision on ``nominal`` and ``nan_latent`` (the
  clean decode and the black-image one).
* ``nightly``: everything: the decoders under every other backend and in half precision and fp8 on ``ood`` and
  ``video`` too. A decoder's attention is one single-head layer in its middle block, so the backend barely moves a
  decode, and a half-precision decode on a CPU without native fp16 costs 15-30x its float32 time (2.3-3.9 s per
  tiny decode on an AVX2-only EPYC, every case decodes twice: full and tiled; docs/benchmarks.md "CPU tier").

The tier is a property of the case alone, never of the machine, so two machines running one tier run the same
cases. With ``-m`` or ``-k`` and no ``--tier``, the expression is the selection (tier ``nightly``).
"""

from __future__ import annotations

from .axes import TIERS
from .case import Case
from .families import is_vae

DECODER_PROFILES_IN_FULL = ("nominal", "nan_latent")  # decoder profiles the default tier runs in every precision


def tier_of(case: Case, reference_backend: str) -> str:
    """The smallest tier that holds ``case``."""
    if is_vae(case.component) and (case.backend != reference_backend or (case.precision != "fp32" and case.profile not in DECODER_PROFILES_IN_FULL)):
        return "nightly"
    return "default"


def in_tier(case: Case, tier: str, reference_backend: str) -> bool:
    return TIERS.index(tier_of(case, reference_backend)) <= TIERS.index(tier)
