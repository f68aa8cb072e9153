"""Server-Sent Events framing and heartbeats.

A heartbeat is a comment frame (``: ping``): standard SSE parsers ignore it,
while proxies and clients with idle timeouts see bytes on the wire. Some
OpenAI clients choke on comments all the same, so an interval of 0 sends none.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"

# The SSE line terminators; str.splitlines() would also split on \x0b, \x1c,
# U+2028 and others, which SSE treats as ordinary characters.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ServerSentEvent:
    """One SSE message, serialised exactly as the specification parses it."""

    def __init__(
        self, data: str, event: str | None = None, id: str | None = None
    ) -> None:
        self.data = data
        self.event = event
        self.id = id

    def encode(self) -> bytes:
        """The frame; :class:`ValueError` if *event* or *id* would break a line.

        Only ``data`` may span lines: a line break in the other fields would
        forge fields or events.
        """
        for name, value in (("event", self.event), ("id", self.id)):
            if value is not None and _LINE_BREAK.search(value):
                raise ValueError(f"an SSE {name} cannot contain a line break")
        lines = []
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        lines.extend(f"data: {line}" for line in _LINE_BREAK.split(self.data))
        return ("\n".join(lines) + "\n\n").encode("utf-8")


def json_event(payload: Any) -> bytes:
    """A ``data:`` frame carrying *payload* as compact JSON."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=plain)
    return ServerSentEvent(text).encode()


class Waitable(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


class ClientGone(Exception):
    """The client closed its connection: nobody reads the rest."""


class Heartbeat:
    """When a stream last sent bytes, so that its waits count one silence.

    A stream waits several times between frames (its turn in the queue, then
    its prompt); each wait starting the count afresh let 1.2 s pass without a
    ping at an interval of 1 s.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()

    def sent(self, frame: bytes) -> bytes:
        """Note that *frame* goes out now (if it holds anything); return it."""
        if frame:
            self.last = time.monotonic()
        return frame


def pings(
    waitable: Waitable,
    interval: float,
    limit: float | None = None,
    gone: Callable[[], bool] | None = None,
    heartbeat: Heartbeat | None = None,
) -> Iterator[bytes]:
    """Yield a heartbeat each time *interval* seconds pass with *waitable* unfinished.

    The wait is cooperative (a gevent timer under gevent), so the hub keeps
    serving while the model works. An interval of 0 or less waits silently.
    Past *limit* seconds in all, raise :class:`TimeoutError`. Silence counts
    from *heartbeat*'s last frame, or from now without one.
    """
    clock = heartbeat or Heartbeat()
    deadline = None if limit is None else time.monotonic() + limit
    beat = clock.last + interval if interval > 0 else None
    while True:
        timeout = None if beat is None else max(0.0, beat - time.monotonic())
        if gone is not None:
            # Heartbeats off: a write never fails, so look at the socket.
            timeout = 1.0 if timeout is None else min(timeout, 1.0)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            timeout = remaining if timeout is None else min(timeout, remaining)
        if waitable.wait(timeout):
            return
        if gone is not None and gone():
            raise ClientGone
        now = time.monotonic()
        # A wait may also end early (a wake-up meant for an earlier token):
        # only a whole interval of silence earns a heartbeat.
        if beat is not None and now >= beat and (deadline is None or now < deadline):
            yield clock.sent(PING)
            beat = now + interval


def plain(value: Any) -> Any:
    """JSON's ``default``: llama-cpp-python puts numpy floats in logprobs."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
