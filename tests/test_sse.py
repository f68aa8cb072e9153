"""Property tests of the SSE framing, read back by two independent parsers.

One parser is the openai client's own (``openai._streaming.SSEDecoder``, fed
bytes as httpx hands them over); the other is written here from the WHATWG
"event stream interpretation" algorithm. Frames are fed split at arbitrary
byte boundaries, also inside multibyte characters and between the CR and LF
of a CRLF.

SSE cannot carry a CR in data: every CR, LF and CRLF in a ``data`` value ends
a ``data:`` line, and the parser joins the lines with LF. So text comes back
with its line breaks normalised to LF, and JSON (which escapes them) comes
back exactly. Everything else (U+2028, U+0085, \\x0b, \\x0c, \\x1c-\\x1e, NUL,
emoji, a leading space, a colon) is ordinary text to SSE and must survive.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from wsgi_llama.sse import DONE, PING, Heartbeat, ServerSentEvent, json_event, pings

# Parsers


@dataclass(frozen=True)
class Event:
    """An event as a parser reports it.

    ``event`` None is the default type, "message"; ``id`` "" is no id, which
    SSE does not tell apart from an empty one.
    """

    data: str
    event: str | None = None
    id: str = ""


class SpecParser:
    """The WHATWG event-stream interpretation, fed bytes in any chunks.

    https://html.spec.whatwg.org/multipage/server-sent-events.html
    #event-stream-interpretation -- lines end at CRLF, lone CR or lone LF and
    nothing else; a leading BOM is dropped; ``:`` lines are comments; one
    space after the colon is dropped; data lines join with LF; an empty data
    buffer dispatches nothing; the last event id persists across events; an
    event cut off by the end of the stream is discarded.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line: list[str] = []
        self._after_cr = False
        self._started = False
        self._data = ""
        self._type = ""
        self._last_id = ""
        self.events: list[Event] = []
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self._chars(self._utf8.decode(chunk))

    def close(self) -> list[Event]:
        self._chars(self._utf8.decode(b"", final=True))
        return self.events  # a pending line and a pending event are dropped

    def _chars(self, text: str) -> None:
        for ch in text:
            if not self._started:
                self._started = True
                if ch == "\ufeff":
                    continue
            if self._after_cr:
                self._after_cr = False
                if ch == "\n":
                    continue
            if ch == "\r":
                self._after_cr = True
                self._end_line()
            elif ch == "\n":
                self._end_line()
            else:
                self._line.append(ch)

    def _end_line(self) -> None:
        line = "".join(self._line)
        self._line = []
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:])
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id" and "\0" not in value:
            self._last_id = value
        # "retry" and unknown fields change nothing an event carries.

    def _dispatch(self) -> None:
        if not self._data:
            self._type = ""
            return
        self.events.append(Event(self._data[:-1], self._type or None, self._last_id))
        self._data = ""
        self._type = ""


def spec_parse(chunks: list[bytes]) -> list[Event]:
    parser = SpecParser()
    for chunk in chunks:
        parser.feed(chunk)
    return parser.close()


def openai_parse(chunks: list[bytes]) -> list[Event]:
    return [
        Event(sse.data, sse.event, sse.id or "")
        for sse in SSEDecoder().iter_bytes(iter(chunks))
    ]


PARSERS = {"openai": openai_parse, "whatwg": spec_parse}
parsers = pytest.mark.parametrize("parse", list(PARSERS.values()), ids=list(PARSERS))

# Strategies

# Characters that line-splitting code gets wrong: SSE's own terminators, the
# ones str.splitlines() also splits on, NUL, multibyte and astral characters,
# and the characters of the framing itself.
TRICKY = [
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\r",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x00",
    "\ufeff",
    "\ufffd",
    "é",
    "€",
    "漢",
    "😀",
    "👩\u200d👩\u200d👧",
    ":",
    " ",
    "data: ",
    "data:",
    ": ping",
    "event: x",
    "id: 1",
    "[DONE]",
]

