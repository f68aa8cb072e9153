"""llama.cpp's threads: the tuner, fed the step times and CPU shares machines
give it, and the priority they run at."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from wsgi_llama import tuning


class Machine:
    """Step times per thread count, the CPU share threads get, idle cores."""

    def __init__(self, seconds: dict[int, float], share: dict[int, float], idle: float):
        self.seconds, self.share, self.idle = seconds, share, idle

    def __call__(self) -> float | None:
        return self.idle

    def run(self, tuner: tuning.ThreadTuner, steps: int) -> list[int]:
        """Record *steps* generation steps; the thread count of each."""
        used = []
        for _ in range(steps):
            n = tuner.threads()
            used.append(n)
            seconds = self.seconds[n]
            tuner.record(4, seconds, seconds * n * self.share[n])
        return used


QUIET = ({2: 0.014, 1: 0.022}, {2: 0.98, 1: 1.0}, 0.0)
# One core busy elsewhere: two threads wait for each other (measured with
# Gemma 3 270M here: 21 against 44 tokens/s, 73 % of their CPU time).
HOGGED = ({2: 0.048, 1: 0.023}, {2: 0.73, 1: 1.0}, 0.0)


def test_a_quiet_machine_is_never_probed() -> None:
    """Probing cost a quiet machine 25 % of its speed: no reason, no probe."""
    machine = Machine(*QUIET)
    tuner = tuning.ThreadTuner(2, idle=machine)
    used = []
    deadline = time.monotonic() + 1.2  # a probe used to come after 0.5 s
    while time.monotonic() < deadline:
        used += machine.run(tuner, tuning.WINDOW_STEPS)
        time.sleep(0.01)
    assert set(used) == {2}
    assert tuner.probes == 0


def test_contention_moves_to_fewer_threads_and_a_free_core_back() -> None:
    machine = Machine(*HOGGED)
    tuner = tuning.ThreadTuner(2, idle=machine)
    used = machine.run(tuner, 3 * tuning.WINDOW_STEPS)
    assert tuner.best == 1
    assert used[-1] == 1
    # Both cores stay busy (the hog and our thread): one thread it stays.
    used = machine.run(tuner, 500)
    assert set(used) == {1}
    # The hog ends: a core idles, two threads are tried (not at once after
    # the move: that would undo it) and kept.
    machine.seconds, machine.share, machine.idle = QUIET
    machine.idle = 1.0
    deadline = time.monotonic() + tuning.FIRST_WAIT + 1
    while tuner.best == 1 and time.monotonic() < deadline:
        machine.run(tuner, tuning.WINDOW_STEPS)
        time.sleep(0.01)
    assert tuner.best == 2
    assert set(machine.run(tuner, 500)) == {2}


def test_a_losing_probe_is_tried_later_and_later() -> None:
    """Contended, yet one thread is slower (another cause): two it stays."""
    machine = Machine({2: 0.02, 1: 0.04}, {2: 0.7, 1: 1.0}, 0.0)
    tuner = tuning.ThreadTuner(2, idle=machine)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        machine.run(tuner, tuning.WINDOW_STEPS)
        time.sleep(0.01)
    assert tuner.best == 2
    # Waits of 0.5 s, then 1 s: two probes in 1.2 s, not one every window.
    assert 1 <= tuner.probes <= 2


def test_one_thread_is_never_tuned() -> None:
    machine = Machine(*HOGGED)
    tuner = tuning.ThreadTuner(1, idle=machine)
    assert set(machine.run(tuner, 200)) == {1}
    assert tuner.probes == 0


def test_idle_cores_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"

    def write(busy0: int, idle0: int, busy1: int, idle1: int) -> None:
        stat.write_text(
            f"cpu  {busy0 + busy1} 0 0 {idle0 + idle1} 0 0 0 0 0 0\n"
            f"cpu0 {busy0} 0 0 {idle0} 0 0 0 0 0 0\n"
            f"cpu1 {busy1} 0 0 {idle1} 0 0 0 0 0 0\n"
            "intr 1 2 3\n"
        )

    write(100, 100, 100, 100)
    cores = tuning.IdleCores(str(stat))
    cores._cpus = {"cpu0", "cpu1"}
    write(150, 150, 200, 100)  # cpu0 idle half the time, cpu1 busy
    assert cores() == 0.5
    assert cores() is None  # no time passed
    assert tuning.IdleCores(str(tmp_path / "missing"))() is None


class Fixed(tuning.ThreadTuner):
    """A tuner that always answers *n* threads and keeps what it was told."""

    def __init__(self, n: int) -> None:
        super().__init__(2)
        self.n = n
        self.steps: list[tuple[int, float, float]] = []
        self.pauses = 0

    def threads(self) -> int:
        return self.n

    def record(self, tokens: int, seconds: float, cpu: float) -> None:
        self.steps.append((tokens, seconds, cpu))

    def pause(self) -> None:
        self.pauses += 1


def test_one_request_at_a_time_follows_a_tuner_too(make_app: Any) -> None:
    """Without the engine (LLAMA_PARALLEL=1), llama-cpp-python's own decoding
    takes the tuner's thread count and reports each generated token's step."""
    app = make_app(LLAMA_PARALLEL=1, LLAMA_N_THREADS=2)
    pool = app.extensions["wsgi_llama"].pool
    model = next(iter(pool.models.values()))
    assert model.engine is None
    assert isinstance(model.llama.tuner, tuning.ThreadTuner)
    model.llama.tuner = tuner = Fixed(1)
    body = {"prompt": "threads", "max_tokens": 12, "temperature": 0}
    response = app.test_client().post("/v1/completions", json=body)
    assert response.status_code == 200
    generated = response.get_json()["usage"]["completion_tokens"]
    assert generated >= 2
    # Every token after the first is one step of one token, timed.
    assert len(tuner.steps) >= generated - 1
    assert all(t == 1 and s > 0 and c >= 0 for t, s, c in tuner.steps)
    assert tuner.pauses == 1
    assert llama_cpp.llama_n_threads(model.llama._ctx.ctx) == 1
    assert llama_cpp.llama_n_threads_batch(model.llama._ctx.ctx) == 1


def nice_of(tid: int) -> int:
    """A thread's nice value, from its /proc stat line (field 19)."""
    with open(f"/proc/{os.getpid()}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def threads_at(nice: int) -> list[int]:
    return [
        int(tid)
        for tid in os.listdir(f"/proc/{os.getpid()}/task")
        if nice_of(int(tid)) == nice
    ]


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


@linux_only
@pytest.mark.parametrize(("parallel", "nice"), [(8, 3), (1, 4)])
def test_llama_cpp_threads_run_below_the_serving_ones(
    make_app: Any, parallel: int, nice: int
) -> None:
    """The engine's loop (or the model's thread without it) and the workers it
    starts run LLAMA_COMPUTE_NICE levels below; the serving thread keeps its.
    Each case has a nice of its own: the other's threads live on."""
    mine = threading.get_native_id()
    base = nice_of(mine)
    if base + nice > 19:
        pytest.skip(f"this process already runs at nice {base}")
    app = make_app(LLAMA_PARALLEL=parallel, LLAMA_N_THREADS=2, LLAMA_COMPUTE_NICE=nice)
    body = {"prompt": "priority", "max_tokens": 4, "temperature": 0}
    response = app.test_client().post("/v1/completions", json=body)
    assert response.status_code == 200
    assert nice_of(mine) == base
    model = next(iter(app.extensions["wsgi_llama"].pool.models.values()))
    if model.engine is not None:
        assert model.engine.thread_id is not None
        assert nice_of(model.engine.thread_id) == base + nice
    # The decoding thread and the worker it started for its second thread.
    assert len(threads_at(base + nice)) >= 2


@linux_only
def test_a_compute_nice_of_0_leaves_the_priority_alone(make_app: Any) -> None:
    base = nice_of(threading.get_native_id())
    app = make_app(LLAMA_COMPUTE_NICE=0)
    body = {"prompt": "priority", "max_tokens": 2, "temperature": 0}
    assert app.test_client().post("/v1/completions", json=body).status_code == 200
    engine = next(iter(app.extensions["wsgi_llama"].pool.models.values())).engine
    assert engine is not None and engine.thread_id is not None
    assert nice_of(engine.thread_id) == base


def mapped(path: Path) -> bool:
    """Whether this process maps *path* (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip("\n").endswith(str(path)) for line in f)


@linux_only
@pytest.mark.parametrize("use_mmap", [None, True])
def test_weights_are_read_into_memory_unless_the_config_maps_them(
    tmp_path: Path, tiny_model: Path, use_mmap: bool | None
) -> None:
    """Mapped weights made the first decode after an idle second slower."""
    from wsgi_llama import create_app

    model = tmp_path / "weights.gguf"  # a name no other test's model maps
    model.write_bytes(tiny_model.read_bytes())
    entry: dict[str, Any] = {"model": str(model), "n_ctx": 256}
    if use_mmap is not None:
        entry["use_mmap"] = use_mmap
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [entry]}))
    app = create_app({"LLAMA_CONFIG_FILE": str(config)})
    body = {"prompt": "weights", "max_tokens": 2, "temperature": 0}
    assert app.test_client().post("/v1/completions", json=body).status_code == 200
    assert mapped(model) is bool(use_mmap)
