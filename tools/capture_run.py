"""Capture block inputs during a real ComfyUI run on a checkpoint file: ``comfy.sd.load_diffusion_model``, then
``comfy.sample.sample`` (euler, a few steps, seeded synthetic conditioning) under ``conformance.captures.capturing``.

    python tools/capture_run.py --comfyui PATH --weights FILE --out capture.safetensors [--steps 3] [--blocks 0,2]
        [--evaluations 0,2] [--grid 8x8] [--via node]

The conditioning is synthetic (seeded normal text-encoder states of the file's width); everything else is the
checkout's own loading and sampling path. Prints what was captured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance.captures import capturing  # noqa: E402
from conformance.checkpoints import open_checkpoint  # noqa: E402
from conformance.subjects.comfyui.loader import load  # noqa: E402
from conformance.workloads.comfyui import placeholders  # noqa: E402

NODE = Path(__file__).resolve().parent.parent / "fixtures" / "custom_nodes" / "conformance_capture" / "__init__.py"
CONTEXT = {"qwen": lambda d: d.joint_attention_dim, "flux": lambda d: d.context_dim, "wan": lambda d: d.text_dim}


def conditioning(checkpoint, tokens: int, seed: int):
    dims = next(iter(checkpoint.model.dims.values()))
    generator = torch.Generator().manual_seed(seed)
    width = CONTEXT[checkpoint.family](dims)
    context = torch.randn(1, tokens, width, generator=generator)
    negative = torch.randn(1, tokens, width, generator=generator) * 0.1
    extra = {}
    if checkpoint.family == "flux":
        extra = {"pooled_output": torch.randn(1, dims.vec_dim, generator=generator), "guidance": 3.5}
    return [[context, dict(extra)]], [[negative, dict(extra)]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks", default="0")
    parser.add_argument("--evaluations", default="0")
    parser.add_argument("--grid", default="8x8", help="latent size in 2x2 patches (tokens per side), HxW")
    parser.add_argument("--tokens", type=int, default=8, help="text tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--via", choices=("context", "node"), default="context", help="conformance.captures.capturing, or the ConformanceCapture custom node")
    args = parser.parse_args(argv)

    comfy = load(Path(args.comfyui), torch.device("cpu"))
    placeholders()
    sd, sample = comfy.module("comfy.sd"), comfy.module("comfy.sample")
    checkpoint = open_checkpoint(args.weights)
    model = sd.load_diffusion_model(str(checkpoint.path))
    component = next(iter(checkpoint.block_counts))
    blocks = {component: tuple(int(b) for b in args.blocks.split(","))}
    h, w = (int(x) for x in args.grid.split("x"))
    channels = model.model.latent_format.latent_channels
    shape = (1, channels, 1, 2 * h, 2 * w) if checkpoint.family != "flux" else (1, channels, 2 * h, 2 * w)
    latent = sample.fix_empty_latent_channels(model, torch.zeros(shape))
    noise = sample.prepare_noise(latent, args.seed)
    positive, negative = conditioning(checkpoint, args.tokens, args.seed + 1)
    evaluations = tuple(int(e) for e in args.evaluations.split(","))
    run = lambda patched: sample.sample(patched, noise, args.steps, 2.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=args.seed)  # noqa: E731
    if args.via == "node":
        spec = importlib.util.spec_from_file_location("conformance_capture", NODE)
        node = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(node)
        (patched,) = node.NODE_CLASS_MAPPINGS["ConformanceCapture"]().patch(model, args.out, args.blocks, args.evaluations, str(args.weights))
        out = run(patched)
    else:
        with capturing(model, args.out, blocks, evaluations, model_file=str(args.weights)) as patched:
            out = run(patched)
    print(json.dumps({"comfyui": comfy.version, "file": args.weights, "latent": list(out.shape), "finite": bool(torch.isfinite(out).all()), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
