"""Debian packages a host test needs: installed when missing, else skip or fail."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

#: Set by .ci/run: a server that cannot be installed fails its tests.
REQUIRE = "WSGI_LLAMA_REQUIRE_SERVERS"


def unavailable(reason: str) -> None:
    """Skip with *reason*, or fail when the environment demands every server."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason} ({REQUIRE}=1)")
    pytest.skip(reason)


def installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return status.returncode == 0 and status.stdout.strip() == "installed"


def need(*packages: str) -> None:
    """Install the Debian *packages* that are missing (as root, with apt-get)."""
    if shutil.which("dpkg-query") is None:
        unavailable(f"not a Debian system: cannot install {', '.join(packages)}")
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        unavailable(f"{', '.join(missing)} not installed and not root to install")
    result = _apt_get("install", "-y", "--no-install-recommends", *missing)
    if result.returncode != 0:
        # Package lists may be missing or stale on a fresh machine.
        _apt_get("update")
        result = _apt_get("install", "-y", "--no-install-recommends", *missing)
    if result.returncode != 0:
        unavailable(
            f"apt-get install {' '.join(missing)} failed:\n{result.stdout[-2000:]}"
            f"\n{result.stderr[-2000:]}"
        )


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=900", *args],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        check=False,
    )
