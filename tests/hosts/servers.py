"""Apache and nginx run in the foreground from a configuration of our own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
#: The unprivileged user the servers' workers run as (Debian's web user).
WEB_USER = "www-data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def public_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory every user can read (pytest's are mode 700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(source: Path, target: Path) -> Path:
    """Copy *source* to *target*, readable by everyone."""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o644)
    return target


def write_public(target: Path, text: str) -> Path:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(0o644)
    return target


def render(template: str, replacements: Mapping[str, str]) -> str:
    """*template* with each key replaced; every key must occur in it.

    So a change to a deploy/ file that a test relies on breaks the test
    instead of silently testing something else.
    """
    for old, new in replacements.items():
        assert old in template, f"{old!r} is no longer in the deploy file"
        template = template.replace(old, new)
    return template


def deploy_file(name: str, replacements: Mapping[str, str]) -> str:
    return render((DEPLOY / name).read_text(), replacements)


class Server:
    """A server process in the foreground, in its own process group."""

    name = "server"

    def __init__(self, root: Path, command: list[str], ports: list[int]) -> None:
        self.root = root
        self.ports = ports
        self.output = root / "output.log"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def logs(self, limit: int = 4000) -> str:
        """Every log file under the server's root, for failure messages."""
        parts = []
        for path in sorted(self.root.rglob("*log")):  # Apache's error_log too
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-limit:]}")
        return "\n".join(parts)

    def wait_ready(
        self, path: str = "/health", index: int = 0, timeout: float = 90
    ) -> None:
        """Poll *path* until it answers 200 (the app loads on that request)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.logs()}")
            try:
                response = httpx.get(self.url(index) + path, timeout=30)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:500]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready ({last}):\n{self.logs()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Workers left behind (a daemon that ignored the master): they are
        # ours, in the group we created.
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


class Apache(Server):
    """``apache2 -DFOREGROUND`` with a ServerRoot of its own."""

    name = "apache2"

    def __init__(
        self, root: Path, modules: list[str], body: str, ports: list[int]
    ) -> None:
        run = root / "run"
        run.mkdir(mode=0o755, parents=True, exist_ok=True)
        loads = "\n".join(
            f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so"
            for m in ["mpm_event", "authz_core", "env", *modules]
        )
        listens = "\n".join(f"Listen 127.0.0.1:{port}" for port in ports)
        user = f"User {WEB_USER}\nGroup {WEB_USER}" if os.geteuid() == 0 else ""
        conf = write_public(
            root / "httpd.conf",
            f"""\
ServerRoot "{root}"
ServerName 127.0.0.1
DefaultRuntimeDir "{run}"
PidFile "{run}/apache2.pid"
ErrorLog "{root}/error.log"
LogLevel info
{user}
{loads}
{listens}
StartServers 1
MinSpareThreads 8
MaxSpareThreads 32
ServerLimit 2
ThreadsPerChild 16
MaxRequestWorkers 32
{body}
""",
        )
        super().__init__(
            root, ["/usr/sbin/apache2", "-f", str(conf), "-DFOREGROUND"], ports
        )


class Nginx(Server):
    """``nginx`` in the foreground with a prefix of its own."""

    name = "nginx"

    def __init__(self, root: Path, http: str, ports: list[int]) -> None:
        temp = root / "temp"
        temp.mkdir(mode=0o755, parents=True, exist_ok=True)
        user = f"user {WEB_USER};" if os.geteuid() == 0 else ""
        temps = "\n".join(
            f"    {kind}_temp_path {temp}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = write_public(
            root / "nginx.conf",
            f"""\
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
{user}
events {{
    worker_connections 256;
}}
http {{
    access_log {root}/access.log;
{temps}
{http}
}}
""",
        )
        super().__init__(
            root,
            ["/usr/sbin/nginx", "-e", str(root / "error.log"), "-c", str(conf)],
            ports,
        )
