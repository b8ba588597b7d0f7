"""What each declaration of fixtures/expected_failures.toml matched in one or more runs, measured: the kinds and
locations of the failures, the worst metrics, the versions, and the cases that failed otherwise or passed.

    python tools/declared_failures.py REPORT_DIR [REPORT_DIR ...]

Used to restate the declarations (kind, at, ceiling) from measurements; prints one block per declaration.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def main(dirs: list[str]) -> int:
    entries: dict[int, dict] = defaultdict(lambda: {"cases": 0, "outcomes": defaultdict(int), "kinds": defaultdict(int), "worst": {}, "versions": set(), "other": []})
    for d in dirs:
        doc = json.loads((Path(d) / "results.json").read_text())
        version = (doc["run"].get("subject") or {}).get("version")
        for case in doc["cases"]:
            declared = case.get("expected_failure")
            if not declared:
                continue
            indices = declared["index"] if isinstance(declared["index"], list) else [declared["index"]]
            for index in indices:
                record(entries[index], case, version)
    report(entries)
    return 0


def record(e: dict, case: dict, version: str | None) -> None:
    e["cases"] += 1
    e["outcomes"][case["outcome"]] += 1
    e["versions"].add(f"{case['subject']} {version}")
    for f in case.get("failure_kinds") or []:
        if f["kind"] != "expectation":
            e["kinds"][(f["kind"], f.get("at"))] += 1
    for metric in ("rel_l2", "max_abs_rel"):
        value = (case.get("metrics") or {}).get(metric)
        if value is not None and not math.isnan(value):
            if value > e["worst"].get(metric, (-1, ""))[0]:
                e["worst"][metric] = (value, case["id"])
    if case["outcome"] != "xfailed":
        e["other"].append(f"{case['outcome']}: {case['id']}: {case['reason'][:300]}")


def report(entries: dict) -> None:
    for index in sorted(entries):
        e = entries[index]
        print(f"expected[{index}]: {e['cases']} cases, {dict(e['outcomes'])}, {sorted(e['versions'])}")
        for (kind, at), n in sorted(e["kinds"].items(), key=str):
            print(f"    {kind:16s} at {at}: {n}")
        for metric, (value, case_id) in e["worst"].items():
            print(f"    worst {metric} {value:.4g} ({case_id})")
        for line in e["other"][:8]:
            print(f"    {line}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
