"""The suite's time budget and the running estimate of what an entry costs."""
from __future__ import annotations

import statistics
import time
from typing import Callable


class Budget:
    """Seconds left of the suite's budget, and whether an entry estimated at ``cost``
    seconds still fits."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.clock = clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, cost: float) -> bool:
        return self.left() >= cost


class CostModel:
    """Running estimate of an entry's wall time per section (first guesses until one ran)."""

    def __init__(self, guesses: dict[str, float]):
        self.guesses = dict(guesses)
        self.seen: dict[str, list[float]] = {}

    def estimate(self, section: str) -> float:
        s = self.seen.get(section)
        return statistics.median(s) if s else self.guesses.get(section, 10.0)

    def record(self, section: str, seconds: float) -> None:
        self.seen.setdefault(section, []).append(seconds)
