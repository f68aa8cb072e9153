"""Entry point for Phusion Passenger (cPanel "Setup Python App") and mod_wsgi.

Set LLAMA_MODEL (and other LLAMA_* keys) in the hosting panel's environment
variables, or here before the import. Without gevent, wsgi-llama runs
llama.cpp in ordinary threads; heartbeats still flow.
"""

from wsgi_llama import app as application  # noqa: F401
