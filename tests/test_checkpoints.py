"""Checkpoints in every layout of fixtures/make_checkpoints.py: what the suite reads from each, the dequantized
weights against the values written, and the bad-file catalog (one message each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conformance.checkpoints import CheckpointError, identity, open_checkpoint, read_block

from tests.helpers import checkpoint_maker

ROOT = Path(__file__).resolve().parent.parent
MAKER = checkpoint_maker()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return MAKER.write_all(tmp_path_factory.mktemp("checkpoints"))


# file -> (family, variant, block counts, format name, stored weight dtype, prefix)
LAYOUTS = {
    "qwen_image_bf16.safetensors": ("qwen", "Qwen-Image", {"qwen.block": 3}, "plain", "BF16", ""),
    "qwen_image_fp8_e4m3fn.safetensors": ("qwen", "Qwen-Image", {"qwen.block": 3}, "fp8", "F8_E4M3", ""),
    "qwen_image_comfy_quant.safetensors": ("qwen", "Qwen-Image", {"qwen.block": 3}, "comfy_quant", "F8_E4M3", ""),
    "qwen_image_quant_metadata.safetensors": ("qwen", "Qwen-Image", {"qwen.block": 3}, "comfy_quant", "F8_E4M3", ""),
    "Qwen-Image": ("qwen", "Qwen-Image", {"qwen.block": 3}, "plain", "BF16", ""),
    "qwen-image-Q8_0.gguf": ("qwen", "Qwen-Image", {"qwen.block": 3}, "gguf", "GGUF_Q8_0", ""),
    "flux1-dev-Q8_0.gguf": ("flux", "FLUX.1-dev", {"flux.double": 2, "flux.single": 3}, "gguf", "GGUF_Q8_0", ""),
    "flux1-dev.safetensors": ("flux", "FLUX.1-dev", {"flux.double": 2, "flux.single": 3}, "plain", "BF16", ""),
    "flux1-schnell.safetensors": ("flux", "FLUX.1-schnell", {"flux.double": 2, "flux.single": 3}, "plain", "BF16", ""),
    "flux1-dev-fp8.safetensors": ("flux", "FLUX.1-dev", {"flux.double": 2, "flux.single": 3}, "fp8", "F8_E4M3", "model.diffusion_model."),
    "flux1-dev-fp8-e5m2.safetensors": ("flux", "FLUX.1-dev", {"flux.double": 2, "flux.single": 3}, "fp8", "F8_E5M2", ""),
    "flux_dev_fp8_scaled.safetensors": ("flux", "FLUX.1-dev", {"flux.double": 2, "flux.single": 3}, "scaled_fp8", "F8_E4M3", ""),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("wan", "WAN 2.1 T2V 256 wide", {"wan.t2v": 3}, "plain", "F16", ""),
    "wan2.1_t2v_14B_fp8_scaled.safetensors": ("wan", "WAN 2.1 T2V 256 wide", {"wan.t2v": 3}, "scaled_fp8", "F8_E4M3", ""),
    "wan2.1_i2v_480p_14B_fp16.safetensors": ("wan", "WAN 2.1 I2V 256 wide", {"wan.i2v": 3}, "plain", "F16", ""),
    "wan2.2_ti2v_5B_fp16.safetensors": ("wan", "WAN 2.2 TI2V 256 wide", {"wan.ti2v": 3}, "plain", "F16", ""),
    "wan2.2_i2v_high_noise_14B_fp8_blockwise.safetensors": ("wan", "WAN 2.2 I2V 256 wide (an expert)", {"wan.t2v": 3}, "fp8_blockwise", "F8_E4M3", ""),
}


def test_every_layout_is_listed():
    assert set(LAYOUTS) == set(MAKER.LAYOUTS)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_is_read_as_written(files, name):
    if name not in files:
        pytest.skip("a GGUF layout: the gguf package is not installed (pip install gguf)")
    family, variant, counts, fmt, dtype, prefix = LAYOUTS[name]
    checkpoint = open_checkpoint(files[name])
    assert (checkpoint.family, checkpoint.model.variant, checkpoint.block_counts) == (family, variant, counts)
    assert (checkpoint.format.name, checkpoint.format.weight_dtype, checkpoint.prefix) == (fmt, dtype, prefix)
    component = next(iter(counts))
    block = read_block(checkpoint, component, counts[component] - 1)
    dims = checkpoint.model.dims[component]
    if family == "qwen":  # the dequantized block carries exactly the keys and shapes of a block at these dims
        shapes = {k.split(".", 2)[2]: v for k, v in MAKER.qwen_shapes(dims, 1).items() if k.startswith("transformer_blocks.0.")}
        assert {k: tuple(v.shape) for k, v in block.weights.items() if k in shapes} == shapes
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in block.weights.values())
    # the dequantized weights are the written float32 values within the storage format's rounding
    written = MAKER.weights(_shapes_of(family, dims, component), family)
    start = f"{checkpoint.model.block_lists[component]}.{counts[component] - 1}."
    for key, value in block.weights.items():
        source = written.get(start + key, written.get(key))
        if source is None or source.dim() != 2:
            continue
        rel = float((value - source).norm() / source.norm())
        # GGUF Q8_0 (one scale per 32 values, 8-bit): the worst matrix of the two fixtures measures 5.1e-3
        assert rel < {"BF16": 4e-3, "F16": 5e-4, "F8_E4M3": 0.04, "F8_E5M2": 0.08, "GGUF_Q8_0": 1e-2}[dtype], (key, rel)
    assert identity(block) == identity(read_block(checkpoint, component, counts[component] - 1))


def _shapes_of(family, dims, component):
    if family == "qwen":
        return MAKER.qwen_shapes(dims, 3)
    if family == "flux":
        return MAKER.flux_shapes(dims, 2, 3)
    return MAKER.wan_shapes(dims, 3)


def _header_rewrite(path: Path, out: Path, change) -> Path:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
    return out


@pytest.fixture(scope="module")
def bad_files(files, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every row of the catalog, written once: name -> (the bad file, the message it must get)."""
    tmp = tmp_path_factory.mktemp("bad")
    qwen = files["qwen_image_bf16.safetensors"]
    data = qwen.read_bytes()
    cases = {}
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp / "truncated.safetensors", "truncated")
    (tmp / "corrupt.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    cases["corrupt header"] = (tmp / "corrupt.safetensors", "corrupt header")
    (tmp / "model.ckpt").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    cases["pickle .ckpt"] = (tmp / "model.ckpt", "pickle checkpoint: refused, never unpickled")
    (tmp / "model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    cases["pickle .bin"] = (tmp / "model.bin", "pickle checkpoint: refused, never unpickled")
    if "flux1-dev-Q8_0.gguf" in files:
        whole = files["flux1-dev-Q8_0.gguf"].read_bytes()
        (tmp / "flux1-dev-Q8_0.gguf").write_bytes(whole[: len(whole) // 2])
        cases["truncated gguf"] = (tmp / "flux1-dev-Q8_0.gguf", "truncated")
    else:  # without the gguf package a GGUF file is one line saying what to install
        (tmp / "flux1-dev-Q8_0.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x00" * 32)
        cases["truncated gguf"] = (tmp / "flux1-dev-Q8_0.gguf", "needs the gguf package")
    two = tmp / "two"
    two.mkdir()
    (two / "a.safetensors").write_bytes(data)
    (two / "b.safetensors").write_bytes(data)
    cases["two candidates"] = (two, "2 candidate files (a.safetensors, b.safetensors)")
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp / "vae.safetensors"))
    cases["unknown family"] = (tmp / "vae.safetensors", "unknown family")
    state = {k: v.to(torch.bfloat16) for k, v in MAKER._qwen().items() if k != "transformer_blocks.0.attn.norm_q.weight"}
    save_file(state, str(tmp / "missing.safetensors"))
    cases["missing key"] = (tmp / "missing.safetensors", "lacks 'transformer_blocks.0.attn.norm_q.weight'")
    state = {k: v.to(torch.bfloat16) for k, v in MAKER._qwen().items() if not k.startswith("transformer_blocks.1.")}
    save_file(state, str(tmp / "gap.safetensors"))
    cases["missing block"] = (tmp / "gap.safetensors", "transformer_blocks has gaps: no block [1]")
    scaled = MAKER.legacy_scaled(MAKER._wan(MAKER.WAN_T2V), torch.float16, scale_input=False)
    bad = dict(scaled)
    bad["blocks.2.ffn.0.scale_weight"] = torch.ones(3)
    save_file(bad, str(tmp / "bad_scale.safetensors"))
    cases["scale of the wrong shape"] = (tmp / "bad_scale.safetensors", "(blocks.2): ffn.0.scale_weight has shape [3]")
    unmarked = {k: v for k, v in scaled.items() if k != "scaled_fp8"}
    save_file(unmarked, str(tmp / "no_marker.safetensors"))
    cases["scales without marker"] = (tmp / "no_marker.safetensors", "no scaled_fp8 marker")
    index = files["Qwen-Image"] / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    folder = tmp / "extra"
    folder.mkdir()
    for f in index.parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weight_map = json.loads(index.read_text())
    weight_map["weight_map"].pop("txt_norm.weight")
    (folder / index.name).write_text(json.dumps(weight_map))
    cases["extra key in a shard"] = (folder, "tensors the index does not list, e.g. ['txt_norm.weight']")
    wrong = _header_rewrite(qwen, tmp / "shape.safetensors", lambda h: h["img_in.weight"].__setitem__("shape", [7, 7]))
    cases["wrong shape"] = (wrong, "tensor 'img_in.weight' [7, 7] BF16 needs 98 bytes")
    return cases


BAD = ("truncated", "corrupt header", "pickle .ckpt", "pickle .bin", "truncated gguf", "two candidates", "unknown family", "missing key",
       "missing block", "scale of the wrong shape", "scales without marker", "extra key in a shard", "wrong shape")  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
def test_bad_file_has_one_clear_message(bad_files, bad):
    path, message = bad_files[bad]
    with pytest.raises(CheckpointError) as raised:
        checkpoint = open_checkpoint(path)
        component = next(iter(checkpoint.block_counts))
        read_block(checkpoint, component, checkpoint.block_counts[component] - 1).weights  # dequantized on first use
    text = str(raised.value)
    assert message in text and "\n" not in text
    assert text.startswith(str(path))


def test_block_out_of_range_names_the_count(files):
    checkpoint = open_checkpoint(files["flux1-dev.safetensors"])
    with pytest.raises(CheckpointError, match=r"has 2 flux.double blocks \(0-1\); block 5 asked"):
        read_block(checkpoint, "flux.double", 5)


# what ComfyUI's own comfy.model_detection makes of each layout (supported_models class), by version
COMFY_CLASSES = {
    "qwen_image_bf16.safetensors": "QwenImage", "qwen_image_fp8_e4m3fn.safetensors": "QwenImage",
    "qwen_image_comfy_quant.safetensors": "QwenImage", "qwen_image_quant_metadata.safetensors": "QwenImage", "Qwen-Image": "QwenImage",
    "qwen-image-Q8_0.gguf": "QwenImage", "flux1-dev-Q8_0.gguf": "Flux",  # the header's shapes, as ComfyUI-GGUF hands them over
    "flux1-dev.safetensors": "Flux", "flux1-schnell.safetensors": "FluxSchnell", "flux1-dev-fp8.safetensors": "Flux",
    "flux1-dev-fp8-e5m2.safetensors": "Flux", "flux_dev_fp8_scaled.safetensors": "Flux",
    "wan2.1_t2v_1.3B_fp16.safetensors": "WAN21_T2V", "wan2.1_t2v_14B_fp8_scaled.safetensors": "WAN21_T2V",
    "wan2.1_i2v_480p_14B_fp16.safetensors": "WAN21_I2V", "wan2.2_ti2v_5B_fp16.safetensors": "WAN22_T2V",
    "wan2.2_i2v_high_noise_14B_fp8_blockwise.safetensors": "WAN21_T2V",
}  # fmt: skip

DETECT_SCRIPT = """
import json, sys, torch
from pathlib import Path
from conformance.subjects.comfyui.loader import load
from conformance.checkpoints import open_checkpoint, comfyui_detection
comfy = load(Path(sys.argv[1]), torch.device("cpu"))
out = {}
for path in sys.argv[2:]:
    out[Path(path).name] = comfyui_detection(comfy, open_checkpoint(path))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="no ComfyUI checkout: set COMFYUI_PATH to check ComfyUI's own model detection")
def test_comfyui_detection_agrees(files):
    """ComfyUI's model_detection, run on the headers (meta tensors), names the model class the suite's family and
    variant stand for, with the same block counts (a disagreement raises)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DETECT_SCRIPT, os.environ["COMFYUI_PATH"], *map(str, files.values())], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert {name: r["supported_model"] for name, r in result.items()} == {n: c for n, c in COMFY_CLASSES.items() if n in files}
    assert result["flux_dev_fp8_scaled.safetensors"]["scaled_fp8"] == "torch.float8_e4m3fn"


def test_inspect_command(files, tmp_path, capsys):
    from conformance.cli import main

    assert main(["inspect", str(files["flux1-dev-fp8.safetensors"])]) == 0
    said = json.loads(capsys.readouterr().out)
    assert (said["prefix"], said["variant"], said["format"]["name"]) == ("model.diffusion_model.", "FLUX.1-dev", "fp8")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    assert main(["inspect", str(tmp_path / "x.ckpt")]) == 2
    assert "refused, never unpickled" in capsys.readouterr().err
