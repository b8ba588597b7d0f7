"""The golden prefetcher: goldens made ahead by a second process equal those the run makes, each is made once, the
run takes them without recomputing, a golden the run is making is skipped, and a stopped prefetcher leaves no
half-written file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from conformance.goldens import GoldenStore, file_sha256
from conformance.prefetch import GoldenPrefetch, PrefetchSpec
from tests.helpers import engine
from tests.test_suite_run import run_suite

KEYS = (("qwen.block", "tiny", "nominal"), ("flux.single", "tiny", "massive"), ("wan.t2v", "tiny", "nominal"))


def _spec(tmp_path: Path, keys, run_id: str = "run-a") -> PrefetchSpec:
    made_here = engine(tmp_path, committed=tmp_path / "empty")
    return PrefetchSpec(
        subject="diffusers", comfyui_path=None, committed=tmp_path / "empty", local=tmp_path / "local",
        identity=dict(made_here.identity()), run_id=run_id, keys=tuple(keys), threads=1,
    )  # fmt: skip


def test_prefetched_goldens_equal_the_runs_own_and_are_taken_without_recomputing(tmp_path):
    prefetch = GoldenPrefetch(_spec(tmp_path, KEYS))
    prefetch.start()
    assert prefetch.join(120), "the prefetcher did not finish three tiny goldens in 120 s"
    log = prefetch.stop()
    assert log.errors == [] and len(log.made) == 3 and log.seconds > 0, log
    store = GoldenStore(tmp_path / "local", "local")
    # made in this process, in another store: the same bits (same code, same CPU)
    other = engine(tmp_path / "b", committed=tmp_path / "empty")
    for component, scale, profile in KEYS:
        ours = other.golden(component, scale, profile)
        theirs = store.entry(ours.key)
        assert theirs is not None and theirs["run_id"] == "run-a"
        assert theirs["sha256"] == file_sha256(ours.path), ours.key.id
    # the run that owns the prefetcher takes them as they are: no float64 forward, no 'confirmed' recomputation
    run = engine(tmp_path, committed=tmp_path / "empty", run_id="run-a")
    for key in KEYS:
        run.golden(*key)
    assert run.golden_seconds == 0.0 and run.golden_changes == []


def test_a_golden_being_made_elsewhere_is_skipped_not_waited_for(tmp_path):
    spec = _spec(tmp_path, KEYS)
    store = GoldenStore(tmp_path / "local", "local")
    held = engine(tmp_path, committed=tmp_path / "empty").golden_key(*KEYS[0])
    with store.creating(held):  # as the run does while it makes the first golden itself
        prefetch = GoldenPrefetch(spec)
        prefetch.start()
        assert prefetch.join(120), "the prefetcher waited for a golden another process holds"
    log = prefetch.stop()
    assert store.entry(held) is None
    assert len(log.made) == 2 and not any(held.id in line for line in log.made), log.made


def test_stopping_a_prefetcher_mid_golden_leaves_no_partial_file_and_no_held_lock(tmp_path):
    key = ("qwen.block", "real", "nominal")  # tens of seconds of float64 on a CI CPU: still running when stopped
    prefetch = GoldenPrefetch(_spec(tmp_path, [key]))
    prefetch.start()
    time.sleep(8)
    log = prefetch.stop(timeout=60)
    assert prefetch.join(0) and log.made == []  # ended (SIGTERM, or the kill after 60 s)
    store = GoldenStore(tmp_path / "local", "local")
    golden_key = engine(tmp_path, committed=tmp_path / "empty").golden_key(*key)
    assert store.entry(golden_key) is None
    assert not [p for p in (tmp_path / "local").rglob("*.tmp")]
    with store.creating(golden_key, wait=False):  # the lock died with the process
        pass


def test_a_suite_run_with_the_prefetcher_makes_each_golden_once(tmp_path):
    (tmp_path / "empty").mkdir()
    proc, report_dir = run_suite(tmp_path, "-k", "block and fp32 and sdpa", "--golden-dir", str(tmp_path / "empty"), "--prefetch-goldens", "on")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    document = json.loads((report_dir / "results.json").read_text())
    run, cases = document["run"], document["cases"]
    assert run["golden_prefetch"]["ran"] and run["golden_prefetch"]["errors"] == []
    # a whole-model case (the -k takes the first-block-cache patch rows) is judged against a fresh process, not a golden
    keys = {(c["component"], c["scale"], c["profile"]) for c in cases if c["outcome"] != "skipped" and c.get("sequence", "none") == "none"}
    created = [line for line in run["golden_changes"] if line.startswith("created ")]
    assert len(created) == len(keys) and not [line for line in run["golden_changes"] if line.startswith("confirmed")], run["golden_changes"]
    assert run["golden_prefetch"]["made"] == len([line for line in created if "made ahead by the prefetcher" in line])
    assert all(c["outcome"] in ("passed", "xfailed") for c in cases if c["outcome"] != "skipped")


def test_the_prefetcher_is_off_on_a_cpu_run_by_default_and_says_why(tmp_path):
    proc, report_dir = run_suite(tmp_path, "-k", "qwen and block and fp32 and sdpa and nominal")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prefetch = json.loads((report_dir / "results.json").read_text())["run"]["golden_prefetch"]
    expected = "a CPU run's cases use every core themselves" if not torch.cuda.is_available() else None
    assert prefetch["ran"] is False and (expected is None or prefetch["why"] == expected), prefetch
