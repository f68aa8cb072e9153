"""How many threads llama.cpp should use, found while serving.

llama.cpp's threads wait for each other at every step of the graph. When
another process holds a core, one of them is descheduled and the others wait
for it: Gemma 3 270M on 2 threads fell from 60 to 0.7 tokens/s beside one busy
core, and the tiny test model from 0.1 s to 8 s for 300 tokens on a loaded
machine, while one thread kept its speed. So the engine measures its
generation steps and now and then tries one thread more or fewer, keeping
whichever decodes faster. Probes that lose are tried less and less often.
"""

from __future__ import annotations

import time

#: A measuring window ends after this many steps and seconds, or MAX_WINDOW.
WINDOW_STEPS = 8
WINDOW_SECONDS = 0.2
MAX_WINDOW = 1.0
#: A probe must beat the current count by this factor to replace it.
MARGIN = 1.15
FIRST_PROBE = 0.5
LONGEST_WAIT = 60.0


class ThreadTuner:
    """Chooses the thread count for each step from measured decode speed."""

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self.best = self.most
        self._current = self.most
        self._rates: dict[int, float] = {}
        self._direction = -1
        self._wait = FIRST_PROBE
        self._next_probe = time.monotonic() + FIRST_PROBE
        self._probing = False
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0

    def threads(self) -> int:
        """The thread count for the next step."""
        return self._current

    def record(self, tokens: int, seconds: float) -> None:
        """A generation step of *tokens* took *seconds* with :meth:`threads`."""
        if self.most == 1:
            return
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds
        if self._seconds < MAX_WINDOW and (
            self._steps < WINDOW_STEPS or self._seconds < WINDOW_SECONDS
        ):
            return
        rate = self._tokens / self._seconds
        self._steps = self._tokens = 0
        self._seconds = 0.0
        now = time.monotonic()
        if not self._probing:
            self._rates[self.best] = rate
            if now >= self._next_probe:
                self._start_probe()
            return
        self._probing = False
        probe = self._current
        if rate > self._rates.get(self.best, 0.0) * MARGIN:
            self.best = probe
            self._wait = FIRST_PROBE
        else:
            self._wait = min(self._wait * 2, LONGEST_WAIT)
            self._direction = -self._direction
        self._rates[probe] = rate
        self._current = self.best
        self._next_probe = now + self._wait

    def _start_probe(self) -> None:
        probe = self.best + self._direction
        if not 1 <= probe <= self.most:
            self._direction = -self._direction
            probe = self.best + self._direction
        if not 1 <= probe <= self.most:
            return
        self._probing = True
        self._current = probe
