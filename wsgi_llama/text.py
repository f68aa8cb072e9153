"""Text out of generated tokens, one token at a time.

llama-cpp-python re-detokenizes the whole completion for every streamed token
(quadratic in long generations) and matches stop strings on the bytes so far.
Here each token costs its own piece only: :class:`Detokenizer` turns tokens
into text as characters complete (one may span tokens), and
:class:`StopMatcher` holds back only the text that may yet become a stop
string.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Sequence

import llama_cpp


class Detokenizer:
    """A sequence's tokens to text, incrementally and UTF-8 safe.

    The text equals llama-cpp-python's ``Llama.detokenize`` of all the tokens
    fed, decoded with ``errors="replace"``: pieces as ``llama_token_to_piece``
    gives them (special tokens render as nothing), and one leading space
    dropped after a leading BOS, as llama-cpp-python does.
    """

    def __init__(self, model: llama_cpp.Llama, prompt_tail: Sequence[int] = ()) -> None:
        # llama.cpp's pieces do not depend on the token before (lstrip is 0,
        # as in llama-cpp-python), so the prompt's tail is kept only for
        # tokenizers that would need it.
        self.prompt_tail = tuple(prompt_tail)
        self._model = model  # keeps the vocabulary alive
        self._vocab = model._model.vocab
        self._bos = model.token_bos()
        self._buffer = ctypes.create_string_buffer(64)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._fed = 0
        self._strip_space = False

    def piece(self, token: int) -> bytes:
        """The bytes *token* stands for (nothing for special tokens)."""
        size = len(self._buffer)
        n = llama_cpp.llama_token_to_piece(
            self._vocab, token, self._buffer, size, 0, False
        )
        if n < 0:  # the buffer is too small: -n bytes are needed
            self._buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buffer, -n, 0, False
            )
        return self._buffer.raw[:n]

    def feed(self, token: int) -> str:
        """The text completed by *token*: held back while a character is partial."""
        data = self.piece(token)
        if self._fed == 0 and token == self._bos:
            self._strip_space = True
        self._fed += 1
        if self._strip_space and data:
            self._strip_space = False
            if data[:1] == b" ":
                data = data[1:]
        return self._decoder.decode(data)

    def flush(self) -> str:
        """What is left at the end: an unfinished character becomes U+FFFD."""
        return self._decoder.decode(b"", True)


class StopMatcher:
    """Cuts text at the earliest stop string, across any split into pieces.

    :meth:`feed` returns only text that cannot become part of a stop string:
    the rest is held until later text decides. Once a stop is found the text
    before it is the last; ``stopped`` says so.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in dict.fromkeys(stops) if stop]
        self._longest = max(map(len, self.stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        text = self._held + text
        found = self._first_stop(text)
        # A stop that started earlier and is still incomplete may yet win.
        start = max(0, len(text) - self._longest + 1)
        for pending in range(start, min(found, len(text))):
            tail = text[pending:]
            if any(stop.startswith(tail) for stop in self.stops):
                self._held = tail
                return text[:pending], False
        self._held = ""
        if found < len(text):
            self.stopped = True
            return text[:found], True
        return text, False

    def flush(self) -> str:
        """The held text at the end of the stream (cut at a stop it holds)."""
        if self.stopped:
            return ""
        text, self._held = self._held, ""
        found = self._first_stop(text)
        if found < len(text):
            self.stopped = True
            return text[:found]
        return text

    def _first_stop(self, text: str) -> int:
        """Where the earliest stop string in *text* starts; ``len(text)`` if none."""
        found = len(text)
        for stop in self.stops:
            at = text.find(stop, 0, found + len(stop) - 1)
            if at >= 0:
                found = min(found, at)
        return found
