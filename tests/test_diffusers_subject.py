"""The diffusers adapter: real classes, the subject's own embedders, forced backends, fp8 storage."""

from __future__ import annotations

import torch

from conformance.backends import CallCounter
from conformance.precision import get_precision

from .helpers import diffusers_subject, engine

CPU = torch.device("cpu")


def test_inputs_come_from_the_subjects_own_embedders(tmp_path):
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    eng = engine(tmp_path)
    inputs = eng.inputs("qwen.block", "tiny", "nominal").kwargs
    img_freqs, txt_freqs = inputs["image_rotary_emb"]
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    want_img, want_txt = rope([(1, 8, 8)], max_txt_seq_len=16, device=CPU)
    assert torch.equal(img_freqs, want_img) and torch.equal(txt_freqs, want_txt)
    assert inputs["hidden_states"].shape == (1, 64, 256) and inputs["encoder_hidden_states"].shape == (1, 16, 256)
    assert inputs["temb"].shape == (1, 256)


def test_massive_profile_sets_its_channels_and_nothing_else(tmp_path):
    eng = engine(tmp_path)
    nominal = eng.inputs("qwen.block", "tiny", "nominal").kwargs
    massive = eng.inputs("qwen.block", "tiny", "massive").kwargs
    img = massive["hidden_states"]
    assert torch.all(img[..., 233] == 6e4) and torch.all(img[..., 11] == 1e4)
    keep = torch.ones(256, dtype=torch.bool)
    keep[[11, 97, 150, 233]] = False
    assert torch.equal(img[..., keep], nominal["hidden_states"][..., keep])
    assert torch.equal(massive["temb"], nominal["temb"])


def test_backend_is_forced_counted_and_restored(tmp_path):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    eng = engine(tmp_path)
    subject = eng.subject
    before = dict(_AttentionBackendRegistry._backends)
    checks = _AttentionBackendRegistry._checks_enabled
    built = subject.build("qwen.block", "tiny", get_precision("fp32"), eng.weights("qwen.block", "tiny"), CPU)
    kwargs = subject.cast_inputs(eng.inputs("qwen.block", "tiny", "nominal"), torch.float32, CPU)
    outputs = {}
    for backend in ("sdpa", "math"):
        counter = CallCounter()
        with torch.no_grad(), subject.use_backend(built.module, backend, counter):
            outputs[backend] = built(kwargs)
        assert counter.as_dict() == {f"diffusers:{subject.expected_kernels(backend)[0].split(':')[1]}": 1}
    assert _AttentionBackendRegistry._backends == before
    assert _AttentionBackendRegistry._checks_enabled == checks
    assert built.module.attn.processor._attention_backend is None
    for name in ("txt", "img"):
        diff = (outputs["sdpa"][name] - outputs["math"][name]).abs().max()
        assert float(diff) < 1e-5
    assert AttentionBackendName("native") in before


def test_unoffered_and_unavailable_backends_have_reasons():
    subject = diffusers_subject()
    assert subject.backend_support("sdpa", CPU).available
    assert subject.backend_support("math", CPU).available
    assert "not offered by diffusers" in subject.backend_support("split", CPU).reasons[0]
    for backend in ("xformers", "sage", "flash"):
        reasons = subject.backend_support(backend, CPU).reasons
        assert any("needs a CUDA device" in r for r in reasons)


def test_fp8_weights_rest_in_fp8_and_compute_in_bf16(tmp_path, monkeypatch):
    eng = engine(tmp_path)
    subject = eng.subject
    built = subject.build("qwen.block", "tiny", get_precision("fp8_e4m3"), eng.weights("qwen.block", "tiny"), CPU)
    linear = built.module.img_mlp.net[2]
    assert linear.weight.dtype == torch.float8_e4m3fn and linear.bias.dtype == torch.bfloat16
    assert built.module.attn.norm_q.weight.dtype == torch.bfloat16  # norms are skipped, as diffusers does
    kwargs = subject.cast_inputs(eng.inputs("qwen.block", "tiny", "nominal"), torch.bfloat16, CPU)
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(weight.dtype)
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    counter = CallCounter()
    with torch.no_grad(), subject.use_backend(built.module, "sdpa", counter):
        built(kwargs)
    assert seen and set(seen) == {torch.bfloat16}  # every linear ran on dequantized bf16 weights
    assert linear.weight.dtype == torch.float8_e4m3fn  # and back to storage after it
    assert "14 layers stored as float8_e4m3fn" in built.notes[0]


def test_per_tensor_scale_keeps_the_weight_range():
    from conformance.precision import dequantize, quantize_per_tensor

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 3
    q, scale, stats = quantize_per_tensor(w)
    back = dequantize(q, scale, torch.float32)
    assert float(back.abs().max()) == float(w.abs().max())
    assert stats.saturated >= 1 and stats.flushed_to_zero == 0
    assert float((back - w).norm() / w.norm()) < 0.04
