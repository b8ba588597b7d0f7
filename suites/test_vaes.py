"""VAE decoders, latent to pixels to the saved image: every case of the matrix for qwen.vae, wan.vae21/22, flux.vae."""

import pytest


@pytest.mark.conformance(kind="vae")
def test_vae(case, conformance):
    conformance.check(case)
