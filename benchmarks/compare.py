"""wsgi-llama beside its peers: llama-cpp-python's server and llama.cpp's own.

Prints figures and the targets of continuous batching beside them; it is not
a test and asserts nothing. On Gemma 3 270M (the ``demo`` extra)::

    python benchmarks/compare.py [--reps 3] [--quick] [--json out.json]
        [--lcp-venv DIR] [--llama-server-bin FILE] [--servers NAMES]

Each server runs alone (start, measure, stop), behind the OpenAI HTTP API
(``/v1/completions``, temperature 0, httpx on loopback):

- ``wsgi-llama``: ``gunicorn -k gevent wsgi_llama:app``, one worker, with the
  environment's ``LLAMA_*`` keys (``LLAMA_PARALLEL=1 python ...`` measures
  one-at-a-time) and ``LLAMA_PING_INTERVAL=1``;
- ``llama-cpp-python``: ``python -m llama_cpp.server`` from the venv in
  ``--lcp-venv`` or ``$LCP_SERVER_VENV`` (skipped when absent), with
  ``--n_threads`` = cores and ``--interrupt_requests False`` (by default it
  cuts a stream short whenever another request arrives); otherwise its
  defaults, ``logits_all`` included;
- ``llama.cpp``: the ``llama-server`` binary named by ``--llama-server-bin`` or
  ``$LLAMA_SERVER_BIN`` (skipped when absent), with ``--parallel 8
  --kv-unified --cont-batching`` and its default threads: as many sequences
  as wsgi-llama batches by default (llama.cpp's own automatic default is 4,
  which ran 8 streams in 3.4-3.6 s instead of 2.6-2.8 s, and 200 requests
  in 17-20 s instead of 14-15.5 s).

Every rep of a server is paired with llama-cpp-python in-process (a child
process holding its own ``Llama``, wsgi-llama's settings: every core,
``logits_all`` off): the same streams and the same long prompt, run beside
the server's (just before it, or by turns), since this machine's speed
drifts. The batched walls (4 and 8 streams, the 200) are paired the same
way with ``BareBatching``: the same prompts decoded by a bare
continuous-batching loop on llama.cpp's C API in a second child, as many
sequences per step as ``--parallel``.
Figures, per rep:

- time to first token and stream tokens/s (tokens after the first over the
  time from the first to the last) of a stream after a short prompt: three
  streams per rep, each paired with an in-process one on the same prompt
  (one with ``--quick``); the targets take the median over all pairs;
- prefill: time to the one token of a request with a ~1.6k-token prompt;
- wall time of 4 and of 8 concurrent 48-token streams, as many times per
  rep as the stream and paired the same way (with ``BareBatching``);
- wall time and median TTFT of 4 concurrent 48-token streams whose prompts
  begin with the same ~1k-token report (a system prompt, a shared document)
  and end with questions of their own; not paired (the bare loop evaluates
  every prompt whole);
- 200 simultaneous short requests (8 tokens, not streamed): served, refused
  (503/429), other failures, wall time;
- tokens/s of one stream with a CPU hog beside the server (a
  ``python -c 'while True: pass'`` process, killed afterwards), over a
  bounded window;
- second turn of a chat: Gemma 3 270M has no chat template, so the honest
  equivalent is a completion whose prompt extends the previous prompt and
  its answer; TTFT of turn 1 (~800 new tokens) and of turn 2;
- heartbeat gaps (wsgi-llama only): the silence before each ``: ping`` while
  a long prompt runs beside three streams; ideal: 1 s;
- peak RSS (``VmHWM`` from /proc) of the serving process.

Every prompt is new (its first words carry a counter), so no server reuses a
prefix except where the chat and the shared prompt measure it. All servers
listen on 127.0.0.1 and everything started is stopped at the end, on errors
too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_server import REPO, LiveServer, free_port
from throughput import cores, default_model, vm_hwm, worker_of

from wsgi_llama.config import DEFAULTS

TOPICS = ["rivers", "bridges", "libraries", "gardens", "railways", "lighthouses"]
NAMES = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel"]
STREAM_SUBJECTS = ["a fox", "the sea", "a clock", "an old map", "the moon"]
STREAM_SUBJECTS += ["a baker", "a train", "the rain"]
PING_INTERVAL = 1.0
SERVERS = ("wsgi-llama", "llama-cpp-python", "llama.cpp")


# -- prompts ------------------------------------------------------------------


class Prompts:
    """Fresh prompts that share no prefix but BOS.

    Each starts with a word of its own (one token), then its counter. Until
    2026-11-27 they started with one of eight names: a short prompt shared
    BOS and the name (over a tenth of it) with a recent one, and wsgi-llama
    reused those tokens.
    """

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.vocab = llama_cpp.Llama(
            model_path=str(model), vocab_only=True, verbose=False
        )
        self.counter = 0
        self.chapters: dict[int, int] = {}
        self.words = self._first_words() or NAMES

    def _first_words(self, wanted: int = 4096) -> list[str]:
        """Capitalised words that are one token each, as many as *wanted*."""
        words = []
        for token in range(self.vocab.n_vocab()):
            piece = self.vocab.detokenize([token]).decode("utf-8", "replace")
            if not (4 <= len(piece) <= 9 and piece.isalpha() and piece.istitle()):
                continue
            if len(self.vocab.tokenize(piece.encode(), add_bos=False)) == 1:
                words.append(piece)
                if len(words) == wanted:
                    break
        return words if len(words) >= 256 else []

    def _opening(self) -> str:
        self.counter += 1
        return f"{self.words[self.counter % len(self.words)]} {self.counter}"

    def count(self, text: str) -> int:
        return len(self.vocab.tokenize(text.encode()))

    def short(self) -> str:
        return f"{self._opening()}. Once upon a time"

    def stream(self, i: int) -> str:
        return f"{self._opening()}. A story about {STREAM_SUBJECTS[i % 8]}:"

    def long(self, target: int) -> str:
        """A report of about *target* tokens (never more)."""
        opening = self._opening()
        if target not in self.chapters:
            n = 1
            while self.count(_report(opening, n + 1)) <= target:
                n += 1
            self.chapters[target] = n
        return _report(opening, self.chapters[target])

    def close(self) -> None:
        self.vocab.close()


def shared_prompts(prompts: Prompts, n: int, target: int = 1000) -> list[str]:
    """*n* prompts that begin with the same new report of about *target*
    tokens (a system prompt, a document) and end with questions of their own."""
    report = prompts.long(target)
    return [
        f"{report}\nQuestion {j + 1}: What does chapter {j + 1} say?\nAnswer:"
        for j in range(n)
    ]


def _report(opening: str, chapters: int) -> str:
    return f"{opening} report.\n" + "".join(
        f"Chapter {i + 1}: {topic}. People have written about {topic} for "
        f"centuries, describing how {topic} shaped the towns around them, who "
        f"built and kept them, and what travellers noticed when they first "
        f"arrived. This chapter compares those notes with what we know today "
        f"about {topic}.\n"
        for i, topic in ((i, TOPICS[i % len(TOPICS)]) for i in range(chapters))
    )


# -- one request --------------------------------------------------------------


def stream(
    client: httpx.Client,
    url: str,
    prompt: str,
    max_tokens: int,
    deadline: float | None = None,
) -> dict[str, Any]:
    """One streamed completion, timed as a client sees it.

    Tokens are the events with text; ``silences`` holds, for each frame, the
    time since the headers or the previous frame, and whether it was a ping
    (an SSE comment). Past *deadline* (a ``perf_counter`` time) the stream is
    dropped.
    """
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    times: list[float] = []
    silences: list[tuple[float, bool]] = []
    text: list[str] = []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "tokens": 0, "error": response.text}
        previous = time.perf_counter()
        for line in response.iter_lines():
            now = time.perf_counter()
            if line.startswith(":"):
                silences.append((now - previous, True))
                previous = now
                continue
            if not line.startswith("data:"):
                continue
            silences.append((now - previous, False))
            previous = now
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"status": 200, "tokens": len(times), "error": event["error"]}
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                times.append(now)
                text.append(choices[0]["text"])
            if deadline is not None and now > deadline:
                break
    end = time.perf_counter()
    result: dict[str, Any] = {
        "status": 200,
        "tokens": len(times),
        "text": "".join(text),
        "silences": silences,
        "start": start,
        "end": end,
    }
    if times:
        result["ttft"] = times[0] - start
        if len(times) > 1:
            result["tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    return result


def together(n: int, work: Callable[[int], Any]) -> tuple[list[Any], float]:
    """Run work(0..n-1) in n threads released at once; results and wall time."""
    barrier = threading.Barrier(n + 1)
    results: list[Any] = [None] * n
    ends = [0.0] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(900)
    return results, max(ends) - start


# -- the servers --------------------------------------------------------------


class Peer:
    """A server subprocess on loopback; ``pid`` is the process that serves."""

    name = ""
    ready_path = "/health"

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.port = int(command[command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        self.pid = self.process.pid
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{_tail(log)}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in 180 s:\n{_tail(log)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LlamaCppServer(Peer):
    name = "llama.cpp"

    def __init__(
        self,
        binary: Path,
        model: Path,
        log: Path,
        parallel: int,
        extra: Sequence[str] = (),
    ) -> None:
        command = [str(binary), "-m", str(model), "--host", "127.0.0.1"]
        command += ["--port", str(free_port()), "--parallel", str(parallel)]
        command += ["--kv-unified", "--cont-batching", *extra]
        self.command = command
        super().__init__(command, log, dict(os.environ))

    def describe(self) -> dict[str, Any]:
        try:
            props = httpx.get(self.url + "/props", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}
        settings = props.get("default_generation_settings") or {}
        return {
            "command": " ".join(self.command),
            "total_slots": props.get("total_slots"),
            "n_ctx": settings.get("n_ctx"),
            "build_info": props.get("build_info"),
        }


class LcpServer(Peer):
    name = "llama-cpp-python"
    ready_path = "/v1/models"

    def __init__(self, venv: Path, model: Path, log: Path) -> None:
        n = str(cores())
        command = [str(venv / "bin" / "python"), "-m", "llama_cpp.server"]
        command += ["--model", str(model), "--host", "127.0.0.1"]
        command += ["--port", str(free_port()), "--n_threads", n]
        command += ["--n_threads_batch", n, "--interrupt_requests", "False"]
        self.command = command
        super().__init__(command, log, dict(os.environ))

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(self.command)}


class WsgiLlama:
    """``gunicorn -k gevent wsgi_llama:app``, one worker, heartbeats every 1 s."""

    name = "wsgi-llama"

    def __init__(self, model: Path, log: Path) -> None:
        env = {"LLAMA_MODEL": str(model), "LLAMA_PING_INTERVAL": str(PING_INTERVAL)}
        args = ("--timeout", "300", "--log-level", "warning")
        self.server = LiveServer(env, log, *args)
        self.url = self.server.url
        try:
            self.pid = worker_of(self.server.process.pid)
        except RuntimeError:
            self.server.stop()
            raise

    def describe(self) -> dict[str, Any]:
        keys = {k: v for k, v in os.environ.items() if k.startswith("LLAMA_")}
        keys.pop("LLAMA_SERVER_BIN", None)
        return {"command": "gunicorn -k gevent wsgi_llama:app", "env": keys}

    def stop(self) -> None:
        self.server.stop()


class Direct:
    """llama-cpp-python in-process, in a child process of its own (its own RSS).

    :meth:`batch` runs :class:`BareBatching` in a second child, started on
    first use, so that this one's RSS stays that of a plain ``Llama``.
    """

    def __init__(self, model: Path) -> None:
        self.model = model
        self.bare: Direct | None = None
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--direct-child", str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def batch(self, prompts: list[str], max_tokens: int, parallel: int) -> float:
        """Wall time of *prompts* batched *parallel* at a time, in-process."""
        if self.bare is None:
            self.bare = Direct(self.model)
        job = {"prompts": prompts, "max_tokens": max_tokens, "parallel": parallel}
        return float(self.bare.call(op="batch", **job)["wall"])

    def call(self, **job: Any) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the in-process llama-cpp-python child died")
        return json.loads(line)

    def stop(self) -> None:
        if self.bare is not None:
            self.bare.stop()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def direct_child(model: str) -> None:
    """Serve Direct.call: stream a completion in this process and time it.

    ``op="batch"`` runs :class:`BareBatching` instead; a child used for it
    should do nothing else, so that the other's RSS stays llama-cpp-python's.
    """
    import llama_cpp

    n = cores()
    llama: llama_cpp.Llama | None = None
    bare: BareBatching | None = None
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "rss":
            result: dict[str, Any] = {"rss": vm_hwm(os.getpid())}
        elif job["op"] == "batch":
            if bare is None or bare.parallel != job["parallel"]:
                if bare is not None:
                    bare.close()
                bare = BareBatching(model, job["parallel"])
            result = bare.run(job["prompts"], job["max_tokens"])
        else:
            if llama is None:
                llama = llama_cpp.Llama(
                    model_path=model,
                    n_ctx=2048,
                    n_threads=n,
                    n_threads_batch=n,
                    logits_all=False,
                    verbose=False,
                )
            start = time.perf_counter()
            times = []
            for chunk in llama.create_completion(
                job["prompt"], max_tokens=job["max_tokens"], temperature=0, stream=True
            ):
                if chunk["choices"][0]["text"]:  # type: ignore[index]
                    times.append(time.perf_counter())
            result = {"tokens": len(times)}
            if times:
                result["ttft"] = times[0] - start
            if len(times) > 1:
                result["tok_s"] = (len(times) - 1) / (times[-1] - times[0])
        print(json.dumps(result), flush=True)


class BareBatching:
    """Continuous batching on llama.cpp's C API and nothing else: the floor.

    *parallel* sequences share each ``llama_decode``; a sequence takes the
    next prompt as soon as it ends; tokens are the argmax of the logits (what
    temperature 0 gives) and nothing stops a sequence before *max_tokens*.
    No HTTP, no sampler chain, no detokenizing: a server's wall time over this
    one's, paired, is what serving costs on top of llama.cpp's own work, with
    the machine's drift between servers taken out.
    """

    def __init__(self, model: str, parallel: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.parallel = parallel
        # Quiet, as Llama(verbose=False) is: llama.cpp logs every tensor.
        self._quiet = llama_cpp.llama_log_callback(lambda *_: None)
        llama_cpp.llama_log_set(self._quiet, None)
        self.model = llama_cpp.llama_model_load_from_file(
            model.encode(), llama_cpp.llama_model_default_params()
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 2048
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = parallel
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = cores()
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(
            self.vocab, data, len(data), buffer, len(buffer), True, False
        )
        return list(buffer[:n])

    def run(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        import numpy as np

        lib, batch = self.lib, self.batch
        memory = lib.llama_get_memory(self.ctx)
        lib.llama_memory_clear(memory, True)
        waiting = [self.tokenize(p) for p in prompts]
        waiting.reverse()
        # Per sequence id: [prompt, tokens decoded, next token or None, made].
        seqs: list[list[Any] | None] = [None] * self.parallel
        made = 0
        start = time.perf_counter()
        while waiting or any(seqs):
            for i in range(self.parallel):
                if seqs[i] is None and waiting:
                    seqs[i] = [waiting.pop(), 0, None, 0]
            n, rows = 0, []
            for i, seq in enumerate(seqs):
                if seq is None:
                    continue
                if seq[2] is not None:
                    todo = [seq[2]]
                else:
                    todo = seq[0][seq[1] : seq[1] + 512 - n - self.parallel]
                last = seq[2] is not None or seq[1] + len(todo) == len(seq[0])
                for j, token in enumerate(todo):
                    batch.token[n] = token
                    batch.pos[n] = seq[1] + j
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = i
                    batch.logits[n] = last and j == len(todo) - 1
                    n += 1
                seq[1] += len(todo)
                if last:
                    rows.append(i)
            batch.n_tokens = n
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(
                lib.llama_get_logits(self.ctx), shape=(len(rows), self.n_vocab)
            )
            for row, i in enumerate(rows):
                seq = seqs[i]
                assert seq is not None
                seq[2] = int(logits[row].argmax())
                seq[3] += 1
                made += 1
                if seq[3] == max_tokens:
                    lib.llama_memory_seq_rm(memory, i, -1, -1)
                    seqs[i] = None
        return {"wall": time.perf_counter() - start, "tokens": made}

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- measuring one server -----------------------------------------------------


class Plan:
    """Sizes of the measures; --quick shrinks what can shrink."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.reps = args.reps if args.reps else (1 if args.quick else 3)
        self.stream_tokens = 64 if args.quick else 128
        #: Streams per rep, each paired with one in-process.
        self.stream_pairs = 1 if args.quick else 3
        self.long_tokens = 1600
        self.chat_tokens = 800
        self.hog_window = 8.0 if args.quick else 15.0
        self.burst = 200
        self.burst_tokens = 8
        #: Sequences per step: llama.cpp's server's and the bare reference's.
        self.parallel = args.llama_server_parallel


