"""A virtualenv of the system Python with this repository installed.

Debian's mod_wsgi and Passenger run /usr/bin/python3, not the Python running
the tests, so the app needs a venv made from it (``python-home``,
``PassengerPython``). It is cached under /var/tmp, keyed on the system Python
and the repository's sources, and readable by every user. llama-cpp-python's
wheel comes from pip's cache, so building it takes seconds, not minutes.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .packages import need, unavailable

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
CACHE = Path("/var/tmp/wsgi-llama-host-tests")


def _sources_key(extra: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    digest.update(version.encode())
    digest.update(" ".join(extra).encode())
    files = [REPO / "setup.cfg", REPO / "pyproject.toml"]
    files += sorted((REPO / "wsgi_llama").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def system_venv(label: str = "app", *extra: str) -> Path:
    """The venv's directory: /usr/bin/python3, this repo and *extra* packages.

    Venvs with other *extra* packages get another *label*: each label keeps
    one venv, for the current sources. They start as a copy of the plain one
    (building a venv from scratch takes a minute, most of it pip resolving).
    """
    need("python3-venv")
    if not SYSTEM_PYTHON.exists():
        unavailable(f"{SYSTEM_PYTHON} is missing")
    base = None if not extra else system_venv()
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    venv = CACHE / f"{label}-{_sources_key(extra)}"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / "ready").exists():
            return venv
        for old in CACHE.glob(f"{label}-*"):
            # Earlier sources' venvs, unless a server may still be using one
            # (made in the last hour), and failed builds.
            ready = old / "ready"
            if not ready.exists() or time.time() - ready.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        if base is not None:
            # Its scripts keep naming the plain venv, but nothing runs them;
            # "python -m pip" installs into the copy and writes right ones.
            shutil.copytree(base, venv, symlinks=True)
            (venv / "ready").unlink()
            result = _wheels(venv, extra)
            if result.returncode == 0:
                result = _pip(venv, "install", "--find-links", CACHE / "wheels", *extra)
        else:
            subprocess.run([SYSTEM_PYTHON, "-m", "venv", venv], check=True)
            with tempfile.TemporaryDirectory() as tmp:
                # A copy of the sources, without the developer's .venv and caches.
                source = Path(tmp) / "src"
                shutil.copytree(
                    REPO,
                    source,
                    ignore=shutil.ignore_patterns(
                        ".venv", ".git", "*.egg-info", "build", "__pycache__"
                    ),
                )
                result = _pip(venv, "install", source)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(
                "pip install into the system Python's venv failed:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        (venv / "ready").touch()
    return venv


def _pip(venv: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _wheels(venv: Path, packages: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """Build wheels of *packages* that have none in the cache yet.

    pip does not cache what it compiles from an sdist (mod-wsgi: about 20 s
    on 2 cores), so the wheel is kept here.
    """
    wheels = CACHE / "wheels"
    wheels.mkdir(mode=0o755, exist_ok=True)
    names = [p.split("=")[0].split(">")[0].split("<")[0].strip() for p in packages]
    missing = [
        package
        for package, name in zip(packages, names, strict=True)
        if not any(wheels.glob(name.replace("-", "_").lower() + "-*.whl"))
    ]
    if not missing:
        return subprocess.CompletedProcess([], 0, "", "")
    # Without the wheel package, pip 23 installs a setup.py project without
    # building a wheel.
    result = _pip(venv, "install", "wheel")
    if result.returncode == 0:
        result = _pip(venv, "wheel", "--no-deps", "-w", wheels, *missing)
    return result
