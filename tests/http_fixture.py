"""A small file server on 127.0.0.1 for download tests (no internet): Range support, a request log,
dropped connections and a mode that ignores Range.

    with serve() as server:
        server.files["/zoo.zip"] = data          # path (query ignored) -> bytes
        download(f"{server.url}/zoo.zip?dl=1", ...)
        server.requests                          # [(path with query, Range header or None), ...]
"""

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        data = srv.files.get(self.path.split("?")[0])
        srv.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start, asked = 0, self.headers.get("Range")
        if asked and not srv.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:  # promise the whole body, send half, hang up
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve():
    """A file server in a background thread for the duration of the block."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.drops, srv.ignore_range = {}, [], 0, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
