"""Real servers for tests/test_host_*.py: Apache (mod_wsgi, Passenger), nginx.

Each is installed from Debian's packages when missing, started on loopback on a
free port from its own configuration in a world-readable temporary directory
(its workers run as an unprivileged user, who must read the venv, the app and
the model), and stopped afterwards. The configurations are the files in
deploy/, with paths and ports replaced.
"""