def measure_server(
    server: Any,
    direct: Direct,
    prompts: Prompts,
    plan: Plan,
    log: Callable[[str], None],
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    timeout = httpx.Timeout(300, connect=30, pool=300)
    reps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"reps": reps}
    with httpx.Client(limits=limits, timeout=timeout) as client:
        try:
            stream(client, server.url, prompts.short(), 8)  # warm-up: weights paged in
            for rep in range(plan.reps):
                reps.append({})  # filled as it goes: an interrupted rep keeps its part
                measure_rep(server, client, direct, prompts, plan, log, rep, reps[-1])
        except (Exception, KeyboardInterrupt, SystemExit) as exc:
            # Keep the reps done; on an error go on, when interrupted stop.
            log(f"{server.name} stopped in rep {len(reps)}: {exc!r}")
            result["error"] = f"in rep {len(reps)}: {exc!r}"
            result["interrupted"] = not isinstance(exc, Exception)
    result["rss"] = vm_hwm(server.pid)
    return result


def measure_rep(
    server: Any,
    client: httpx.Client,
    direct: Direct,
    prompts: Prompts,
    plan: Plan,
    log: Callable[[str], None],
    rep: int,
    figures: dict[str, Any],
) -> None:
    url = server.url
    name = f"{server.name} rep {rep + 1}"

    figures.update(single_stream(server, client, direct, prompts, plan))
    log(
        f"{name}: stream {figures['stream_tokens']} tokens, TTFT "
        f"{_ms(figures['ttft'])} ms, {_f(figures['tok_s'])} tok/s (in-process: "
        f"{_ms(figures['direct_ttft'])} ms, {_f(figures['direct_tok_s'])} tok/s; "
        f"medians of {_pairs(figures['tok_s_ratios'])})"
    )

    text = prompts.long(plan.long_tokens)
    figures["prompt_tokens"] = prompts.count(text)
    paired = direct.call(op="stream", prompt=text, max_tokens=1)
    one = stream(client, url, text, 1)
    figures.update(prefill=one.get("ttft"), direct_prefill=paired.get("ttft"))
    log(
        f"{name}: prefill of {figures['prompt_tokens']} tokens "
        f"{_f(one.get('ttft'), 2)} s (in-process {_f(paired.get('ttft'), 2)} s)"
    )

    for n in (4, 8):
        figures.update(concurrent_streams(n, url, client, direct, prompts, plan))
        log(
            f"{name}: {n} x 48-token streams in {figures[f'streams_{n}']:.2f} s, "
            f"{figures[f'streams_{n}_complete']} complete (in-process batched "
            f"{figures[f'direct_streams_{n}']:.2f} s; medians of "
            f"{_pairs(figures[f'streams_{n}_ratios'])})"
        )

    figures.update(chat(client, url, prompts, plan))
    log(
        f"{name}: chat TTFT turn 1 {_ms(figures['chat_ttft_1'])} ms, "
        f"turn 2 {_ms(figures['chat_ttft_2'])} ms"
    )

    figures.update(shared_streams(url, client, prompts))
    log(
        f"{name}: 4 x 48-token streams after a shared {figures['shared_tokens']}"
        f"-token prompt in {figures['shared_4']:.2f} s, {figures['shared_4_complete']}"
        f" complete, median TTFT {_ms(figures['shared_4_ttft'])} ms"
    )
    # After these four, llama.cpp's server took 270-350 ms to the next first
    # token instead of 50-120 (headtohead.py): a short request, not measured,
    # so that the burst does not carry it.
    stream(client, url, prompts.short(), 1)

    texts = guests(rep * plan.burst, plan.burst)
    figures["direct_burst_wall"] = direct.batch(texts, plan.burst_tokens, plan.parallel)
    figures.update(burst(client, url, plan, texts))
    log(
        f"{name}: {plan.burst} short requests at once: {figures['burst_served']} "
        f"served, {figures['burst_refused']} refused, {figures['burst_failed']} "
        f"failed, {figures['burst_wall']:.2f} s (in-process batched "
        f"{figures['direct_burst_wall']:.2f} s)"
    )

    figures.update(hogged(client, url, prompts, plan))
    log(
        f"{name}: with a CPU hog: {_f(figures.get('hog_tok_s'))} tok/s "
        f"({figures['hog_tokens']} tokens in {plan.hog_window:.0f} s window)"
    )

    if isinstance(server, WsgiLlama):
        figures.update(heartbeats(client, url, prompts, plan))
        log(
            f"{name}: heartbeat gaps p50 {_ms(figures['ping_p50'])} ms, p99 "
            f"{_ms(figures['ping_p99'])} ms over {figures['pings']} pings"
        )


