"""Where the measured errors sit against the budgets of fixtures/budgets.toml, and how far they move between CPU paths.

    python tools/budget_noise.py --out docs/noise/budget-headroom.json \
        LABEL=REPORT_DIR [...] --pair LABEL_A:LABEL_B [...]

Each report directory is one run of a published subject (a checkout, a CPU path). A pair is one subject's selection
run on two CPU paths (ATEN_CPU_CAPABILITY, MKL_CBWR=COMPATIBLE): per kind (block or decoder), precision and metric it
gives the largest change of a case's value between the two, relative and absolute. The noise margin of a kind,
precision and metric is twice that largest change over every pair, relative for the reduced precisions and absolute
for fp32 (whose values are rounding floors of 1e-7..1e-6), as the gate's margins are derived.

A budget is sound when no measured value lies within its noise margin of it: a passed case stays below on any machine,
a declared budget failure stays above, and no reference run fails undeclared. A case is judged under today's budgets,
not the outcome its run recorded: only its declaration (xfailed or not) is taken from the run. ``tests/test_budgets.py`` checks
today's budgets against the committed measurement, which keeps every case that could matter (within 4x of a budget,
or failing one).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from .backends import XCHECK
from .compare import budget_for
from .families import is_vae
from .rundir import load_results

METRICS = ("rel_l2", "max_abs_rel")
ABSOLUTE_NOISE = ("fp32",)  # precisions whose noise margin is absolute
KEEP_WITHIN = 4.0  # cases further than this factor from every budget cannot come near one under a margin < 3x


def kind_of(case: dict) -> str:
    return "vae" if is_vae(case["component"]) else "block"


def budget_of(kind: str, precision: str, profile: str, metric: str) -> float:
    return getattr(budget_for(precision, kind=kind if kind == "vae" else None, profile=profile), metric)


def _budget_failure_only(case: dict) -> bool:
    kinds = {f["kind"] for f in case.get("failure_kinds") or []}
    return kinds == {"budget"}


def records(document: dict, label: str) -> Iterable[dict]:
    """The cases of one run a budget decides: passed ones, and those that failed (or xfailed) on a budget only."""
    for case in document["cases"]:
        if case["backend"] == XCHECK or case["outcome"] not in ("passed", "failed", "xfailed"):
            continue
        if case["outcome"] != "passed" and not _budget_failure_only(case):
            continue
        values = {m: (case.get("metrics") or {}).get(m) for m in METRICS}
        if not all(v is not None and math.isfinite(v) for v in values.values()):
            continue
        yield {"run": label, "id": case["id"], "kind": kind_of(case), "precision": case["precision"],
               "profile": case["profile"], "outcome": case["outcome"], **{m: float(f"{v:.6g}") for m, v in values.items()}}


def path_change(a_dir: Path, b_dir: Path) -> dict[str, dict]:
    """Per kind/precision/metric: the largest relative and absolute change of a case's value between two runs."""
    a_cases = {c["id"]: c for c in load_results(a_dir)["cases"]}
    out: dict[str, dict] = {}
    for case in load_results(b_dir)["cases"]:
        other = a_cases.get(case["id"])
        if other is None or case["backend"] == XCHECK:
            continue
        for metric in METRICS:
            a, b = (other.get("metrics") or {}).get(metric), (case.get("metrics") or {}).get(metric)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a == 0:
                continue
            entry = out.setdefault(f"{kind_of(case)}/{case['precision']}/{metric}",
                                   {"cases": 0, "max_rel_change": 0.0, "max_abs_change": 0.0})
            entry["cases"] += 1
            if abs(b / a - 1) > entry["max_rel_change"]:
                entry.update(max_rel_change=abs(b / a - 1), rel_at=case["id"], rel_values=[a, b])
            if abs(b - a) > entry["max_abs_change"]:
                entry.update(max_abs_change=abs(b - a), abs_at=case["id"])
    return dict(sorted(out.items()))


