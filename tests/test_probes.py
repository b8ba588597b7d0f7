"""Probes name the module where a bad value is born, and the stats they record are right."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conformance.case import Case
from conformance.precision import get_precision
from conformance.boundaries import INPUT, ROOT, GuardSpy, first_nonfinite
from conformance.probes import Probes, tensor_stats

from .helpers import diffusers_subject, engine


def _block_module_names() -> list[str]:
    subject = diffusers_subject()
    from conformance.families.common import synthetic_weights
    from conformance.families import qwen

    shapes = subject.weight_shapes("qwen.block", "tiny")
    built = subject.build("qwen.block", "tiny", get_precision("fp32"), synthetic_weights(shapes, 0, "qwen", qwen.INIT), torch.device("cpu"))
    # Containers (ModuleList) are never called; everything else runs in a forward.
    return [name for name, m in built.module.named_modules() if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))]


MODULES = _block_module_names()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    eng = engine(tmp_path_factory.mktemp("stores"))
    return eng, eng.inputs("qwen.block", "tiny", "nominal")


def _run_with_plant(eng, inputs, module_name: str, value: float):
    subject = eng.subject
    built = subject.build("qwen.block", "tiny", get_precision("fp32"), eng.weights("qwen.block", "tiny"), torch.device("cpu"))
    target = dict(built.module.named_modules())[module_name]

    def plant(_module, _args, output):
        first = output[0] if isinstance(output, tuple) else output
        first.view(-1)[first.numel() // 2] = value  # one bad value in the module's (first) output
        return output

    target.register_forward_hook(plant)
    kwargs = subject.cast_inputs(inputs, torch.float32, torch.device("cpu"))
    with torch.no_grad(), Probes(built.module, built.boundary_names, built.input_probes) as probes:
        outputs = built(kwargs)
    return probes.records(), outputs


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("module_name", MODULES, ids=[m or ROOT for m in MODULES])
def test_planted_nonfinite_is_located_in_its_module(tiny, module_name, value):
    eng, inputs = tiny
    records, _ = _run_with_plant(eng, inputs, module_name, value)
    first = first_nonfinite(records)
    assert first is not None
    assert first["module"] == (module_name or ROOT)
    assert first["count"] >= 1
    assert first["nan"] == (1 if math.isnan(value) else 0) or first["count"] > 1


def test_nonfinite_input_is_reported_as_entering(tiny):
    eng, inputs = tiny
    subject = eng.subject
    built = subject.build("qwen.block", "tiny", get_precision("fp32"), eng.weights("qwen.block", "tiny"), torch.device("cpu"))
    kwargs = subject.cast_inputs(inputs, torch.float32, torch.device("cpu"))
    kwargs["encoder_hidden_states"][0, 3, 5] = math.nan
    with torch.no_grad(), Probes(built.module, built.boundary_names, built.input_probes) as probes:
        built(kwargs)
    first = first_nonfinite(probes.records())
    assert first["module"] == INPUT and first["tensor"] == "encoder_hidden_states" and first["count"] == 1


def test_clip_masked_overflow_shows_as_saturation_and_fails(tmp_path):
    """diffusers clips fp16 Qwen outputs to +-65504: an overflow in the residual add would leave only saturated values.

    Channel 233 of the image stream sits at 6e4 (massive profile); a gate of 1 and an MLP bias of 2e4 push the
    residual to 8e4. In fp16 the in-line add overflows to inf, which the clip turns into 65504 before the block
    returns. The output is finite; the spy on Tensor.clip sees the inf going in, and the saturation count the 65504s
    coming out.
    """
    eng = engine(tmp_path, committed=tmp_path / "golden", update_goldens=True)
    weights = eng.weights("qwen.block", "tiny")
    dim, channel = 256, 233
    gate2 = 5 * dim + channel  # img_mod output chunks: shift1, scale1, gate1, shift2, scale2, gate2
    weights["img_mod.1.weight"][gate2] = 0.0
    weights["img_mod.1.bias"][gate2] = 1.0
    weights["img_mlp.net.2.bias"][channel] = 2e4  # 6e4 + 2e4 > 65504: the residual add overflows, the MLP does not

    fp16 = eng.run(Case("diffusers", "qwen", "qwen.block", "tiny", "fp16", "sdpa", "massive"))
    assert fp16.outcome == "failed"
    first = fp16.first_nonfinite
    assert first["module"] == ROOT and first["boundary"] == "input of Tensor.clip" and first["count"] == 64
    assert first["masked_by_guard"] and not first["entered"]
    assert fp16.reason.startswith("non-finite inside the component although its outputs are finite (masked by the subject's guard)")
    assert "64 values saturated at the float16 maximum; first at block (block output, output[1])" in fp16.reason
    assert fp16.stats["max_abs_value"] == 65504.0 and fp16.stats["saturated"] == 64
    assert fp16.stats["subject_guard_touched"] == 64
    assert fp16.metrics_by_output["img/bulk"]["rel_l2"] < 1e-3  # only the clipped channel is wrong
    bf16 = eng.run(Case("diffusers", "qwen", "qwen.block", "tiny", "bf16", "sdpa", "massive"))
    assert bf16.outcome == "passed" and bf16.stats["max_abs_value"] > 65504  # bf16 holds 8e4


def _reference_stats(x: torch.Tensor) -> list[float]:
    xd = x.double()
    finite = torch.isfinite(xd)
    return [
        float((~finite).sum()),
        float(torch.isnan(xd).sum()),
        float(xd[finite].abs().max()) if finite.any() else 0.0,
        float((xd.abs() == torch.finfo(x.dtype).max).sum()),
    ]


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    values=arrays(
        dtype="float32",
        shape=st.integers(1, 257),
        elements=st.one_of(
            st.floats(width=32, allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, 65504.0, -65504.0, 1e-8, 6e-8]),
        ),
    ),
    stride=st.integers(1, 3),
)
def test_tensor_stats_match_a_plain_reference(dtype, values, stride):
    x = torch.from_numpy(values).to(DTYPES[dtype])[::stride]  # odd sizes and non-contiguous views
    special = torch.tensor([torch.finfo(DTYPES[dtype]).max], dtype=DTYPES[dtype])
    x = torch.cat([x, special]) if stride == 3 else x
    assert tensor_stats(x).tolist() == _reference_stats(x)


class _AddsInPlace(torch.nn.Module):
    """Updates its input in place, as ComfyUI's FLUX blocks do with their residual streams."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.in_place = in_place

    def forward(self, x):
        y = self.lin(x)
        if self.in_place:
            x += y
            return x
        return x + y


