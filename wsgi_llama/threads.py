"""Run llama.cpp calls in native OS threads.

A llama.cpp call holds the GIL-free C code for seconds; made from a greenlet it
freezes the gevent hub (no heartbeats, no other clients, and gunicorn's arbiter
kills the worker). So every such call goes to a native thread: gevent's hub
threadpool when gevent has patched :mod:`threading`, otherwise an ordinary
:class:`~concurrent.futures.ThreadPoolExecutor`. The caller waits with a
timeout, which is what lets a stream send heartbeats while the model works.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def gevent_patched() -> bool:
    """True when gevent has monkey-patched :mod:`threading` in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


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
