"""One TLS context for every HTTPS request of a process (wheel downloads, remotes).

urllib builds a new context per request otherwise, and loading the CA bundle into it costs
~25 ms of CPU each time (0.6 s for 25 wheels; a lazy first import fetches ~1,200 objects).
The defaults are urllib's (SSL_CERT_FILE, SSL_CERT_DIR honoured).
"""

from __future__ import annotations

import functools
import ssl
import threading

_LOCK = threading.Lock()  # lru_cache alone may build it once per racing thread


def ssl_context() -> ssl.SSLContext:
    with _LOCK:
        return new_ssl_context()


@functools.lru_cache(maxsize=1)
def new_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()