@pytest.mark.parametrize("in_place", [False, True], ids=["keeps-input", "updates-input"])
def test_inputs_are_read_before_the_block_can_change_them(in_place):
    """The component's inputs are read on sight until the module is seen to leave them alone; after that they join the
    end-of-forward batch. Either way the input record holds the values the block was given (here: one NaN)."""
    module = _AddsInPlace(in_place)
    for forward in range(3):
        x = torch.ones(2, 4)
        x[0, 0] = math.nan
        with torch.no_grad(), Probes(module) as probes:
            module(x)
        records = probes.records()
        first = first_nonfinite(records)
        assert first is not None and first["module"] == "input" and first["count"] == 1, (forward, records)
        assert not records[0].changed_in_place
    from conformance.probes import _KEEPS_INPUTS

    assert _KEEPS_INPUTS[module]["component input"] is (not in_place)


def test_a_deferred_input_changed_after_all_is_flagged_and_read_on_sight_again():
    module = _AddsInPlace(False)
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
    probes.records()
    module.in_place = True  # the same module now updates its input: the deferred read sees later values
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
    records = probes.records()
    assert records[0].module == "input" and records[0].changed_in_place
    from conformance.probes import _KEEPS_INPUTS

    assert _KEEPS_INPUTS[module]["component input"] is False


def test_inputs_noted_at_the_end_of_a_loops_forwards_keep_their_start_versions():
    """Once a root is seen to leave its top-level tensor inputs alone, a forward's start only keeps the call and the
    inputs' versions (the start of a forward is on the GPU's critical path); the inputs are noted at the end with
    those versions, ahead of the outputs. A later in-place update is still flagged, and the next forward reads the
    inputs on sight again."""
    module = _AddsInPlace(False)
    with torch.no_grad(), Probes(module) as probes:
        seen = []
        for step in range(4):
            module.in_place = step == 2
            x = torch.ones(2, 4)
            x[0, 0] = math.nan
            module(x)
            seen.append((probes._defer_inputs, probes.records()))
    assert [deferred for deferred, _ in seen] == [False, True, True, False]
    for step, (_, records) in enumerate(seen):
        assert [(r.module, r.tensor) for r in records][:1] == [("input", "args[0]")]
        assert records[0].changed_in_place is (step == 2), step
        if step != 2:
            assert first_nonfinite(records)["module"] == "input"
    assert [r.as_dict() for r in seen[1][1]] == [r.as_dict() for r in seen[0][1]]


def test_a_module_with_its_own_output_hook_is_recorded_after_it():
    """Global hooks run before a module's own; a module that edits its output in a hook is recorded as its caller
    sees it."""
    module = _AddsInPlace(False)

    def poison(_m, _a, out):
        out[0, 0] = math.inf
        return out

    module.lin.register_forward_hook(poison)
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
    first = first_nonfinite(probes.records())
    assert first is not None and first["module"] == "lin"


