"""Ending streams cleanly when gunicorn stops (SIGTERM from systemd, Kubernetes).

On SIGTERM gunicorn stops accepting, lets running requests go on for
``--graceful-timeout`` seconds, then SIGKILLs the worker: a stream still
running is cut wherever it is, with no error event and no end to its chunked
body. Under the gevent worker, :class:`Shutdown` watches the worker and,
shortly before the kill, raises :class:`ShuttingDown` in each stream still
running, where it waits for the model. :func:`.stream.events` answers any
exception with one ``data: {"error": ...}`` event, so the stream ends with
that event and a properly closed body. A stream is only interrupted while its
generator runs, never while the server writes a frame, so no frame is cut.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import weakref
from collections.abc import Generator
from typing import Any, TypeVar

from .errors import APIError
from .threads import gevent_patched

G = TypeVar("G", bound=Generator[Any, Any, Any])


class ShuttingDown(APIError):
    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down and cut this response short; retry it.",
            503,
            code="server_shutting_down",
        )


def margin(graceful_timeout: float) -> float:
    """How long before the kill streams are ended: time to send the last event."""
    return min(2.0, graceful_timeout / 3)


class Shutdown:
    """One app's running streams, ended before gunicorn's gevent worker is killed."""

    def __init__(self) -> None:
        self._streams: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._watcher: Any = None
        self._lock = threading.Lock()

    def watch(self, generator: G, environ: dict[str, Any]) -> G:
        """Look after a streaming response's generator; return it unchanged."""
        worker = gunicorn_worker()
        if worker is None or not gevent_patched():
            return generator  # other servers: nothing known of their shutdown
        import gevent

        self._streams[generator] = (gevent.getcurrent(), environ.get("gunicorn.socket"))
        with self._lock:
            if self._watcher is None:
                self._watcher = gevent.spawn(self._run, worker)
        return generator

    def _run(self, worker: Any) -> None:
        import gevent

        while worker.alive:
            gevent.sleep(0.25)
        graceful = float(worker.cfg.graceful_timeout)
        deadline = time.monotonic() + max(0.0, graceful - margin(graceful))
        while self._streams and time.monotonic() < deadline:
            gevent.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        interrupted: weakref.WeakSet[Any] = weakref.WeakSet()
        while self._streams:
            for generator, (greenlet, sock) in list(self._streams.items()):
                if generator.gi_frame is None or greenlet.dead:
                    self._streams.pop(generator, None)
                elif generator not in interrupted:
                    # From the hub, so nothing runs between the check and the throw.
                    gevent.get_hub().loop.run_callback(
                        _interrupt, generator, greenlet, sock, interrupted
                    )
            gevent.sleep(0.05)


def _interrupt(generator: Any, greenlet: Any, sock: Any, interrupted: Any) -> None:
    # Only while the generator runs (it waits for the model, the queue or a
    # heartbeat's timer): suspended at a yield, the server may be mid-write.
    if generator.gi_running and not greenlet.dead and generator not in interrupted:
        interrupted.add(generator)
        if sock is not None:
            # No keep-alive wait for a next request after the last event: the
            # worker may exit as soon as its streams are done.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        greenlet.throw(ShuttingDown())


def gunicorn_worker() -> Any:
    """The gunicorn worker serving this process, if any: its SIGTERM handler's owner."""
    handler = signal.getsignal(signal.SIGTERM)
    worker = getattr(handler, "__self__", None)
    if type(worker).__module__.startswith("gunicorn.workers") and hasattr(
        worker, "alive"
    ):
        return worker
    return None
