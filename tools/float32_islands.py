"""Where a subject's "float64" forward computes in float32 (``conformance.islands``), per component at tiny scale, on
the nominal profile's inputs: the islands another device may round differently, and those it cannot.

    python tools/float32_islands.py [--comfyui PATH] [--component qwen.block,...] [--out docs/noise/float32-islands.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def islands(subject_name: str, comfyui: str | None, components: list[str]) -> dict:
    from conformance.goldens import GoldenStore
    from conformance.paths import GOLDEN_DIR
    from conformance.runner import Engine, EngineOptions
    from conformance.subjects import load_subject

    subject = load_subject(subject_name, comfyui_path=comfyui, device=torch.device("cpu"))
    engine = Engine(subject, EngineOptions(device=torch.device("cpu"), committed_store=GoldenStore(GOLDEN_DIR, "committed"), local_store=GoldenStore(Path(tempfile.mkdtemp()), "local")))
    report = {"subject": subject.info().as_dict() | {"path": None}, "torch": torch.__version__, "components": {}}
    for component in components:
        ops = engine.float32_ops(component)
        may_differ, same_bits = ops.may_differ(), ops.same_bits()
        report["components"][component] = {"may_differ_on_another_device": may_differ, "same_bits_everywhere": same_bits}
        print(f"{subject_name} {component}: float32 ops that may differ on another device: {may_differ or 'none'}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: the diffusers subject)")
    parser.add_argument("--component", default="qwen.block,flux.double,flux.single,wan.t2v,wan.i2v,wan.ti2v,qwen.vae,wan.vae21,wan.vae22,flux.vae")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = islands("comfyui" if args.comfyui else "diffusers", args.comfyui, args.component.split(","))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
