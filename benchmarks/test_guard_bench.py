"""What guards and probes cost on a block forward: ``pytest benchmarks/test_guard_bench.py -m bench``.

* ``test_guarded_forward``: a real-dim Qwen and FLUX double block (diffusers; ComfyUI too when ``COMFYUI_PATH`` is set)
  in bf16 and fp16 under every guard policy, no probes. ``extra_info["overhead"]`` is the median time over the
  unguarded forward's, measured in the same session.
* ``test_probe_overhead``: the Qwen block in bf16 with probes off, on the block's inputs and outputs (``io``) and on
  every module (``all``), installed once as over a sampler's steps: each timed call is one forward, its one host sync
  and the building of its records (entering the probes is timed apart, ``install_s``). A fourth scope, ``read``, is
  the reference for ``io``: no probes, the same input and output tensors read by the statistics kernel straight after
  the forward (the least a check of them after the forward can cost). ``extra_info["overhead"]`` comes from a separate
  interleaved measurement (the four scopes alternating in 40 rounds of 10 forwards, 400 forwards each), so that drift
  during the session does not bias it; ``paired_overhead`` is the median over rounds of each round's ratio;
  ``over_read`` is the scope's time over ``read``'s. ``extra_info["device_overhead"]`` is the same ratio of GPU times
  with the host's time hidden (a sleep kernel queued before each forward, 8 x 5 forwards per scope): what the probes
  add on the device, free of the host's noise. Targets, on an H100/H200 (recorded, not asserted): ``io`` at most 1 %
  over ``off``, ``all`` at most 10 %.

Each forward is timed with its CUDA synchronisation. On a CPU the tiny scale runs, as a smoke test of the harness.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch

from benchmarks.engines import DEVICE, SUBJECTS, engine
from conformance.backends import CallCounter
from conformance.families import family_of
from conformance.guards import GuardContext, GuardRun, get_policy, support_reason
from conformance.precision import get_precision
from conformance.kernels import HostStats
from conformance.probes import Probes, read_key
from conformance.trees import floating_tensors
from conformance.runner import Engine

pytestmark = pytest.mark.bench

CUDA = torch.cuda.is_available()
SCALE = "real" if CUDA else "tiny"
ROUNDS, WARMUP = (25, 3) if CUDA else (5, 1)
GUARDS = ("none", "clip", "nan_to_num", "fp32_residual", "upcast_attention", "partial_fp16")
_BASELINE: dict[tuple, float] = {}


class Forward:
    """One built block and its inputs; ``__call__`` runs it under a guard, synchronised (``ProbedLoop``: with probes)."""

    def __init__(self, eng: Engine, component: str, precision: str) -> None:
        self.eng, self.component, self.precision = eng, component, get_precision(precision)
        inputs = eng.inputs(component, SCALE, "nominal")
        self.weights = eng.weights(component, SCALE)
        self.built = eng.subject.build(component, SCALE, self.precision, self.weights, DEVICE)
        self.full = eng.subject.cast_inputs(inputs, torch.float32, DEVICE)
        self.kwargs = eng.subject.cast_inputs(inputs, self.precision.activation_dtype, DEVICE)
        self.sizes = inputs.sizes

    def __call__(self, guard: str = "none") -> None:
        """One forward under ``guard``, no probes, synchronised."""
        policy = get_policy(guard)
        run = GuardRun(guard, DEVICE) if policy else None
        ctx = GuardContext(
            family_of(self.component), self.component, self.precision.name, self.precision.activation_dtype, "sdpa",
            self.eng.subject.residual_streams(self.component), self.weights,
        )  # fmt: skip
        kwargs = policy.prepare_inputs(dict(self.kwargs), self.full, ctx, run) if policy else self.kwargs
        with torch.no_grad(), self.eng.subject.use_backend(self.built.module, "sdpa", CallCounter(), component=self.component) as prepare:
            with policy.apply(self.built.module, ctx, run) if policy else contextlib.nullcontext():
                self.built(prepare(kwargs), self.sizes)
        if run is not None and run.touched is not None:
            run.touched.item()
        if CUDA:
            torch.cuda.synchronize()


_FORWARDS: dict[tuple, Forward] = {}


def _forward(eng: Engine, subject: str, component: str, precision: str) -> Forward:
    key = (subject, component, precision)
    if key not in _FORWARDS:
        _FORWARDS.clear()  # one real-dim block in memory at a time
        _FORWARDS[key] = Forward(eng, component, precision)
    return _FORWARDS[key]


def _median(fn) -> float:
    """Median seconds of ``fn`` (synchronised) over ROUNDS after WARMUP: the baseline the overheads divide by."""
    times = []
    for i in range(WARMUP + ROUNDS):
        start = time.perf_counter()
        fn()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("component", ["qwen.block", "flux.double"])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_guarded_forward(benchmark, tmp_path_factory, subject, component, precision, guard):
    reason = support_reason(guard, family_of(component), component, precision, "sdpa", False)
    if reason:
        pytest.skip(f"guard {guard}: {reason}")
    forward = _forward(engine(subject, tmp_path_factory), subject, component, precision)
    key = (subject, component, precision)
    if key not in _BASELINE and not benchmark.disabled:
        _BASELINE[key] = _median(forward)
    benchmark.pedantic(forward, kwargs={"guard": guard}, rounds=ROUNDS, warmup_rounds=WARMUP)
    if benchmark.stats is None:  # --benchmark-disable (the CI smoke run): the forward ran once, untimed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=str(DEVICE), scale=SCALE, unguarded_median_s=_BASELINE[key], overhead=median / _BASELINE[key] - 1)


class ProbedLoop:
    """The block with probes installed once, as over a sampler's steps: each call is one forward and its
    ``records()`` (the one host sync; ``scope="off"``: a plain synchronisation). Entering costs once per loop and is
    timed apart (``install_s``).

    ``scope="read"`` is the reference for ``io``: no probes, the call's input and output tensors read by the
    statistics kernel after the forward, straight from the benchmark (``HostStats``, one launch, one sync). It is the
    least that any check of those tensors after the forward can cost, so ``io`` over ``read`` is what the probes' own
    bookkeeping adds."""

    def __init__(self, forward: Forward, scope: str) -> None:
        self.forward, self.scope = forward, scope
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> ProbedLoop:
        f = self.forward
        self.stack.enter_context(torch.no_grad())
        prepare = self.stack.enter_context(f.eng.subject.use_backend(f.built.module, "sdpa", CallCounter(), component=f.component))
        self.kwargs = prepare(f.kwargs)
        self.host = HostStats()
        start = time.perf_counter()
        probed = self.scope in ("io", "all")
        self.probes = self.stack.enter_context(
            Probes(f.built.module, f.built.boundary_names, f.built.input_probes, f.built.guards, enabled=probed, scope=self.scope if probed else "all")
        )  # fmt: skip
        self.install_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def __call__(self) -> None:
        output = self.forward.built(self.kwargs, self.forward.sizes)
        if self.scope == "read":
            self.host.stats_of(self._io_tensors(output))
            self.host.take()  # the forward's one synchronisation
        elif self.scope != "off":
            self.probes.records()  # waits for the statistics: the forward's one synchronisation
        elif CUDA:
            torch.cuda.synchronize()

    def _io_tensors(self, output) -> list[torch.Tensor]:
        """The tensors ``io`` probes read: every floating tensor of the call's inputs and outputs, each once."""
        found = {}
        for value, name in ((self.kwargs, "inputs"), (output, "outputs")):
            for _, tensor in floating_tensors(value, name):
                found.setdefault(read_key(tensor), tensor)
        return list(found.values())

    def device_seconds(self) -> float:
        """The GPU time of one probed forward, its statistics read included, with the GPU kept busy (a sleep kernel
        queued first) so that the host is ahead and none of its time shows: what the probes add on the device."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        output = self.forward.built(self.kwargs, self.forward.sizes)
        if self.scope == "read":
            self.host.stats_of(self._io_tensors(output))
        elif self.scope != "off":
            self.probes.flush()  # the launch records() would make; the event goes after it, before the sync
        end.record()
        if self.scope == "read":
            self.host.take()
        elif self.scope != "off":
            self.probes.records()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def _interleaved(forward: Forward, scopes: tuple[str, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward of each probe scope, measured in alternating runs (``PER_ROUND`` forwards of each
    scope per round, ``INTERLEAVED_ROUNDS`` rounds), so that a drift of the machine during the session (clocks,
    other tenants) moves every scope alike and the overhead ratios are not skewed by the order of the tests. Also the
    paired overhead of each scope: the median over rounds of its round median over ``off``'s in the same round (a
    drift between rounds cancels)."""
    times: dict[str, list[float]] = {scope: [] for scope in scopes}
    per_round: dict[str, list[float]] = {scope: [] for scope in scopes}
    for scope in scopes:
        with ProbedLoop(forward, scope) as loop:
            for _ in range(WARMUP):
                loop()
    for _ in range(INTERLEAVED_ROUNDS):
        for scope in scopes:
            with ProbedLoop(forward, scope) as loop:
                for _ in range(PER_ROUND):
                    start = time.perf_counter()
                    loop()
                    times[scope].append(time.perf_counter() - start)
            per_round[scope].append(statistics.median(times[scope][-PER_ROUND:]))
    medians = {scope: statistics.median(values) for scope, values in times.items()}
    paired = {scope: statistics.median(a / b - 1 for a, b in zip(per_round[scope], per_round["off"])) for scope in scopes}
    return medians, paired


