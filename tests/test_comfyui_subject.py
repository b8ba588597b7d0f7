"""ComfyUI's own classes through the adapter. Needs a checkout: COMFYUI_PATH=/path/to/ComfyUI (CI has none)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from conformance.backends import CallCounter
from conformance.case import Case
from conformance.goldens import GoldenStore
from conformance.precision import get_precision
from conformance.runner import Engine, EngineOptions

CHECKOUT = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not CHECKOUT, reason="no ComfyUI checkout: set COMFYUI_PATH to run the ComfyUI adapter tests")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    from conformance.subjects import load_subject

    tmp = tmp_path_factory.mktemp("stores")
    subject = load_subject("comfyui", comfyui_path=CHECKOUT, device=CPU)
    return Engine(subject, EngineOptions(device=CPU, committed_store=GoldenStore(tmp / "c", "c"), local_store=GoldenStore(tmp / "l", "l")))


def _run(eng, precision="fp32", backend="sdpa", path="rebind", profile="nominal"):
    return eng.forward("qwen.block", "tiny", get_precision(precision), backend, eng.inputs("qwen.block", "tiny", profile), probes=False, path=path)


def test_replayed_inputs_give_the_block_output_of_the_full_model(eng):
    """Capture is faithful: the standalone block on captured inputs equals block 0 inside ComfyUI's own model."""
    import comfy.ldm.qwen_image.model as qmodel

    from conformance.families import qwen
    from conformance.subjects.capture import accepted_kwargs

    weights = eng.weights("qwen.block", "tiny")
    dims = qwen.DIMS["tiny"]
    ops = eng.subject.comfy.ops.disable_weight_init
    model = qmodel.QwenImageTransformer2DModel(
        **accepted_kwargs(
            qmodel.QwenImageTransformer2DModel.__init__,
            dict(num_layers=1, num_attention_heads=dims.heads, attention_head_dim=dims.head_dim, joint_attention_dim=dims.joint_attention_dim, final_layer=False, dtype=torch.float32, device="cpu", operations=ops),
        )
    )
    state = {k: v for k, v in weights.items() if k in model.state_dict()}
    state.update({f"transformer_blocks.0.{k}": v for k, v in weights.items() if f"transformer_blocks.0.{k}" in model.state_dict()})
    model.load_state_dict(state, strict=False)
    seen = {}
    model.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    raw = qwen.raw_inputs("tiny", __import__("conformance.profiles", fromlist=["x"]).load_profiles("qwen")["nominal"], 0)
    with torch.no_grad():
        try:
            model(raw.latent, raw.timestep, raw.context)
        except AttributeError:
            pass  # versions with final_layer=False stop after the blocks; the hook has run
    default = eng.subject.comfy.attention.optimized_attention.__name__  # what the model used: attention_sub_quad on CPU
    backend = {"attention_pytorch": "sdpa"}.get(default, default.removeprefix("attention_"))
    standalone = _run(eng, backend=backend)
    assert torch.equal(seen["out"][0], standalone.outputs["txt"]) and torch.equal(seen["out"][1], standalone.outputs["img"])


@pytest.mark.parametrize("backend", ["sdpa", "split", "sub_quad", "basic"])
def test_every_cpu_backend_is_forced_and_counted(eng, backend):
    run = _run(eng, backend=backend)
    assert run.calls.as_dict() == {f"comfy:attention_{'pytorch' if backend == 'sdpa' else backend}": 1}


@pytest.mark.parametrize("backend", ["sdpa", "split", "sub_quad", "basic"])
def test_override_path_is_bitwise_equal_to_rebinding(eng, backend):
    if "override" not in eng.subject.backend_paths("qwen.block", backend):
        pytest.skip(f"ComfyUI {eng.subject.comfy.version} has no optimized_attention_override (added in 0.3.60)")
    rebind, override = _run(eng, backend=backend), _run(eng, backend=backend, path="override")
    assert override.calls.as_dict() == rebind.calls.as_dict()
    for name in rebind.outputs:
        assert torch.equal(rebind.outputs[name], override.outputs[name])


