"""Gunicorn config of the local server's API: ndif's own (ndif 0.1.2,
`ndif.services.api.gunicorn_conf`), with anyio's asyncio backend imported first.

Why: nnsight 0.8.1, which the API imports for its request schema, mounts a
`save` attribute on every object when it is imported. anyio (4.15 and 4.16
checked) defines its typed-attribute classes (`SocketAttribute`, ...) lazily,
the first time its asyncio backend is needed, and refuses one with a public
attribute that has no annotation: once nnsight is imported, that first use
raises TypeError("Attribute 'save' is missing its type annotation"), and so does
every later one. In the API the first use is starlette writing an uploaded file
that has outgrown its 1 MiB in-memory spool (`run_in_threadpool`), so a stock
ndif 0.1.2 API answers every request whose serialized trace (the `blob` part)
is over 1 MiB with HTTP 400 "There was an error parsing the body".

Imported here, in gunicorn's master before it forks the workers and before
anything imports nnsight, the classes are made while `object` has no `save`;
the workers inherit them. local_server.sh starts gunicorn with this config.
"""

import anyio._backends._asyncio  # noqa: F401  (the backend; it defines anyio.abc.SocketAttribute)
import anyio.streams.file  # noqa: F401  (FileStreamAttribute)
import anyio.streams.tls  # noqa: F401  (TLSAttribute)

# ndif's settings and hooks (bind, workers, worker_class, timeout, post_fork,
# on_starting) as they are; gunicorn ignores the other names this brings in.
from ndif.services.api.gunicorn_conf import *  # noqa: E402, F403
