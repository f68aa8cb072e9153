"""Fixtures shared by tests/test_host_*.py (import them into the test module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .pythonenv import system_venv
from .servers import public_dir, publish


@pytest.fixture(scope="session")
def app_venv() -> Path:
    """The system Python's venv with wsgi-llama (cached between runs)."""
    return system_venv()


@pytest.fixture(scope="module")
def public(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A world-readable directory for one test module's server."""
    with public_dir(f"wsgi-llama-{request.module.__name__}-") as path:
        yield path


@pytest.fixture(scope="module")
def public_model(public: Path, tiny_model: Path) -> Path:
    """The tiny model where the servers' unprivileged user can read it."""
    return publish(tiny_model, public / "models" / "tiny.gguf")
