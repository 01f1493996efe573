"""The network side of `prx-data download`: what we add to img2dataset, through urllib's opener.

img2dataset's downloader fetches every image with `urllib.request.urlopen`. urllib's documented hook for
that is the process-wide opener (`urllib.request.install_opener`), so prx installs its own opener while a
download task runs and img2dataset's code is used as it is (threads, retries, its X-Robots-Tag check, its
error strings). The opener adds:

- an honest, configurable User-Agent (img2dataset always sends a Firefox string);
- a byte cap enforced while streaming (Content-Length checked first, then the body counted as it arrives);
- a truncated-body check (the connection closed before the announced Content-Length arrived);
- the private-address guard: every connection, the first and every redirect hop, resolves the host itself,
  refuses private, loopback, link-local, site-local, shared (CGNAT), multicast and reserved addresses before
  connecting, and checks the connected socket's peer address again, unless private networks are allowed;
- only http and https (no file:, ftp: or data: handlers, so a URL list cannot read local files);
- a total deadline per URL (`--url-deadline`): `--timeout` bounds each socket operation, so a server that
  sends one byte a second would hold a thread for hours; at the deadline a watchdog thread shuts the URL's
  socket down, whatever phase it is in (headers or body), and the URL's row is `timeout`.

Our own failures are raised with a `[prx:CODE]` marker, which survives img2dataset's `str(err)`, so
`reason_for` maps every error string img2dataset records back to one ledger reason code.
"""
from __future__ import annotations

import heapq
import http.client
import ipaddress
import re
import socket
import threading
import time
import urllib.request
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

try:
    _VERSION = metadata.version("prx")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0"

DEFAULT_USER_AGENT = (f"prx-data/{_VERSION} (image dataset downloader built on img2dataset; "
                      "honours X-Robots-Tag noai, noimageai, noindex, noimageindex)")
CHUNK = 1 << 16


class DownloadRefused(OSError):
    """A refusal of ours; the message starts with `[prx:CODE]` so the code survives `str(err)`."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"[prx:{code}] {detail}")
        self.code = code


# ------------------------------------------------------------------------------ private-address guard
_SHARED = ipaddress.ip_network("100.64.0.0/10")


def address_blocked(ip: str) -> str | None:
    """Why a peer address is refused without --allow-private-network, or None when it is public."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"unparsable address {ip!r}"
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            addr = mapped
    for name in ("loopback", "link_local", "site_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(addr, f"is_{name}", False):  # site_local: IPv6 fec0::/10 only
            return name.replace("_", "-")
    if isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED:
        return "shared (CGNAT)"
    if not addr.is_global:
        return "not global"
    return None


def peer_blocked(sockaddr: tuple) -> str | None:
    """The guard's one decision, on a resolved (address, port, ...) socket address."""
    return address_blocked(sockaddr[0])


def _check(host: str, sockaddr: tuple) -> None:
    why = peer_blocked(sockaddr)
    if why is not None:
        raise DownloadRefused("private_address",
                              f"{host} -> {sockaddr[0]} is {why} (use --allow-private-network to allow)")


def guarded_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None,
                              *args, **kwargs):
    """socket.create_connection that resolves the host itself and connects only to public addresses.

    The name is resolved once and the socket connects to that resolved address (no second lookup that a
    DNS rebinding could change); the connected socket's peer is checked again.
    """
    host, port = address[0], address[1]
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    refused: DownloadRefused | None = None
    error: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        try:
            _check(host, sockaddr)
        except DownloadRefused as exc:
            refused = refused or exc
            continue
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            _check(host, sock.getpeername())
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, DownloadRefused):
                raise
            error = exc
    if error is not None:
        raise error
    if refused is not None:
        raise refused
    raise OSError(f"getaddrinfo returned no address for {host}")


