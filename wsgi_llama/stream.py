"""The generator a streaming view returns.

It waits its turn in the model's queue, then advances llama-cpp-python's
chunk iterator one step at a time in a native thread. While it waits, and
while a step runs (prompt processing, a slow token), it yields heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from .batched import Pump
from .errors import APIError
from .pool import Model, QueueTimeout
from .sse import DONE, PING, ClientGone, Heartbeat, json_event, pings
from .threads import Call, CallQueue


@dataclass
class Job:
    """What a streaming request runs once its turn comes."""

    model: Model
    start: Callable[[], Iterator[dict[str, Any]]]
    shape: Callable[[dict[str, Any]], dict[str, Any] | None]
    final: Callable[[], dict[str, Any] | None] = lambda: None
    logits: Callable[[], AbstractContextManager[Any]] = field(default=nullcontext)
    #: Called in the model's turn once a generation has ended, however it ended.
    counted: Callable[[], None] = lambda: None


def events(
    job: Job,
    runner: CallQueue,
    interval: float,
    queue_timeout: float,
    to_api_error: Callable[[Exception], APIError],
    gone: Callable[[], bool] | None = None,
) -> Iterator[bytes]:
    # Enter the queue only once iterated: a server may close a generator it
    # never started, and then no ``finally`` would give the place back.
    ticket = None
    heartbeat = Heartbeat()
    try:
        ticket = job.model.queue.enter(job.model.alias)
        # The headers go out with the first chunk. gunicorn sends them for an
        # empty one; mod_wsgi and Passenger drop empty chunks and would hold
        # the headers until the first heartbeat or token. So with heartbeats
        # on, the first chunk is one; with them off, not a byte more.
        yield heartbeat.sent(PING if interval > 0 else b"")
        try:
            yield from pings(
                ticket,
                interval,
                queue_timeout,
                None if interval > 0 else gone,
                heartbeat,
            )
        except TimeoutError:
            raise QueueTimeout(job.model.alias, queue_timeout) from None
        if gone is not None and gone():
            return  # left while queued: its prompt is not worth processing
        with job.logits():
            yield from _generate(job, runner, interval, heartbeat)
        yield DONE
    except ClientGone:
        return
    except Exception as exc:
        # The status line has gone out: report the error as one event.
        yield json_event(to_api_error(exc).body())
    finally:
        if ticket is not None:
            ticket.leave()


def _generate(
    job: Job, runner: CallQueue, interval: float, heartbeat: Heartbeat
) -> Iterator[bytes]:
    step: Call[Any] | None = None
    chunks: Iterator[dict[str, Any]] | None = None
    try:
        step = runner.submit(job.start)
        yield from pings(step, interval, heartbeat=heartbeat)
        chunks = step.result()
        while True:
            step = runner.submit(next, chunks, None)
            yield from pings(step, interval, heartbeat=heartbeat)
            chunk = step.result()
            if chunk is None:
                break
            shaped = job.shape(chunk)
            if shaped is not None:
                yield heartbeat.sent(json_event(shaped))
        final = job.final()
        if final is not None:
            yield json_event(final)
    except Exception:
        if step is not None and step.done():
            runner.call(job.model.llama.reset)  # llama.cpp may be mid-batch
        raise
    finally:
        # A client that went away leaves its step running: let it finish before
        # the model is released, or two threads end up in one llama context.
        if step is not None:
            while not step.done():
                step.wait()
        if chunks is not None:
            runner.call(getattr(chunks, "close", lambda: None))
            job.counted()


def pumped_events(
    pump: Pump,
    first: tuple[str, Any],
    shape: Callable[[dict[str, Any]], dict[str, Any] | None],
    final: Callable[[], dict[str, Any] | None],
    interval: float,
    to_api_error: Callable[[Exception], APIError],
    gone: Callable[[], bool] | None = None,
    counted: Callable[[], None] = lambda: None,
) -> Iterator[bytes]:
    """The events of a generation on the engine, with heartbeats while it waits.

    *pump* runs the request's llama-cpp-python code; *first* is what its
    first step returned (the view took it, to answer 503 while it could).
    *counted* is called once the generation has ended, however it ended.
    """
    heartbeat = Heartbeat()
    try:
        # As in events(): with heartbeats on, the first chunk is one, so that
        # mod_wsgi and Passenger (which drop empty chunks) send the headers.
        yield heartbeat.sent(PING if interval > 0 else b"")
        kind, value = first
        while kind != "done":
            if kind == "wait":
                off = None if interval > 0 else gone
                yield from pings(value, interval, None, off, heartbeat)
            else:
                shaped = shape(value)
                if shaped is not None:
                    yield heartbeat.sent(json_event(shaped))
            kind, value = pump.step()
        last = final()
        if last is not None:
            yield json_event(last)
        yield DONE
    except ClientGone:
        return
    except Exception as exc:
        yield json_event(to_api_error(exc).body())
    finally:
        pump.close()
        counted()
