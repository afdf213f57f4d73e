"""An HTTP server on 127.0.0.1 that answers each path with a payload of its own."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def serve_paths(payloads: Mapping[str, bytes]) -> Iterator[str]:
    """Serve ``payloads[path]`` on a free 127.0.0.1 port; yield ``http://host:port``.

    A path (with its query) that has no payload gets 404.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = payloads.get(self.path)
            self.send_response(200 if payload is not None else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(payload or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
