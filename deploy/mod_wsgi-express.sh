#!/bin/sh
# mod_wsgi-express (README.rst, "mod_wsgi-express"): Apache and mod_wsgi from
# PyPI, no Apache configuration to write. Needs Apache's headers to build:
#   apt-get install apache2 apache2-dev python3-dev
#   /usr/bin/python3 -m venv /srv/wsgi-llama/venv
#   /srv/wsgi-llama/venv/bin/pip install wsgi-llama mod-wsgi
# Defaults that break long generations are raised here: request-timeout (60 s
# by default) would restart the daemon mid-stream and reload the model.
# As root, --user/--group name the unprivileged user the daemon runs as. It
# passes the Authorization header (LLAMA_API_KEY) and uses the main
# interpreter (%{GLOBAL}) by default. The daemon's working directory is named:
# by default it is wherever this script is run from, and a directory the
# daemon's user cannot enter (/root, a private /tmp/...) leaves it restarting
# every 20 s with "Unable to change working directory", never serving.
exec /srv/wsgi-llama/venv/bin/mod_wsgi-express start-server \
    /srv/wsgi-llama/app/wsgi_llama.wsgi \
    --working-directory /srv/wsgi-llama/app \
    --host 127.0.0.1 --port 8000 \
    --user www-data --group www-data \
    --server-root /srv/wsgi-llama/express \
    --processes 1 --threads 8 \
    --application-type script \
    --request-timeout 900 \
    --socket-timeout 900 \
    --queue-timeout 60 \
    --connect-timeout 15 \
    --startup-timeout 120 \
    --graceful-timeout 30 \
    --shutdown-timeout 30 \
    --setenv LLAMA_MODEL /srv/wsgi-llama/models/gemma-3-270m-q4_k_m.gguf \
    --setenv LLAMA_N_THREADS 2 \
    --setenv LLAMA_PING_INTERVAL 15 \
    "$@"
