"""What machine a number was computed on, and one repair that keeps a chosen CPU path usable.

Float32 and bfloat16 kernels on a CPU round differently per instruction set and BLAS path; the suite records which
one ran (in every report and golden manifest) so a difference between two machines can be traced to it.

``ATEN_CPU_CAPABILITY=avx2`` selects ATen's AVX2 kernels, but oneDNN keeps choosing by the hardware: on a CPU with
AMX (Sapphire Rapids) torch 2.13's bf16 flash attention then asks oneDNN whether it can pack bf16 (yes, by the
hardware), and the AVX2 build of the kernel fails with ``pack_vnni2 is only supported when avx512 is supported``. A
real AVX2 machine never meets that mismatch. ``align_onednn_isa`` caps oneDNN at the ISA ATen was asked for (oneDNN
reads ``ONEDNN_MAX_CPU_ISA`` when it first dispatches, so setting it in-process before any bf16 kernel runs works),
unless the user set the cap themselves.
"""

from __future__ import annotations

import os
import platform

# ATEN_CPU_CAPABILITY value -> the oneDNN ISA cap of the same width.
_ONEDNN_ISA = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}


def align_onednn_isa(environ: dict[str, str] = os.environ) -> str | None:
    """Cap oneDNN at ATen's chosen instruction set (see the module docstring); returns the cap set, if any."""
    capability = environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability not in _ONEDNN_ISA or "ONEDNN_MAX_CPU_ISA" in environ or "DNNL_MAX_CPU_ISA" in environ:
        return None
    environ["ONEDNN_MAX_CPU_ISA"] = _ONEDNN_ISA[capability]
    return environ["ONEDNN_MAX_CPU_ISA"]


def _blas() -> str:
    import torch

    config = torch.__config__.show()
    for line in config.splitlines():
        line = line.strip()
        if line.startswith("- BLAS_INFO="):
            return line.removeprefix("- BLAS_INFO=").strip()
    if "Intel(R) oneAPI Math Kernel Library" in config or "MKL" in config:
        return "mkl"
    return "unknown"


def cpu_path() -> dict:
    """The CPU path float32 results depend on: ATen's kernel capability, the BLAS, threads and the switches that
    change them (``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``)."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas(),
        "threads": torch.get_num_threads(),
        "processor": _processor(),
        "machine": platform.machine(),
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ},
    }


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (None off Linux or where unreadable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def half_precision_path(flags: set[str] | None = None) -> str | None:
    """Why half-precision cases on this CPU run a slow path, or None where it has native fp16 and bf16 arithmetic
    (AVX512-FP16 / AMX-FP16 and AVX512-BF16 / AMX-BF16). Without them torch converts to float32 per element: a tiny
    fp16 decoder takes 15-30x its float32 time (docs/benchmarks.md, "CPU tier")."""
    flags = set((_cpuinfo("flags") or "").split()) if flags is None else flags
    if not flags:
        return None  # not Linux/x86 (or unreadable): nothing to say
    missing = [name for name, native in (("fp16", ("avx512_fp16", "amx_fp16")), ("bf16", ("avx512_bf16", "amx_bf16"))) if not flags & set(native)]
    if not missing:
        return None
    return (
        f"this CPU has no native {' or '.join(missing)} arithmetic ({_processor()}, {_torch_capability()}): half-precision "
        "cases run torch's converting path, 10-30x slower than float32 (same results, longer run)"
    )


def _torch_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _processor() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"
