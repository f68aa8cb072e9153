"""Write a tiny random-weight GGUF model for fast tests that still run real llama.cpp.

Real models are hundreds of megabytes and slow to load; this one is about 0.5 MB,
loads in milliseconds and generates thousands of tokens per second, yet it goes
through the same llama.cpp code paths (GGUF loading, tokenizer, chat template,
sampling) as a real ``llama`` model.

Design choices:

* Byte-level SentencePiece vocabulary (``<unk>``, ``<s>``, ``</s>``, ``▁`` and the
  256 ``<0xNN>`` byte tokens), so any UTF-8 text tokenizes to bytes and detokenizes
  back exactly. The ``▁`` token is needed because llama.cpp's SPM tokenizer turns
  spaces into U+2581 before tokenizing; without a token for it a space would
  round-trip to ``▁`` via byte fallback.
* The output projection has large random rows only for the byte tokens of
  ``[A-Za-z0-9 .,]`` and zero rows for everything else: EOS (and other tokens)
  get logit 0 while the top logits are ~50, so generation practically never stops
  early. Keeping the output ASCII also matters: llama-cpp-python keeps generating
  past ``max_tokens`` while the text ends in an incomplete UTF-8 sequence, so
  random high bytes would make ``max_tokens=N`` yield more than N tokens.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 4096

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_BYTE_ID = 4
OUTPUT_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,"


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", "\u2581"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL, tt.NORMAL] + [tt.BYTE] * 256
    return tokens, [0.0] * len(tokens), [int(t) for t in types]


def write_tiny_model(path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Write a tiny random ``llama`` GGUF model to ``path`` and return the path."""
    path = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    def rand(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        """Random (out, in) matrix; default std 1/sqrt(in) keeps activations O(1)."""
        std = cols**-0.5 if std is None else std
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-test-model")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are (out_features, in_features); GGUF reverses them.
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    allowed = [FIRST_BYTE_ID + b for b in OUTPUT_CHARS]
    output[allowed] = rand(len(allowed), N_EMBD, std=3.0)
    ones = np.ones(N_EMBD, dtype=np.float32)
    writer.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD, std=1.0))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", rand(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones)
        writer.add_tensor(f"{blk}.ffn_gate.weight", rand(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", rand(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", rand(N_EMBD, N_FF))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