def test_a_kernel_that_raises_is_a_caught_fallback(eng, monkeypatch):
    """ComfyUI logs and silently uses SDPA when sageattn raises (as it does on fp32); the case must fail on that."""
    attention = eng.subject.comfy.attention

    def rejecting_sageattn(q, k, v, **kwargs):
        raise ValueError("Input tensors must be in dtype of torch.float16 or torch.bfloat16")

    monkeypatch.setattr(attention, "sageattn", rejecting_sageattn, raising=False)
    subject = eng.subject
    built = subject.build("qwen.block", "tiny", get_precision("fp32"), eng.weights("qwen.block", "tiny"), CPU)
    kwargs = subject.cast_inputs(eng.inputs("qwen.block", "tiny", "nominal"), torch.float32, CPU)
    counter = CallCounter()
    from conformance.subjects.comfyui.attention import use_backend

    with torch.no_grad(), use_backend(subject.comfy, (("comfy.ldm.qwen_image.model", "optimized_attention_masked"),), "sage", counter, "rebind") as prepare:
        built(prepare(kwargs))
    assert counter.fallbacks and "Error running sage attention" in counter.fallbacks[0]
    assert "sageattention.sageattn" not in counter.as_dict()  # it raised: not counted as run


def test_sage_and_flash_skip_without_their_packages(eng):
    for backend, package in (("sage", "sageattention"), ("flash", "flash-attn")):
        reasons = eng.subject.backend_support(backend, CPU).reasons
        assert any(f"package {package} is not installed" in r for r in reasons) or any("CUDA" in r for r in reasons)
    assert "math" not in [b for b in ("math",) if eng.subject.backend_support(b, CPU).available]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("precision", ["fp8_e4m3", "fp8_mm"])