def _pairs(ratios: list[float]) -> str:
    return f"{len(ratios)} pair" + ("" if len(ratios) == 1 else "s")


def single_stream(
    server: Any, client: httpx.Client, direct: Direct, prompts: Prompts, plan: Plan
) -> dict[str, Any]:
    """One stream, *plan.stream_pairs* times, each beside in-process on its prompt.

    The two of a pair run back to back, taking turns to go first, so that
    drift falls on both. With one pair per rep, the ratio of one server moved
    by up to 12 % between the reps of a run here (2026-11-26).
    """
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for i in range(plan.stream_pairs):
        text = prompts.short()
        for side in ("direct", "server") if i % 2 == 0 else ("server", "direct"):
            if side == "direct":
                theirs.append(
                    direct.call(op="stream", prompt=text, max_tokens=plan.stream_tokens)
                )
            else:
                ours.append(stream(client, server.url, text, plan.stream_tokens))

    def median(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    pairs = list(zip(ours, theirs, strict=True))
    return {
        "ttft": median(ours, "ttft"),
        "tok_s": median(ours, "tok_s"),
        "stream_tokens": min(r["tokens"] for r in ours),
        "direct_ttft": median(theirs, "ttft"),
        "direct_tok_s": median(theirs, "tok_s"),
        "tok_s_ratios": [
            a["tok_s"] / b["tok_s"]
            for a, b in pairs
            if a.get("tok_s") and b.get("tok_s")
        ],
        "ttft_diffs": [
            a["ttft"] - b["ttft"]
            for a, b in pairs
            if a.get("ttft") is not None and b.get("ttft") is not None
        ],
    }


def concurrent_streams(
    n: int,
    url: str,
    client: httpx.Client,
    direct: Direct,
    prompts: Prompts,
    plan: Plan,
) -> dict[str, Any]:
    """*n* concurrent 48-token streams, *plan.stream_pairs* times, each beside
    :class:`BareBatching` on the same prompts, taking turns to go first."""
    walls: list[float] = []
    bare: list[float] = []
    complete: list[int] = []
    for i in range(plan.stream_pairs):
        texts = [prompts.stream(j) for j in range(n)]
        for side in ("direct", "server") if i % 2 == 0 else ("server", "direct"):
            if side == "direct":
                bare.append(direct.batch(texts, 48, plan.parallel))
                continue
            results, wall = together(
                n, lambda j, t=texts: stream(client, url, t[j], 48)
            )
            walls.append(wall)
            complete.append(
                sum(1 for r in results if isinstance(r, dict) and r.get("tokens") == 48)
            )
    return {
        f"streams_{n}": statistics.median(walls),
        f"direct_streams_{n}": statistics.median(bare),
        f"streams_{n}_complete": min(complete),
        f"streams_{n}_ratios": [a / b for a, b in zip(walls, bare, strict=True)],
    }


def shared_streams(url: str, client: httpx.Client, prompts: Prompts) -> dict[str, Any]:
    """4 concurrent 48-token streams whose prompts share ~1k tokens.

    Not paired with :class:`BareBatching`, which evaluates every prompt whole.
    """
    texts = shared_prompts(prompts, 4)
    results, wall = together(4, lambda j: stream(client, url, texts[j], 48))
    done = [r for r in results if isinstance(r, dict) and r.get("tokens") == 48]
    ttfts = [r["ttft"] for r in done if r.get("ttft") is not None]
    return {
        "shared_tokens": prompts.count(texts[0]),
        "shared_4": wall,
        "shared_4_complete": len(done),
        "shared_4_ttft": statistics.median(ttfts) if ttfts else None,
    }


def chat(
    client: httpx.Client, url: str, prompts: Prompts, plan: Plan
) -> dict[str, Any]:
    """Two turns; the second prompt extends the first prompt and its answer."""
    first = (
        prompts.long(plan.chat_tokens)
        + "\nQuestion: What is this report about?\nAnswer:"
    )
    one = stream(client, url, first, 24)
    second = (
        first + one.get("text", "") + "\nQuestion: Which chapter is longest?\nAnswer:"
    )
    two = stream(client, url, second, 8)
    return {"chat_ttft_1": one.get("ttft"), "chat_ttft_2": two.get("ttft")}


def guests(first: int, n: int) -> list[str]:
    """The burst's prompts, numbered from *first*.

    Every rep must send prompts the server has not seen, or a server with a
    prompt cache (llama.cpp's keeps 8 GiB of them in RAM) skips most of each
    prompt from the second rep on. Every server gets the same numbers, so the
    same prompts.
    """
    return [f"Guest {first + i} knocks at the door. The host says" for i in range(n)]


def burst(
    client: httpx.Client, url: str, plan: Plan, texts: list[str]
) -> dict[str, Any]:
    """The *texts* as short completions all at once, not streamed."""

    def one(i: int) -> int:
        body = {
            "prompt": texts[i],
            "max_tokens": plan.burst_tokens,
            "temperature": 0,
        }
        response = client.post(url + "/v1/completions", json=body)
        if response.status_code == 200 and response.json().get("choices"):
            return 200
        return response.status_code

    results, wall = together(len(texts), one)
    served = sum(1 for r in results if r == 200)
    refused = sum(1 for r in results if r in (429, 503))
    failures = [r for r in results if r not in (200, 429, 503)]
    return {
        "burst_served": served,
        "burst_refused": refused,
        "burst_failed": len(failures),
        "burst_failure_sample": repr(failures[0])[:200] if failures else None,
        "burst_wall": wall,
    }


@contextmanager
def cpu_hog() -> Iterator[subprocess.Popen[bytes]]:
    """Another process keeping one core busy, killed on the way out."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield hog
    finally:
        hog.kill()
        hog.wait()


def hogged(
    client: httpx.Client, url: str, prompts: Prompts, plan: Plan
) -> dict[str, Any]:
    """One stream beside a CPU hog, cut after plan.hog_window seconds."""
    text = prompts.short()
    with cpu_hog():
        deadline = time.perf_counter() + plan.hog_window
        one = stream(client, url, text, plan.stream_tokens, deadline=deadline)
    # A dropped stream may leave the server busy for one more step: let it end.
    stream(client, url, prompts.short(), 1)
    speed = one.get("tok_s")
    if speed is None:  # fewer than two tokens in the window
        speed = one["tokens"] / plan.hog_window
    return {
        "hog_tok_s": speed,
        "hog_tokens": one["tokens"],
        "hog_ttft": one.get("ttft"),
    }


def heartbeats(
    client: httpx.Client, url: str, prompts: Prompts, plan: Plan
) -> dict[str, Any]:
    """Silences a heartbeat ends, while a long prompt runs beside three streams.

    Counted: the silence before each ``: ping``, and any silence longer than
    the interval that a data frame ends (a ping was due and did not come).
    Not counted: the opening ping that carries the headers (wsgi-llama's
    first chunk, so that every server sends them at once). Ideal: every one
    equal to the interval.
    """
    texts = [prompts.long(plan.long_tokens)] + [prompts.stream(i) for i in range(3)]
    sizes = [16, 48, 48, 48]
    results, _ = together(4, lambda i: stream(client, url, texts[i], sizes[i]))
    gaps = []
    for result in results:
        silences = result.get("silences", []) if isinstance(result, dict) else []
        if silences and silences[0][1] and silences[0][0] < PING_INTERVAL / 2:
            silences = silences[1:]  # the opening ping
        gaps += [gap for gap, ping in silences if ping or gap > PING_INTERVAL]
    gaps.sort()
    return {
        "pings": len(gaps),
        "ping_gaps": gaps,
        "ping_p50": _quantile(gaps, 0.5),
        "ping_p99": _quantile(gaps, 0.99),
    }


# -- summaries, targets and the table -----------------------------------------


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _values(result: dict[str, Any], key: str) -> list[float]:
    return [r[key] for r in result["reps"] if r.get(key) is not None]


def _median(result: dict[str, Any] | None, key: str) -> float | None:
    values = _values(result, key) if result else []
    return statistics.median(values) if values else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over reps, and the paired ratios against in-process."""
    keys = [
        "ttft", "tok_s", "prefill", "streams_4", "streams_8", "burst_served",
        "burst_refused", "burst_failed", "burst_wall", "hog_tok_s", "chat_ttft_1",
        "chat_ttft_2", "direct_ttft", "direct_tok_s", "direct_prefill",
        "direct_streams_4", "direct_streams_8", "direct_burst_wall", "shared_4",
        "shared_4_ttft",
    ]  # fmt: skip
    summary = {key: _median(result, key) for key in keys}
    # Measures run several times per rep: over all their pairs.
    for name, key in (
        ("ttft_minus_direct", "ttft_diffs"),
        ("tok_s_over_direct", "tok_s_ratios"),
        ("streams_4_over_direct", "streams_4_ratios"),
        ("streams_8_over_direct", "streams_8_ratios"),
    ):
        values = [v for r in result["reps"] for v in r.get(key, [])]
        summary[name] = statistics.median(values) if values else None
    pairs = {
        "prefill_over_direct": ("prefill", "direct_prefill", lambda a, b: a / b),
        "burst_over_direct": ("burst_wall", "direct_burst_wall", lambda a, b: a / b),
        "hog_over_quiet": ("hog_tok_s", "tok_s", lambda a, b: a / b),
        "chat_turn2_over_turn1": ("chat_ttft_2", "chat_ttft_1", lambda a, b: a / b),
    }
    for name, (a, b, combine) in pairs.items():
        values = [combine(r[a], r[b]) for r in result["reps"] if r.get(a) and r.get(b)]
        summary[name] = statistics.median(values) if values else None
    gaps = [g for r in result["reps"] for g in r.get("ping_gaps", [])]
    summary["pings"] = len(gaps)
    summary["ping_p50"] = _quantile(gaps, 0.5)
    summary["ping_p99"] = _quantile(gaps, 0.99)
    summary["rss_mb"] = result["rss"] / 2**20
    return summary


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for wsgi-llama; None where a reference is missing.

    Speeds and batched wall times are compared as ratios to the in-process
    run paired with each rep (:class:`BareBatching` for the walls), so the
    machine's drift between servers cancels out; counts and memory are
    compared as measured.
    """
    ours = results.get("wsgi-llama", {}).get("summary")
    ref = results.get("llama.cpp", {}).get("summary")
    if not ours:
        return []

    def check(name: str, goal: str, value: str, met: bool | None) -> dict[str, Any]:
        return {"target": name, "goal": goal, "measured": value, "met": met}

    def vs_ref(key: str, factor: float, better: str) -> tuple[str, bool | None]:
        mine, theirs = ours.get(key), ref.get(key) if ref else None
        if mine is None or theirs is None:
            return f"{_f(mine, 2)} vs -", None
        met = mine <= factor * theirs if better == "low" else mine >= factor * theirs
        return f"{_f(mine, 2)} vs {_f(theirs, 2)}", met

    rows = []
    batched = "(ratio to in-process batched)"
    for n in (4, 8):
        value, met = vs_ref(f"streams_{n}_over_direct", 1.0, "low")
        rows.append(
            check(
                f"{n} x 48-token streams", f"wall <= llama.cpp's {batched}", value, met
            )
        )
    value, met = vs_ref("burst_over_direct", 1.0, "low")
    served = ours["burst_served"]
    all_served = served is not None and served >= 200
    rows.append(
        check(
            "200 short requests at once",
            f"200 served, wall <= llama.cpp's {batched}",
            f"{_f(served, 0)} served; {value}",
            None if served is None else (met if all_served else False),
        )
    )
    value, met = vs_ref("tok_s_over_direct", 0.95, "high")
    rows.append(
        check("stream tok/s", ">= 0.95 x llama.cpp's (ratio to in-process)", value, met)
    )
    diff = ours["ttft_minus_direct"]
    rows.append(
        check(
            "time to first token",
            "<= in-process + 3 ms (paired)",
            f"{_ms(diff, signed=True)} ms",
            None if diff is None else diff <= 0.003,
        )
    )
    value, met = vs_ref("prefill_over_direct", 1.05, "low")
    rows.append(
        check(
            "prefill 1.6k tokens",
            "<= 1.05 x llama.cpp's (ratio to in-process)",
            value,
            met,
        )
    )
    ratio = ours["chat_turn2_over_turn1"]
    rows.append(
        check(
            "second chat turn TTFT",
            "<= 1/3 of the first's",
            f"{_f(ratio, 2)} of it",
            None if ratio is None else ratio <= 1 / 3,
        )
    )
    p99 = ours["ping_p99"]
    rows.append(
        check(
            "heartbeat gap p99",
            f"<= {PING_INTERVAL * 1000:.0f} + 50 ms",
            f"{_ms(p99)} ms ({ours['pings']} pings)",
            None if p99 is None else p99 <= PING_INTERVAL + 0.05,
        )
    )
    value, met = vs_ref("rss_mb", 1.5, "low")
    rows.append(check("RSS", "<= 1.5 x llama.cpp's (MB)", value, met))
    hog = ours["hog_over_quiet"]
    rows.append(
        check(
            "one core busy elsewhere",
            ">= 0.5 x quiet tok/s",
            f"{_f(hog, 2)} x",
            None if hog is None else hog >= 0.5,
        )
    )
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:+.0f}" if signed else f"{value * 1000:.0f}"


def _cell(
    result: dict[str, Any] | None, key: str, digits: int, scale: float = 1
) -> str:
    values = [v * scale for v in _values(result, key)] if result else []
    if not values:
        return "-"
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1 and round(min(values), digits) != round(max(values), digits):
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def table(results: dict[str, dict[str, Any]], direct: dict[str, Any]) -> str:
    names = [n for n in SERVERS if results.get(n, {}).get("reps")]
    columns = ["in-process", *names]
    data = {n: results[n] for n in names}
    # The in-process column: every pairing of every server, pooled.
    pooled = {
        "reps": [
            {
                "ttft": r.get("direct_ttft"),
                "tok_s": r.get("direct_tok_s"),
                "prefill": r.get("direct_prefill"),
            }
            for n in names
            for r in results[n]["reps"]
        ]
    }
    data["in-process"] = pooled
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("time to first token (ms)", lambda n: _cell(data[n], "ttft", 0, 1000)),
        ("stream (tok/s)", lambda n: _cell(data[n], "tok_s", 1)),
        ("  in-process paired (tok/s)", lambda n: _cell(data[n], "direct_tok_s", 1)),
        ("prefill ~1.6k tokens (s)", lambda n: _cell(data[n], "prefill", 2)),
        ("4 x 48-token streams (s)", lambda n: _cell(data[n], "streams_4", 2)),
        ("  in-process batched paired (s)", lambda n: _paired(data[n], "streams_4")),
        ("8 x 48-token streams (s)", lambda n: _cell(data[n], "streams_8", 2)),
        ("  in-process batched paired (s)", lambda n: _paired(data[n], "streams_8")),
        ("4 streams, shared 1k prompt (s)", lambda n: _cell(data[n], "shared_4", 2)),
        ("  median TTFT (ms)", lambda n: _cell(data[n], "shared_4_ttft", 0, 1000)),
        ("200 at once: served", lambda n: _cell(data[n], "burst_served", 0)),
        ("200 at once: refused", lambda n: _cell(data[n], "burst_refused", 0)),
        ("200 at once: wall (s)", lambda n: _cell(data[n], "burst_wall", 2)),
        ("  in-process batched paired (s)", lambda n: _paired(data[n], "burst_wall")),
        ("with a CPU hog (tok/s)", lambda n: _cell(data[n], "hog_tok_s", 1)),
        ("chat turn 1 TTFT (ms)", lambda n: _cell(data[n], "chat_ttft_1", 0, 1000)),
        ("chat turn 2 TTFT (ms)", lambda n: _cell(data[n], "chat_ttft_2", 0, 1000)),
        ("heartbeat gap p50/p99 (ms)", lambda n: _pings(data[n])),
        ("peak RSS (MB)", lambda n: _rss(n, data, direct)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    col = 22
    lines = [f"{'':{width}}" + "".join(f"{c:>{col}}" for c in columns)]
    for label, cell in rows:
        lines.append(f"{label:{width}}" + "".join(f"{cell(c):>{col}}" for c in columns))
    return "\n".join(lines)


def _paired(result: dict[str, Any], key: str) -> str:
    """The paired in-process batched wall of *key*; "-" for in-process itself."""
    return _cell(result, f"direct_{key}", 2)


def _pings(result: dict[str, Any]) -> str:
    gaps = [g for r in result["reps"] for g in r.get("ping_gaps", [])]
    if not gaps:
        return "-"
    return f"{_ms(_quantile(gaps, 0.5))}/{_ms(_quantile(gaps, 0.99))} n={len(gaps)}"


def _rss(name: str, data: dict[str, Any], direct: dict[str, Any]) -> str:
    rss = direct.get("rss") if name == "in-process" else data[name].get("rss")
    return "-" if rss is None else f"{rss / 2**20:.0f}"


def target_lines(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no wsgi-llama figures: no targets)"
    width = max(len(r["target"]) for r in rows) + 2
    goal = max(len(r["goal"]) for r in rows) + 2
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    return "\n".join(
        f"{r['target']:{width}}{r['goal']:{goal}}{r['measured']:28}{verdict[r['met']]}"
        for r in rows
    )


# -- running ------------------------------------------------------------------


def start(name: str, args: argparse.Namespace, model: Path, logs: Path) -> Any:
    log = logs / f"{name}.log"
    if name == "wsgi-llama":
        return WsgiLlama(model, log)
    if name == "llama-cpp-python":
        return LcpServer(args.lcp_venv, model, log)
    return LlamaCppServer(
        args.llama_server_bin,
        model,
        log,
        args.llama_server_parallel,
        args.llama_server_arg,
    )


def skipped(name: str, args: argparse.Namespace) -> str | None:
    """Why *name* cannot run here, or None."""
    if name == "llama-cpp-python":
        venv = args.lcp_venv
        if venv is None:
            return "no --lcp-venv / $LCP_SERVER_VENV: llama-cpp-python's server skipped"
        if not (venv / "bin" / "python").exists():
            return f"{venv} holds no venv: llama-cpp-python's server skipped"
    if name == "llama.cpp":
        binary = args.llama_server_bin
        if binary is None:
            return (
                "no --llama-server-bin / $LLAMA_SERVER_BIN: llama.cpp's server skipped"
            )
        if not os.access(binary, os.X_OK):
            return f"{binary} is not executable: llama.cpp's server skipped"
    return None


def report_header(model: Path) -> dict[str, Any]:
    """When, on what machine (its load now) and which model, for a JSON report."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cores": cores(),
            "platform": platform.platform(),
            "load_before": os.getloadavg(),
        },
        "model": str(model),
    }


