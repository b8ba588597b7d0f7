"""A fresh worker process: the target model of a sequence sampled with nothing run before it, its latent written to
a safetensors file (``workloads.sequences.run_worker``).

    python -m conformance.workloads.worker --comfyui PATH --device cpu --precision bf16 --backend sdpa --out F
    python -m conformance.workloads.worker --subject diffusers --device cpu --precision bf16 --backend sdpa --out F
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.workloads.worker")
    parser.add_argument("--subject", choices=("comfyui", "diffusers"), default="comfyui")
    parser.add_argument("--comfyui", help="the ComfyUI checkout (--subject comfyui)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.subject == "comfyui" and not args.comfyui:
        parser.error("--subject comfyui needs --comfyui PATH")

    import torch
    from safetensors.torch import save_file

    from .patches import load_patch
    from ..backends import CallCounter
    from .sequences import TARGET, RunSpec, _run_model, spec_modules
    from .state import snapshot

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.subject == "comfyui":
        from ..subjects.comfyui.loader import load
        from .comfyui import ComfyWholeModels

        models = ComfyWholeModels(load(Path(args.comfyui), device), device)
    else:
        from ..subjects.diffusers import DiffusersSubject

        models, _ = DiffusersSubject(device).whole_models()
    spec = RunSpec(args.precision, args.backend, load_patch(args.patch) if args.patch else None, args.steps, args.seed)
    state = snapshot(models.state_modules() + spec_modules(spec))
    alerts: list[str] = []
    latent, _, _, _ = _run_model(models, TARGET, spec, CallCounter(), observe=False, alerts=alerts)
    save_file({"latent": latent.contiguous()}, args.out, metadata={"state": json.dumps(state), "nondeterministic": json.dumps(alerts)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
