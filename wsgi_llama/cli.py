"""``wsgi-llama``: serve a model under gunicorn's gevent worker in one command.

It only translates options into ``LLAMA_*`` environment variables and runs
``gunicorn -k gevent wsgi_llama:app``; gunicorn's own options follow ``--``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

OPTIONS = {
    "model": "LLAMA_MODEL",
    "alias": "LLAMA_MODEL_ALIAS",
    "config_file": "LLAMA_CONFIG_FILE",
    "ping_interval": "LLAMA_PING_INTERVAL",
    "api_key": "LLAMA_API_KEY",
    "n_ctx": "LLAMA_N_CTX",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="wsgi-llama",
        description="Serve a GGUF model with an OpenAI-compatible API under "
        "gunicorn's gevent worker. Extra gunicorn options go after '--'.",
    )
    parser.add_argument("--model", help="GGUF file (default: Gemma 3 270M demo)")
    parser.add_argument("--alias", help="name clients use (default: file stem)")
    parser.add_argument("--config-file", help="llama-cpp-python-style JSON/YAML")
    parser.add_argument("--ping-interval", help="heartbeat seconds; 0 turns off")
    parser.add_argument("--api-key", help="required bearer key(s), comma-separated")
    parser.add_argument("--n-ctx", help="context length in tokens")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="each loads the model")
    parser.add_argument("gunicorn_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for option, key in OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            os.environ[key] = str(value)
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gevent",
        "--bind",
        f"{args.host}:{args.port}",
        "--workers",
        str(args.workers),
        *args.gunicorn_args,
        "wsgi_llama:app",
    ]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
