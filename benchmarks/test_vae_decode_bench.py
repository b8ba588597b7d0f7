"""Real-config VAE decode timings: ``pytest benchmarks/test_vae_decode_bench.py -m bench``.

Each of the four decoders at its real width decodes the ``nominal`` latent of the real scale (16x16 latent pixels:
128x128 pixels, 256x256 for the 16x Wan 2.2 VAE), without probes, in fp32, bf16 and fp16, on the device the suite
would use (CUDA when present). The subject is diffusers, plus ComfyUI when ``COMFYUI_PATH`` names a checkout.
On a CPU the tiny scale runs, as a smoke test (a real-width fp16 decode on a CPU without native fp16 takes many
minutes); ``CONFORMANCE_BENCH_SCALE=real`` times the real widths there too.
``extra_info`` holds the latent and pixel shapes and the pixels decoded per second. Nothing is asserted.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.engines import DEVICE, SUBJECTS, engine
from conformance.families import vae
from conformance.precision import get_precision

pytestmark = pytest.mark.bench
SCALE = os.environ.get("CONFORMANCE_BENCH_SCALE") or ("real" if DEVICE.type == "cuda" else "tiny")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("component", vae.COMPONENTS)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_decode(benchmark, tmp_path_factory, subject, component, precision):
    eng = engine(subject, tmp_path_factory)
    built = eng.subject.build(component, SCALE, get_precision(precision), eng.weights(component, SCALE), DEVICE)
    kwargs = eng.subject.cast_inputs(eng.inputs(component, SCALE, "nominal"), get_precision(precision).activation_dtype, DEVICE)

    def decode():
        with torch.no_grad():
            out = built(kwargs)["pixels"]
        _sync()
        return out

    pixels = benchmark.pedantic(decode, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(subject=eng.subject.info().identity, device=str(DEVICE), scale=SCALE, latent=list(kwargs["z"].shape), pixels=list(pixels.shape))
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["megapixels_per_s"] = pixels[0, 0].numel() / 1e6 / benchmark.stats.stats.median