# ------------------------------------------------------------------------------ the response wrapper
class CappedResponse:
    """Wraps urllib's response: `read()` streams in chunks, stops past the byte cap, detects truncation."""

    def __init__(self, response, max_bytes: int | None, deadline: "Deadline | None" = None):
        self._r = response
        self._max = max_bytes
        self._total = 0  # body bytes read so far, all reads together
        self._deadline = deadline
        self.headers = response.headers

    def __getattr__(self, name):
        return getattr(self._r, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._r.close()
        return False

    def _count(self, n: int) -> None:
        self._total += n
        if self._max and self._total > self._max:
            self._r.close()
            raise DownloadRefused("too_large", f"body passed {self._max} bytes while streaming")

    def read(self, amt: int | None = None) -> bytes:
        try:
            data = self._read(amt)
        except (OSError, http.client.HTTPException) as exc:
            if self._deadline is not None and self._deadline.passed():  # the watchdog cut it
                raise self._deadline.error() from exc
            raise
        if self._deadline is not None and self._deadline.passed():
            raise self._deadline.error()  # the watchdog cut the body short
        return data

    def _read(self, amt: int | None) -> bytes:
        if amt is not None:  # partial reads count towards the cap too
            chunk = self._r.read(amt)
            self._count(len(chunk))
            return chunk
        announced = self._r.headers.get("Content-Length")
        try:
            expected = int(announced) if announced is not None else None
        except ValueError:
            expected = None
        parts = []
        while True:
            chunk = self._r.read(CHUNK)
            if not chunk:
                break
            self._count(len(chunk))
            parts.append(chunk)
        if expected is not None and self._total < expected:
            raise DownloadRefused("incomplete_body",
                                  f"connection closed after {self._total} of {expected} bytes")
        return b"".join(parts)


# ------------------------------------------------------------------------------ the opener
class _Processor(urllib.request.BaseHandler):
    """Sets the User-Agent on every request (redirects too) and caps every final response."""

    handler_order = 1100  # after HTTPErrorProcessor: only successful responses are wrapped

    def __init__(self, user_agent: str, max_bytes: int | None):
        self.user_agent = user_agent
        self.max_bytes = max_bytes

    def http_request(self, req):
        req.add_header("User-Agent", self.user_agent)  # replaces img2dataset's Firefox string
        return req

    https_request = http_request

    def http_response(self, req, response):
        if isinstance(response, CappedResponse):
            return response
        length = response.headers.get("Content-Length")
        if self.max_bytes and length is not None and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise DownloadRefused("too_large", f"Content-Length {length} > {self.max_bytes} bytes")
        return CappedResponse(response, self.max_bytes, getattr(_this_url, "deadline", None))

    https_response = http_response


class _Connection:
    """http.client's connection with the address guard and the URL's deadline watched once connected."""

    def __init__(self, *args, guarded: bool, deadline: "Deadline | None", **kwargs):
        super().__init__(*args, **kwargs)
        if guarded:
            self._create_connection = guarded_create_connection  # http.client's own hook for the socket
        self._deadline = deadline

    def connect(self):
        super().connect()
        if self._deadline is not None:
            WATCHDOG.watch(self.sock, self._deadline.at)  # the TLS socket too, once wrapped


class _HTTPConnection(_Connection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Connection, http.client.HTTPSConnection):
    pass


def _connection(cls: type, guarded: bool):
    def make(host, **kwargs):
        return cls(host, guarded=guarded, deadline=getattr(_this_url, "deadline", None), **kwargs)

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guarded: bool):
        super().__init__()
        self._guarded = guarded

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_connection(_HTTPConnection, self._guarded), req, **kwargs)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guarded: bool):
        super().__init__()
        self._guarded = guarded

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_connection(_HTTPSConnection, self._guarded), req, **kwargs)


# ------------------------------------------------------------------------------ the per-URL deadline
_this_url = threading.local()  # .deadline: the Deadline of the URL this thread is fetching


@dataclass(frozen=True)
class Deadline:
    at: float        # time.monotonic() when the URL's time is up
    seconds: float

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def error(self) -> "DownloadRefused":
        return DownloadRefused("timeout", f"no complete answer within --url-deadline {self.seconds:g} s")


class Watchdog:
    """One daemon thread that shuts sockets down at their deadline (a blocked read then returns at once)."""

    def __init__(self):
        self._heap: list[tuple[float, int, weakref.ref]] = []
        self._cv = threading.Condition()
        self._count = 0
        self._thread: threading.Thread | None = None

    def watch(self, sock, at: float) -> None:
        with self._cv:
            heapq.heappush(self._heap, (at, self._count, weakref.ref(sock)))
            self._count += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prx-url-deadline", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    sock = heapq.heappop(self._heap)[2]()
                    if sock is not None and sock.fileno() != -1:  # closed sockets are long done
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._cv.wait(self._heap[0][0] - now if self._heap else None)


WATCHDOG = Watchdog()


