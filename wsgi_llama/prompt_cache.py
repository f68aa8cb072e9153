"""Sequences' KV cells kept in host memory after the context needs their room.

An engine holds ``LLAMA_PARALLEL`` sequences, and a finished one's cells stay
for the next request that shares its prefix (the next turn of a chat) until
another request needs them. With more conversations than sequences, a turn's
cells are usually gone by the next turn, and its whole history would be
evaluated again: seconds per thousand tokens on a small CPU, against
milliseconds to copy the cells back. The engine saves such a sequence here
(``llama_state_seq_get_data``) before it drops its cells, and copies one back
(``llama_state_seq_set_data``) when a prompt shares more with it than with
what the context holds. llama.cpp's server does the same (``--cache-ram``).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens *a* and *b* share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Saved sequence states by their tokens, the least recently used dropped first.

    *capacity* is in bytes. An entry whose tokens begin another's adds
    nothing and is not kept: the longer one serves every prompt it would.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[tuple[int, ...], ctypes.Array[ctypes.c_ubyte]]
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds *tokens* (and maybe more after them)."""
        n = len(tokens)
        return any(
            len(key) >= n and common_prefix(key, tokens) == n for key in self._entries
        )

    def find(self, prompt: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The entry sharing the longest prefix with *prompt*, and that length."""
        best: tuple[int, ...] | None = None
        longest = 0
        for key in self._entries:
            n = common_prefix(key, prompt)
            if n > longest:
                best, longest = key, n
        return best, longest

    def get(self, key: tuple[int, ...]) -> ctypes.Array[ctypes.c_ubyte]:
        """The state saved for *key*, now the most recently used."""
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, tokens: Sequence[int], data: ctypes.Array[ctypes.c_ubyte]) -> None:
        """Keep *data*, the state of a sequence holding *tokens*."""
        if len(data) > self.capacity or self.covers(tokens):
            return
        key = tuple(tokens)
        for other in [k for k in self._entries if common_prefix(k, key) == len(k)]:
            self._drop(other)  # a prefix of the new entry
        self._entries[key] = data
        self.size += len(data)
        while self.size > self.capacity:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.size -= len(self._entries.pop(key))
