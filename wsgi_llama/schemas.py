"""Request bodies, validated before any model sees them.

Field names and defaults follow llama-cpp-python's server, so its clients
work unchanged; unknown fields are ignored, as OpenAI clients send many.
Types are strict, as OpenAI's are: ``"3"`` is not a number and ``true`` not
an integer (JSON has no integer/float split, so ``1`` is a float).
Validation errors become 400s that name the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .errors import APIError

_TOKEN_ID = re.compile(r"-?[0-9]+")
_TOKEN_DIGITS = 12  # longer ids are out of any vocabulary's range
#: Choices per request (OpenAI's limit is 128): each is a sequence of the
#: engine, and beyond LLAMA_PARALLEL (8 by default) they wait for each other.
MAX_CHOICES = 16
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(strict=True)]


class Body(BaseModel):
    # Python's json accepts NaN and Infinity; no field here means them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The fields both generation endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: Probability = 0.95
    top_k: int = Field(default=40, ge=0)
    min_p: Probability = 0.05
    typical_p: Probability = 1.0
    repeat_penalty: float = Field(default=1.1, ge=0.0)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    mirostat_mode: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, ge=0.0)
    mirostat_eta: float = Field(default=0.1, ge=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    logit_bias: dict[str, float] | None = None
    grammar: str | None = None
    #: Choices, each a sequence of the engine sharing the prompt's cells.
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    sse_ping_interval: float | None = Field(default=None, le=3600)
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids, got {key[:20]!r}")
            if len(key.lstrip("-")) > _TOKEN_DIGITS:
                raise PydanticCustomError(
                    "invalid_token_id", f"token id {key[:20]}... is out of range"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be between -100 and 100, got {bias}")
        return value

    def bias_tokens(self) -> list[int]:
        return [int(key) for key in self.logit_bias or {}]


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[TokenId] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int = Field(default=1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if value == []:
            raise ValueError("must be text or a non-empty list of token ids")
        if isinstance(value, list) and isinstance(value[0], str):
            if len(value) > 1:
                raise ValueError("only one prompt per request is supported")
            return value[0]
        return value


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        # As OpenAI: only assistant messages (which may carry tool calls
        # instead) and legacy function results may go without content.
        role = info.data.get("role")
        if value is None and role not in {None, "assistant", "function"}:
            raise PydanticCustomError("missing", f"{role} messages need content")
        return value

    def to_llama(self) -> dict[str, Any]:
        """The message as llama-cpp-python's chat templates expect it."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = self.model_dump(exclude_none=True)
        message["content"] = content
        if self.role == "developer":  # templates predate this role
            message["role"] = "system"
        return message


class FunctionDefinition(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaFormat(Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    def to_llama(self) -> dict[str, Any] | None:
        """llama-cpp-python's form: a JSON object, optionally with a schema."""
        if self.type == "text":
            return None
        schema = self.schema_
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            schema = self.json_schema.schema_
        fmt: dict[str, Any] = {"type": "json_object"}
        if schema is not None:
            fmt["schema"] = schema
        return fmt


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_named(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        function = value.get("function")
        if (
            value.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise ValueError(
                'an object must be {"type": "function", "function": {"name": ...}}'
            )
        return value

    @field_validator("function_call")
    @classmethod
    def _function_named(cls, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value.get("name"), str):
            raise ValueError("an object must have a string name")
        return value


class EmbeddingRequest(Body):
    model: str | None = None
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    # The openai client asks for base64 unless told otherwise.
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == [] or (isinstance(value, list) and [] in value):
            raise ValueError("must not be empty")
        return value

    def texts_and_tokens(self) -> list[str | list[int]]:
        """Each input: a text, or a list of token ids."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]  # type: ignore[list-item]
        return list(value)  # type: ignore[arg-type]


class TokenizeRequest(Body):
    model: str | None = None
    input: str


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[TokenId]


B = TypeVar("B", bound=BaseModel)


def parse(model: type[B], raw: bytes) -> B:
    """Parse a request body; any fault is a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(
            f"The body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError("The body is nested too deeply.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("The body must be a JSON object.", code="invalid_json")
    where = _surrogate_at(data, ())
    if where is not None:
        param = _param(where) or None
        raise APIError(
            f"Invalid value for '{param}': a lone UTF-16 surrogate is not text.",
            param=param,
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _param(error["loc"])
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
            if error["msg"] != "Field required":
                message += f" {error['msg'][0].upper()}{error['msg'][1:]}."
        else:
            message = f"Invalid value for '{param}': {error['msg']}"
        code = "invalid_token_id" if error["type"] == "invalid_token_id" else None
        raise APIError(message, param=param, code=code) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_at(
    value: Any, loc: tuple[int | str, ...]
) -> tuple[int | str, ...] | None:
    """Where a string holds a lone surrogate: JSON can escape one, UTF-8 can't."""
    if isinstance(value, str):
        return loc if _SURROGATE.search(value) else None
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                return (*loc, key)
            found = _surrogate_at(item, (*loc, key))
            if found is not None:
                return found
    return None


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location in OpenAI's form, e.g. ``messages[0].role``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"str", "list[str]", "list[int]"} or "[" in str(part):
            continue  # the union member pydantic tried, not a field
        else:
            text += f".{part}" if text else str(part)
    return text
