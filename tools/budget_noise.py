"""Measure where the errors sit against the budgets and how far they move between CPU paths (conformance.budget_noise).

    python tools/budget_noise.py --out docs/noise/budget-headroom.json LABEL=REPORT_DIR [...] --pair LABEL_A:LABEL_B [...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.budget_noise import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
