"""How many threads llama.cpp should use, found while serving.

llama.cpp's threads wait for each other at every node of the graph. When
another process holds a core, one of them is descheduled and the others wait
for it: Gemma 3 270M on 2 threads fell from 72 to 21 tokens/s here beside one
busy core, while 1 thread kept 44. Trying another count has a price too: a
tuner that tried one thread every few seconds took a quiet machine from 70 to
51 tokens/s. So this one tries a count only when the machine says to:

- fewer threads when the process had less CPU time during its steps than its
  threads should have had (they waited for a core);
- more threads when a core stays idle while the engine runs (``/proc/stat``;
  where that cannot be read, now and then).

A probe that loses is tried again later and later. What other processes do
while the engine is idle says little: starting at one thread after a burst
there cost the next stream up to 10 s at the slower count.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import llama_cpp

log = logging.getLogger("wsgi_llama.tuning")

#: A measuring window ends after this many steps and seconds, or MAX_WINDOW.
WINDOW_STEPS = 4
WINDOW_SECONDS = 0.1
MAX_WINDOW = 1.0
#: Below this share of its threads' time on a CPU, the process is contended.
CONTENDED = 0.85
#: Idle cores that make one thread more worth trying.
WHOLE_CORE = 0.7
#: A probe with more threads must be this much faster to be kept; one with
#: fewer is kept unless it is slower.
UP_MARGIN = 1.1
FIRST_WAIT = 0.5
LONGEST_WAIT = 60.0


class IdleCores:
    """Idle cores among this process's CPUs since the last call (``/proc/stat``)."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        try:
            self._cpus: set[str] | None = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self._cpus = None
        self._last = self._read()

    def _read(self) -> tuple[int, int, int] | None:
        try:
            with open(self._path, "rb") as f:
                lines = f.read().decode("ascii", "replace").splitlines()
        except OSError:
            return None
        idle = total = cpus = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if name == "cpu" or not name.startswith("cpu"):
                continue
            if self._cpus is not None and name not in self._cpus:
                continue
            # user nice system idle iowait irq softirq steal
            values = [int(v) for v in rest.split()[:8]]
            idle += values[3] + values[4]
            total += sum(values)
            cpus += 1
        return (idle, total, cpus) if cpus else None

    def __call__(self) -> float | None:
        """Average idle cores since the last call; None if unknown."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1]) * now[2]


class ThreadTuner:
    """Chooses the thread count for each step from measured decode speed."""

    def __init__(
        self, most: int, idle: Callable[[], float | None] | None = None
    ) -> None:
        self.most = max(1, most)
        self.best = self.most
        self._current = self.most
        self._idle = idle if idle is not None else IdleCores()
        self._best_rate = 0.0
        self._probing = 0  # the direction of the probe running, or 0
        self._wait = {-1: FIRST_WAIT, 1: FIRST_WAIT}
        self._not_before = {-1: 0.0, 1: 0.0}
        self._paused = False
        self._told = 0  # what llama.cpp's context was last given
        self._restart()
        #: Probes tried and kept, for logs and tests.
        self.probes = 0
        self.changes = 0

    def threads(self) -> int:
        """The thread count for the next step."""
        return self._current

    def apply(self, ctx: Any, threads: int | None = None) -> None:
        """Give llama.cpp's context *threads* (default: :meth:`threads`) if it
        has another count."""
        n = self.threads() if threads is None else threads
        if n != self._told:
            llama_cpp.llama_set_n_threads(ctx, n, n)
            self._told = n

    def pause(self) -> None:
        """The engine has nothing to do; :meth:`record` resumes."""
        if not self._paused:
            self._paused = True
            self._restart()

    def record(self, tokens: int, seconds: float, cpu: float) -> None:
        """A generation step of *tokens* took *seconds* and *cpu* process seconds."""
        if self.most == 1:
            return
        if self._paused:
            self._paused = False
            self._idle()  # judge cores from here, not over the idle spell
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds
        self._cpu += cpu
        if self._seconds < MAX_WINDOW and (
            self._steps < WINDOW_STEPS or self._seconds < WINDOW_SECONDS
        ):
            return
        rate = self._tokens / self._seconds
        share = self._cpu / (self._seconds * self._current)
        idle = self._idle()
        self._restart()
        now = time.monotonic()
        if self._probing:
            self._settle(rate, now)
            return
        self._best_rate = rate
        if share < CONTENDED and self.best > 1:
            self._probe(-1, now)
        elif self.best < self.most and (idle is None or idle >= WHOLE_CORE):
            self._probe(1, now)

    def _probe(self, direction: int, now: float) -> None:
        if now < self._not_before[direction]:
            return
        probe = self.best + direction
        if 1 <= probe <= self.most:
            self._probing = direction
            self._current = probe
            self.probes += 1

    def _settle(self, rate: float, now: float) -> None:
        direction, self._probing = self._probing, 0
        margin = UP_MARGIN if direction > 0 else 1.0
        if rate >= self._best_rate * margin:
            log.info(
                "%d thread(s) instead of %d: %.1f against %.1f tokens/s",
                self._current,
                self.best,
                rate,
                self._best_rate,
            )
            self.best = self._current
            self._best_rate = rate
            self.changes += 1
            self._wait[direction] = FIRST_WAIT
            # Straight back would undo what was just measured.
            self._not_before[-direction] = now + self._wait[-direction]
        else:
            self._current = self.best
            self._wait[direction] = min(self._wait[direction] * 2, LONGEST_WAIT)
            self._not_before[direction] = now + self._wait[direction]

    def _restart(self) -> None:
        self._steps = self._tokens = 0
        self._seconds = self._cpu = 0.0
