"""The OpenAI-compatible API as a Flask blueprint.

Views are synchronous. Every llama.cpp call runs in a native thread through
the app's :class:`~.threads.Runner`; a streaming view returns the generator
from :mod:`.stream`, which interleaves heartbeats while the model works.
"""

from __future__ import annotations

import functools
import hmac
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any, NoReturn

from flask import Blueprint, Response, current_app, jsonify, request
from flask.sansio.blueprints import BlueprintSetupState
from llama_cpp import llama_chat_format
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)

from . import errors, mounts, openapi, playground, responses, schemas, stream
from .batched import Choices, EngineLlama, Pump, Unbatchable
from .config import Settings
from .errors import APIError
from .mounts import EXTENSION, Server
from .pool import Model, QueueTimeout
from .threads import Signal

#: Why a request runs one at a time where the model has no engine.
ALONE = "this model runs one request at a time"

#: Served without an API key: the health check, the playground's page and
#: files (the page asks for the key and sends it with its API calls), and the
#: catch-all's 404s and 405s under a mount.
OPEN_ENDPOINTS = ("health", "unknown_route", *playground.OPEN_ENDPOINTS)
#: Methods the catch-all under a mount's prefix answers (with a 404 or 405).
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

log = logging.getLogger("wsgi_llama")


def create_blueprint(
    config: Mapping[str, Any] | None = None,
    name: str = "wsgi_llama",
    url_prefix: str | None = None,
) -> Blueprint:
    """The API as a blueprint; registering it loads the models its settings name.

    :param config: ``LLAMA_*`` keys for this mount only, over the app's config;
        a blueprint registered twice (``name=`` differing) is two mounts with
        these same keys. Mounts naming the same model file share one copy.
    :raises ConfigError: on registration, for a bad setting; it names the key.
    """
    own = dict(config or {})
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    bp.record(lambda state: _setup(state, own))
    bp.before_request(lambda: _server().metrics.started())
    bp.before_request(_guard)
    bp.after_request(_cors)
    bp.after_request(lambda response: _server().metrics.answered(response))
    errors.register(bp)

    bp.get("/health")(health)
    bp.get("/metrics")(metrics)
    bp.get("/openapi.json")(openapi_json)
    bp.get("/v1/models")(list_models)
    bp.get("/v1/models/<path:model_id>")(get_model)
    bp.post("/v1/completions")(completions)
    bp.post("/v1/chat/completions")(chat_completions)
    bp.post("/v1/embeddings")(embeddings)
    bp.post("/extras/tokenize")(tokenize)
    bp.post("/extras/tokenize/count")(tokenize_count)
    bp.post("/extras/detokenize")(detokenize)
    playground.register(bp, _server)
    return bp


def _setup(state: BlueprintSetupState, config: Mapping[str, Any]) -> None:
    mounts.setup(state, config)
    if state.url_prefix and state.url_prefix.strip("/"):
        # Inside a host app: unknown routes under the prefix get OpenAI's
        # shape from this mount's handlers; the host's 404 page stays its own.
        # Werkzeug prefers a rule that accepts the method, and any static
        # route beats this one, so it only catches what nothing else would.
        state.add_url_rule(
            "/<path:_rest>", "unknown_route", _unknown_route, methods=_METHODS
        )


def _server() -> Server:
    """The state of the mount serving this request."""
    return current_app.extensions[EXTENSION][request.blueprint]


def _guard() -> Response | None:
    settings = _server().settings
    if request.method == "OPTIONS" and settings.cors_origins:
        return current_app.make_default_options_response()
    request.max_content_length = settings.max_request_bytes
    endpoint = (request.endpoint or "").rpartition(".")[2]
    public = OPEN_ENDPOINTS if settings.metrics_auth else (*OPEN_ENDPOINTS, "metrics")
    if settings.api_keys and endpoint not in public:
        _authenticate(settings.api_keys)
    return None


