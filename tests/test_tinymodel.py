"""Check that the tiny test model behaves as the rest of the test suite assumes."""

from __future__ import annotations

import pathlib

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tinymodel import write_tiny_model

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again?"},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module")
def llm(model_path: pathlib.Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=512, verbose=False)


def test_file_is_small_and_deterministic(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    assert model_path.stat().st_size < 1_000_000
    assert write_tiny_model(tmp_path / "a.gguf").read_bytes() == model_path.read_bytes()
    assert (
        write_tiny_model(tmp_path / "b.gguf", seed=1).read_bytes()
        != model_path.read_bytes()
    )


def test_model_shape(model_path: pathlib.Path) -> None:
    big = llama_cpp.Llama(model_path=str(model_path), n_ctx=4096, verbose=False)
    assert big.n_ctx() == 4096
    assert big.metadata["llama.context_length"] == "4096"
    assert big.n_vocab() == 260
    assert (big.token_bos(), big.token_eos()) == (1, 2)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        " leading and  double spaces ",
        "a\nb\r\nc\td\x00",
        "emoji 😀🎉, CJK 漢字テスト",
        "<s></s>",
    ],
)
def test_tokenize_round_trip(llm: llama_cpp.Llama, text: str) -> None:
    data = text.encode()
    tokens = llm.tokenize(data, add_bos=False)
    assert len(tokens) == len(data)  # one token per byte
    assert llm.detokenize(tokens) == data
    assert llm.tokenize(data) == [llm.token_bos(), *tokens]


def test_chat_template(llm: llama_cpp.Llama) -> None:
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(
        template=template, eos_token="</s>", bos_token="<s>"
    )
    prompt = formatter(messages=MESSAGES).prompt
    assert prompt == (
        "<|system|>\nBe brief.\n<|user|>\nHi!\n"
        "<|assistant|>\nHello.\n<|user|>\nAgain?\n<|assistant|>\n"
    )

    result = llm.create_chat_completion(messages=MESSAGES, max_tokens=20)
    assert result["choices"][0]["finish_reason"] == "length"
    # One token per byte; no BOS: Jinja2ChatFormatter leaves that to the template.
    assert result["usage"]["prompt_tokens"] == len(prompt.encode())
    assert result["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_max_tokens_honoured(
    tmp_path_factory: pytest.TempPathFactory, seed: int, temperature: float
) -> None:
    path = tmp_path_factory.getbasetemp() / f"tiny-{seed}.gguf"
    if not path.exists():
        write_tiny_model(path, seed=seed)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, seed=seed, verbose=False)
    result = llm.create_completion("Hello", max_tokens=300, temperature=temperature)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 300
    assert result["choices"][0]["text"].isascii()


def test_streaming(llm: llama_cpp.Llama) -> None:
    chunks = list(llm.create_completion("Hello", max_tokens=50, stream=True))
    assert len(chunks) == 51  # one per token, then the finish_reason chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 50
