"""The prompt cache's bookkeeping: which entry serves a prompt, what it drops."""

from __future__ import annotations

import ctypes

from wsgi_llama.prompt_cache import PromptCache, common_prefix


def state(size: int) -> ctypes.Array[ctypes.c_ubyte]:
    return (ctypes.c_ubyte * size)()


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_find_gives_the_entry_sharing_the_longest_prefix() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3, 4], state(10))
    cache.put([1, 2, 5, 6, 7], state(10))
    cache.put([9, 9], state(10))
    assert cache.find([1, 2, 5, 6, 0]) == ((1, 2, 5, 6, 7), 4)
    assert cache.find([1, 2, 3, 4, 5]) == ((1, 2, 3, 4), 4)
    assert cache.find([8]) == (None, 0)


def test_an_entry_that_begins_another_is_not_kept_twice() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3], state(10))
    cache.put([1, 2, 3, 4, 5], state(20))  # supersedes the first
    assert len(cache) == 1 and cache.size == 20
    cache.put([1, 2], state(10))  # nothing the longer one lacks
    assert len(cache) == 1 and cache.covers([1, 2, 3, 4])
    assert not cache.covers([1, 2, 3, 4, 5, 6])


def test_the_least_recently_used_go_first_when_full() -> None:
    cache = PromptCache(100)
    cache.put([1], state(40))
    cache.put([2], state(40))
    cache.get((1,))  # used: now the newest
    cache.put([3], state(40))
    assert cache.find([2])[0] is None
    assert cache.find([1])[0] == (1,) and cache.find([3])[0] == (3,)
    assert cache.size == 80


def test_a_state_larger_than_the_cache_is_not_kept() -> None:
    cache = PromptCache(100)
    cache.put([1], state(50))
    cache.put([2], state(101))
    assert len(cache) == 1 and cache.size == 50
