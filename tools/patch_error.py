"""Measure how far each example patch moves the sampled latent from the unpatched run: what a patch's
``BUDGET_REL_L2`` (fixtures/patches/) is set from.

For every precision and seed, the tiny Qwen model is sampled once unpatched and once with each patch, in one process
per subject (each ComfyUI checkout, and diffusers with ``--diffusers``), and the rel-L2 of the two latents is recorded
with the patch's work (attention calls: fewer where a first-block cache skipped blocks):

    python tools/patch_error.py --comfyui PATH [--comfyui PATH2 ...] [--diffusers] --out docs/noise/patch-error.json

A budget is 2x the worst rel-L2 measured over every checkout, precision and seed the patch supports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEEDS = (0, 1, 2)


def measure(subject: str) -> dict:
    """``subject``: a ComfyUI checkout's path, or ``diffusers``."""
    import torch

    from conformance.backends import CallCounter
    from conformance.subjects import load_subject
    from conformance.workloads.patches import BUILTIN, load_patch
    from conformance.workloads.sequences import DTYPES, TARGET, RunSpec, _run_model, compare_bits

    torch.set_num_threads(1)
    if subject == "diffusers":
        implementation = load_subject("diffusers", device=torch.device("cpu"))
    else:
        implementation = load_subject("comfyui", comfyui_path=subject, device=torch.device("cpu"))
    models, _ = implementation.whole_models()
    rows = []
    for name in BUILTIN:
        patch = load_patch(name)
        reason = patch.unsupported(models.build(TARGET, torch.float32, 0))
        if reason:
            rows.append({"patch": name, "unsupported": reason})
            continue
        for precision in DTYPES:
            for seed in SEEDS:
                plain, *_ = _run_model(models, TARGET, RunSpec(precision, "sdpa", None, seed=seed), CallCounter(), observe=False)
                calls = CallCounter()
                patched, *_ = _run_model(models, TARGET, RunSpec(precision, "sdpa", patch, seed=seed), calls, observe=False)
                bits = compare_bits(plain, patched)
                rows.append({"patch": name, "precision": precision, "seed": seed, "rel_l2": bits["rel_l2"], "max_abs_diff": bits["max_abs_diff"],
                             "attention_calls": calls.as_dict(), "finite": bool(torch.isfinite(patched).all())})  # fmt: skip
    return {"subject": models.subject, "version": models.version, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", action="append", default=[], help="a ComfyUI checkout (repeatable)")
    parser.add_argument("--diffusers", action="store_true", help="measure the patches on diffusers' models too")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    runs = []
    subjects = args.comfyui + (["diffusers"] if args.diffusers else [])
    if not subjects:
        parser.error("name at least one subject: --comfyui PATH or --diffusers")
    for subject in subjects:  # one process per subject: `comfy` is one top-level module per process
        proc = subprocess.run([sys.executable, __file__, "--out", "-", "--one", subject], capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    worst: dict[str, float] = {}
    for run in runs:
        for row in run["rows"]:
            if "rel_l2" in row:
                worst[row["patch"]] = max(worst.get(row["patch"], 0.0), row["rel_l2"])
    report = {"runs": runs, "worst_rel_l2": worst, "budget_rel_l2 (2x worst)": {k: 2 * v for k, v in worst.items()}}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["worst_rel_l2"]), "->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
