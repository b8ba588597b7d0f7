"""Captured activations: the exact inputs of chosen blocks during a real ComfyUI run, and their replay as profiles.

Capture (``capturing``, or the drop-in custom node ``fixtures/custom_nodes/conformance_capture``): a model function
wrapper on a ``ModelPatcher`` clone (``set_model_unet_function_wrapper``, the custom nodes' own way in) counts the
model's evaluations; on a chosen one it puts forward pre-hooks on the chosen blocks for that evaluation only, takes
each block's keyword arguments as the block receives them, and rewrites one safetensors file atomically: tensors
``<record>.<argument>``, metadata ``conformance_capture`` (JSON: per record the component, block, evaluation, sigma,
latent shape, dtypes, the model file and the ComfyUI version; non-tensor arguments where they are JSON values).

Replay (``--profile captured:PATH``): each record becomes a profile of its component,
``cape<evaluation>b<block>@<file hash>`` (``s<block>`` for FLUX's single blocks), whose inputs are the recorded tensors (``inputs``); the block then runs in
every precision and backend against its float64 golden, like any profile, on the synthetic weights of the scale whose
width matches and on ``--weights`` (the same block only).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .profiles import Profile, Sizes

METADATA_KEY = "conformance_capture"
FORMAT_VERSION = 1
# the block lists of ComfyUI's model classes, by component (the suite's ComfyUI block specs name the same)
BLOCK_LISTS = {
    "QwenImageTransformer2DModel": {"qwen.block": "transformer_blocks"},
    "Flux": {"flux.double": "double_blocks", "flux.single": "single_blocks"},
    "WanModel": {"wan.t2v": "blocks"},  # an i2v model (model_type "i2v"): wan.i2v (``block_lists``)
}


def block_lists(model) -> dict[str, str]:
    lists = BLOCK_LISTS.get(type(model).__name__)
    if lists is None:
        raise CaptureError(f"cannot capture from {type(model).__name__}: the suite knows {', '.join(BLOCK_LISTS)}")
    if type(model).__name__ == "WanModel" and getattr(model, "model_type", "t2v") == "i2v":
        return {"wan.i2v": "blocks"}
    return lists


class CaptureError(ValueError):
    """A capture file the suite cannot replay, or a model it cannot capture from; the message names it."""


# -- capture ------------------------------------------------------------------------------------------------------
def _comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


def _json_value(value):
    """A non-tensor argument as JSON, or None where it is not one (``transformer_options`` holds the run's patches)."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        return None


@dataclass
class Recorder:
    path: Path
    blocks: dict[str, tuple[int, ...]]  # component -> block indices
    evaluations: tuple[int, ...]  # model evaluations to record (0 = the first call of the model)
    model_file: str | None = None
    model_dtype: str | None = None
    seen: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def wrapper(self, apply_model, args: dict):
        index, self.seen = self.seen, self.seen + 1
        if index not in self.evaluations:
            return apply_model(args["input"], args["timestep"], **args["c"])
        diffusion_model = _diffusion_model(apply_model)
        handles = []
        lists = block_lists(diffusion_model)
        for component, indices in self.blocks.items():
            if component not in lists:
                raise CaptureError(f"{type(diffusion_model).__name__} has no {component} blocks (it has {', '.join(lists)})")
            block_list = getattr(diffusion_model, lists[component])
            for n in indices:
                if not 0 <= n < len(block_list):
                    raise CaptureError(f"{component}: the model has {len(block_list)} blocks; block {n} asked")
                handles.append(block_list[n].register_forward_pre_hook(self._hook(component, n, index, args), with_kwargs=True))
        try:
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            for handle in handles:
                handle.remove()
            self.write()

    def _hook(self, component: str, block: int, evaluation: int, args: dict):
        def hook(module, positional, keywords):
            bound = dict(zip(inspect.signature(module.forward).parameters, positional))
            bound.update(keywords)
            name = f"e{evaluation}b{block}" if component != "flux.single" else f"e{evaluation}s{block}"
            record = {
                "name": name,
                "component": component,
                "block": block,
                "evaluation": evaluation,
                "sigma": [float(s) for s in args["timestep"].flatten().tolist()],
                "latent_shape": list(args["input"].shape),
                "resolution": [8 * d for d in args["input"].shape[-2:]],  # pixels, at the VAEs' 8x
                "text_tokens": int(args["c"]["c_crossattn"].shape[1]) if torch.is_tensor(args["c"].get("c_crossattn")) else None,
                "cond_or_uncond": list(args.get("cond_or_uncond") or []),
                "tensors": {},
                "values": {},
                "dropped": [],
            }
            for key, value in bound.items():
                if torch.is_tensor(value):
                    self.tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
                    record["tensors"][key] = str(value.dtype).replace("torch.", "")
                elif _json_value(value) is not None or value is None:
                    record["values"][key] = value
                else:
                    record["dropped"].append(key)
            self.records.append(record)

        return hook

    def write(self) -> None:
        metadata = {
            "format": FORMAT_VERSION,
            "comfyui": _comfyui_version(),
            "model_file": self.model_file,
            "model_dtype": self.model_dtype,
            "records": self.records,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file(self.tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(tmp, self.path)


def _diffusion_model(apply_model):
    """The ``diffusion_model`` of the ``BaseModel`` whose ``apply_model`` the wrapper was given."""
    base = getattr(apply_model, "__self__", None)
    model = getattr(base, "diffusion_model", None)
    block_lists(model)
    return model


def default_blocks(model_patcher) -> dict[str, tuple[int, ...]]:
    model = model_patcher.model.diffusion_model
    component, name = next(iter(block_lists(model).items()))
    return {component: (0,)} if len(getattr(model, name)) else {}


def patched(model_patcher, path, blocks: dict[str, tuple[int, ...]] | None = None, evaluations=(0,), model_file: str | None = None):
    """A clone of ``model_patcher`` that records ``blocks``' inputs at the chosen model evaluations into ``path``
    (what the custom node returns), and its recorder."""
    recorder = Recorder(Path(path), blocks or default_blocks(model_patcher), tuple(evaluations), model_file, str(model_patcher.model.get_dtype()).replace("torch.", ""))
    clone = model_patcher.clone()
    clone.set_model_unet_function_wrapper(recorder.wrapper)
    return clone, recorder


@contextlib.contextmanager
def capturing(model_patcher, path, blocks: dict[str, tuple[int, ...]] | None = None, evaluations=(0,), model_file: str | None = None):
    """``with capturing(model, "x.safetensors", {"qwen.block": (0, 2)}, evaluations=(0, 3)) as model: sample(model,
    ...)``: the records are in ``path`` when the block ends (rewritten after every recorded evaluation)."""
    clone, recorder = patched(model_patcher, path, blocks, evaluations, model_file)
    yield clone
    if not recorder.records:
        raise CaptureError(f"nothing was captured into {path}: the model was evaluated {recorder.seen} times, evaluations {list(recorder.evaluations)} asked")


# -- replay -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CapturedRecord:
    profile: str  # the profile name its cases carry
    path: str
    record: dict
    meta: dict
    width: int  # the hidden width of the model it was captured from (its first argument's last dim)

    @property
    def component(self) -> str:
        return self.record["component"]


CAPTURED: dict[str, CapturedRecord] = {}


def clear() -> None:
    """Forget the registered captures (the end of a session)."""
    CAPTURED.clear()


def register_capture(path: str) -> list[str]:
    """Read a capture file's records and register each as a profile; the profile names."""
    file = Path(path)
    if not file.is_file():
        raise CaptureError(f"{path}: no such capture file")
    try:
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CaptureError(f"{path}: not a safetensors file ({type(error).__name__}: {error})") from None
    if METADATA_KEY not in metadata:
        raise CaptureError(f"{path}: not a capture (no {METADATA_KEY!r} metadata: write one with conformance.captures or the ConformanceCapture node)")
    meta = json.loads(metadata[METADATA_KEY])
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:8]
    names = []
    for record in meta["records"]:
        missing = [k for k in record["tensors"] if f"{record['name']}.{k}" not in shapes]
        if missing:
            raise CaptureError(f"{path}: record {record['name']} lacks its tensors {missing}")
        name = f"cap{record['name']}@{digest}"
        width = shapes[f"{record['name']}.{next(iter(record['tensors']))}"][-1]
        CAPTURED[name] = CapturedRecord(name, str(file), record, {k: v for k, v in meta.items() if k != "records"}, width)
        names.append(name)
    return names


def profiles_for(component: str) -> dict[str, Profile]:
    out = {}
    for name, captured in CAPTURED.items():
        if captured.component != component:
            continue
        record = captured.record
        sizes = Sizes(image_grid=(1, 1), text_tokens=record["text_tokens"] or 0, frames=1)
        out[name] = Profile(
            family=component.split(".")[0],
            name=name,
            description=f"inputs of block {record['block']} at model evaluation {record['evaluation']} (sigma {record['sigma'][0]:.4g})",
            provenance=f"captured from {captured.meta.get('model_file') or 'a model'} by ComfyUI {captured.meta.get('comfyui')} ({captured.path})",
            timestep=record["sigma"][0],
            latent_std=0.0,
            context_std=0.0,
            sizes={"tiny": sizes, "real": sizes},
            applies_to=(component,),
        )
    return out


def captured(profile: str) -> CapturedRecord | None:
    return CAPTURED.get(profile)


def inputs(profile: str) -> tuple[dict[str, object], dict[str, int]]:
    """The recorded keyword arguments (float32 tensors, JSON values; ``transformer_options`` empty) and the sizes."""
    found = CAPTURED[profile]
    record = found.record
    kwargs: dict[str, object] = dict(record["values"])
    with safe_open(found.path, "pt") as handle:
        for key in record["tensors"]:
            tensor = handle.get_tensor(f"{record['name']}.{key}")
            kwargs[key] = tensor.float() if tensor.is_floating_point() else tensor
    for key in record["dropped"]:
        if key == "transformer_options":
            kwargs[key] = {}
    text = record["text_tokens"] or 0
    streams = [t for t in kwargs.values() if torch.is_tensor(t) and t.dim() == 3]
    image = streams[0].shape[1] if streams else 0
    if record["component"] == "flux.single":
        image -= text
    shape = record["latent_shape"]
    frames = shape[2] if len(shape) == 5 and record["component"].startswith("wan") else 1
    return kwargs, {"image_tokens": image, "text_tokens": text, "frames": frames}
