"""mod_wsgi entry file for wsgi-llama (deploy/apache-mod_wsgi.conf).

Settings come from, last wins: ``wsgi-llama.env`` beside this file
(optional; ``LLAMA_KEY=value`` lines), the process environment, and Apache's
``SetEnv`` (or ``mod_wsgi-express --setenv``), read on the first request.
The model loads on the first request too; a bad setting answers every request
with a JSON 503 that names the key.
"""

import os

from wsgi_llama.hosting import make_application

ENV_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wsgi-llama.env")
application = make_application(ENV_FILE if os.path.exists(ENV_FILE) else None)
