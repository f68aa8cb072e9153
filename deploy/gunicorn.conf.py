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


# /metrics in multiprocess mode: every worker writes its values to files in
# one directory and a scrape of any worker adds them up. Without these hooks,
# workers share a directory named after the master, left in the temporary
# directory when it exits; with them, one made here and removed at the end.
_metrics_dir = None


def on_starting(server):
    global _metrics_dir
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        _metrics_dir = tempfile.mkdtemp(prefix="wsgi-llama-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def child_exit(server, worker):
    # A dead worker's gauges (queue depth, active generations) stop counting;
    # its counters stay in the totals.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir is not None:
        import shutil

        shutil.rmtree(_metrics_dir, ignore_errors=True)
