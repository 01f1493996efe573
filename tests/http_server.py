"""A loopback HTTP server for tests, with the images and hostile answers download tests need.

The server itself is package code (`pipeline.download.serve.ImageServer`, also used by the demo and the
benchmark); this module adds test images built from real photos and a catalogue of routes, each named
with the ledger reason the downloader must give it.

    from http_server import loopback_server, encode
    with loopback_server() as srv:
        url = srv.add("/x.jpg", Route(body=encode(arr, "JPEG")))
"""
from __future__ import annotations

import io
import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.download.serve import ImageServer, Route

__all__ = ["ImageServer", "Route", "loopback_server", "encode", "noise", "Case", "hostile_cases", "trickle_server"]


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@contextmanager
def loopback_server(host: str = "127.0.0.1", delay: float = 0.0):
    srv = ImageServer(host=host, delay=delay)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def trickle_server(answer: bytes, interval: float):
    """A slow-loris server on loopback: each connection's request is read, then `answer` (status line, headers
    and body) is sent one byte every `interval` seconds, so no single read waits long. Yields the server;
    `srv.url(path)` names it and `srv.connections` records each connection as {"bytes_sent", "seconds"
    (from its first byte to its end), "cut" (True: the client closed it before the whole answer was sent)}."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    stop = threading.Event()
    connections: list[dict] = []

    def answer_one(conn: socket.socket) -> None:
        record = {"bytes_sent": 0, "seconds": 0.0, "cut": False}
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            connections.append(record)
            start = time.monotonic()
            for i in range(len(answer)):
                try:
                    conn.sendall(answer[i:i + 1])
                    record["bytes_sent"] = i + 1
                    # the client's close (FIN or RST) makes the socket readable: it has stopped listening
                    if select.select([conn], [], [], interval)[0] and not conn.recv(1):
                        record["cut"] = True
                        break
                except OSError:
                    record["cut"] = True
                    break
                if stop.is_set():
                    break
            record["seconds"] = time.monotonic() - start

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=answer_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, name="trickle-server", daemon=True)
    thread.start()

    class _Server:
        def url(self, path: str) -> str:
            return f"http://127.0.0.1:{port}{path}"

    srv = _Server()
    srv.connections = connections
    try:
        yield srv
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@dataclass
class Case:
    name: str
    path: str
    route: Route
    reason: str          # expected ledger reason ('' = kept)
    ext: str | None = None  # expected image member of a kept sample


def hostile_cases(photos: dict[str, np.ndarray], slow_seconds: float) -> list[Case]:
    """One route per hostile answer a download meets; distinct image bytes so nothing is a duplicate."""
    names = sorted(photos)
    small = {n: np.ascontiguousarray(photos[n][::4, ::4]) for n in names}
    jpeg, png, webp = (encode(small[names[0]], "JPEG", quality=90), encode(small[names[1]], "PNG"),
                       encode(small[names[2]], "WEBP", quality=80))
    target = encode(small[names[3]], "JPEG", quality=85)
    big = encode(noise(400, 400, 1), "PNG")                        # ~480 kB: past the 200 kB byte cap
    bomb = encode(np.zeros((3000, 3000, 3), np.uint8), "PNG")      # 9 Mpx in a few kB: past the pixel cap
    tiny = encode(noise(8, 8, 2), "PNG")                           # shorter side 8 < --min-image-size 16
    jpg_h = {"Content-Type": "image/jpeg"}
    return [
        Case("jpeg", "/good.jpg", Route(body=jpeg, headers=jpg_h), "", "jpg"),
        Case("png", "/good.png", Route(body=png, headers={"Content-Type": "image/png"}), "", "png"),
        Case("webp", "/good.webp", Route(body=webp, headers={"Content-Type": "image/webp"}), "", "webp"),
        Case("png named .jpg", "/really-a-png.jpg", Route(body=encode(small[names[4]], "PNG"), headers=jpg_h),
             "", "png"),
        Case("404", "/missing.jpg", Route(404, b"nope"), "http_404"),
        Case("500", "/error.jpg", Route(500, b"boom"), "http_5xx"),
        Case("403", "/forbidden.jpg", Route(403, b"no"), "http_403"),
        Case("slow", "/slow.jpg", Route(body=jpeg, headers=jpg_h, delay=slow_seconds), "timeout"),
        Case("html as jpeg", "/page.jpg", Route(body=b"<!doctype html><html><body>Login</body></html>",
                                               headers=jpg_h), "not_an_image"),
        Case("truncated body", "/truncated.jpg", Route(body=target, headers=jpg_h, truncate_to=200),
             "incomplete_body"),
        Case("truncated, no length", "/cut.jpg", Route(body=target[:len(target) // 2], headers=jpg_h,
                                                       send_length=False), "decode_error"),
        Case("oversized (Content-Length)", "/big.png", Route(body=big), "too_large"),
        Case("oversized (streamed)", "/big-stream.png", Route(body=big, send_length=False), "too_large"),
        Case("pixel bomb", "/bomb.png", Route(body=bomb), "image_too_large"),
        Case("too small", "/tiny.png", Route(body=tiny), "too_small"),
        Case("redirect", "/redirect.jpg", Route(location="/target.jpg"), "", "jpg"),
        Case("redirect target", "/target.jpg", Route(body=target, headers=jpg_h), "duplicate_exact"),
        Case("redirect loop", "/loop.jpg", Route(location="/loop.jpg"), "redirect_loop"),
        Case("X-Robots-Tag noai", "/noai.jpg", Route(body=encode(small[names[5]], "JPEG"),
                                                     headers={**jpg_h, "X-Robots-Tag": "noai"}), "opted_out"),
        Case("X-Robots-Tag for prx", "/prx-noimageai.jpg",
             Route(body=encode(small[names[6]], "JPEG"), headers={**jpg_h, "X-Robots-Tag": "prx-data: noimageai"}),
             "opted_out"),
        Case("X-Robots-Tag for another bot", "/otherbot.jpg",
             Route(body=encode(small[names[6]], "JPEG", quality=70),
                   headers={**jpg_h, "X-Robots-Tag": "otherbot: noai"}), "", "jpg"),
        Case("empty body", "/empty.jpg", Route(body=b"", headers=jpg_h), "empty_file"),
    ]
