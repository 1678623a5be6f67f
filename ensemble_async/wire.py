"""A lean HTTP/1.1 client for the request/answer exchanges on every generation's path.

Layer boundary: this module moves bytes. It opens and keeps alive connections to one
origin, writes a request, frames the answer (``Content-Length``, chunked, or up to the
close) and hands back ``(status, headers, body)``. It knows nothing of JSON, of
servers' protocols or of retries: ``http.HTTPTransport`` builds the requests, maps the
answers and is the only caller. Streams (server-sent events) stay on aiohttp.

Why it exists: aiohttp's client spends about 80 us of CPU per request on work a JSON
exchange with an inference server does not need (URL objects, cookie jars, tracing
hooks, a stream reader per answer); this client spends about 20 us on the same
exchange (``bench/fleet.py``, ``docs/performance.md``). At thousands of requests per
second on one coordinator that is most of a core.

What it does, so that real servers' habits are met:

* keep-alive with a pool of idle connections (last used first); a connection the
  server closed, or idle longer than ``keepalive_s`` (4 s: under uvicorn's 5 s, the
  shortest common server setting), is closed rather than reused. Nothing is sent
  twice here: a connection that breaks with the request on it is a ``ConnectError``,
  and the member's retry policy decides.
* answers framed by ``Content-Length``, by chunked transfer coding (trailers skipped),
  or by the end of the connection (a reset is not an end); ``1xx`` interim answers
  skipped; ``Connection: close`` and HTTP/1.0 honoured; ``gzip``/``deflate`` content
  or transfer codings undone (never asked for), a stream that ends early refused.
* lines in the head, chunk lines and trailers end with CRLF or a lone LF (a lone CR
  ends none); the first empty line ends the head.
* an answer broken off (a close before its length or last chunk, or a reset) is a
  ``MalformedResponseError`` when it is a success; an error answer (status >= 400)
  keeps its status with what arrived of its body, as the status is what counts.
* bounds: the head, and the trailers, each at most ``MAX_HEAD_BYTES``; the body at
  most ``limit`` bytes while it arrives (``ResponseTooLargeError``), or for answers
  with status >= 400 cut at ``error_limit`` bytes; silence on the socket longer than
  ``read_timeout`` is a ``RequestTimeoutError`` (its timer, re-armed while data
  trickles in, is cancelled with the request); connecting longer than
  ``connect_timeout`` too.
* a cancelled request closes its connection (its state is unknown), so cancellation
  never leaves a half-read answer in the pool.
* TLS for ``https://`` origins (the system's trust store, SNI on the host name).

Not supported (aiohttp is still used for these, or they are not used at all): proxies,
redirects, cookies, request streaming, pipelining.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

from .errors import ConnectError, MalformedResponseError, RequestTimeoutError, ResponseTooLargeError

__all__ = ["MAX_HEAD_BYTES", "Answer", "Origin", "build_head", "check_header"]

MAX_HEAD_BYTES = 64 * 1024
"""The longest status line and headers accepted in one answer (with the blank line
that ends them); the same bound holds for the trailers after a chunked body."""

Answer = tuple[int, dict[str, str], bytes]
"""What a request gives back: the status, the headers (names in lower case; repeated
names joined with ``", "``) and the body (decoded when the server compressed it)."""

_HEX = b"0123456789abcdefABCDEF"

_TRAILERS = -2
"""``_Connection.chunk_left`` after the last chunk: reading the trailers."""

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_header(name: str, value: str) -> None:
    """Refuse a header that could break the request's framing. The message names the
    header, never its value (it may be a secret)."""
    if not name or any(c not in _TOKEN for c in name):
        raise ValueError(f"header name {name!r} is not a valid HTTP token")
    if any(c in "\r\n\0" for c in value):
        raise ValueError(f"header {name!r} holds a line break or NUL")


def build_head(method: str, target: str, host: str, headers: Mapping[str, str]) -> bytes:
    """The request line and fixed headers, up to (not including) ``Content-Length``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        check_header(name, value)
        if name.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
            lines.append(f"{name}: {value}")
    # UTF-8 as aiohttp sends it; never an encoding error, whose message would quote a
    # piece of the value (which may be a secret)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", errors="replace")


