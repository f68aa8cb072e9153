"""Shaping llama-cpp-python's results into what OpenAI's schemas require.

llama-cpp-python leaves out fields the schemas mark required-but-nullable
(``refusal`` on messages, ``logprobs`` on choices) and reports no usage when
streaming; strict clients and validators reject that.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from flask import Response

from .pool import Llama
from .sse import plain


def json_response(payload: Any, status: int = 200) -> Response:
    text = json.dumps(payload, ensure_ascii=False, default=plain)
    return Response(text, status, mimetype="application/json")


def usage(llama: Llama) -> dict[str, int]:
    """Token counts of the generation that just ran on *llama*."""
    return {
        "prompt_tokens": llama.prompt_tokens,
        "completion_tokens": llama.completion_tokens,
        "total_tokens": llama.prompt_tokens + llama.completion_tokens,
    }


def completion(result: dict[str, Any]) -> dict[str, Any]:
    for choice in result["choices"]:
        choice.setdefault("logprobs", None)
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
    return result


def chat_completion(result: dict[str, Any]) -> dict[str, Any]:
    for choice in result["choices"]:
        message = choice["message"]
        message.setdefault("content", None)
        message.setdefault("refusal", None)
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        if message.get("function_call") is None:
            message.pop("function_call", None)
        choice.setdefault("logprobs", None)
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
    return result


def chat_chunk(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    for choice in chunk["choices"]:
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
        delta = choice.get("delta", {})
        if delta.get("function_call") is None:
            delta.pop("function_call", None)
        for key in ("tool_calls", "role"):  # null is not allowed for either
            if delta.get(key) is None:
                delta.pop(key, None)
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    for choice in chunk["choices"]:
        choice.setdefault("logprobs", None)
    if include_usage:
        chunk["usage"] = None
    return chunk


def embeddings(result: dict[str, Any], encoding: str) -> dict[str, Any]:
    """One vector per input, as OpenAI returns, as floats or base64.

    A model without a pooling type of its own yields a vector per token;
    their mean is the usual sentence embedding.
    """
    for item in result["data"]:
        vector = np.asarray(item["embedding"], dtype="<f4")
        if vector.ndim == 2:
            vector = vector.mean(axis=0)
        if encoding == "base64":
            item["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")
        else:
            item["embedding"] = vector.tolist()
    return result


def usage_chunk(last: dict[str, Any], llamas: list[Llama]) -> dict[str, Any]:
    """The extra last chunk ``stream_options.include_usage`` asks for, with
    one of *llamas* per choice."""
    return {
        "id": last["id"],
        "object": last["object"],
        "created": last["created"],
        "model": last["model"],
        "choices": [],
        "usage": total_usage([usage(llama) for llama in llamas]),
    }


def total_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    """The usage of a request's choices: they share its prompt, counted once."""
    prompt = usages[0]["prompt_tokens"]
    completion = sum(u["completion_tokens"] for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def merge_choices(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of the choices' results, their choices in order."""
    merged = dict(results[0])
    merged["choices"] = [
        {**choice, "index": i}
        for i, result in enumerate(results)
        for choice in result["choices"]
    ]
    merged["usage"] = total_usage([r["usage"] for r in results])
    return merged