def test_unscaled_fp8_weights_beyond_the_range_are_stored_saturated(eng, precision, device):
    """massive_growth scales rows of the output projections by 1e5: stored unscaled in e4m3 they must read +-448
    on every device (a bare cast on CUDA makes them NaN, on the CPU 448)."""
    precision = get_precision(precision)
    if precision.not_supported_reasons(CPU):
        pytest.skip("; ".join(precision.not_supported_reasons(CPU)))
    weights = dict(eng.weights("qwen.block", "tiny", "massive_growth"))
    big = weights["attn.to_out.0.weight"]
    assert big.abs().max() > 448
    built = eng.subject.build("qwen.block", "tiny", precision, weights, torch.device(device))
    stored = built.module.attn.to_out[0].weight.cpu()
    assert stored.dtype == torch.float8_e4m3fn and not torch.isnan(stored.float()).any()
    assert torch.equal(stored.float(), big.clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert any("saturating" in note and "0 values" not in note for note in built.notes)


@pytest.mark.parametrize("precision", ["fp8_e4m3", "fp8_scaled", "fp8_block"])
def test_fp8_variants_use_comfyuis_ops(eng, precision):
    built = eng.subject.build("qwen.block", "tiny", get_precision(precision), eng.weights("qwen.block", "tiny"), CPU)
    linear = built.module.attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    assert type(linear).__module__.startswith(("comfy.ops", "conformance.subjects.comfyui.ops"))
    if precision == "fp8_scaled":
        assert linear.scale_weight.shape == () and float(linear.scale_weight) > 0
    if precision == "fp8_block":
        assert linear.scale_weight.shape == (256, 4, 1)
    if precision == "fp8_e4m3":
        assert built.module.attn.norm_q.weight.dtype == torch.float8_e4m3fn  # as ComfyUI loads an fp8 model


def test_xcheck_against_diffusers(eng):
    result = eng.run(Case("comfyui", "qwen", "qwen.block", "tiny", "fp32", "xcheck", "nominal"))
    assert result.outcome == "passed", result.reason
    assert result.metrics["rel_l2"] < 1e-6


def test_no_stray_log_level_change(eng):
    level = logging.getLogger().level
    _run(eng)
    assert logging.getLogger().level == level


def _has_sage() -> bool:
    import importlib.util

    return importlib.util.find_spec("sageattention") is not None and torch.cuda.is_available()


@pytest.mark.skipif(not _has_sage(), reason="needs the sageattention package and a CUDA device")
@pytest.mark.parametrize(
    "device, dtype, rejection",
    [("cpu", torch.float32, "must be on cuda"), ("cuda", torch.float64, "must be in dtype")],
    ids=["cpu-tensors", "cuda-fp64"],
)
def test_real_sage_rejecting_an_input_is_a_caught_fallback(eng, device, dtype, rejection):
    """The real sageattn refuses the input, ComfyUI logs and uses SDPA; the suite sees the log and the missing call."""
    from conformance import compare
    from conformance.subjects.comfyui.attention import expected_kernels, use_backend

    subject = eng.subject
    precision = get_precision("fp32")
    built = subject.build("qwen.block", "tiny", precision, eng.weights("qwen.block", "tiny"), torch.device(device))
    built.module.to(dtype)
    kwargs = subject.cast_inputs(eng.inputs("qwen.block", "tiny", "nominal"), dtype, torch.device(device))
    counter = CallCounter()
    with torch.no_grad(), use_backend(subject.comfy, (("comfy.ldm.qwen_image.model", "optimized_attention_masked"),), "sage", counter, "rebind") as prepare:
        outputs = built(prepare(kwargs))
    assert all(torch.isfinite(t).all() for t in outputs.values())  # the fallback produced a plausible output
    assert counter.fallbacks and rejection in counter.fallbacks[0]
    verdict = compare.judge(
        compare.Evidence(precision="fp32", backend="sage", reference_backend="sdpa", metrics={k: 0.0 for k in compare.METRIC_NAMES} | {"cosine": 1.0},
                         backend_calls=counter.as_dict(), expected_kernels=expected_kernels("sage"), fallbacks=tuple(counter.fallbacks)),
        compare.budget_for("fp32"),
    )
    assert verdict.outcome == "failed" and "silent fallback: ComfyUI logged: Error running sage attention" in verdict.reason
    assert "sageattention.sageattn" in verdict.reason  # and the kernel never ran


@pytest.mark.parametrize("component", ["flux.double", "flux.single", "wan.t2v", "wan.i2v", "wan.ti2v"])
def test_canonical_layout_is_comfyuis_own(eng, component):
    adapter = eng.subject._adapter(component)
    block = adapter._block(adapter.spec.dims("tiny"), torch.float32, "meta", eng.subject.comfy.ops.disable_weight_init)
    canonical = adapter.weight_shapes("tiny")
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == {k: v for k, v in canonical.items() if k in block.state_dict()}


def test_in_place_updates_of_flux_blocks_do_not_touch_the_inputs(eng):
    """DoubleStreamBlock does `txt += ...`: every run gets its own copy, so goldens and cases stay independent."""
    inputs = eng.inputs("flux.double", "tiny", "nominal")
    before = inputs.kwargs["txt"].clone()
    first = eng.forward("flux.double", "tiny", get_precision("fp32"), "sdpa", inputs, probes=False)
    second = eng.forward("flux.double", "tiny", get_precision("fp32"), "sdpa", inputs, probes=False)
    assert torch.equal(inputs.kwargs["txt"], before)
    assert torch.equal(first.outputs["txt"], second.outputs["txt"])


@pytest.mark.parametrize("guard", ["fp32_residual", "clip", "nan_to_num", "upcast_attention"])
def test_guarded_runs_do_not_touch_the_inputs_either(eng, guard):
    inputs = eng.inputs("flux.double", "tiny", "nominal")
    before = {k: v.clone() for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}
    eng.forward("flux.double", "tiny", get_precision("fp16"), "sdpa", inputs, probes=False, guard=guard)
    for key, value in before.items():
        assert torch.equal(inputs.kwargs[key], value), key


def test_comfyui_flux_guard_is_made_visible(eng):
    """fp16_overflow: the text stream overflows in the residual add; nan_to_num zeroes it; the report still says where."""
    from conformance.expectations import ExpectedFailure

    eng.options.expected_failures = []
    result = eng.run(Case("comfyui", "flux", "flux.double", "tiny", "fp16", "sdpa", "fp16_overflow"))
    assert result.outcome == "failed"
    assert result.reason.startswith("non-finite inside the component although its outputs are finite (masked by the subject's guard)")
    assert result.first_nonfinite["boundary"] == "txt residual after attention" and result.first_nonfinite["masked_by_guard"]
    assert result.stats["subject_guard_touched"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in (result.metrics["rel_l2"],))
    del ExpectedFailure


def test_wan_i2v_runs_three_attentions(eng):
    run = eng.forward("wan.i2v", "tiny", get_precision("fp32"), "sdpa", eng.inputs("wan.i2v", "tiny", "nominal"), probes=False)
    assert run.calls.as_dict() == {"comfy:attention_pytorch": 3}  # self, text cross, image cross


# -- VAE decoders ------------------------------------------------------------------------------------------------------
def _vae_case(component: str, profile: str, backend: str = "sdpa") -> Case:
    return Case("comfyui", component.split(".")[0], component, "tiny", "fp32", backend, profile)


def test_vae_decoders_are_comfyuis_own_classes(eng):
    import comfy.ldm.models.autoencoder
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2

    expected = {"qwen.vae": comfy.ldm.wan.vae.WanVAE, "wan.vae21": comfy.ldm.wan.vae.WanVAE, "wan.vae22": comfy.ldm.wan.vae2_2.WanVAE, "flux.vae": comfy.ldm.models.autoencoder.AutoencodingEngine}
    for component, cls in expected.items():
        built = eng.subject.build(component, "tiny", get_precision("fp32"), eng.weights(component, "tiny"), CPU)
        assert type(built.module) is cls


@pytest.mark.parametrize(("backend", "function"), [("sdpa", "pytorch_attention"), ("split", "normal_attention")])
def test_vae_attention_is_forced_counted_and_restored(eng, backend, function):
    built = eng.subject.build("flux.vae", "tiny", get_precision("fp32"), eng.weights("flux.vae", "tiny"), CPU)
    attn = built.module.decoder.mid.attn_1
    before = attn.optimized_attention
    counter = CallCounter()
    with torch.no_grad(), eng.subject.use_backend(built.module, backend, counter, component="flux.vae") as prepare:
        built(prepare(eng.subject.cast_inputs(eng.inputs("flux.vae", "tiny", "nominal"), torch.float32, CPU)))
    assert counter.as_dict() == {f"comfy:{function}": 1}
    assert attn.optimized_attention is before


def test_vae_nan_latent_is_reported_as_entering(eng):
    from conformance.expectations import load_expected_failures
    from conformance.paths import EXPECTED_FAILURES_FILE

    eng.options.expected_failures = load_expected_failures(EXPECTED_FAILURES_FILE)
    eng.options.update_goldens = True
    try:
        result = eng.run(_vae_case("wan.vae21", "nan_latent"))
    finally:
        eng.options.expected_failures, eng.options.update_goldens = [], False
    assert result.outcome == "xfailed", result.failures
    assert result.first_nonfinite["module"] == "input" and result.first_nonfinite["entered"] is True
    assert any("RuntimeWarning: invalid value encountered in cast" in f for f in result.failures)


@pytest.mark.parametrize(
    ("component", "weight", "module"),
    [
        ("wan.vae21", "decoder.upsamples.4.residual.2.weight", "decoder.upsamples.4.residual.2"),
        ("flux.vae", "decoder.up.1.block.0.conv1.weight", "decoder.up.1.block.0.conv1"),
    ],
)
def test_vae_fault_planted_in_an_up_block_is_named(eng, component, weight, module):
    weights = dict(eng.weights(component, "tiny"))
    faulty = weights[weight].clone()
    faulty.view(-1)[0] = float("inf")
    built = eng.subject.build(component, "tiny", get_precision("fp32"), {**weights, weight: faulty}, CPU)
    from conformance.boundaries import first_nonfinite
    from conformance.probes import Probes

    kwargs = eng.subject.cast_inputs(eng.inputs(component, "tiny", "nominal"), torch.float32, CPU)
    with torch.no_grad(), Probes(built.module, built.boundary_names, root_label=built.root_label) as probes:
        probes.record_inputs(kwargs)
        built(kwargs)
    first = first_nonfinite(probes.records())
    assert first["module"] == module, first


def test_vae_tiled_decode_uses_comfyuis_tiler(eng, monkeypatch):
    import comfy.utils

    calls = []
    original = comfy.utils.tiled_scale_multidim
    monkeypatch.setattr(comfy.utils, "tiled_scale_multidim", lambda *a, **k: calls.append(tuple(a[2] if len(a) > 2 else k["tile"])) or original(*a, **k))
    for component in ("wan.vae22", "flux.vae"):
        built = eng.subject.build(component, "tiny", get_precision("fp32"), eng.weights(component, "tiny"), CPU)
        kwargs = eng.subject.cast_inputs(eng.inputs(component, "tiny", "nominal"), torch.float32, CPU)
        with torch.no_grad():
            full = built(kwargs)["pixels"]
            tiled = built.tiled_call(built.module, kwargs, {})["pixels"]
        assert tiled.shape == full.shape
        rel = float((tiled - full).norm() / full.norm())
        assert 1e-3 < rel < 0.9, rel
    assert (999, 6, 6) in calls  # Wan: decode_tiled_3d's (t, y, x) tiles
    assert {(12, 3), (3, 12), (6, 6)} <= set(calls)  # FLUX: decode_tiled_'s three tilings, (y, x)


def test_an_adapter_that_cannot_build_is_named_once_as_the_skip_reason(eng, monkeypatch):
    """A version whose signatures the adapter does not match: the component is not offered, its cases stay in the
    matrix, skipped with what differs (the gate sees a component that ran before and no longer builds)."""
    import dataclasses

    from conformance.matrix import build_matrix
    from conformance.subjects.base import SubjectError
    from conformance.subjects.comfyui.blocks import SPECS, ComfyBlock

    def old_signature(*args, **kwargs):
        raise TypeError("FluxParams.__init__() got an unexpected keyword argument 'final_layer'")

    spec = dataclasses.replace(SPECS["flux.double"], make_block=old_signature)
    with pytest.raises(SubjectError, match="the suite's adapter cannot build flux.double on ComfyUI .*: TypeError: FluxParams"):
        ComfyBlock(eng.subject.comfy, spec)
    monkeypatch.setitem(eng.subject.missing_components, "flux.double", "the suite's adapter cannot build flux.double: TypeError: x")
    monkeypatch.delitem(eng.subject._components, "flux.double")
    entries = [e for e in build_matrix(eng.subject, CPU) if e.case.component == "flux.double"]
    assert entries and all(e.skip_reason == "flux.double: the suite's adapter cannot build flux.double: TypeError: x" for e in entries)


def test_fallback_patterns_match_every_fallback_log_line_in_comfyuis_source(eng):
    """The log lines ComfyUI writes when it abandons a kernel (attention fallbacks, fp8 ops), read from this checkout's
    own source and formatted with an error: each one is caught as a fallback."""
    import re
    from pathlib import Path

    from conformance.subjects.comfyui.attention import FALLBACK_PATTERNS

    root = Path(eng.subject.comfy.path) / "comfy"
    call = re.compile(r"logging\.(?:error|warning|info)\((f?)([\"'])(.*?)\2")
    lines = []
    for path in (root / "ldm" / "modules" / "attention.py", root / "ops.py"):
        for match in call.finditer(path.read_text()):
            text = match.group(3)
            if re.search(r"(?i)(attention|fp8)", text) and re.search(r"(?i)(fail|error|exception|instead)", text):
                lines.append(re.sub(r"\{[^}]*\}", "RuntimeError: boom", text))
    assert lines, "no fallback log line found in ComfyUI's attention.py / ops.py"
    missed = [line for line in lines if not any(p.search(line) for p in FALLBACK_PATTERNS)]
    assert not missed, missed
