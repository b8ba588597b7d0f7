"""``python -m conformance gate|expectations|html ...``: see ``conformance.cli``."""

import sys

from .cli import main

sys.exit(main())
