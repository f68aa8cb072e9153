"""Soak test: concurrent clients against a live server for a long time.

Starts ``gunicorn -k gevent wsgi_llama:app`` on a model (the test suite's tiny
model by default) and runs ``--clients`` concurrent clients for ``--duration``
seconds (an hour by default). Each client loops over a mix of streaming and
non-streaming completions and chat completions, and now and then drops a
stream halfway. Every response is checked: status 200, SSE frames well formed,
one id per stream, ``[DONE]`` at the end, and with the tiny model exactly the
requested number of tokens. A line every ``--report`` seconds, then the figures::

    .venv/bin/python benchmarks/soak.py --duration 3600

The test suite runs a bounded version (tests/test_load.py imports this module).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disconnects import Server, Stats, stats, tiny_model

KINDS = ("stream", "chat_stream", "completion", "chat", "dropped")
WEIGHTS = (4, 4, 2, 2, 1)


class Malformed(Exception):
    """A response that is not what the request asked for."""


def check_stream(raw: bytes, exact: int | None, chat: bool) -> int:
    """Check an SSE body; return its number of content characters.

    Frames are ``: ping`` or one ``data: {json}`` line; the last is ``[DONE]``;
    every event carries the same id; no event is an error; with *exact*, the
    text has that many characters (one per token with the tiny model).
    """
    if not raw.endswith(b"\n\n"):
        raise Malformed(f"unterminated frame: {raw[-100:]!r}")
    frames = raw[:-2].split(b"\n\n")
    if frames[-1] != b"data: [DONE]":
        raise Malformed(f"no [DONE]: {frames[-1][:300]!r}")
    ids = set()
    text = []
    finish = None
    for frame in frames[:-1]:
        if frame == b": ping":
            continue
        if not frame.startswith(b"data: {") or b"\n" in frame:
            raise Malformed(f"bad frame: {frame[:200]!r}")
        event = json.loads(frame[len(b"data: ") :])
        if "error" in event:
            raise Malformed(f"error event: {event}")
        ids.add(event["id"])
        if not event["choices"]:
            continue  # a usage chunk
        choice = event["choices"][0]
        if chat:
            text.append(choice["delta"].get("content") or "")
        else:
            text.append(choice["text"])
        if choice["finish_reason"] is not None:
            if finish is not None:
                raise Malformed("two finish reasons")
            finish = choice["finish_reason"]
    if len(ids) != 1:
        raise Malformed(f"{len(ids)} ids in one stream: {sorted(ids)[:5]}")
    if finish is None:
        raise Malformed("no finish_reason")
    n = len("".join(text))
    if exact is not None and n != exact:
        raise Malformed(f"{n} characters, expected {exact}")
    return n


@dataclass
class Result:
    served: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            name = f"{kind}: {type(exc).__name__}"
            self.errors[name] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{name}: {str(exc)[:300]}")

    def ok(self, kind: str, latency: float, first: float | None) -> None:
        with self.lock:
            self.served[kind] += 1
            self.latencies.append(latency)
            if first is not None:
                self.first_tokens.append(first)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def one_request(
    client: httpx.Client, kind: str, rng: random.Random, exact: bool
) -> float | None:
    """Make one request of *kind*; return the time to its first token, if streamed."""
    tokens = rng.randint(8, 200)
    chat = kind.startswith("chat")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"max_tokens": tokens, "seed": rng.randrange(2**31)}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Soak {rng.random()}"}]
    else:
        body["prompt"] = f"Soak {rng.random()}"
    if kind == "dropped":
        body["max_tokens"] = 2000
        with client.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise Malformed(f"status {response.status_code}: {response.read()!r}")
            for chunk in response.iter_raw():
                if b"data: {" in chunk:
                    break  # leave mid-stream: the connection is closed
        return None
    if kind in ("completion", "chat"):
        response = client.post(path, json=body)
        if response.status_code != 200:
            raise Malformed(f"status {response.status_code}: {response.text[:300]}")
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        if exact and len(text) != tokens:
            raise Malformed(f"{len(text)} characters, expected {tokens}")
        return None
    started = time.monotonic()
    first = None
    raw = b""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raise Malformed(f"status {response.status_code}: {response.read()!r}")
        for chunk in response.iter_raw():
            if first is None and b"data: {" in chunk:
                first = time.monotonic() - started
            raw += chunk
    check_stream(raw, tokens if exact else None, chat)
    return first


def run(
    url: str,
    duration: float,
    clients: int,
    *,
    exact: bool = True,
    seed: int = 0,
    report: float = 0,
    on_report: Callable[[float, Result], None] | None = None,
) -> Result:
    """Run *clients* looping clients against *url* for *duration* seconds."""
    result = Result()
    deadline = time.monotonic() + duration
    started = time.monotonic()

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                kind = rng.choices(KINDS, WEIGHTS)[0]
                begun = time.monotonic()
                try:
                    first = one_request(client, kind, rng, exact)
                except Exception as exc:
                    result.error(kind, exc)
                    time.sleep(0.5)
                else:
                    result.ok(kind, time.monotonic() - begun, first)

    threads = [
        threading.Thread(target=client_loop, args=(i,), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    next_report = started + report if report > 0 else float("inf")
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        if time.monotonic() >= next_report and on_report is not None:
            on_report(time.monotonic() - started, result)
            next_report += report
    return result


def summary(result: Result, elapsed: float) -> str:
    served = sum(result.served.values())
    errors = sum(result.errors.values())
    lat = result.latencies
    ttft = result.first_tokens
    details = [f"{k} {v}" for k, v in sorted(result.errors.items())]
    lines = [
        f"requests served: {served} in {elapsed:.0f} s ({served / elapsed:.1f}/s); "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.served.items())),
        f"errors: {errors}" + (": " + ", ".join(details) if details else ""),
        f"latency p50 {percentile(lat, 50):.3f} s, p95 {percentile(lat, 95):.3f} s, "
        f"max {max(lat, default=float('nan')):.3f} s",
        f"time to first token (streams) p50 {percentile(ttft, 50):.3f} s, "
        f"p95 {percentile(ttft, 95):.3f} s",
    ]
    lines.extend("  " + example for example in result.examples)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600, help="seconds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", type=Path, help="GGUF file (default: tiny model)")
    parser.add_argument("--report", type=float, default=60, help="seconds per line")
    parser.add_argument("--threads", default="1", help="LLAMA_N_THREADS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-cache-mb",
        default="0",
        help="LLAMA_PROMPT_CACHE_MB (default 0: the cache grows to its bound "
        "by design; off, growth is a leak)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        env = {
            "LLAMA_MODEL": str(model),
            "LLAMA_N_CTX": "4096",
            "LLAMA_N_THREADS": args.threads,
            "LLAMA_PING_INTERVAL": "1",
            "LLAMA_PROMPT_CACHE_MB": args.prompt_cache_mb,
        }
        server = Server(env, Path(tmp) / "gunicorn.log", "-w", str(args.workers))
        try:
            pids = server.workers()
            before = {pid: stats(pid) for pid in pids}

            def line(elapsed: float, result: Result) -> None:
                now = {pid: stats(pid) for pid in server.workers()}
                print(
                    f"{elapsed:7.0f} s  served {sum(result.served.values()):>7}  "
                    f"errors {sum(result.errors.values()):>4}  "
                    + "  ".join(_worker(pid, s) for pid, s in now.items()),
                    flush=True,
                )

            print(
                f"{args.clients} clients, {args.workers} worker(s), "
                f"{args.duration:g} s; at start: "
                + "  ".join(_worker(pid, s) for pid, s in before.items()),
                flush=True,
            )
            started = time.monotonic()
            result = run(
                server.url,
                args.duration,
                args.clients,
                exact=args.model is None,
                seed=args.seed,
                report=args.report,
                on_report=line,
            )
            elapsed = time.monotonic() - started
            time.sleep(1)
            after = {pid: stats(pid) for pid in server.workers()}
            print(summary(result, elapsed))
            for pid, s in after.items():
                start = before.get(pid)
                change = (
                    f" ({s.rss_mb - start.rss_mb:+.1f} MB since start)" if start else ""
                )
                print(f"at the end: {_worker(pid, s)}{change}")
        finally:
            server.stop()
            errors = [
                line
                for line in server.log.read_text().splitlines()
                if "Traceback" in line or "[ERROR]" in line or "WORKER TIMEOUT" in line
            ]
            print(f"server log: {len(errors)} error lines")
            for line in errors[:10]:
                print("  " + line)


def _worker(pid: int, s: Stats) -> str:
    return f"worker {pid}: RSS {s.rss_mb:.1f} MB, {s.threads} threads, {s.fds} fds"


if __name__ == "__main__":
    main()