def test_a_module_added_after_the_map_was_cached_is_named_and_one_outside_is_dropped():
    """The path map is cached per component and not walked before each forward; records() names what it missed."""
    module = _AddsInPlace(False)
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
    assert [r.module for r in probes.records()][1:] == ["lin", ROOT]
    module.lin = torch.nn.Sequential(torch.nn.Linear(4, 4))  # replaced after the map was cached
    outsider = torch.nn.Linear(4, 4)
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
        outsider(torch.ones(2, 4))
    assert [r.module for r in probes.records()][1:] == ["lin.0", "lin", ROOT]


def test_a_guard_call_is_attributed_to_the_module_running_it():
    class Clips(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Identity())

        def forward(self, x):
            return self.inner(x).clip(-1, 1)

    module = Clips()
    spy = GuardSpy(torch.Tensor, "clip", "Tensor.clip")
    with torch.no_grad(), Probes(module, guards=(spy,)) as probes:
        module(torch.full((3,), 2.0))
    guard = [r for r in probes.records() if r.boundary == "input of Tensor.clip"]
    assert len(guard) == 1 and guard[0].module == ROOT and guard[0].touched == 3


def test_one_installation_serves_a_loop_of_forwards():
    """Probes entered once watch every forward run under them; records() returns each forward's boundaries and starts
    afresh (a sampler's steps), with the inputs' in-place check still done per forward."""
    module = _AddsInPlace(False)
    with torch.no_grad(), Probes(module) as probes:
        per_forward = []
        for step in range(3):
            x = torch.ones(2, 4)
            x[0, 0] = math.nan if step == 1 else 1.0
            module(x)
            per_forward.append(probes.records())
    assert [len(r) for r in per_forward] == [len(per_forward[0])] * 3
    assert [first_nonfinite(r) is not None for r in per_forward] == [False, True, False]
    assert first_nonfinite(per_forward[1])["module"] == "input"
    assert probes.records() == []


def test_a_tensor_recorded_twice_is_read_once(monkeypatch):
    """A dropout in eval returns its input: both boundaries get the statistics of one read."""
    import conformance.probes as probes_module

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)).eval()
    read = []
    real = probes_module.HostStats.stats_of
    monkeypatch.setattr(probes_module.HostStats, "stats_of", lambda self, tensors: read.append(len(tensors)) or real(self, tensors))
    x = torch.ones(2, 4)
    with torch.no_grad(), Probes(module) as probes:
        module(x)
    records = probes.records()
    linear, dropout = (r for r in records if r.module in ("0", "1"))
    assert (linear.max_abs, linear.nonfinite) == (dropout.max_abs, dropout.nonfinite)
    # four boundaries, two reads: the input, and the linear's output (which is the dropout's and the block's too)
    assert len(records) == 4 and sum(read) == 2


def test_flush_queues_the_read_and_records_are_unchanged(monkeypatch):
    """flush() launches the read of what was recorded so far; records() then has nothing left to read, and returns
    the same numbers as without it. Flushing with nothing recorded reads nothing."""
    import conformance.probes as probes_module

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    read = []
    real = probes_module.HostStats.stats_of
    monkeypatch.setattr(probes_module.HostStats, "stats_of", lambda self, tensors: read.append(len(tensors)) or real(self, tensors))
    x = torch.linspace(-3, 3, 8).reshape(2, 4)
    with torch.no_grad(), Probes(module) as probes:
        module(x)
        plain = probes.records()
        read.clear()
        module(x)
        probes.flush()
        assert read, "flush() launched no read"
        launched = list(read)
        probes.flush()
        assert read == launched  # nothing new recorded: nothing read again
        flushed = probes.records()
        assert read == launched
    assert [r.as_dict() for r in flushed] == [r.as_dict() for r in plain]


def test_a_probed_module_is_freed_once_its_owner_drops_it():
    """The probes' per-root caches hold no module: a probed model goes when its owner drops it (a cache that held it
    kept every probed model's weights on the GPU for the life of the process)."""
    import gc
    import weakref

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad(), Probes(module) as probes:
        module(torch.ones(2, 4))
    assert len(probes.records()) == 5  # the input, three modules, the root
    with torch.no_grad(), Probes(module) as probes:  # the cached tree is used again
        module(torch.ones(2, 4))
    assert [r.module for r in probes.records()] == [INPUT, "0", "1", "2", ROOT]
    gone = weakref.ref(module)
    del module, probes
    gc.collect()
    assert gone() is None
