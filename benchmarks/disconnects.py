"""Drop clients in every way a client can go, and watch the worker's RSS and threads.

Starts ``gunicorn -k gevent wsgi_llama:app`` (one worker) on a model, drops
``--count`` connections of mixed kinds, and prints the worker's resident
memory, thread count and open file descriptors every ``--every`` disconnects::

    .venv/bin/python benchmarks/disconnects.py --count 500

The kinds, in turn (every action starts with the model idle, except queued
streams, which wait behind a stream that holds the model):

``queued``
    a stream waiting in the model's queue, dropped after its first heartbeat;
``streaming``
    a stream dropped after its first token (the holder of the queued ones);
``prompt``
    a stream with a prompt of ``--prompt-tokens`` tokens, dropped during
    prompt processing (after its first heartbeat, before any token);
``before_response``
    a streaming request sent in full, then the connection closed at once;
``mid_request``
    a connection closed halfway through sending the request body;
``non_stream``
    a non-streaming request dropped while it runs (its generation stops).

Linux only: the figures come from ``/proc/<worker pid>/status``. The test
suite runs a bounded version (tests/test_faults.py imports this module).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from live_server import LiveServer

REPO = Path(__file__).resolve().parent.parent
PING = b": ping\n\n"
DATA = b"data: {"


# --- the worker, seen through /proc -------------------------------------------


def children(pid: int) -> list[int]:
    """The pids whose parent is *pid* (gunicorn's workers, for the arbiter)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


@dataclass(frozen=True)
class Stats:
    rss_kb: int
    threads: int
    fds: int

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024


def stats(pid: int) -> Stats:
    """Resident memory, thread count and open file descriptors of *pid*."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return Stats(
        rss_kb=int(fields["VmRSS"][0]),
        threads=int(fields["Threads"][0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


# --- a server to measure ------------------------------------------------------


class Server(LiveServer):
    def workers(self) -> list[int]:
        return children(self.process.pid)


def tiny_model(directory: Path) -> Path:
    """Write the test suite's tiny model (tests/tinymodel.py) into *directory*."""
    sys.path.insert(0, str(REPO / "tests"))
    from tinymodel import write_tiny_model

    return write_tiny_model(directory / "tiny.gguf")


# --- clients that go away -----------------------------------------------------


def send(
    port: int, path: str, body: dict[str, Any], *, body_part: float = 1.0
) -> socket.socket:
    """Open a connection and send a POST, or only the first *body_part* of its body."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data[: int(len(data) * body_part)])
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60) -> bytes:
    """Read until *marker* has arrived; raise if the server closes or is silent."""
    sock.settimeout(timeout)
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}: {received[-300:]!r}")
        received += chunk
    return received


def drop(sock: socket.socket, reset: bool = False) -> None:
    """Close the connection: an orderly close, or with *reset* an RST at once."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Disconnector:
    """Performs disconnects of mixed kinds against a server on *port*.

    The server should send heartbeats often (``LLAMA_PING_INTERVAL=0.05``):
    queued and prompt-processing drops wait for the first one.
    """

    def __init__(self, port: int, prompt_tokens: int = 3000) -> None:
        self.port = port
        self.prompt_tokens = prompt_tokens
        self.done: Counter[str] = Counter()
        self._serial = 0

    @property
    def count(self) -> int:
        return sum(self.done.values())

    def _drop(self, sock: socket.socket, kind: str) -> None:
        # Half the clients close in order (FIN), half reset the connection.
        drop(sock, reset=self.count % 2 == 1)
        self.done[kind] += 1

    def _unique(self) -> str:
        # A different start each time: no prompt is served from the KV cache.
        self._serial += 1
        return f"{self._serial} "

    def idle(self) -> None:
        """Return once the model is free: a request queues behind all others."""
        response = httpx.post(
            f"http://127.0.0.1:{self.port}/v1/completions",
            json={"prompt": "idle", "max_tokens": 1},
            timeout=120,
        )
        response.raise_for_status()

    def queued(self, n: int) -> None:
        """A holder streams; *n* streams queue behind it; all are dropped."""
        holder = send(
            self.port,
            "/v1/completions",
            {"prompt": self._unique(), "max_tokens": 2000, "stream": True},
        )
        read_until(holder, DATA)
        waiting = []
        for _ in range(n):
            sock = send(
                self.port,
                "/v1/completions",
                {"prompt": self._unique() + "q", "max_tokens": 500, "stream": True},
            )
            waiting.append(sock)
        for sock in waiting:
            read_until(sock, PING)
        for sock in waiting:
            self._drop(sock, "queued")
        self._drop(holder, "streaming")

    def streaming(self) -> None:
        sock = send(
            self.port,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": self._unique()}],
                "max_tokens": 2000,
                "stream": True,
            },
        )
        read_until(sock, DATA)
        self._drop(sock, "streaming")

    def prompt(self) -> None:
        text = self._unique() + "xy" * (self.prompt_tokens // 2)
        sock = send(
            self.port,
            "/v1/completions",
            {"prompt": text, "max_tokens": 2000, "stream": True},
        )
        received = read_until(sock, PING)
        if DATA in received:
            raise AssertionError("a token came before the first heartbeat")
        self._drop(sock, "prompt")

    def before_response(self) -> None:
        sock = send(
            self.port,
            "/v1/completions",
            {"prompt": self._unique(), "max_tokens": 2000, "stream": True},
        )
        self._drop(sock, "before_response")

    def mid_request(self) -> None:
        body = {"prompt": self._unique() + "z" * 2000, "max_tokens": 10}
        sock = send(self.port, "/v1/completions", body, body_part=0.5)
        self._drop(sock, "mid_request")

    def non_stream(self) -> None:
        # Dropped while it generates: the server sees the closed socket
        # within a second and stops at the next token (shown by
        # tests/test_faults.py::test_running_non_streaming_request_stops_...).
        sock = send(
            self.port,
            "/v1/completions",
            {"prompt": self._unique(), "max_tokens": 100},
        )
        time.sleep(0.01)
        self._drop(sock, "non_stream")

    def run(self, count: int) -> None:
        """Perform *count* more disconnects, cycling through the kinds."""
        target = self.count + count
        while self.count < target:
            for action in self._cycle():
                left = target - self.count
                if left <= 0:
                    break
                if action == "queued":
                    if left == 1:
                        self.idle()
                        self.streaming()
                    else:
                        self.idle()
                        self.queued(min(3, left - 1))
                else:
                    self.idle()
                    getattr(self, action)()
        self.idle()

    @staticmethod
    def _cycle() -> Iterator[str]:
        yield from (
            "queued",
            "prompt",
            "before_response",
            "mid_request",
            "non_stream",
            "streaming",
        )


def measure(
    disconnector: Disconnector, pid: int, count: int, every: int
) -> list[tuple[int, Stats]]:
    """Stats of *pid* before the first disconnect and after each *every* more."""
    rows = [(disconnector.count, settled_stats(pid))]
    while disconnector.count < count:
        disconnector.run(min(every, count - disconnector.count))
        rows.append((disconnector.count, settled_stats(pid)))
    return rows


def settled_stats(pid: int, wait: float = 0.5) -> Stats:
    """Stats once the worker has had *wait* seconds to finish cleaning up."""
    time.sleep(wait)
    return stats(pid)


def table(rows: list[tuple[int, Stats]]) -> str:
    first = rows[0][1]
    header = ("disconnects", "RSS MB", "ΔRSS MB", "threads", "fds")
    lines = ["{:>11}  {:>8}  {:>8}  {:>7}  {:>5}".format(*header)]
    for count, s in rows:
        lines.append(
            f"{count:>11}  {s.rss_mb:>8.1f}  {s.rss_mb - first.rss_mb:>+8.1f}  "
            f"{s.threads:>7}  {s.fds:>5}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="disconnects to make")
    parser.add_argument("--every", type=int, default=100, help="rows of the table")
    parser.add_argument("--warmup", type=int, default=30, help="disconnects first")
    parser.add_argument("--model", type=Path, help="GGUF file (default: tiny model)")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--threads", default="1", help="LLAMA_N_THREADS")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        env = {
            "LLAMA_MODEL": str(model),
            "LLAMA_N_CTX": str(max(4096, args.prompt_tokens + 1024)),
            "LLAMA_N_THREADS": args.threads,
            "LLAMA_PING_INTERVAL": "0.05",
            "LLAMA_MIN_PING_INTERVAL": "0.05",
        }
        server = Server(env, Path(tmp) / "gunicorn.log")
        try:
            (pid,) = server.workers()
            disconnector = Disconnector(server.port, args.prompt_tokens)
            before = stats(pid)
            started = time.monotonic()
            disconnector.run(args.warmup)
            print(
                f"worker {pid}; before warm-up: RSS {before.rss_mb:.1f} MB, "
                f"{before.threads} threads, {before.fds} fds; "
                f"warm-up: {args.warmup} disconnects"
            )
            disconnector.done.clear()
            rows = measure(disconnector, pid, args.count, args.every)
            elapsed = time.monotonic() - started
            print(table(rows))
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(disconnector.done.items()))
            print(f"kinds: {kinds}")
            print(f"{args.warmup + args.count} disconnects in {elapsed:.0f} s")
            response = httpx.post(
                server.url + "/v1/completions",
                json={"prompt": "after", "max_tokens": 20},
                timeout=60,
            )
            text = response.json()["choices"][0]["text"]
            print(f"next request: {response.status_code}, {len(text)} characters")
        finally:
            server.stop()
            errors = [
                line
                for line in server.log.read_text().splitlines()
                if "Traceback" in line or "[ERROR]" in line
            ]
            print(f"server log: {len(errors)} error lines")
            for line in errors[:10]:
                print("  " + line)


if __name__ == "__main__":
    main()
