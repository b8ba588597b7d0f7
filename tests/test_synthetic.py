import torch

from conformance.synthetic import derive_seed, normal


def test_same_arguments_same_bits():
    assert torch.equal(normal((3, 1000), 7, "a", "b"), normal((3, 1000), 7, "a", "b"))


def test_values_are_exact_integer_arithmetic_and_two_float32_roundings():
    """An independent reference: the PCG64 words split into four 16-bit integers, summed in Python integers, then one
    float32 multiplication and one float32 addition (struct-rounded). Equal bit for bit: nothing depends on the
    instruction set (torch.randn's vectorised Box-Muller would)."""
    import math
    import struct

    import numpy as np

    def f32(x: float) -> float:
        return struct.unpack("<f", struct.pack("<f", x))[0]

    mean, std = 0.25, 0.5
    x = normal((4096,), 0, "qwen", "pinned", std=std, mean=mean)
    words = np.random.PCG64(derive_seed(0, "qwen", "pinned")).random_raw(4096)
    scale = f32(std * math.sqrt(3.0) / 65536.0)
    for i, word in enumerate(int(w) for w in words):
        total = sum((word >> (16 * k)) & 0xFFFF for k in range(4)) - 2 * 65535
        expected = f32(f32(float(total) * scale) + f32(mean))
        assert float(x[i]) == expected, (i, float(x[i]), expected)


def test_keys_are_independent():
    a = normal((1000,), 0, "x")
    assert not torch.equal(a, normal((1000,), 0, "y"))
    assert not torch.equal(a, normal((1000,), 1, "x"))
    assert derive_seed(0, "x") != derive_seed(0, "x", "")


def test_moments_and_bounds():
    x = normal((1 << 20,), 3, "moments", mean=1.0, std=2.0).double()
    assert abs(float(x.mean()) - 1.0) < 0.01
    assert abs(float(x.std()) - 2.0) < 0.01
    assert float((x - 1).abs().max()) <= 2.0 * 3.4642  # Irwin-Hall(4) is bounded at sqrt(12)