class _Framing:
    """How the current answer's body ends."""

    LENGTH = 0
    CHUNKED = 1
    CLOSE = 2


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    __slots__ = (
        "body",
        "buffer",
        "chunk_left",
        "closed",
        "codings",
        "cut",
        "error_limit",
        "framing",
        "headers",
        "idle_since",
        "keep_alive",
        "last_data",
        "length",
        "limit",
        "received",
        "scanned",
        "state",
        "status",
        "timer",
        "transport",
        "waiter",
    )

    # states
    _IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.state = self._IDLE
        self.scanned = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.framing = _Framing.LENGTH
        self.length = 0
        self.chunk_left = -1
        self.codings: list[str] = []
        self.body = bytearray()
        self.limit = 0
        self.error_limit = 0
        self.cut = False
        self.keep_alive = True
        self.received = False
        self.last_data = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.state == self._IDLE:
            # Bytes with no request outstanding: the server is out of step; never reuse.
            self.close()
            return
        self.received = True
        self.last_data = time.monotonic()
        try:
            self._advance()
        except BaseException as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # the end of the connection is the end of a body framed by it; a reset or a
        # failed read (exc) is not an end, nor is a close before the length or the last
        # chunk: a success's body is then incomplete, while an error answer keeps its
        # status with what arrived of its body (only a message: the status counts)
        if self.state == self._BODY and (
            self.cut or (self.framing == _Framing.CLOSE and exc is None)
        ):
            if self.framing == _Framing.LENGTH:
                self._take(bytes(self.buffer[: self.length]))
            self._finish()
            return
        if self.waiter is not None and not self.waiter.done():
            what = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            if self.state == self._HEAD and not self.received:
                err: Exception = ConnectError(
                    f"server closed the connection before answering{what}"
                )
            else:
                err = MalformedResponseError(f"server closed the connection mid-answer{what}")
            self.waiter.set_exception(err)

    # -- one exchange -----------------------------------------------------------------

    def start(self, data: bytes, limit: int, error_limit: int) -> asyncio.Future[Answer]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.state = self._HEAD
        self.scanned = 0
        self.limit = limit
        self.error_limit = error_limit
        self.received = False
        self.last_data = time.monotonic()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        self.abort()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _advance(self) -> None:
        if self.state == self._HEAD:
            self._read_head()
        if self.state == self._BODY:
            self._read_body()

    def _read_head(self) -> None:
        while True:
            buffer = self.buffer
            # the first empty line ends the head: "\n\r\n" (CRLF CRLF, the common
            # case) or "\n\n", whichever comes first (a lone LF ends a line too)
            start = max(0, self.scanned - 2)
            end = buffer.find(b"\n\r\n", start)
            lf = buffer.find(b"\n\n", start, len(buffer) if end < 0 else end + 1)
            if lf >= 0:
                end, stop = lf, lf + 2
            else:
                stop = end + 3
            # the same bound whether the head arrives in one read or in many
            if (stop if end >= 0 else len(buffer) + 1) > MAX_HEAD_BYTES:
                raise MalformedResponseError(
                    f"answer head is over the limit of {MAX_HEAD_BYTES} bytes"
                )
            if end < 0:
                self.scanned = len(buffer)
                return
            if end and buffer[end - 1] == 13:  # the CR of the last line's CRLF
                end -= 1
            head = bytes(buffer[:end]).decode("latin-1")
            del buffer[:stop]
            self.scanned = 0
            first, _, rest = head.partition("\r\n")
            if "\n" in first:  # the status line ends with a lone LF
                first, _, rest = head.partition("\n")
            status, version = _status_line(first)
            if 100 <= status < 200:
                if status == 101:
                    raise MalformedResponseError("server switched protocols (HTTP 101)")
                continue  # an interim answer (100 Continue, 103 Early Hints)
            headers = _parse_headers(rest)
            self.status = status
            self.headers = headers
            connection = headers.get("connection", "").lower()
            if version == "1.1":
                self.keep_alive = "close" not in connection
            else:
                self.keep_alive = "keep-alive" in connection
            self.body = bytearray()
            self.cut = False
            if status >= 400:
                self.limit = self.error_limit
                self.cut = True  # an error body is cut, never refused
            # codings to undo, last applied first: content codings, then transfer
            # codings other than the final chunked
            encoding = headers.get("content-encoding")
            self.codings = _codings(encoding) if encoding else []
            transfer = headers.get("transfer-encoding")
            codings = _codings(transfer) if transfer else []
            if status in (204, 304):
                self.framing, self.length = _Framing.LENGTH, 0
            elif codings:
                # the transfer codings frame the answer, whatever a Content-Length says
                # (a sign of a broken server: the connection is not reused after it)
                if codings[-1] == "chunked":
                    self.framing, self.chunk_left = _Framing.CHUNKED, -1
                    codings.pop()
                else:  # chunked is not the last coding: the close ends the body
                    self.framing, self.keep_alive = _Framing.CLOSE, False
                self.codings += codings
                if "content-length" in headers:
                    self.keep_alive = False
            elif "content-length" in headers:
                self.framing, self.length = _Framing.LENGTH, _content_length(headers)
                if self.length > self.limit and not self.cut:
                    raise ResponseTooLargeError(
                        f"answer of {self.length} bytes is over the limit of {self.limit} bytes"
                    )
            else:
                self.framing, self.keep_alive = _Framing.CLOSE, False
            self.state = self._BODY
            return

    def _read_body(self) -> None:
        buffer = self.buffer
        if self.framing == _Framing.LENGTH:
            if len(buffer) < self.length:
                if self.cut and len(buffer) >= self.limit:
                    self._take(bytes(buffer[: self.limit]))
                    self.keep_alive = False
                    self._finish()
                return
            self._take(bytes(buffer[: self.length]))
            del buffer[: self.length]
            self._finish()
        elif self.framing == _Framing.CHUNKED:
            self._read_chunks()
        else:
            self._take(bytes(buffer))
            buffer.clear()

    def _read_chunks(self) -> None:
        buffer = self.buffer
        pos = 0
        while True:
            if self.chunk_left == _TRAILERS:
                self._read_trailers()
                return
            if self.chunk_left < 0:  # at a chunk-size line (ended by CRLF or a lone LF)
                eol = buffer.find(b"\n", pos)
                if eol < 0:
                    if len(buffer) - pos > 1024:
                        raise MalformedResponseError("chunk size line is too long")
                    break
                size_text = bytes(buffer[pos:eol]).split(b";", 1)[0].strip()
                # hex digits only (int(x, 16) also takes "+", "_" and "0x")
                if not size_text or size_text.strip(_HEX) or len(size_text) > 16:
                    raise MalformedResponseError(f"bad chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if size == 0:
                    # the last chunk; the LF that ends its line stays, so that empty
                    # trailers are an empty line right at the start
                    del buffer[:eol]
                    self.chunk_left = _TRAILERS
                    self.scanned = 0
                    continue
                pos = eol + 1
                self.chunk_left = size
            after = pos + self.chunk_left
            if len(buffer) < after + 2 and not buffer.startswith(b"\n", after):
                # take what is there of this chunk, keep the rest for later
                have = min(len(buffer) - pos, self.chunk_left)
                if have:
                    self._take(bytes(buffer[pos : pos + have]))
                    self.chunk_left -= have
                    pos += have
                break
            self._take(bytes(buffer[pos:after]))
            if buffer.startswith(b"\r\n", after):
                pos = after + 2
            elif buffer.startswith(b"\n", after):
                pos = after + 1
            else:
                raise MalformedResponseError("chunk is not followed by CRLF")
            self.chunk_left = -1
        if pos:
            del buffer[:pos]

    def _read_trailers(self) -> None:
        """Skip the trailers, bounded as the head is. The buffer starts at the LF that
        ended the last chunk's line; the first empty line after it ends them."""
        buffer = self.buffer
        start = max(0, self.scanned - 2)
        end = buffer.find(b"\n\r\n", start)
        lf = buffer.find(b"\n\n", start, len(buffer) if end < 0 else end + 1)
        stop = lf + 2 if lf >= 0 else end + 3 if end >= 0 else -1
        # the trailers with their empty line, however they arrive: at most
        # MAX_HEAD_BYTES (not counting the LF at the start)
        if (stop - 1 if stop >= 0 else len(buffer)) > MAX_HEAD_BYTES:
            raise MalformedResponseError(
                f"answer trailers are over the limit of {MAX_HEAD_BYTES} bytes"
            )
        if stop < 0:
            self.scanned = len(buffer)
            return
        del buffer[:stop]
        self._finish()

    def _take(self, data: bytes) -> None:
        if self.state != self._BODY:
            return
        self.body += data
        if len(self.body) > self.limit:
            if not self.cut:
                raise ResponseTooLargeError(f"answer is over the limit of {self.limit} bytes")
            del self.body[self.limit :]
            self.keep_alive = False
            self._finish()

    def _finish(self) -> None:
        if self.state != self._BODY:
            return
        self.state = self._DONE
        body = bytes(self.body)
        self.body = bytearray()
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.codings:
            try:
                for coding in reversed(self.codings):
                    body = _decompress(body, coding, self.limit, self.cut)
            except MalformedResponseError as exc:
                if not self.cut:
                    waiter.set_exception(exc)
                    return
                # an error answer: its status decides what the caller does; the
                # body, only a message, says why there is none
                body = str(exc).encode()
        waiter.set_result((self.status, self.headers, body))


_HEADER_LINE = re.compile(r"\r\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)")
"""One header line, from the CRLF before it to the CRLF after it (not consumed)."""

_FOLD = re.compile(r"\r\n[ \t]+")
"""An obsolete line fold: a line break and the spaces that start the next line."""

_LONE_LF = re.compile(r"(?<!\r)\n")
"""An LF with no CR before it."""


def _parse_headers(text: str) -> dict[str, str]:
    """Header lines (CRLF- or LF-separated, no final line end) as a dict: names in
    lower case, repeated names joined with ``", "``. One regular-expression pass; a
    line that is not ``name: value`` (nor the folded rest of one) is a
    ``MalformedResponseError`` naming it."""
    if not text:
        return {}
    pairs = _HEADER_LINE.findall(f"\r\n{text}\r\n")
    if len(pairs) != text.count("\r\n") + 1:
        if text.count("\n") != text.count("\r\n"):
            # a lone LF ends a line as CRLF does (a lone CR ends none)
            return _parse_headers(_LONE_LF.sub("\r\n", text))
        if "\r\n " in text or "\r\n\t" in text:
            # obsolete line folding: the value goes on, read as one space
            return _parse_headers(_FOLD.sub(" ", text))
        for line in text.split("\r\n"):
            found = _HEADER_LINE.match(f"\r\n{line}\r\n")
            if found is None or found.end() != len(line) + 2:
                raise MalformedResponseError(f"malformed header line {line[:80]!r}")
        raise MalformedResponseError("malformed header lines")  # pragma: no cover
    headers = {name.lower(): value for name, value in pairs}
    if len(headers) != len(pairs):  # a repeated name: join its values in order
        headers = {}
        for name, value in pairs:
            key = name.lower()
            old = headers.get(key)
            headers[key] = value if old is None else f"{old}, {value}"
    return headers


def _status_line(line: str) -> tuple[int, str]:
    parts = line.split(" ", 2)
    # three ASCII digits, 100 or more (int() alone takes "+20", " 20", "2_0")
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or len(parts[1]) != 3
        or not (parts[1].isascii() and parts[1].isdigit())
        or parts[1] < "100"
    ):
        raise MalformedResponseError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return int(parts[1]), parts[0][5:]


