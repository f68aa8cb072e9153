""".ci/run: every step's failure stops it, and it runs README.rst's test command.

The script runs against stand-ins for ``python3``, ``pip``, ``pytest`` and
``ruff`` that record that they ran and fail on demand, so these tests show the
control flow in a second, without installing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

# A stand-in for python3 (and for .venv/bin/{pip,python,ruff}): logs its name,
# its arguments and WSGI_LLAMA_REQUIRE_SERVERS; exits with $FAIL_<NAME> or 0.
STUB = """#!/bin/sh
name=$(basename "$0")
echo "$name $* require=${WSGI_LLAMA_REQUIRE_SERVERS:-}" >> "$CI_LOG"
if [ "$name" = python3 ] && [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    for tool in pip python ruff; do cp "$0" "$3/bin/$tool"; done
fi
eval "exit \\${FAIL_$(echo "$name" | tr a-z A-Z):-0}"
"""


def readme_test_command() -> str:
    readme = (REPO / "README.rst").read_text("utf-8")
    (command,) = re.findall(r"\n    (python3 -m venv .venv && .*pytest)\n", readme)
    return command


def run_ci(tmp_path: Path, **fail: str) -> tuple[int, list[str]]:
    """Run a copy of .ci/run with stand-ins; return its status and the log."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(STUB)
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CI_LOG": str(log),
        **{f"FAIL_{name.upper()}": status for name, status in fail.items()},
    }
    done = subprocess.run(
        ["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, timeout=60
    )
    lines = log.read_text().splitlines() if log.exists() else []
    return done.returncode, lines


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_all_steps_run_in_order_when_all_pass(tmp_path: Path) -> None:
    status, log = run_ci(tmp_path)
    assert status == 0
    assert log == [
        "python3 -m venv .venv require=1",
        "pip install -e .[test] require=1",
        "python -m pytest require=1",
        "ruff check . require=1",
        "ruff format --check . require=1",
    ]


@pytest.mark.parametrize(
    ("failing", "ran"),
    [("python3", 1), ("pip", 2), ("python", 3), ("ruff", 4)],
)
def test_a_failed_step_stops_the_run(tmp_path: Path, failing: str, ran: int) -> None:
    status, log = run_ci(tmp_path, **{failing: "7"})
    assert status == 7
    assert len(log) == ran, log


def test_runs_readme_test_command_verbatim() -> None:
    script = (REPO / ".ci" / "run").read_text("utf-8")
    assert f"({readme_test_command()})\n" in script
    assert os.access(REPO / ".ci" / "run", os.X_OK)
