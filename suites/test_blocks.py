"""Transformer blocks: every case of the matrix (subject x component x scale x precision x backend x profile)."""

import pytest


@pytest.mark.conformance(kind="block")
def test_block(case, conformance):
    conformance.check(case)
