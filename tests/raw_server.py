"""A TCP server on 127.0.0.1 that is not a proper HTTP server, for fault tests."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def raw_server(answer: bytes | None) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that is not a proper HTTP server.

    Every connection gets ``answer`` (raw bytes, whatever was asked) and is
    closed; with ``None`` it is accepted and never answered until the server
    closes. Yields a URL on it.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if answer is None:
                held.append(conn)
                continue
            with contextlib.suppress(OSError):
                conn.settimeout(5.0)
                conn.recv(65536)
                conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/metrics"
    finally:
        done.set()
        thread.join(timeout=10)
        for conn in held:
            conn.close()
        listener.close()