texts = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=3))).map("".join),
    st.sampled_from(["", "\r", "\n", "\r\n", "a\r", "a\r\n", " ", "\n\r", "😀\r"]),
)
# A field value that has no line break in it (the only kind SSE can carry).
field_values = texts.map(lambda t: re.sub(r"[\r\n]", "", t))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def splits(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    """*blob* cut at arbitrary byte offsets, with empty chunks now and then."""
    if draw(st.booleans()) and len(blob) < 2000:
        return [blob[i : i + 1] for i in range(len(blob))]
    # Fractions of the length, so that the draws do not depend on it.
    fractions = draw(st.lists(st.integers(0, 1 << 16), max_size=12))
    cuts = sorted(f * len(blob) >> 16 for f in fractions)
    bounds = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


def normalise(text: str) -> str:
    """What SSE delivers of *text*: each of CRLF, CR, LF read as one LF."""
    return re.sub(r"\r\n|\r|\n", "\n", text)


# Single frames


@given(text=texts)
def test_frame_is_one_block_of_data_lines(text: str) -> None:
    frame = ServerSentEvent(text).encode()
    assert frame.endswith(b"\n\n")
    body = frame[:-2]
    assert b"\r" not in frame
    assert b"\n\n" not in body  # one event: no blank line before the end
    assert all(line.startswith(b"data: ") for line in body.split(b"\n"))


@parsers
@given(data=st.data(), text=texts)
def test_text_round_trips(
    parse: Callable[[list[bytes]], list[Event]], data: st.DataObject, text: str
) -> None:
    frame = ServerSentEvent(text).encode()
    assert parse(data.draw(splits(frame))) == [Event(normalise(text))]


@parsers
@given(data=st.data(), payload=json_values)
def test_json_round_trips(
    parse: Callable[[list[bytes]], list[Event]], data: st.DataObject, payload: Any
) -> None:
    frame = json_event(payload)
    assert frame.count(b"\n") == 2  # JSON escapes CR and LF: one data line
    (event,) = parse(data.draw(splits(frame)))
    assert event.event is None
    assert json.loads(event.data) == payload


@parsers
@given(data=st.data(), text=texts, event=field_values, id=field_values)
def test_event_and_id_round_trip(
    parse: Callable[[list[bytes]], list[Event]],
    data: st.DataObject,
    text: str,
    event: str,
    id: str,
) -> None:
    assume("\0" not in id)  # SSE ignores an id with NUL in it
    frame = ServerSentEvent(text, event=event, id=id).encode()
    # An empty event name means "message", reported as None by both parsers.
    expected = Event(normalise(text), event or None, id)
    assert parse(data.draw(splits(frame))) == [expected]


@parsers
@given(text=texts, event=texts, id=texts)
@example(text="real", event="message\ndata: forged", id="")
@example(text="real", event="", id="1\r\ndata: forged")
def test_event_and_id_cannot_inject_fields(
    parse: Callable[[list[bytes]], list[Event]], text: str, event: str, id: str
) -> None:
    """An event name or id with a line break must not forge other fields.

    SSE cannot carry a line break in those fields, so encode() must refuse
    them (ValueError) rather than emit a frame that reads back differently.
    """
    try:
        frame = ServerSentEvent(text, event=event, id=id).encode()
    except ValueError:
        return
    expected = Event(normalise(text), event or None, id)
    assert parse([frame]) == [expected] or "\0" in id


# Streams


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[Event]]:
    """Frames as the server sends them, heartbeats anywhere, and the events.

    No ids: the server sends none, and once one has been seen the openai
    decoder dispatches an empty event at every heartbeat (it tests the id
    buffer, which persists, where the specification tests the data buffer).
    """
    frames: list[bytes] = []
    expected: list[Event] = []
    for _ in range(draw(st.integers(0, 6))):
        frames.extend([PING] * draw(st.integers(0, 3)))
        kind = draw(st.sampled_from(["text", "json", "event"]))
        if kind == "text":
            text = draw(texts)
            frames.append(ServerSentEvent(text).encode())
            expected.append(Event(normalise(text)))
        elif kind == "json":
            payload = draw(json_values)
            frames.append(json_event(payload))
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
            expected.append(Event(text))
        else:
            text, event = draw(texts), draw(field_values)
            frames.append(ServerSentEvent(text, event=event).encode())
            expected.append(Event(normalise(text), event or None))
    frames.extend([PING] * draw(st.integers(0, 3)))
    if draw(st.booleans()):
        frames.append(DONE)
        expected.append(Event("[DONE]"))
        frames.extend([PING] * draw(st.integers(0, 2)))
    return frames, expected


@parsers
@given(data=st.data(), stream=streams())
def test_pings_between_events_are_ignored(
    parse: Callable[[list[bytes]], list[Event]],
    data: st.DataObject,
    stream: tuple[list[bytes], list[Event]],
) -> None:
    frames, expected = stream
    assert parse(data.draw(splits(b"".join(frames)))) == expected


