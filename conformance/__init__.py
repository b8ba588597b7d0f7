"""Numerical conformance of diffusion-model components (see README.md)."""

from .machine import align_onednn_isa

# Before torch runs a bf16 kernel: keep oneDNN on the instruction set ATEN_CPU_CAPABILITY chose (conformance.machine).
align_onednn_isa()