def llama_server_args(parser: argparse.ArgumentParser) -> None:
    """``--llama-server-bin``, ``--llama-server-parallel`` and
    ``--llama-server-arg``, for the scripts that run llama.cpp's server."""
    parser.add_argument(
        "--llama-server-bin",
        type=Path,
        default=os.environ.get("LLAMA_SERVER_BIN") or None,
        help="llama.cpp's llama-server binary (default: $LLAMA_SERVER_BIN)",
    )
    parser.add_argument(
        "--llama-server-parallel",
        type=int,
        default=DEFAULTS["LLAMA_PARALLEL"],
        help="llama-server --parallel (default: wsgi-llama's LLAMA_PARALLEL "
        "default, 8; llama.cpp's own automatic default is 4)",
    )
    parser.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more llama-server argument, e.g. --llama-server-arg=--load-mode "
        "--llama-server-arg=none (repeatable)",
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, help="a GGUF file (default: Gemma 3 270M)"
    )
    parser.add_argument(
        "--reps", type=int, help="reps per server (default 3, --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="1 rep, shorter streams")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated subset of {','.join(SERVERS)}",
    )
    parser.add_argument(
        "--lcp-venv",
        type=Path,
        default=os.environ.get("LCP_SERVER_VENV") or None,
        help="venv with llama-cpp-python[server] (default: $LCP_SERVER_VENV)",
    )
    llama_server_args(parser)
    args = parser.parse_args()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    if sys.argv[1:2] == ["--direct-child"]:
        direct_child(sys.argv[2])
        return
    args = parse_args()
    model = (args.model or default_model()).resolve()
    plan = Plan(args)
    began = time.monotonic()
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: every finally runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(text: str) -> None:
        elapsed = time.monotonic() - began
        print(f"[{elapsed:6.0f} s] {text}", file=sys.stderr, flush=True)

    notes = [n for n in (skipped(s, args) for s in args.servers) if n]
    names = [s for s in SERVERS if s in args.servers and not skipped(s, args)]
    report: dict[str, Any] = {
        **report_header(model),
        "plan": vars(plan),
        "notes": notes,
        "servers": {},
    }
    for note in notes:
        log(note)
    prompts = Prompts(model)
    direct = Direct(model)
    logs = Path(tempfile.mkdtemp(prefix="wsgi-llama-compare-"))
    try:
        direct.call(op="stream", prompt=prompts.short(), max_tokens=8)  # warm-up
        for name in names:
            log(f"{name}: starting")
            try:
                server = start(name, args, model, logs)
            except RuntimeError as exc:
                log(f"{name}: {exc}")
                report["notes"].append(f"{name} did not start (see {logs})")
                continue
            try:
                result = measure_server(server, direct, prompts, plan, log)
                result["about"] = server.describe()
            finally:
                server.stop()
            if "error" in result:
                report["notes"].append(f"{name} failed: {result['error']}")
            if result["reps"]:
                result["summary"] = summarize(result)
            report["servers"][name] = result
            if result.pop("interrupted", False):
                report["notes"].append("interrupted: the figures so far")
                break
        else:
            report["in_process"] = direct.call(op="rss")
    except (KeyboardInterrupt, SystemExit) as exc:
        report["notes"].append(f"interrupted ({exc!r}): the figures so far")
    finally:
        direct.stop()
        prompts.close()
    report.setdefault("in_process", {})
    report["machine"]["load_after"] = os.getloadavg()
    report["elapsed_s"] = time.monotonic() - began
    report["targets"] = targets(report["servers"])

    load = report["machine"]
    print(
        f"\n{model.name}, {cores()} cores, {plan.reps} rep(s) per server, median "
        f"(min-max); {report['date']}; load average {load['load_before'][0]:.2f} "
        f"before, {load['load_after'][0]:.2f} after; {report['elapsed_s']:.0f} s"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print()
    print(table(report["servers"], report["in_process"]))
    print("\nTargets (issue 9), for wsgi-llama:")
    print(target_lines(report["targets"]))
    print(f"\nserver logs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"figures: {args.json}")
    if any(note.startswith("interrupted") for note in report["notes"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