def _content_length(headers: dict[str, str]) -> int:
    values = {v.strip() for v in headers["content-length"].split(",")}
    if len(values) != 1:
        raise MalformedResponseError("answer has conflicting Content-Length headers")
    value = values.pop()
    # ASCII digits only ("\xb2" is a digit to str.isdigit, not to int()), and few
    # enough that int() takes them (it refuses over 4300)
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise MalformedResponseError(f"bad Content-Length {value[:20]!r}")
    return int(value)


def _codings(value: str) -> list[str]:
    """A Content-Encoding or Transfer-Encoding value as its codings, in the order they
    were applied, in lower case (``identity`` left out)."""
    codings = [c.strip(" \t").lower() for c in value.split(",")]
    return [c for c in codings if c and c != "identity"]


def _decompress(body: bytes, encoding: str, limit: int, cut: bool) -> bytes:
    """``body`` with ``encoding`` undone, at most ``limit`` bytes of it (``cut``: an
    error body, cut there, whose stream may end early; else over the limit is a
    ``ResponseTooLargeError`` and a stream that ends early a ``MalformedResponseError``).
    A gzip body may hold several members, one after another."""
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise MalformedResponseError(f"answer has unsupported coding {encoding!r}")
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(body, limit + 1 - len(out))
        except zlib.error as exc:
            raise MalformedResponseError(
                f"answer body does not decode as {encoding}: {exc}"
            ) from None
        if len(out) > limit:
            if not cut:
                raise ResponseTooLargeError(f"answer is over the limit of {limit} bytes")
            return bytes(out[:limit])
        if not inflater.eof:
            if cut:
                return bytes(out)
            raise MalformedResponseError(
                f"answer body is cut short (its {encoding} stream ends early)"
            )
        body = inflater.unused_data
        if wbits != zlib.MAX_WBITS:
            body = body.lstrip(b"\0")  # zero padding after a member, as gzip(1) allows
        if not body:
            return bytes(out)
        if wbits == zlib.MAX_WBITS:
            raise MalformedResponseError("answer body has bytes after its deflate stream")