def test_ping_is_a_comment() -> None:
    parser = SpecParser()
    parser.feed(PING * 3)
    assert parser.close() == []
    assert parser.comments == [" ping"] * 3
    assert openai_parse([PING, DONE, PING]) == [Event("[DONE]")]


@parsers
def test_cr_lf_split_across_chunks_is_one_line_end(
    parse: Callable[[list[bytes]], list[Event]],
) -> None:
    # The CR of a CRLF in one chunk and the LF in the next: one line end, so
    # the blank line after "data: a" is not doubled into an empty event.
    assert parse([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]) == [
        Event("a"),
        Event("b"),
    ]
    assert parse([b"data: a\r", b"", b"\n", b"\r\n"]) == [Event("a")]


@parsers
def test_multibyte_character_split_in_every_place(
    parse: Callable[[list[bytes]], list[Event]],
) -> None:
    frame = json_event({"text": "€😀\u2028\x85"})
    for cut in range(len(frame) + 1):
        (event,) = parse([frame[:cut], frame[cut:]])
        assert json.loads(event.data) == {"text": "€😀\u2028\x85"}


# Through the server: streamed text equals the non-streamed text
#
# The tiny model's vocabulary is bytes (ids 4..259 are <0x00>..<0xFF>), and
# its output rows are zero except for [A-Za-z0-9 .,], so on its own it never
# writes a multibyte character. A grammar of multibyte characters, with
# positive logit biases on their lead bytes, makes it write them; every other
# non-ASCII byte keeps logit 0 and so loses to a biased one.
#
# Why a grammar and not logit_bias alone: a bias is the same at every step, so
# it cannot spell a sequence; the model then writes lone lead bytes forever
# (see test_hostile.py for what that does to the server). Why no mixing of
# 4-byte with shorter characters: llama.cpp checks a partial UTF-8 sequence
# only against code point ranges, so after F0 it also accepts the overlong
# F0 82 .. that "could become" U+20AC, and llama-cpp-python then drops those
# bytes as invalid UTF-8 -- valid text still, but not the characters asked for.

BMP_CHARS = ["é", "ß", "ü", "\x85", "€", "\u2028", "漢", "字", "…"]
ASTRAL_CHARS = ["😀", "🎉", "🚀", "👍"]
ASCII_WORDS = ["a", "b", "z", " "]


def first_byte_token(char: str) -> int:
    return 4 + char.encode("utf-8")[0]


def gbnf_literal(text: str) -> str:
    """A GBNF string literal of *text*, every character escaped."""
    return '"' + "".join(f"\\U{ord(c):08X}" for c in text) + '"'


@st.composite
def generations(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(st.sampled_from([BMP_CHARS, ASTRAL_CHARS]))
    chars = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=True))
    words = draw(st.lists(st.sampled_from(ASCII_WORDS), max_size=2, unique=True))
    alternatives = [gbnf_literal(c) for c in chars + words]
    grammar = f"root ::= ({' | '.join(alternatives)})+"
    bias = {str(first_byte_token(c)): draw(st.floats(1, 100).map(round)) for c in chars}
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body: dict[str, Any] = {
        "max_tokens": draw(st.integers(1, 24)),
        "temperature": 0,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "grammar": grammar,
        "logit_bias": bias,
    }
    prompt = draw(st.sampled_from(["", "a", "€ 😀", "Say\r\nsomething\u2028"]))
    if path == "/v1/completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    return {"path": path, "body": body, "alphabet": set("".join(chars + words))}


@pytest.fixture(scope="module")
def pinging(make_app: Callable[..., Flask]) -> FlaskClient:
    """An app that sends a heartbeat whenever a step takes over 1 ms."""
    app = make_app(
        LLAMA_PING_INTERVAL="0.001",
        LLAMA_MIN_PING_INTERVAL="0.001",
        LLAMA_N_THREADS=1,  # spinning threads crawl on a busy machine
    )
    return app.test_client()


def stream_bytes(client: FlaskClient, path: str, body: dict[str, Any]) -> list[bytes]:
    response = client.post(path, json={**body, "stream": True}, buffered=False)
    try:
        assert response.status_code == 200
        assert response.mimetype == "text/event-stream"
        return list(response.response)
    finally:
        response.close()


