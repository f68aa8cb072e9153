"""ggml-cpu's work buffers come page-aligned (see :mod:`wsgi_llama.alignment`)."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable, Iterator

import llama_cpp  # noqa: F401  (loads libggml-cpu)
import pytest
from flask import Flask

from wsgi_llama import alignment

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="the work buffers are aligned on Linux x86-64 only",
)

LIBC = ctypes.CDLL(None)
NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)


def address(function: object) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value


@pytest.fixture()
def slot() -> Iterator[ctypes.c_void_p]:
    """ggml-cpu's import of ``new[]``, put back to libstdc++'s for the test."""
    library, base = alignment._loaded("libggml-cpu")
    at = base + alignment._import_slot(library, alignment.NEW_ARRAY)
    pointer = ctypes.c_void_p.from_address(at)
    patched = pointer.value
    pointer.value = address(ctypes.CDLL("libstdc++.so.6")._Znam)
    try:
        yield pointer
    finally:
        pointer.value = patched


def test_loading_a_model_makes_ggml_cpu_arrays_page_aligned(
    slot: ctypes.c_void_p, make_app: Callable[..., Flask]
) -> None:
    assert slot.value != address(LIBC.valloc)
    app = make_app()
    assert slot.value == address(LIBC.valloc)
    # What ggml-cpu gets for a work buffer now, and can give back to free().
    for size in (2_244_800, 100, 1 << 20):
        buffer = NEW(slot.value)(size)
        assert buffer and buffer % 4096 == 0
        LIBC.free(ctypes.c_void_p(buffer))
    body = {"prompt": "aligned", "max_tokens": 8}
    response = app.test_client().post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.get_json()["usage"]["completion_tokens"] >= 1


def test_aligning_again_changes_nothing(slot: ctypes.c_void_p) -> None:
    assert alignment.align_work_buffers()
    assert alignment.align_work_buffers()
    assert slot.value == address(LIBC.valloc)
