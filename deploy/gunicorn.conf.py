"""gunicorn settings for wsgi-llama.

Use: ``gunicorn -c deploy/gunicorn.conf.py wsgi_llama:app``. Model settings
come from ``LLAMA_*`` environment variables (see README.rst).
"""

import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
# llama.cpp runs in native threads, so the gevent hub stays free for
# heartbeats, other clients and the arbiter's worker heartbeat.
worker_class = "gevent"
# Each worker loads its own copy of the model and uses every core while it
# generates: one worker per machine is usually right; add workers for
# availability (a killed worker is replaced while the others serve).
workers = int(os.environ.get("WORKERS", "1"))
worker_connections = 1000
# Not a request time limit under gevent: only how long the arbiter waits for
# a silent worker. Long generations are fine.
timeout = 60
graceful_timeout = 30
keepalive = 5
