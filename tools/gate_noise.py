"""How much a case's rel_l2 moves between two runs of unchanged code: the noise the gate's margin must sit above.

    python tools/gate_noise.py --out docs/noise/gate-margins.json LABEL=BASELINE_DIR:CANDIDATE_DIR [...]

Each pair is two report directories of the same selection whose code did not change between them (a rerun on the
same machine; another CPU path: ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE; two ComfyUI versions on components
whose code is the same). Per precision: the largest relative change |c / b - 1| and absolute change |c - b| of
rel_l2 over the cases that ran on both sides with a finite rel_l2, where it was, and how many cases the gate, run on
the pair with the margins of fixtures/budgets.toml, calls regressed (false alarms: must be 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.gate import compare_runs  # noqa: E402
from conformance.rundir import cases_by_id, load_results, rel_l2  # noqa: E402


def measure(base_dir: Path, cand_dir: Path) -> dict:
    base, cand = cases_by_id(load_results(base_dir)), cases_by_id(load_results(cand_dir))
    per: dict[str, dict] = {}
    for case_id, b in base.items():
        c = cand.get(case_id)
        if c is None or b["outcome"] == "skipped" or c["outcome"] == "skipped":
            continue
        rb, rc = rel_l2(b), rel_l2(c)
        if rb is None or rc is None or rb == 0:
            continue
        entry = per.setdefault(b["precision"], {"cases": 0, "identical": 0, "max_rel_change": 0.0, "max_abs_change": 0.0})
        entry["cases"] += 1
        entry["identical"] += rb == rc
        rel, absolute = abs(rc / rb - 1), abs(rc - rb)
        if rel > entry["max_rel_change"]:
            entry.update(max_rel_change=rel, max_rel_at=case_id, max_rel_values=[rb, rc])
        if absolute > entry["max_abs_change"]:
            entry.update(max_abs_change=absolute, max_abs_at=case_id)
    result = compare_runs(base_dir, cand_dir)
    alarms = [{"id": v.case_id, "why": v.why} for v in result.with_verdict("regressed")]
    semantics = [{"id": v.case_id, "why": v.why} for v in result.with_verdict("semantics changed")]
    return {"baseline": str(base_dir), "candidate": str(cand_dir), "by_precision": per, "false_alarms": alarms,
            "semantics_changed": semantics, "machines": [load_results(d)["run"].get("machine") for d in (base_dir, cand_dir)]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="LABEL=BASELINE_DIR:CANDIDATE_DIR")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = {}
    for pair in args.pairs:
        label, _, dirs = pair.partition("=")
        a, _, b = dirs.partition(":")
        out[label] = measure(Path(a), Path(b))
        m = out[label]
        print(f"{label}: {len(m['false_alarms'])} regressed, {len(m['semantics_changed'])} semantics changed")
        for precision, e in sorted(m["by_precision"].items()):
            print(f"  {precision:10s} {e['cases']:4d} cases, {e['identical']:4d} identical, max rel change {e['max_rel_change']:.3g}"
                  f" ({e.get('max_rel_at', '-')}), max abs change {e['max_abs_change']:.3g}")
        for alarm in m["false_alarms"][:5]:
            print(f"  REGRESSED {alarm['id']}: {alarm['why'][0][:200]}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
