"""A small HTTP image server on loopback, for the demo, the download benchmark and the tests.

    with ImageServer() as srv:                      # 127.0.0.1, a free port
        srv.add("/a.jpg", Route(body=jpeg_bytes, headers={"Content-Type": "image/jpeg"}))
        srv.serve_folder("photos/")                 # every file of a folder at /NAME
        url = srv.url("/a.jpg")

Routes can answer with any status, extra headers, a delay before answering, a redirect, a body cut short
of its announced Content-Length, no Content-Length at all, or a body dripped one byte at a time. `pattern` routes serve many URLs from a
few bodies (`/img/{n}.jpg` for the benchmark). `hits` counts requests per path, `user_agents` per
User-Agent.

`python -m pipeline.download.serve FOLDER [--delay S]` serves a folder until interrupted.
"""
from __future__ import annotations

import mimetypes
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0              # seconds before the response starts
    location: str | None = None     # redirect target (status defaults to 302)
    truncate_to: int | None = None  # send only this many body bytes, then close (Content-Length stays full)
    send_length: bool = True        # False: no Content-Length, the body ends when the connection closes
    drip: float = 0.0               # > 0: send the body one byte at a time, this many seconds apart

    def __post_init__(self):
        if self.location is not None and self.status == 200:
            self.status = 302


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True


class ImageServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0):
        self.routes: dict[str, Route] = {}
        self.patterns: list[tuple[re.Pattern, Callable[[re.Match], Route | None]]] = []
        self.delay = delay  # added to every route's own delay
        self.hits: Counter = Counter()
        self.user_agents: Counter = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"
            server_version = "prx-test-server"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                    server.user_agents[self.headers.get("User-Agent", "")] += 1
                route = server.lookup(path)
                if route is None:
                    route = Route(404, b"not found", {"Content-Type": "text/plain"})
                wait = route.delay + server.delay
                if wait:
                    time.sleep(wait)
                try:
                    self.send_response(route.status)
                    if route.location is not None:
                        self.send_header("Location", route.location)
                    for k, v in route.headers.items():
                        self.send_header(k, v)
                    if route.send_length:
                        self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    body = route.body if route.truncate_to is None else route.body[:route.truncate_to]
                    if route.drip:
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(route.drip)
                    else:
                        self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = _Server((host, port), Handler)
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ routes
    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def add_pattern(self, regex: str, make: Callable[[re.Match], Route | None]) -> None:
        self.patterns.append((re.compile(regex), make))

    def serve_folder(self, folder: str, prefix: str = "/") -> dict[str, str]:
        """Every regular file of `folder` at prefix+name; returns {name: url}."""
        urls = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                body = fh.read()
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            urls[name] = self.add(prefix + name, Route(body=body, headers={"Content-Type": ctype}))
        return urls

    def lookup(self, path: str) -> Route | None:
        if path in self.routes:
            return self.routes[path]
        for regex, make in self.patterns:
            m = regex.fullmatch(path)
            if m:
                return make(m)
        return None

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ImageServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="prx-image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits forever on a server that never served
            self.httpd.shutdown()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.download.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each response")
    args = p.parse_args(argv)
    srv = ImageServer(port=args.port, delay=args.delay)
    urls = srv.serve_folder(args.folder)
    print(f"serving {len(urls)} files of {args.folder} at {srv.url('/')}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
