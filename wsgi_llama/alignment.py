"""Page-aligned work buffers for llama.cpp's CPU backend.

ggml's CPU backend keeps the activations it quantizes for each matrix
product in a work buffer it allocates with ``new uint8_t[]``: glibc gives
16-byte alignment, and in the serving thread's heap the buffer landed 32
bytes past a cache line, so many of the kernels' 64-byte loads straddle two
lines. With the buffer page-aligned, a 1.6k-token prompt took 0.93 of the
time (Gemma 3 270M, 2 cores, three pairs of fresh processes).

ggml offers no way to pass a buffer in, so :func:`align_work_buffers`
points the CPU library's import of ``operator new[]`` at libc's ``valloc``
(page-aligned, released by the same ``free`` that ``delete[]`` calls). Only
that library's array allocations change: its two work buffers. Anywhere this
cannot be done safely (not Linux on x86-64 with glibc, an unexpected ELF
file) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("wsgi_llama.alignment")

#: ``operator new[](size_t)``, as libstdc++ mangles it.
NEW_ARRAY = b"_Znam"
_R_X86_64_JUMP_SLOT = 7
_SHT_RELA = 4


def align_work_buffers() -> bool:
    """Make ggml-cpu's ``new[]`` page-aligned in this process; return whether it is.

    Call before the first decode (the work buffer is allocated then, and only
    grows). Safe to call again.
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        library, base = _loaded("libggml-cpu")
        slot = base + _import_slot(library, NEW_ARRAY)
        libc = ctypes.CDLL(None)
        valloc = ctypes.cast(libc.valloc, ctypes.c_void_p).value
        pointer = ctypes.c_void_p.from_address(slot)
        if pointer.value != valloc:
            if not _writable(slot):
                log.debug("ggml-cpu's import of new[] is read-only; left as is")
                return False
            pointer.value = valloc
    except (OSError, ValueError, LookupError, struct.error) as exc:
        log.debug("ggml-cpu's work buffers keep malloc's alignment: %s", exc)
        return False
    return True


def _loaded(name: str) -> tuple[Path, int]:
    """The file of the mapped library whose name starts with *name*, and its base."""
    for start, _, _, offset, path in _mappings():
        if offset == 0 and Path(path).name.startswith(name + ".so"):
            return Path(path), start
    raise LookupError(f"{name} is not loaded")


def _import_slot(library: Path, symbol: bytes) -> int:
    """The offset of *symbol*'s jump slot (its GOT entry) in *library*."""
    with (
        open(library, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as elf,
    ):
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            raise ValueError(f"{library} is not a 64-bit little-endian ELF file")
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        loads = [
            struct.unpack_from("<IIQQ", elf, phoff + i * phentsize)[2:]
            for i in range(phnum)
            if struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 1
        ]
        # The slot's offset counts from the mapping of file offset 0.
        if not loads or loads[0] != (0, 0):
            raise ValueError(f"{library}'s first segment is not at address 0")
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
            for i in range(shnum)
        ]
        for _, kind, _, _, offset, size, link, _, _, entsize in sections:
            if kind != _SHT_RELA or not entsize:
                continue
            symtab = sections[link]
            strtab = sections[symtab[6]]
            for at in range(offset, offset + size, entsize):
                r_offset, info, _ = struct.unpack_from("<QQq", elf, at)
                if info & 0xFFFFFFFF != _R_X86_64_JUMP_SLOT:
                    continue
                entry = symtab[4] + (info >> 32) * symtab[9]
                name_at = strtab[4] + struct.unpack_from("<I", elf, entry)[0]
                if elf[name_at : elf.find(b"\0", name_at)] == symbol:
                    return r_offset
    raise LookupError(f"{library} does not import {symbol.decode()}")


def _writable(address: int) -> bool:
    return any(
        start <= address < end and perms[1] == "w"
        for start, end, perms, _, _ in _mappings()
    )


def _mappings() -> Iterator[tuple[int, int, str, int, str]]:
    """This process's mappings: start, end, permissions, file offset, path."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms, offset, _, _, *path = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        yield start, end, perms, int(offset, 16), path[0] if path else ""