class _Opener(urllib.request.OpenerDirector):
    """Starts each URL's deadline (redirects and the body read included); a failure past it is `timeout`."""

    def __init__(self, url_deadline: float | None):
        super().__init__()
        self.url_deadline = url_deadline

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        deadline = Deadline(time.monotonic() + self.url_deadline, self.url_deadline) if self.url_deadline else None
        _this_url.deadline = deadline
        try:
            return super().open(fullurl, data, timeout)
        except (OSError, http.client.HTTPException) as exc:
            if deadline is not None and deadline.passed() and not isinstance(exc, DownloadRefused):
                raise deadline.error() from exc
            raise


@dataclass(frozen=True)
class NetPolicy:
    user_agent: str = DEFAULT_USER_AGENT
    max_bytes: int | None = None
    allow_private_network: bool = False
    url_deadline: float | None = None  # seconds for one URL, all phases together (None: no deadline)


def build_opener(policy: NetPolicy) -> urllib.request.OpenerDirector:
    """http/https only; no proxy handler (the guard checks the real peer, not a proxy)."""
    opener = _Opener(policy.url_deadline)
    guarded = not policy.allow_private_network
    for handler in (urllib.request.UnknownHandler(), _HTTPHandler(guarded), _HTTPSHandler(guarded),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor(), _Processor(policy.user_agent, policy.max_bytes)):
        opener.add_handler(handler)
    return opener


_lock = threading.Lock()
_active: list = []  # stack of (policy, previous opener)


@contextmanager
def installed(policy: NetPolicy):
    """Install prx's opener for urllib (hence img2dataset) in this process while the block runs."""
    with _lock:
        _active.append(urllib.request._opener)
        urllib.request.install_opener(build_opener(policy))
    try:
        yield
    finally:
        with _lock:
            urllib.request.install_opener(_active.pop())


# ------------------------------------------------------------------------------ error string -> reason
_MARKER = re.compile(r"\[prx:([a-z0-9_]+)(?::([0-9a-f]*))?\]")
_HTTP = re.compile(r"HTTP Error (\d{3})")
_RULES: list[tuple[str, re.Pattern]] = [
    ("opted_out", re.compile(r"disallowed by X-Robots-Tag", re.I)),
    ("redirect_loop", re.compile(r"infinite loop", re.I)),
    ("timeout", re.compile(r"timed out|timeout", re.I)),
    ("dns_error", re.compile(r"Name or service not known|nodename nor servname|Temporary failure in name "
                             r"resolution|No address associated|getaddrinfo|Errno -[0-9]+\]", re.I)),
    ("incomplete_body", re.compile(r"IncompleteRead", re.I)),
    ("tls_error", re.compile(r"SSL|CERTIFICATE", re.I)),
    ("connection_error", re.compile(r"Connection refused|Connection reset|Remote end closed|Connection aborted|"
                                    r"Network is unreachable|No route to host|BadStatusLine|RemoteDisconnected|"
                                    r"Broken pipe", re.I)),
    ("invalid_url", re.compile(r"unknown url type|no host given|control characters|Invalid URL|nonnumeric port",
                               re.I)),
    ("too_small", re.compile(r"image too small", re.I)),
    ("image_too_large", re.compile(r"image area too large", re.I)),
    ("decode_error", re.compile(r"Image decoding error", re.I)),
]


def reason_for(message: str | None) -> str:
    """img2dataset's `error_message` -> a ledger reason code (`download_error` when nothing matches)."""
    text = message or ""
    m = _MARKER.search(text)
    if m:
        return m.group(1)
    m = _HTTP.search(text)
    if m and "infinite loop" not in text:
        code = int(m.group(1))
        if code in (403, 404, 410, 429):
            return f"http_{code}"
        if 500 <= code <= 599:
            return "http_5xx"
        return "http_error"
    for code, pattern in _RULES:
        if pattern.search(text):
            return code
    return "download_error"


def marker_key(message: str | None) -> str:
    """The content key a `[prx:CODE:KEY]` marker carries (images rejected after download), else ''."""
    m = _MARKER.search(message or "")
    return (m.group(2) or "") if m else ""


def clean_detail(message: str | None) -> str:
    """The error text for the ledger's detail: our marker dropped, one line."""
    text = _MARKER.sub("", message or "").strip()
    text = text.replace("<urlopen error", "").rstrip(">").strip()
    return " ".join(text.split())[:500]
