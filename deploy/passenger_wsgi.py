"""Passenger startup file for wsgi-llama: it must sit in the application root.

cPanel's "Setup Python App" and deploy/apache-passenger.conf or
deploy/nginx-passenger.conf use it. Settings come from, last wins:
``wsgi-llama.env`` beside this file (optional; ``LLAMA_KEY=value`` lines),
the process environment (the panel's variables, ``passenger_env_var``) and
Apache's ``SetEnv``, read on the first request. A bad setting answers every request with
a JSON 503 that names the key, instead of "Web application could not be
started".
"""

import os

from wsgi_llama.hosting import make_application

ENV_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wsgi-llama.env")
application = make_application(ENV_FILE if os.path.exists(ENV_FILE) else None)
