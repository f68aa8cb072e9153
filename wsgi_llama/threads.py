"""Run llama.cpp calls in native OS threads.

A llama.cpp call holds the GIL-free C code for seconds; made from a greenlet it
freezes the gevent hub (no heartbeats, no other clients, and gunicorn's arbiter
kills the worker). So every such call goes to a native thread: gevent's hub
threadpool when gevent has patched :mod:`threading`, otherwise an ordinary
:class:`~concurrent.futures.ThreadPoolExecutor`. The caller waits with a
timeout, which is what lets a stream send heartbeats while the model works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from gevent import monkey

T = TypeVar("T")

log = logging.getLogger("wsgi_llama.threads")

# OS threads and locks even when gevent has patched _thread: a loop that runs
# llama.cpp must not be a greenlet, and its locks must block OS threads.
start_native_thread = monkey.get_original("_thread", "start_new_thread")
native_lock = monkey.get_original("_thread", "allocate_lock")
native_id = monkey.get_original("_thread", "get_native_id")


def gevent_patched() -> bool:
    """True when gevent has monkey-patched :mod:`threading` in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


def lower_priority(increment: int) -> None:
    """Run the calling native thread *increment* nice levels below the others.

    llama.cpp's threads keep every core busy while they decode. A woken gevent
    hub (or request thread) then waited for a core, up to 5 ms here, before it
    sent the token just made. Two nice levels lower, they give way to it: in
    paired runs the first token came 1.2-5.9 ms sooner, at the same speed. On
    Linux a thread's nice value is its own, and the threads it starts
    (llama.cpp's OpenMP workers, made at its first decode) inherit it; other
    systems keep their priority.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
    except OSError as exc:
        log.warning("could not lower the priority of llama.cpp's threads: %s", exc)


class Step(Generic[T]):
    """One call running in a native thread, awaited cooperatively."""

    def __init__(self, handle: Any, gevent: bool) -> None:
        self._handle = handle
        self._gevent = gevent

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to *timeout* seconds; return whether the call has finished."""
        if self._gevent:
            self._handle.wait(timeout)
            return bool(self._handle.ready())
        try:
            self._handle.exception(timeout)
        except TimeoutError:
            return False
        return True

    def done(self) -> bool:
        return bool(self._handle.ready() if self._gevent else self._handle.done())

    def result(self) -> T:
        """The call's return value, or its exception raised here."""
        return self._handle.get() if self._gevent else self._handle.result()


class Runner:
    """Submits callables to native threads; state for one app, made lazily."""

    def __init__(self, max_workers: int = 16) -> None:
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Step[T]:
        if gevent_patched():
            import gevent

            pool = gevent.get_hub().threadpool
            return Step(pool.spawn(fn, *args, **kwargs), gevent=True)
        return Step(self._pool().submit(fn, *args, **kwargs), gevent=False)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run *fn* in a native thread and wait for it, however long it takes."""
        step = self.submit(fn, *args, **kwargs)
        try:
            step.wait()
        finally:
            # Even if this greenlet or thread is being stopped, never return
            # while the call may still be inside llama.cpp.
            while not step.done():
                step.wait()
        return step.result()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="wsgi-llama"
                )
            return self._executor

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


class Signal:
    """An event a native thread sets for whoever waits in the thread that made it.

    Under gevent an Event may only be set in its hub's thread, so the setter
    asks that hub to set it (``run_callback_threadsafe`` wakes the hub's loop);
    otherwise it is a :class:`threading.Event`, set directly.
    """

    def __init__(self) -> None:
        if gevent_patched():
            import gevent
            from gevent.event import Event

            self._event: Any = Event()
            self._loop: Any = gevent.get_hub().loop
        else:
            self._event = threading.Event()
            self._loop = None

    def set(self) -> None:
        """Called from any thread."""
        if self._loop is None:
            self._event.set()
        else:
            self._loop.run_callback_threadsafe(self._event.set)

    @staticmethod
    def set_all(signals: list[Signal]) -> None:
        """Set *signals*, with one wake-up call per hub rather than one each."""
        hubs: dict[Any, list[Any]] = {}
        for signal in signals:
            if signal._loop is None:
                signal._event.set()
            else:
                hubs.setdefault(signal._loop, []).append(signal._event)
        for loop, events in hubs.items():
            loop.run_callback_threadsafe(_set_events, events)

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)


def _set_events(events: list[Any]) -> None:
    for event in events:
        event.set()


class Call(Generic[T]):
    """A call queued for a model's thread, awaited like a :class:`Step`."""

    def __init__(self, fn: Callable[..., T], args: Any, kwargs: Any) -> None:
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._signal = Signal()

    def run(self) -> None:
        """Called in the model's thread."""
        try:
            self._value = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # handed to the waiter, raised there
            self._error = exc
        self._done = True
        self._signal.set()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._done:
            self._signal.wait(timeout)
        return self._done

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]


class CallQueue:
    """Calls for one model, run in the one native thread that does its work.

    llama.cpp's CPU backend (built with OpenMP here) keeps a team of worker
    threads for each thread that computes. Two such threads in one process
    make more workers than cores, and libgomp then stops spinning at the
    barriers between graph nodes: Gemma 3 270M fell from about 68 to 50
    tokens/s, in both threads, for as long as the process lived, once a
    second thread had decoded. So every decode of a model happens in one
    thread: the engine's loop, or a :class:`ModelThread`.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._calls: deque[Call[Any]] = deque()
        self._wake = wake

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Call[T]:
        call: Call[T] = Call(fn, args, kwargs)
        self._calls.append(call)
        self._wake()
        return call

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run *fn* in the model's thread and wait for it, however long it takes."""
        step = self.submit(fn, *args, **kwargs)
        try:
            step.wait()
        finally:
            while not step.done():  # never return while it may be in llama.cpp
                step.wait()
        return step.result()

    def __bool__(self) -> bool:
        return bool(self._calls)

    def run_pending(self) -> None:
        """Run the queued calls; in the model's thread."""
        while self._calls:
            self._calls.popleft().run()


class ModelThread(CallQueue):
    """The native thread of a model without the engine, started in the process
    that serves (after gunicorn forks), never before."""

    def __init__(self, nice: int = 0) -> None:
        super().__init__(self._poke)
        self._nice = nice
        self._pid: int | None = None
        self._lock = native_lock()
        self._wakeup = native_lock()
        self._wakeup.acquire()

    def _poke(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._pid = os.getpid()
                    start_native_thread(self._run, ())
        with contextlib.suppress(RuntimeError):  # already awake
            self._wakeup.release()

    def _run(self) -> None:
        lower_priority(self._nice)
        while True:
            self._wakeup.acquire()
            self.run_pending()