def _unknown_route(_rest: str) -> NoReturn:
    """404, or 405 with ``Allow`` when the path exists for other methods."""
    adapter = current_app.create_url_adapter(request)
    allowed = set()
    for method in _METHODS:
        try:
            rule, _ = adapter.match(method=method, return_rule=True)  # type: ignore[union-attr]
        except HTTPException:
            continue
        if rule is not request.url_rule:
            allowed.add(method)
    if allowed:
        raise MethodNotAllowed(valid_methods=sorted(allowed))
    raise NotFound()


def _authenticate(keys: tuple[str, ...]) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            401,
            code="invalid_api_key",
            type="invalid_request_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    supplied = given.strip().encode()
    matched = False
    for key in keys:  # no early exit: the time taken says nothing of the keys
        matched |= hmac.compare_digest(supplied, key.encode())
    if not matched:
        raise APIError(
            "Incorrect API key provided.",
            401,
            code="invalid_api_key",
            type="invalid_request_error",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _cors(response: Response) -> Response:
    origins = _server().settings.cors_origins
    origin = request.headers.get("Origin")
    if origin and origins and ("*" in origins or origin in origins):
        response.headers["Access-Control-Allow-Origin"] = (
            "*" if "*" in origins else origin
        )
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.vary.add("Origin")
    return response


def health() -> Response:
    return jsonify({"status": "ok"})


def metrics() -> Response:
    """Prometheus' text format; ``LLAMA_METRICS=0`` turns the route off."""
    server = _server()
    if not server.settings.metrics:
        raise APIError(f"Unknown route {request.path!r}.", 404, code="not_found")
    return server.metrics.exposition()


def openapi_json() -> Response:
    """This API's description, with the prefix it is mounted under."""
    mount = (
        request.url_rule.rule.removesuffix("/openapi.json") if request.url_rule else ""
    )
    return jsonify(openapi.document(request.script_root + mount))


def list_models() -> Response:
    models = _server().pool.models.values()
    return jsonify({"object": "list", "data": [m.describe() for m in models]})


def get_model(model_id: str) -> Response:
    pool = _server().pool
    if model_id not in pool.models:
        raise APIError(
            f"The model {model_id!r} does not exist.", 404, code="model_not_found"
        )
    return jsonify(pool.models[model_id].describe())


def completions() -> Response:
    body = schemas.parse(schemas.CompletionRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    kwargs = _sampling(body, model, server)
    prompt = body.prompt
    echo = body.echo and prompt != ""
    if prompt == "" and model.llama.token_bos() >= 0:
        # llama-cpp-python would start the completion itself with BOS.
        prompt = [model.llama.token_bos()]
    if isinstance(prompt, list):
        if echo:
            raise APIError("echo needs a text prompt, not token ids.", param="echo")
        model.check_tokens(prompt, "prompt")
        tokens = prompt
    else:
        tokens = _tokenize(server, model, prompt, "prompt")
    _check_context(model, len(tokens))
    kwargs.update(prompt=prompt, suffix=body.suffix, echo=echo, logprobs=body.logprobs)

    def one_at_a_time() -> Response:
        return _generate(
            server,
            body,
            model,
            lambda **more: model.llama.create_completion(**kwargs, **more),
            body.logprobs is not None,
            responses.completion_chunk,
            responses.completion,
        )

    if model.engine is None:
        return _alone(model, body, ALONE, one_at_a_time)
    if echo or body.suffix is not None:
        why = "it asks for echo" if echo else "it has a suffix"
        return _alone(model, body, why, one_at_a_time)
    batched = {**kwargs, "prompt": tokens}
    return _batched(
        server,
        body,
        model,
        lambda llama, **more: llama.create_completion(**batched, **more),
        responses.completion_chunk,
        responses.completion,
        one_at_a_time,
    )


def chat_completions() -> Response:
    body = schemas.parse(schemas.ChatCompletionRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    kwargs = _sampling(body, model, server)
    messages = [message.to_llama() for message in body.messages]
    # A lower bound of the templated prompt: catches most prompts that are too
    # long while a 400 can still be sent; llama.cpp catches the rest.
    text = "".join(m["content"] or "" for m in messages)
    _check_context(
        model, len(_tokenize(server, model, text, "messages", add_bos=False))
    )
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    functions = [f.model_dump(exclude_none=True) for f in body.functions or []]
    for function in [t["function"] for t in tools] + functions:
        # llama-cpp-python indexes it unconditionally.
        function.setdefault("parameters", {"type": "object", "properties": {}})
    kwargs.update(
        messages=messages,
        response_format=_response_format(body, model, server),
        tools=tools or None,
        tool_choice=_tool_choice(body, tools, model, server),
        functions=functions or None,
        function_call=_function_call(body, functions, model, server),
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
    )

    def one_at_a_time() -> Response:
        return _generate(
            server,
            body,
            model,
            lambda **more: model.llama.create_chat_completion(**kwargs, **more),
            body.logprobs,
            responses.chat_chunk,
            responses.chat_completion,
        )

    handler = _chat_handler(model.llama)
    if model.engine is None or not _templates_only(handler):
        why = ALONE if model.engine is None else "its chat handler generates by itself"
        return _alone(model, body, why, one_at_a_time)
    return _batched(
        server,
        body,
        model,
        lambda llama, **more: handler(llama=llama, **kwargs, **more),
        responses.chat_chunk,
        responses.chat_completion,
        one_at_a_time,
    )


def _chat_handler(llama: Any) -> Callable[..., Any]:
    """The handler llama-cpp-python's create_chat_completion would use."""
    return (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format)
        or llama_chat_format.get_chat_completion_handler(llama.chat_format)
    )


def _templates_only(handler: Callable[..., Any]) -> bool:
    """Whether *handler* only templates and calls create_completion once.

    Handlers made from a chat format or a Jinja template do; others (tool
    calling handlers, for one) drive the model themselves.
    """
    name = getattr(handler, "__qualname__", "")
    return name.startswith("chat_formatter_to_chat_completion_handler.")


def _alone(
    model: Model,
    body: schemas.Sampling,
    why: str,
    one_at_a_time: Callable[[], Response],
) -> Response:
    """Run a request the engine does not take one at a time, saying *why*.

    Several choices are sequences of the engine: ``n`` above 1 is a 400 here.
    """
    if body.n > 1:
        raise APIError(
            f"n above 1 needs the batching engine (LLAMA_PARALLEL above 1), and {why}.",
            param="n",
        )
    if model.engine is not None:
        model.engine.stats["exclusive_requests"] += 1
        log.info("model %r: a request runs one at a time: %s", model.alias, why)
    return one_at_a_time()


def embeddings() -> Response:
    body = schemas.parse(schemas.EmbeddingRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    if not model.embedding:
        raise APIError(
            f"The model {model.alias!r} was not loaded for embeddings; "
            "set 'embedding: true' for it in the config file.",
            param="model",
        )
    texts = []
    for i, item in enumerate(body.texts_and_tokens()):
        if isinstance(item, list):  # llama-cpp-python embeds text only
            model.check_tokens(item, f"input[{i}]")
            item = server.runner.call(model.llama.detokenize, item).decode(
                "utf-8", errors="replace"
            )
        model.check_text(item, "input")
        texts.append(item)
    result = _run(
        server,
        model,
        lambda: model.llama.create_embedding(texts, model=model.alias),
        nullcontext,
    )
    return responses.json_response(responses.embeddings(result, body.encoding_format))


def tokenize() -> Response:
    body = schemas.parse(schemas.TokenizeRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    return jsonify(
        {"tokens": _tokenize(server, model, body.input, "input", whole=False)}
    )


def tokenize_count() -> Response:
    body = schemas.parse(schemas.TokenizeRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    return jsonify(
        {"count": len(_tokenize(server, model, body.input, "input", whole=False))}
    )


def detokenize() -> Response:
    body = schemas.parse(schemas.DetokenizeRequest, _body())
    server = _server()
    model = server.pool.get(body.model)
    model.check_tokens(body.tokens, "tokens")
    text = server.runner.call(model.llama.detokenize, body.tokens)
    return jsonify({"text": text.decode("utf-8", errors="replace")})


def _body() -> bytes:
    """The request body, with the size limit held for chunked bodies too."""
    data = request.get_data()
    limit = request.max_content_length
    # Werkzeug stops reading a body without Content-Length at the limit and
    # does not say so: the rest would be silently dropped.
    if request.content_length is None and limit is not None and len(data) >= limit:
        raise RequestEntityTooLarge()
    return data


def _tokenize(
    server: Server,
    model: Model,
    text: str,
    param: str,
    add_bos: bool = True,
    whole: bool = True,
) -> list[int]:
    model.check_text(text, param, whole)
    # Vocabulary look-ups only: safe beside a generation, so no queue.
    return server.runner.call(
        model.llama.tokenize, text.encode("utf-8"), add_bos=add_bos, special=True
    )


def _check_context(model: Model, n_prompt: int) -> None:
    if n_prompt >= model.n_ctx:
        raise APIError(
            f"This model's context is {model.n_ctx} tokens; the prompt has "
            f"{n_prompt}. Shorten the prompt.",
            param="messages" if request.path.endswith("chat/completions") else "prompt",
            code="context_length_exceeded",
        )


def _sampling(body: schemas.Sampling, model: Model, server: Server) -> dict[str, Any]:
    """llama-cpp-python keyword arguments for the fields both endpoints share."""
    model.check_tokens(body.bias_tokens(), "logit_bias")
    cap = server.settings.max_tokens
    max_tokens = body.max_tokens or None  # llama-cpp-python: None runs to n_ctx
    if cap is not None:
        max_tokens = min(max_tokens or cap, cap)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    kwargs: dict[str, Any] = {
        "model": model.alias,
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "typical_p": body.typical_p,
        "repeat_penalty": body.repeat_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "mirostat_mode": body.mirostat_mode,
        "mirostat_tau": body.mirostat_tau,
        "mirostat_eta": body.mirostat_eta,
        "stop": [s for s in stop if s],  # "" would match at once
        "seed": body.seed,
        "logit_bias": body.logit_bias,
    }
    if body.grammar:
        kwargs["grammar"] = server.runner.call(model.grammar, body.grammar, "grammar")
    return kwargs


def _response_format(
    body: schemas.ChatCompletionRequest, model: Model, server: Server
) -> dict[str, Any] | None:
    fmt = body.response_format.to_llama() if body.response_format else None
    if fmt is not None and "schema" in fmt:
        # Checked here, not left to llama-cpp-python: see Model.grammar.
        server.runner.call(model.json_grammar, fmt["schema"], "response_format")
    return fmt


def _tool_choice(
    body: schemas.ChatCompletionRequest,
    tools: list[dict[str, Any]],
    model: Model,
    server: Server,
) -> Any:
    choice = body.tool_choice
    if not isinstance(choice, dict):
        return choice
    name = (choice.get("function") or {}).get("name")
    functions = [tool["function"] for tool in tools]
    _forced_function(name, functions, "tool_choice", "tools", model, server)
    return {"type": "function", "function": {"name": name}}


def _function_call(
    body: schemas.ChatCompletionRequest,
    functions: list[dict[str, Any]],
    model: Model,
    server: Server,
) -> Any:
    call = body.function_call
    if not isinstance(call, dict) or "name" not in call:
        return call
    name = call["name"]
    _forced_function(name, functions, "function_call", "functions", model, server)
    return {"name": name}


def _forced_function(
    name: Any,
    functions: list[dict[str, Any]],
    param: str,
    listed_in: str,
    model: Model,
    server: Server,
) -> None:
    """Check a forced function: llama-cpp-python builds a grammar from it."""
    function = next((f for f in functions if f["name"] == name), None)
    if function is None:
        raise APIError(
            f"{param} names {name!r}, which is not among the {listed_in}.",
            param=param,
        )
    server.runner.call(model.json_grammar, function["parameters"], listed_in)


def _generate(
    server: Server,
    body: schemas.Sampling,
    model: Model,
    call: Callable[..., Any],
    logprobs: bool,
    shape_chunk: Callable[[dict[str, Any], bool], dict[str, Any]],
    shape_result: Callable[[dict[str, Any]], dict[str, Any]],
) -> Response:
    """Run a generation request, streamed or whole, in the model's turn."""
    logits = model.llama.all_logits if logprobs else nullcontext
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(
            server,
            body,
            model,
            lambda: call(stream=True),
            lambda chunk: shape_chunk(chunk, include_usage),
            include_usage,
            logits,
        )
    result = _run(server, model, call, logits)
    usage = result.get("usage") or {}
    server.metrics.tokens(
        model.alias, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    )
    return responses.json_response(shape_result(result))


def _client_gone(environ: dict[str, Any]) -> bool:
    """Whether the client closed its connection (seen on gunicorn's socket only)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _run(
    server: Server,
    model: Model,
    call: Callable[[], Any],
    logits: Callable[[], Any],
) -> Any:
    """Run one whole llama.cpp call in the model's turn, in a native thread."""
    settings = server.settings
    environ = request.environ
    ticket = model.queue.enter(model.alias)
    try:
        deadline = time.monotonic() + settings.queue_timeout
        while not ticket.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise QueueTimeout(model.alias, settings.queue_timeout)
            if _client_gone(environ):
                raise APIError("The client closed the request.", 499)
        if _client_gone(environ):
            raise APIError("The client closed the request.", 499)
        with logits():
            model.llama.cancelled = False
            step = model.runner.submit(call)
            try:
                while not step.wait(1.0):
                    if _client_gone(environ):
                        model.llama.cancelled = True  # stops at the next token
            finally:
                while not step.done():
                    step.wait()
                model.llama.cancelled = False
            try:
                return step.result()
            except Exception as exc:
                raise llama_error(exc, model) from exc
    finally:
        ticket.leave()


def _batched(
    server: Server,
    body: schemas.Sampling,
    model: Model,
    run: Callable[..., Any],
    shape_chunk: Callable[[dict[str, Any], bool], dict[str, Any]],
    shape_result: Callable[[dict[str, Any]], dict[str, Any]],
    one_at_a_time: Callable[[], Response],
) -> Response:
    """Run a generation on the engine, beside the model's other requests.

    *run(llama, stream=...)* is llama-cpp-python code (a chat handler, or
    create_completion) given an :class:`EngineLlama`. It runs in a
    :class:`Pump` until it first waits for the engine, here, so that a full
    queue is still a 503 and a request the engine cannot take goes
    *one_at_a_time*.
    """
    streaming = bool(body.stream)
    proxies: list[EngineLlama] = []
    signal = Signal() if body.n > 1 else None

    def generate_choice(choice: int) -> Callable[[Pump], Any]:
        def generate(pump: Pump) -> Any:
            llama = EngineLlama(
                model,
                server.runner.call,
                pump.wait,
                server.settings.queue_timeout,
                signal,
                choice,
            )
            proxies.append(llama)
            result = run(llama, stream=streaming)
            if not streaming:
                return result
            for chunk in result:
                pump.emit(chunk)
            return None

        return generate

    pump: Pump | Choices
    if body.n == 1:
        pump = Pump(generate_choice(0))
    else:
        pump = Choices([Pump(generate_choice(i)) for i in range(body.n)])
    try:
        first = pump.step()
    except Unbatchable as exc:
        pump.close()
        return _alone(model, body, f"it needs {exc}", one_at_a_time)
    except Exception as exc:
        pump.close()
        raise llama_error(exc, model) from exc
    if streaming:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        last: dict[str, Any] = {}

        def shape(chunk: dict[str, Any]) -> dict[str, Any]:
            last.update(chunk)
            return shape_chunk(chunk, include_usage)

        def final() -> dict[str, Any] | None:
            if not include_usage or not last:
                return None
            return responses.usage_chunk(last, proxies)  # type: ignore[arg-type]

        def counted() -> None:
            for i, llama in enumerate(proxies):
                # The choices of one request share its prompt.
                prompt = llama.prompt_tokens if i == 0 else 0
                server.metrics.tokens(model.alias, prompt, llama.completion_tokens)

        generator = server.shutdown.watch(
            stream.pumped_events(
                pump,
                first,
                shape,
                final,
                _ping_interval(body, server.settings),
                lambda exc: llama_error(exc, model),
                functools.partial(_client_gone, request.environ),
                counted,
            ),
            request.environ,
        )
        response = Response(
            server.metrics.stream(generator, model.alias),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # A server may close the response without iterating it (the client
        # left first): no ``finally`` of the generator runs then.
        response.call_on_close(pump.close)
        return response
    environ = request.environ
    look = time.monotonic() + 1.0
    try:
        kind, value = first
        while kind == "wait":
            # Once a second, tokens or not, see whether the client is still there.
            while not value.wait(max(0.0, look - time.monotonic())):
                if time.monotonic() >= look:
                    break
            if time.monotonic() >= look:
                look = time.monotonic() + 1.0
                if _client_gone(environ):
                    raise APIError("The client closed the request.", 499)
            kind, value = pump.step()
    except Exception as exc:
        raise llama_error(exc, model) from exc
    finally:
        pump.close()
    if body.n > 1:
        value = responses.merge_choices(value)
    usage = value.get("usage") or {}
    server.metrics.tokens(
        model.alias, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    )
    return responses.json_response(shape_result(value))


def _stream(
    server: Server,
    body: schemas.Sampling,
    model: Model,
    start: Callable[[], Iterator[dict[str, Any]]],
    shape: Callable[[dict[str, Any]], dict[str, Any]],
    include_usage: bool,
    logits: Callable[[], Any],
) -> Response:
    settings = server.settings
    last: dict[str, Any] = {}

    def remember(chunk: dict[str, Any]) -> dict[str, Any]:
        last.update(chunk)
        return shape(chunk)

    def final() -> dict[str, Any] | None:
        if not include_usage or not last:
            return None
        return responses.usage_chunk(last, [model.llama])

    def counted() -> None:  # in the model's turn, once the generation ends
        llama = model.llama
        server.metrics.tokens(model.alias, llama.prompt_tokens, llama.completion_tokens)

    def begin() -> Iterator[dict[str, Any]]:
        model.llama.prompt_tokens = model.llama.completion_tokens = 0
        return start()

    model.queue.check_room(model.alias)  # a 503 now, while it can be a status
    job = stream.Job(
        model=model,
        start=begin,
        shape=remember,
        final=final,
        logits=logits,
        counted=counted,
    )
    generator = server.shutdown.watch(
        stream.events(
            job,
            model.runner,
            _ping_interval(body, settings),
            settings.queue_timeout,
            lambda exc: llama_error(exc, model),
            functools.partial(_client_gone, request.environ),
        ),
        request.environ,
    )
    return Response(
        server.metrics.stream(generator, model.alias),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _ping_interval(body: schemas.Sampling, settings: Settings) -> float:
    """The server's interval, or the request's own (<= 0: off), within limits."""
    requested = body.sse_ping_interval
    if requested is None:
        return settings.ping_interval
    if requested <= 0:
        return 0.0
    return max(requested, settings.min_ping_interval)


def llama_error(exc: Exception, model: Model) -> APIError:
    """An exception from llama-cpp-python as the error a client should see."""
    if isinstance(exc, APIError):
        return exc
    message = str(exc)
    if isinstance(exc, ValueError) and "exceed context window" in message:
        return APIError(
            f"This model's context is {model.n_ctx} tokens: {message}.",
            code="context_length_exceeded",
        )
    return errors.from_exception(exc)
