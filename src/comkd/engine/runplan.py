"""A whole run's plan (``comkd run`` / ``demo``): its parts in order and the time left, in each header.

The estimate prices each later part at the mean time of the parts of the same kind that trained in
this process (every distillation is of kind ``distill``, so a second method or seed is priced by the
first); kinds not yet timed are counted and named as such, never guessed. Parts read back by
``--resume`` advance the plan but are not timed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{seconds:.0f}s"


class RunPlan:
    """``kinds``: one entry per part, in the order the run goes through them."""

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = list(kinds)
        self.index = -1
        self.t0 = time.perf_counter()
        self.timed: dict[str, list[float]] = {}
        self._trained = False

    @contextmanager
    def part(self, kind: str) -> Iterator[None]:
        """The next part of the plan; its time counts for ``kind`` when a stage of it trained."""
        self.index += 1
        self._trained, t = False, time.perf_counter()
        yield
        if self._trained:
            self.timed.setdefault(kind, []).append(time.perf_counter() - t)

    def left_after_this(self) -> tuple[float, int]:
        """Seconds the parts after the current one should take, and how many are not yet timed."""
        later = self.kinds[self.index + 1 :]
        known = [sum(self.timed[k]) / len(self.timed[k]) for k in later if k in self.timed]
        return sum(known), len(later) - len(known)

    def note(self) -> str:
        """``part 3 of 8, run 2m10s elapsed; after this part about 4m05s (+2 parts not yet timed)``."""
        self._trained = True
        n, i = len(self.kinds), min(max(self.index, 0), len(self.kinds) - 1)
        s = f"part {i + 1} of {n}, run {_clock(time.perf_counter() - self.t0)} elapsed"
        seconds, untimed = self.left_after_this()
        if i + 1 == n:
            return s + "; the last part"
        if untimed == n - i - 1:
            return s + f"; {untimed} more part{'s' * (untimed > 1)}, not yet timed"
        extra = f" (+{untimed} part{'s' * (untimed > 1)} not yet timed)" if untimed else ""
        return s + f"; after this part about {_clock(seconds)}{extra}"


_ACTIVE: RunPlan | None = None


@contextmanager
def run_plan(kinds: list[str]) -> Iterator[RunPlan]:
    """Make ``kinds`` the plan of the run for the duration of the block (an enclosing plan wins)."""
    global _ACTIVE
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    _ACTIVE = RunPlan(kinds)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None


@contextmanager
def plan_part(kind: str) -> Iterator[None]:
    """The next part of the active plan (nothing when no plan is active)."""
    with _ACTIVE.part(kind) if _ACTIVE is not None else nullcontext():
        yield


def plan_note() -> str:
    """The active plan's note for a stage header (marks the current part as trained), or ''."""
    return _ACTIVE.note() if _ACTIVE is not None else ""
