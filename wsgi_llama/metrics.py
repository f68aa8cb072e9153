"""Prometheus metrics for ``/metrics``: one :class:`Metrics` per app.

prometheus_client keeps values either in the process or, in multiprocess
mode, in files under ``PROMETHEUS_MULTIPROC_DIR`` that every worker writes
and that any worker's ``/metrics`` adds up: a scrape reaches one gunicorn
worker, and the totals must cover all of them. Under gunicorn without that
variable, workers pick a private directory named after their master (see
:func:`multiprocess_dir`); elsewhere the values live in the app's own registry.

The API calls the recording methods from request greenlets only, never from
the native threads running llama.cpp: in multiprocess mode prometheus_client
guards its files with a lock that gevent has patched.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from flask import Response, request

from .sse import DONE, PING
from .threads import gevent_patched

log = logging.getLogger("wsgi_llama")

#: Where the request's arrival time (time.monotonic) is kept, in the WSGI environ.
STARTED = "wsgi_llama.started"

_DURATIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FIRST_TOKEN = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")
_ERROR_EVENT = b'data: {"error":'
#: (``Engine.stats`` key, counter, help): what continuous batching does.
_ENGINE_COUNTERS = (
    ("batched", "wsgi_llama_batched_generations", "Generations batched on the engine."),
    (
        "exclusive_requests",
        "wsgi_llama_unbatched_generations",
        "Generations the engine could not take (echo, suffix, logits processors, "
        "tool-call handlers): each ran alone, holding the whole model.",
    ),
    ("steps", "wsgi_llama_engine_steps", "The engine's llama_decode calls."),
    (
        "step_tokens",
        "wsgi_llama_engine_step_tokens",
        "Tokens its steps carried: prompt chunks and generated tokens.",
    ),
    (
        "step_sequences",
        "wsgi_llama_engine_step_sequences",
        "Sequences its steps carried; per step, the batch's mean width.",
    ),
    (
        "decode_seconds",
        "wsgi_llama_engine_decode_seconds",
        "Time in llama_decode; per second of wall time, how busy the model is.",
    ),
    (
        "reused",
        "wsgi_llama_prompt_reused_tokens",
        "Prompt tokens not evaluated: a held or restored prefix served them.",
    ),
    (
        "shared",
        "wsgi_llama_prompt_shared_tokens",
        "Of the reused prompt tokens, those whose KV cells another sequence "
        "holds too (a system prompt that several requests begin with).",
    ),
    (
        "aborted_steps",
        "wsgi_llama_engine_aborted_steps",
        "Steps cut short for a client that went away.",
    ),
)
#: Seconds between the background updates of the queue gauges.
REFRESH = 1.0


class Metrics:
    """The app's metrics; with *enabled* false, every method does nothing."""

    def __init__(self, enabled: bool = True, directory: str | None = None) -> None:
        self.enabled = enabled
        self.directory = directory
        self._queues: list[tuple[Queue, str]] = []
        self._refresher: int | None = None  # the pid it runs in
        if not enabled:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        if directory is not None:
            _use_files()
        # In multiprocess mode this registry only holds the metric objects;
        # the exposition reads the files instead.
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "wsgi_llama_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "wsgi_llama_request_duration_seconds",
            "From a request's arrival to its response's last byte.",
            ["route"],
            buckets=_DURATIONS,
            registry=registry,
        )
        self.first_token = Histogram(
            "wsgi_llama_time_to_first_token_seconds",
            "Streams: from the request's arrival (queueing included) to the "
            "event carrying its first token.",
            ["model"],
            buckets=_FIRST_TOKEN,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "wsgi_llama_prompt_tokens",
            "Prompt tokens of generations.",
            ["model"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "wsgi_llama_completion_tokens",
            "Tokens generated.",
            ["model"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "wsgi_llama_queue_depth",
            "Requests waiting for the model, across live workers.",
            ["model"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.active = Gauge(
            "wsgi_llama_active_generations",
            "Requests the model is working on, across live workers.",
            ["model"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.prompt_cache = Gauge(
            "wsgi_llama_prompt_cache_bytes",
            "Host memory the prompt cache holds, across live workers.",
            ["model"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.heartbeats = Counter(
            "wsgi_llama_heartbeats",
            "': ping' comment frames sent to streams.",
            ["route"],
            registry=registry,
        )
        self.disconnects = Counter(
            "wsgi_llama_client_disconnects",
            "Clients that went away before their response was complete.",
            ["route"],
            registry=registry,
        )
        #: The batching engine's counters, by the key of ``Engine.stats``.
        self.engine = {
            key: Counter(name, doc, ["model"], registry=registry)
            for key, name, doc in _ENGINE_COUNTERS
        }
        self._engine_seen: dict[int, dict[str, float]] = {}
        self._engine_lock = threading.Lock()

    @classmethod
    def for_app(cls, enabled: bool) -> Metrics:
        return cls(enabled, multiprocess_dir() if enabled else None)

    # --- the exposition --------------------------------------------------------

    def exposition(self) -> Response:
        """The text format Prometheus scrapes, over every worker when multiprocess."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.multiprocess import MultiProcessCollector

        self._refresh()
        registry = self.registry
        if self.directory is not None:
            _forget_dead_workers(self.directory)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.directory)
        # Plain text unless the scraper asks for OpenMetrics.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(registry), content_type=content_type)

    # --- hooks the API calls -----------------------------------------------------

    def started(self) -> None:
        """A ``before_request`` hook: note the arrival time."""
        request.environ[STARTED] = time.monotonic()
        if self.enabled:
            self._refresh_in_background()

    def answered(self, response: Response) -> Response:
        """An ``after_request`` hook: count the status; time the body to its end."""
        if not self.enabled:
            return response
        route = _route()
        self.requests.labels(route, str(response.status_code)).inc()
        if response.status_code == 499:  # a whole request whose client left
            self.disconnects.labels(route).inc()
        started = request.environ.get(STARTED, time.monotonic())
        response.call_on_close(
            lambda: self.duration.labels(route).observe(time.monotonic() - started)
        )
        return response

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if self.enabled:
            self.prompt_tokens.labels(model).inc(prompt)
            self.completion_tokens.labels(model).inc(completion)

    def watch(self, queue: Queue, model: str) -> None:
        """Report a model's queue in the gauges (mounts sharing one: the first).

        The gauges are set from the queue's counts at each scrape and, in the
        background, every :data:`REFRESH` seconds once the process serves (a
        scrape reaches one worker; the others' files must be current too).
        """
        if self.enabled and all(q is not queue for q, _ in self._queues):
            self._queues.append((queue, model))
            self._refresh()

    def _refresh(self) -> None:
        for queue, model in self._queues:
            self.queue_depth.labels(model).set(len(queue))
            self.active.labels(model).set(queue.running)
            cache = getattr(queue, "cache", None)  # the engine's; no FIFO has one
            self.prompt_cache.labels(model).set(cache.size if cache else 0)
            stats = getattr(queue, "stats", None)  # likewise
            if stats is not None:
                self._count_engine(queue, stats, model)

    def _count_engine(self, queue: Queue, stats: dict[str, float], model: str) -> None:
        """Add what the engine's counters gained since the last refresh.

        The engine's thread only bumps numbers in a dict; the counters are
        written here, from a request's greenlet or the refresher.
        """
        with self._engine_lock:
            seen = self._engine_seen.setdefault(id(queue), {})
            gains = {}
            for key in self.engine:
                now = stats.get(key, 0)
                gains[key] = now - seen.get(key, 0)
                seen[key] = now
        for key, gain in gains.items():
            if gain > 0:
                self.engine[key].labels(model).inc(gain)

    def _refresh_in_background(self) -> None:
        """Start the refresher in this process (after a fork too), once."""
        if self._refresher == os.getpid() or not self._queues:
            return
        self._refresher = os.getpid()
        loop = functools.partial(_refresh_loop, weakref.ref(self))
        if gevent_patched():
            import gevent

            gevent.spawn(loop)
        else:
            threading.Thread(
                target=loop, name="wsgi-llama-metrics", daemon=True
            ).start()

    def stream(self, frames: Iterator[bytes], model: str) -> Iterator[bytes]:
        """*frames* unchanged, counting heartbeats, the first token and departures."""
        if not self.enabled:
            return frames
        return self._watch(frames, model, _route(), request.environ.get(STARTED))

    def _watch(
        self, frames: Iterator[bytes], model: str, route: str, started: float | None
    ) -> Iterator[bytes]:
        first = True
        ended = False  # [DONE] or an error event: the server finished the stream
        try:
            for frame in frames:
                if frame == PING:
                    self.heartbeats.labels(route).inc()
                elif frame == DONE or frame.startswith(_ERROR_EVENT):
                    ended = True
                elif first and frame.startswith(b"data: {") and started is not None:
                    first = False
                    elapsed = time.monotonic() - started
                    self.first_token.labels(model).observe(elapsed)
                yield frame
        finally:
            # The WSGI server closes this generator when the client has gone
            # (a write failed); the stream itself ends early without [DONE]
            # when it saw the socket close.
            if not ended:
                self.disconnects.labels(route).inc()
            close = getattr(frames, "close", None)
            if close is not None:
                close()


class Queue(Protocol):
    """A model's queue, as the gauges see it: requests waiting and running."""

    def __len__(self) -> int: ...

    @property
    def running(self) -> int: ...


def _refresh_loop(ref: weakref.ref[Metrics]) -> None:
    """Set the gauges every REFRESH seconds until the app is gone."""
    while (metrics := ref()) is not None:
        metrics._refresh()
        del metrics
        time.sleep(REFRESH)


def _route() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


# --- multiprocess mode ------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The directory the workers share, or None for a registry in the process.

    ``PROMETHEUS_MULTIPROC_DIR`` when set; under gunicorn a private directory
    named after the master (its pid and start time, so never a previous
    master's), which every worker of that master finds by itself.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        return configured
    master = _gunicorn_master()
    if master is None:
        if "gunicorn" in sys.modules:
            log.warning(
                "/metrics counts this process only: set PROMETHEUS_MULTIPROC_DIR "
                "to an empty directory to add up several workers"
            )
        return None
    pid, start = master
    path = Path(tempfile.gettempdir()) / f"wsgi-llama-metrics-{pid}-{start}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        log.warning("/metrics counts this process only: %s", exc)
        return None
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        log.warning("/metrics counts this process only: %s is not ours", path)
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return str(path)


def _gunicorn_master() -> tuple[int, str] | None:
    """The parent's pid and start time, if this is a gunicorn worker (Linux)."""
    if "gunicorn" not in sys.modules:
        return None
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return None
    if b"gunicorn" not in cmdline:
        return None  # preload_app: this is the master itself, or not gunicorn
    # Field 22, start time; the command name before it may hold spaces.
    return parent, stat[stat.rindex(")") + 2 :].split()[19]


def _use_files() -> None:
    """Make new metric values file-backed, even if prometheus_client was
    imported before ``PROMETHEUS_MULTIPROC_DIR`` was set."""
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of workers that died (``child_exit`` may not run)."""
    from prometheus_client.multiprocess import mark_process_dead

    for name in os.listdir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match and not _alive(int(match[1])):
            mark_process_dead(int(match[1]), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
