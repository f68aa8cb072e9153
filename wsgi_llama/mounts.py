"""Where each mount of the API keeps its state, and the models mounts share.

A *mount* is one registration of the blueprint. Each has its own settings
(the app's ``LLAMA_*`` keys overlaid with the mount's own), so ``/v1`` can
send heartbeats while ``/compat`` sends none. The models are the app's: two
mounts naming the same file with the same llama.cpp options share one loaded
copy, and with it its queue, since one context runs one request at a time.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flask import Flask
from flask.sansio.blueprints import BlueprintSetupState

from .config import ModelSettings, Settings, load_settings, mount_config
from .metrics import Metrics
from .pool import Model, Pool
from .shutdown import Shutdown
from .threads import Runner

EXTENSION = "wsgi_llama"


@dataclass
class Server:
    """One mount's settings and models; the app's thread runner and shutdown."""

    settings: Settings
    pool: Pool
    runner: Runner
    #: Ends the app's streams before gunicorn kills the worker on shutdown.
    shutdown: Shutdown = field(default_factory=Shutdown)
    #: The app's metrics, or ones that record nothing (``LLAMA_METRICS=0``).
    metrics: Metrics = field(default_factory=lambda: Metrics(enabled=False))


class ModelRegistry:
    """The models loaded in one app, keyed by file and llama.cpp options.

    A model is loaded once however many mounts name it. A mount that calls it
    by another alias gets a shallow copy: the same llama.cpp context and queue.
    """

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], Model] = {}
        self._users: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._loaded)

    def users(self, model: Model) -> int:
        """How many mounts use *model*'s loaded copy."""
        return self._users.get(
            self._key_of(model.path, model.options, model.parallel), 0
        )

    def get(self, settings: ModelSettings, server: Settings) -> Model:
        """The loaded copy of the model *settings* name, for a mount's *server*
        settings: loaded now unless another mount has it with as many sequences."""
        key = self._key_of(settings.path, settings.options, server.parallel)
        with self._lock:
            model = self._loaded.get(key)
            if model is None:
                model = self._loaded[key] = Model(settings, server)
            else:
                # One queue for the shared context: the longest mount's length;
                # one prompt cache: the largest mount's.
                model.queue.limit = max(model.queue.limit, server.queue_size)
                if model.engine is not None:
                    model.engine.keep_prompts(server.prompt_cache)
            self._users[key] = self._users.get(key, 0) + 1
        if model.alias != settings.alias:
            model = copy.copy(model)
            model.alias = settings.alias
        return model

    @staticmethod
    def _key_of(
        path: Path, options: Mapping[str, Any], parallel: int
    ) -> tuple[str, str, int]:
        # LLAMA_PARALLEL shapes the context (its sequences): another copy.
        resolved = str(Path(path).resolve())
        options_key = json.dumps(dict(options), sort_keys=True, default=repr)
        return resolved, options_key, parallel


class Mounts(dict[str, Server]):
    """``app.extensions["wsgi_llama"]``: each mount's :class:`Server` by blueprint name.

    With a single mount it also stands for that mount (``.settings``,
    ``.pool``), as the one Server stored there before mounts had their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.models = ModelRegistry()
        self.runner = Runner()
        self.shutdown = Shutdown()
        #: The app's metrics, made by the first mount that has them on.
        self.metrics: Metrics | None = None

    def __getattr__(self, name: str) -> Any:
        if name in _SERVER_FIELDS and len(self) == 1:
            return getattr(next(iter(self.values())), name)
        raise AttributeError(
            f"{name!r}: this app has {len(self)} wsgi-llama mounts; "
            f"index by blueprint name: {', '.join(self) or 'none'}"
        )


_SERVER_FIELDS = {f.name for f in fields(Server)}


def registered_name(state: BlueprintSetupState) -> str:
    """The name Flask gives this registration (``request.blueprint`` in views)."""
    return f"{state.name_prefix}.{state.name}".lstrip(".")


def setup(state: BlueprintSetupState, config: Mapping[str, Any] | None) -> Server:
    """Load a mount's settings and models; raise ConfigError on a bad setting."""
    app: Flask = state.app
    mounts = app.extensions.get(EXTENSION)
    if mounts is None:
        mounts = app.extensions[EXTENSION] = Mounts()
    settings = load_settings(mount_config(app.config, config))
    pool = Pool([mounts.models.get(m, settings) for m in settings.models])
    server = mounts[registered_name(state)] = Server(
        settings, pool, mounts.runner, mounts.shutdown
    )
    if settings.metrics:
        if mounts.metrics is None:
            mounts.metrics = Metrics.for_app(True)
        server.metrics = mounts.metrics
        for model in pool.models.values():
            mounts.metrics.watch(model.queue, model.alias)
    return server
