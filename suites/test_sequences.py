"""Whole tiny models after sequences of other families in one process, with and without third-party patches."""

import pytest


@pytest.mark.conformance(kind="sequence")
def test_sequence(case, conformance):
    conformance.check(case)
