"""Measure how much a component's inputs move between CPU paths: the noise the input check must tolerate.

The subject builds a block's inputs with its own embedders in float32; their last bits depend on the CPU's kernels.
This script builds every component's inputs under several CPU paths (each in its own process, since the path is
chosen when torch starts) and compares each with the first, element-wise, as ``conformance.inputs`` does:

    python tools/input_noise.py run --subject diffusers --scale tiny --out docs/noise/inputs-diffusers-tiny.json
    python tools/input_noise.py run --comfyui PATH --scale tiny,real --out ...

``dump`` (one process, the current CPU path) and ``compare`` (dumps made elsewhere, say on the GPU machine's torch)
are the two halves of ``run``. The JSON holds every tensor's numbers and a summary: the worst rel-L2 and max-abs
(relative to the tensor's largest value) per CPU path, over all tensors, which ``fixtures/budgets.toml [inputs]``
is set from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> environment: the CPU paths a user's machine may take (ATen capability, MKL's reproducibility mode, threads).
PATHS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx2+cbwr": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
    "cbwr": {"MKL_CBWR": "COMPATIBLE"},
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2"},
}


def dump(subject_name: str, comfyui: str | None, scales: list[str], out: Path, profiles: list[str] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    from conformance.families import component_profiles
    from conformance.goldens import GoldenStore
    from conformance.inputs import pack
    from conformance.machine import cpu_path
    from conformance.runner import Engine, EngineOptions
    from conformance.subjects import load_subject

    subject = load_subject(subject_name, comfyui_path=comfyui, device=torch.device("cpu"))
    scratch = Path(tempfile.mkdtemp())
    engine = Engine(subject, EngineOptions(torch.device("cpu"), GoldenStore(scratch, "c"), GoldenStore(scratch, "l")))
    tensors, outliers = {}, {}
    for component in subject.components():
        for scale in scales:
            for name, profile in component_profiles(component).items():
                if not profile.applies(component) or subject.profile_reason(component, profile) or (profiles and name not in profiles):
                    continue
                built = engine.inputs(component, scale, name)
                flat, _ = pack(built.kwargs)
                key = f"{component}/{scale}/{name}"
                tensors.update({f"{key}/{t}": v for t, v in flat.items()})
                outliers[key] = built.outlier_channels
            engine._weights.clear()  # real-scale weights are large: one component's at a time
            engine._stressed.clear()
            engine._inputs.clear()
    info = subject.info().as_dict()
    save_file(tensors, str(out), metadata={"meta": json.dumps({"cpu_path": cpu_path(), "subject": info, "outliers": outliers, "torch": torch.__version__})})


def compare(files: list[Path]) -> dict:
    from safetensors import safe_open

    from conformance.inputs import compare_tensors

    def read(path: Path):
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["meta"])
            groups: dict[str, dict] = {}
            for key in handle.keys():
                component, scale, profile, name = key.split("/", 3)
                groups.setdefault(f"{component}/{scale}/{profile}", {})[name] = handle.get_tensor(key)
        return meta, groups

    ref_meta, ref = read(files[0])
    report = {"reference": {"file": str(files[0]), **ref_meta["cpu_path"], "torch": ref_meta["torch"]}, "paths": {}}
    for path in files[1:]:
        meta, groups = read(path)
        tensors, worst_rel, worst_abs, at_rel, at_abs = {}, 0.0, 0.0, None, None
        for key in sorted(set(ref) & set(groups)):
            for diff in compare_tensors(ref[key], groups[key], ref_meta["outliers"].get(key)):
                label = f"{key}/{diff.label}"
                tensors[label] = diff.as_dict()
                if diff.problem is None and diff.rel_l2 > worst_rel:
                    worst_rel, at_rel = diff.rel_l2, label
                if diff.problem is None and diff.max_abs_rel > worst_abs:
                    worst_abs, at_abs = diff.max_abs_rel, label
        report["paths"][path.stem] = {
            **meta["cpu_path"],
            "torch": meta["torch"],
            "worst_rel_l2": worst_rel,
            "worst_rel_l2_at": at_rel,
            "worst_max_abs_rel": worst_abs,
            "worst_max_abs_rel_at": at_abs,
            "identical_tensors": sum(1 for t in tensors.values() if t["rel_l2"] == 0),
            "tensors_compared": len(tensors),
            "problems": {k: v["problem"] for k, v in tensors.items() if "problem" in v},
            "tensors": tensors,
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "dump"):
        p = sub.add_parser(name)
        p.add_argument("--subject", default=None)
        p.add_argument("--comfyui", default=None)
        p.add_argument("--scale", default="tiny")
        p.add_argument("--out", required=True)
        p.add_argument("--profiles", default=None, help="comma-separated profiles (default: all)")
        if name == "run":
            p.add_argument("--paths", default=",".join(PATHS))
    p = sub.add_parser("compare")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "compare":
        Path(args.out).write_text(json.dumps(compare([Path(f) for f in args.files]), indent=1) + "\n")
        return 0
    subject = args.subject or ("comfyui" if args.comfyui else "diffusers")
    scales = args.scale.split(",")
    if args.command == "dump":
        dump(subject, args.comfyui, scales, Path(args.out), args.profiles.split(",") if args.profiles else None)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="input-noise-"))
    files = []
    for name in args.paths.split(","):
        target = workdir / f"{name}.safetensors"
        env = {**os.environ, **PATHS[name]}
        command = [sys.executable, __file__, "dump", "--subject", subject, "--scale", args.scale, "--out", str(target)]
        if args.comfyui:
            command += ["--comfyui", args.comfyui]
        if args.profiles:
            command += ["--profiles", args.profiles]
        print(f"[input-noise] {name}: {PATHS[name] or 'as the machine is'}", file=sys.stderr, flush=True)
        subprocess.run(command, env=env, check=True)
        files.append(target)
    report = compare(files)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for name, path in report["paths"].items():
        print(f"{name:10s} worst rel-L2 {path['worst_rel_l2']:.3g} ({path['worst_rel_l2_at']}), max-abs {path['worst_max_abs_rel']:.3g}, identical {path['identical_tensors']}/{path['tensors_compared']}, problems {len(path['problems'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
