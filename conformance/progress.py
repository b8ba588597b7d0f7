"""Progress of a long run: cases done per family, elapsed time and an estimate of what is left.

Fed by the process that writes the reports (the only process under pytest-xdist that sees every result), one call per
finished case. A line goes out when a family finishes and at most every ``interval`` seconds otherwise; the estimate
is the mean time per finished case over the cases left, so it is rough while skipped cases (instant) dominate.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from .families import family_of


def family_of_case_id(case_id: str) -> str:
    """The family of a case from its id alone (``subject-component-...``): all a pytest-xdist controller, which
    collects nothing, has to count by."""
    parts = case_id.split("-")
    return family_of(parts[1]) if len(parts) > 1 else case_id


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    def __init__(self, write: Callable[[str], None], interval: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write
        self.interval = interval
        self.clock = clock
        self.totals: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.started = clock()
        self.last_line = self.started
        self.seen: set[str] = set()

    def expect(self, case_ids: Iterable[str]) -> None:
        """The run's cases (collection order); called once the selection is known."""
        self.totals = Counter(family_of_case_id(i) for i in case_ids)
        self.started = self.last_line = self.clock()

    def finished(self, case_id: str, outcome: str) -> None:
        if case_id in self.seen:
            return
        self.seen.add(case_id)
        family = family_of_case_id(case_id)
        self.done[family] += 1
        if outcome == "skipped":
            self.skipped[family] += 1
        now = self.clock()
        if self.totals and self.done[family] == self.totals[family]:
            ran = self.done[family] - self.skipped[family]
            self.write(f"{family}: all {self.done[family]} cases done ({ran} ran, {self.skipped[family]} skipped); {self.overall(now)}")
            self.last_line = now
        elif now - self.last_line >= self.interval:
            self.write(self.overall(now))
            self.last_line = now

    def overall(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        done, total = sum(self.done.values()), sum(self.totals.values())
        elapsed = now - self.started
        text = f"{done}/{total} cases, {_duration(elapsed)} elapsed"
        if done and total > done:
            text += f", ETA ~{_duration(elapsed / done * (total - done))}"
        families = ", ".join(f"{f} {self.done[f]}/{n}" for f, n in self.totals.items() if 0 < self.done[f] < n)
        return text + (f" ({families})" if families else "")