def _device_times(forward: Forward, scopes: tuple[str, ...]) -> dict[str, float]:
    """Median GPU seconds per forward of each scope with the host's time hidden (``ProbedLoop.device_seconds``),
    alternating as ``_interleaved`` does; empty without CUDA."""
    if not CUDA:
        return {}
    times: dict[str, list[float]] = {scope: [] for scope in scopes}
    for _ in range(DEVICE_ROUNDS):
        for scope in scopes:
            with ProbedLoop(forward, scope) as loop:
                loop()
                times[scope].extend(loop.device_seconds() for _ in range(DEVICE_PER_ROUND))
    return {scope: statistics.median(values) for scope, values in times.items()}


SCOPES = ("off", "read", "io", "all")
INTERLEAVED_ROUNDS, PER_ROUND = (40, 10) if CUDA else (2, 2)
DEVICE_ROUNDS, DEVICE_PER_ROUND = 8, 5
SLEEP_CYCLES = 20_000_000  # ~10 ms at 2 GHz: longer than the host takes to queue a forward
_INTERLEAVED: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
_DEVICE: dict[str, dict[str, float]] = {}


@pytest.mark.parametrize("probes", SCOPES)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_probe_overhead(benchmark, tmp_path_factory, subject, probes):
    forward = _forward(engine(subject, tmp_path_factory), subject, "qwen.block", "bf16")
    with ProbedLoop(forward, probes) as loop:
        benchmark.pedantic(loop, rounds=ROUNDS, warmup_rounds=WARMUP)
    if benchmark.stats is None:  # --benchmark-disable (the CI smoke run): the forward ran once, untimed
        return
    if subject not in _INTERLEAVED:
        _INTERLEAVED[subject] = _interleaved(forward, SCOPES)
        _DEVICE[subject] = _device_times(forward, SCOPES)
    (medians, paired), device = _INTERLEAVED[subject], _DEVICE[subject]
    target = {"io": "<= 1 % (H100/H200)", "all": "<= 10 % (H100/H200)", "read": "reference for io"}.get(probes)
    benchmark.extra_info.update(
        device=str(DEVICE), scale=SCALE, target=target,
        interleaved_median_s=medians[probes], interleaved_off_median_s=medians["off"],
        overhead=medians[probes] / medians["off"] - 1, paired_overhead=paired[probes],
        forwards_per_scope=INTERLEAVED_ROUNDS * PER_ROUND, install_s=loop.install_s,
        device_median_s=device.get(probes), device_off_median_s=device.get("off"),
        device_overhead=device[probes] / device["off"] - 1 if device else None,
        over_read=medians[probes] / medians["read"] - 1, device_over_read=device[probes] / device["read"] - 1 if device else None,
        tokens=forward.sizes.get("image_tokens", 0) + forward.sizes.get("text_tokens", 0),
    )  # fmt: skip