def margins(changes: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per kind/precision/metric: twice the largest change over every pair, relative or absolute."""
    out: dict[str, dict] = {}
    for pair, per in changes.items():
        for key, e in per.items():
            absolute = key.split("/")[1] in ABSOLUTE_NOISE
            change = e["max_abs_change"] if absolute else e["max_rel_change"]
            entry = out.setdefault(key, {"absolute": absolute, "margin": 0.0})
            if 2 * change > entry["margin"]:
                entry.update(margin=2 * change, from_pair=pair, at=e["abs_at" if absolute else "rel_at"])
    return dict(sorted(out.items()))


def fence(value: float, budget: float, margin: dict) -> float:
    """How far ``value`` sits from ``budget`` in noise margins (>= 1: on its own side on any measured CPU path)."""
    if margin["margin"] == 0:
        return math.inf
    if margin["absolute"]:
        return abs(budget - value) / margin["margin"]
    return abs(math.log(budget / value)) / math.log1p(margin["margin"]) if value > 0 else math.inf


Budgets = Callable[[str, str, str, str], float]


def problems(cases: Iterable[dict], noise: dict[str, dict], budget: Budgets = budget_of) -> list[str]:
    """The cases whose verdict today's budgets would not keep on another CPU path, or that fail undeclared."""
    out = []
    for case in cases:
        where = f"{case['id']} on {case['run']}"
        sides = []
        for metric in METRICS:
            limit = budget(case["kind"], case["precision"], case["profile"], metric)
            margin = noise.get(f"{case['kind']}/{case['precision']}/{metric}", {"absolute": False, "margin": 0.0})
            sides.append((metric, case[metric], limit, case[metric] > limit, fence(case[metric], limit, margin), margin))
        if case["outcome"] != "xfailed":  # undeclared: a reference run of a published subject must pass on any machine
            for metric, value, limit, above, distance, margin in sides:
                if above or distance < 1:
                    out.append(f"{where}: undeclared, {metric} {value:.3g} {'above' if above else 'within the noise margin of'}"
                               f" the budget {limit:.3g} (margin {_margin_text(margin)})")
        elif not any(above and distance >= 1 for _m, _v, _l, above, distance, _n in sides) and not all(
            not above and distance >= 1 for _m, _v, _l, above, distance, _n in sides
        ):  # a declared failure stays failing on any machine, or passes on every one (a stale declaration)
            closest = max(sides, key=lambda s: s[1] / s[2])
            out.append(f"{where}: a declared budget failure, but no metric is clearly above its budget ({closest[0]}"
                       f" {closest[1]:.3g} against {closest[2]:.3g}, margin {_margin_text(closest[5])}): it may pass on one machine and fail on another")
    return out


def _margin_text(margin: dict) -> str:
    return f"{'+-' if margin['absolute'] else 'x'}{margin['margin']:.3g}"


def worth_keeping(case: dict, budget: Budgets = budget_of) -> bool:
    if case["outcome"] == "xfailed":
        return True
    return any(case[m] * KEEP_WITHIN >= budget(case["kind"], case["precision"], case["profile"], m) for m in METRICS)


def summary(cases: list[dict], budget: Budgets = budget_of) -> dict[str, dict]:
    """Per kind/precision/metric/profile: the largest value of an undeclared case and the smallest value above the
    budget of a declared one, against today's budget."""
    rows: dict[str, dict] = {}
    for case in cases:
        for metric in METRICS:
            key = f"{case['kind']}/{case['precision']}/{metric}/{case['profile']}"
            row = rows.setdefault(key, {"budget": budget(case["kind"], case["precision"], case["profile"], metric),
                                        "undeclared_max": None, "declared_min_above": None})
            value, seen = case[metric], [case[metric], case["id"], case["run"]]
            if case["outcome"] != "xfailed":
                if row["undeclared_max"] is None or value > row["undeclared_max"][0]:
                    row["undeclared_max"] = seen
            elif value > row["budget"] and (row["declared_min_above"] is None or value < row["declared_min_above"][0]):
                row["declared_min_above"] = seen
    return dict(sorted(rows.items()))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=REPORT_DIR")
    parser.add_argument("--pair", action="append", default=[], help="LABEL_A:LABEL_B, one subject on two CPU paths")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: write LABEL=REPORT_DIR")
        runs[label] = Path(path)
    changes = {}
    for pair in args.pair:
        a, _, b = pair.partition(":")
        if a not in runs or b not in runs:
            parser.error(f"--pair {pair!r}: both labels must name a run")
        changes[pair] = path_change(runs[a], runs[b])
    noise = margins(changes)
    documents = {label: load_results(d) for label, d in runs.items()}
    cases = [r for label, doc in documents.items() for r in records(doc, label)]
    for key, m in noise.items():
        print(f"noise {key:28s} margin {_margin_text(m)} ({m.get('at', '-')}, {m.get('from_pair', '-')})")
    for key, row in summary(cases).items():
        most, least = row["undeclared_max"], row["declared_min_above"]
        print(f"{key:44s} budget {row['budget']:.3g}  undeclared up to {most and format(most[0], '.3g')}"
              f"  declared failures from {least and format(least[0], '.3g')}")
    found = problems(cases, noise)
    print("\n".join(found) or "every measured value clears its budget by the noise margin")
    if args.out:
        document = {
            "runs": {label: {"machine": doc["run"].get("machine"), "subject": (doc["run"].get("subject") or {}).get("identity"),
                             "dir": str(runs[label])} for label, doc in documents.items()},
            "pairs": changes,
            "noise": noise,
            "summary": summary(cases),
            "cases": [c for c in cases if worth_keeping(c)],
        }
        args.out.write_text(json.dumps(document, indent=None, separators=(",", ":")).replace('},{"run"', '},\n{"run"') + "\n")
    return 1 if found else 0