class Origin:
    """Keep-alive connections to one ``scheme://host:port``, and requests over them.

    Not safe to share between event loops. ``aclose`` closes every connection.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = None,
        keepalive_s: float = 4.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default = 443 if parts.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port == default else f"{name}:{self.port}"
        self.path_prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Origin {self.scheme}://{self.host_header}>"

    def target(self, path: str) -> str:
        """The request target for ``path`` below the base URL's own path."""
        return f"{self.path_prefix}/{path.lstrip('/')}"

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectError(
                f"connecting to {self.host_header} took over {self.connect_timeout} s"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"connection to {self.scheme}://{self.host_header} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        self._open.add(conn)
        return conn

    def _reuse(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.buffer or now - conn.idle_since > self.keepalive_s:
                conn.close()
                self._open.discard(conn)
                continue
            return conn
        return None

    async def request(self, head: bytes, body: bytes, limit: int, error_limit: int) -> Answer:
        """Send ``head`` (from ``build_head``) with ``body``; the answer, framed and
        bounded. Errors: ``ConnectError``, ``RequestTimeoutError``,
        ``MalformedResponseError``, ``ResponseTooLargeError`` (none names a backend: the
        caller does)."""
        data = b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
        conn = self._reuse() or await self._connect()
        return await self._exchange(conn, data, limit, error_limit)

    async def _exchange(
        self, conn: _Connection, data: bytes, limit: int, error_limit: int
    ) -> Answer:
        waiter = conn.start(data, limit, error_limit)
        if self.read_timeout is not None:
            conn.timer = asyncio.get_running_loop().call_later(
                self.read_timeout, self._silence, conn, waiter
            )
        try:
            answer = await waiter
        except BaseException:
            conn.abort()  # half-read or failed: never reused
            self._open.discard(conn)
            raise
        finally:
            # the timer now armed (the first, or one _silence re-armed) goes with the
            # request: none is left holding the connection until it fires
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
        conn.waiter = None
        if conn.keep_alive and not conn.closed and not conn.buffer and not self._closed:
            conn.state = conn._IDLE
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        return answer

    def _silence(self, conn: _Connection, waiter: asyncio.Future[Answer]) -> None:
        """The read-timeout timer: fail the request when the socket has been silent for
        ``read_timeout``, else look again when it could be."""
        if waiter.done() or self.read_timeout is None:
            return
        quiet = time.monotonic() - conn.last_data
        if quiet >= self.read_timeout:
            conn._fail(RequestTimeoutError(f"no data from the server for {self.read_timeout:g} s"))
            return
        conn.timer = asyncio.get_running_loop().call_later(
            self.read_timeout - quiet, self._silence, conn, waiter
        )