def text_of(path: str, chunk: dict[str, Any]) -> str:
    choice = chunk["choices"][0]
    if path == "/v1/completions":
        return choice["text"]
    return choice["delta"].get("content") or ""


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=generations(), data=st.data())
def test_streamed_multibyte_text_equals_the_whole(
    pinging: FlaskClient, case: dict[str, Any], data: st.DataObject
) -> None:
    path, body = case["path"], case["body"]
    whole = pinging.post(path, json=body)
    assert whole.status_code == 200, whole.get_data()
    choice = whole.json["choices"][0]
    expected = choice["text"] if "text" in choice else choice["message"]["content"]

    raw = b"".join(stream_bytes(pinging, path, body))
    hypothesis.event("multibyte output" if not expected.isascii() else "ASCII")
    hypothesis.event("with heartbeats" if PING in raw else "no heartbeat")
    chunks = data.draw(splits(raw))
    for parse in PARSERS.values():
        events = parse(chunks)
        assert events[-1] == Event("[DONE]")
        payloads = [json.loads(e.data) for e in events[:-1]]
        assert all("error" not in p for p in payloads), payloads
        streamed = "".join(text_of(path, p) for p in payloads)
        assert streamed == expected
    # Valid text made of the characters the grammar allows: the multibyte
    # characters came through whole, none cut into replacement characters.
    assert set(expected) <= case["alphabet"], expected
    expected.encode("utf-8")


def test_multibyte_generation_really_happens(pinging: FlaskClient) -> None:
    """The property above is not vacuous: the bias does win multibyte output."""
    body = {
        "prompt": "a",
        "max_tokens": 12,
        "temperature": 0,
        "grammar": 'root ::= ("\\u20AC" | "\\u6F22" | "a")+',
        "logit_bias": {str(first_byte_token("€")): 100},
    }
    text = pinging.post("/v1/completions", json=body).json["choices"][0]["text"]
    assert text == "€€€€"
    raw = b"".join(stream_bytes(pinging, "/v1/completions", body))
    events = openai_parse([raw[i : i + 1] for i in range(len(raw))])
    assert "".join(json.loads(e.data)["choices"][0]["text"] for e in events[:-1]) == (
        "€€€€"
    )


class EarlyWakes:
    """A wait that ends early twice (woken for an earlier token), then succeeds."""

    def __init__(self) -> None:
        self.calls: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.calls.append(timeout)
        return len(self.calls) > 2


def test_an_early_wake_is_no_heartbeat() -> None:
    """A ping came mid-stream with a 30 s interval when a wait ended early."""
    waitable = EarlyWakes()
    assert list(pings(waitable, 30.0)) == []
    assert len(waitable.calls) == 3
    # Each wait is for what is left of the interval, not a new one.
    assert all(t is not None and 29 < t <= 30 for t in waitable.calls)


def test_a_whole_silent_interval_is_one_heartbeat() -> None:
    class Slow:
        def __init__(self) -> None:
            self.n = 0

        def wait(self, timeout: float | None = None) -> bool:
            self.n += 1
            if self.n <= 2:
                time.sleep(timeout or 0)
                return False
            return True

    assert list(pings(Slow(), 0.05)) == [PING, PING]


class Sleeps:
    """A wait that sleeps *first* seconds and succeeds, or sleeps its timeout."""

    def __init__(self, first: float | None = None) -> None:
        self.first = first
        self.calls: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.calls.append(timeout)
        if self.first is not None:
            time.sleep(self.first)
            return True
        time.sleep(timeout or 0)
        return len(self.calls) > 1


def test_silence_is_counted_across_waits() -> None:
    """A queued stream waited for its turn, then for its prompt: two silences
    of 0.7 and 0.5 intervals made one of 1.2 intervals with no ping."""
    heartbeat = Heartbeat()
    assert list(pings(Sleeps(first=0.07), 0.1, heartbeat=heartbeat)) == []
    prompt = Sleeps()
    assert list(pings(prompt, 0.1, heartbeat=heartbeat)) == [PING]
    assert prompt.calls[0] is not None and prompt.calls[0] < 0.04
    # The ping counts as a frame: the next silence starts there.
    assert time.monotonic() - heartbeat.last < 0.11


def test_a_frame_restarts_the_silence() -> None:
    heartbeat = Heartbeat()
    list(pings(Sleeps(first=0.07), 0.1, heartbeat=heartbeat))
    heartbeat.sent(b"data: {}\n\n")
    waitable = Sleeps(first=0.0)
    list(pings(waitable, 0.1, heartbeat=heartbeat))
    assert waitable.calls[0] is not None and waitable.calls[0] > 0.09
    before = heartbeat.last
    assert heartbeat.sent(b"") == b"" and heartbeat.last == before
