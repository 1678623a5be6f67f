"""The lean HTTP/1.1 client (``ensemble_async.wire``) against servers scripted byte by
byte: framing (length, chunked, to the close), keep-alive and its limits, interim
answers, bounds, broken servers, timeouts and cancellation; and ``HTTPTransport``
choosing it or aiohttp."""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from ensemble_async import http
from ensemble_async.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectError,
    MalformedResponseError,
    RequestTimeoutError,
    ResponseTooLargeError,
    ServerError,
)
from ensemble_async.wire import MAX_HEAD_BYTES, Origin, build_head, check_header

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A loopback TCP server; ``handler`` plays the server's side of each connection.
    ``connections`` counts accepted connections; ``requests`` holds each request's
    head and body as read by ``read_request``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> str:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = 0
        for line in head.split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def keep_answering(script: Callable[[int], bytes]) -> Callable[[Scripted], Handler]:
    """A handler that answers every request on a connection with ``script(i)``."""

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    await server.read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                writer.write(script(len(server.requests)))
                await writer.drain()

        return handler

    return make


Serve = Callable[[Callable[[Scripted], Handler]], Awaitable[Scripted]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[Scripted] = []

    async def start(make: Callable[[Scripted], Handler]) -> Scripted:
        server = Scripted(lambda r, w: asyncio.sleep(0))
        server.handler = make(server)
        await server.__aenter__()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.__aexit__()


async def post(
    origin: Origin, body: bytes = b"{}", limit: int = 1 << 20, errors: int = 64
) -> tuple[int, dict[str, str], bytes]:
    head = build_head("POST", origin.target("/generate"), origin.host_header, {})
    return await origin.request(head, body, limit, errors)


async def test_length_framed_answers_reuse_one_connection(serve: Serve) -> None:
    server = await serve(keep_answering(lambda i: answer(b'{"n": %d}' % i)))
    origin = Origin(server.url)
    try:
        got = [await post(origin, b'{"x": %d}' % i) for i in range(3)]
    finally:
        await origin.aclose()
    assert [g[2] for g in got] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert got[0][0] == 200 and got[0][1]["content-type"] == "application/json"
    assert server.connections == 1  # kept alive
    head, body = server.requests[1]
    assert head.startswith("POST /generate HTTP/1.1\r\n") and body == b'{"x": 1}'
    assert f"Host: 127.0.0.1:{server.url.rsplit(':', 1)[1]}\r\n" in head


async def test_chunked_answer_in_one_byte_writes_with_extensions_and_trailers(serve: Serve) -> None:
    wire_bytes = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in range(2):
                await server.read_request(reader)
                for i in range(len(wire_bytes)):
                    writer.write(wire_bytes[i : i + 1])
                    await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        first = await post(origin)
        second = await post(origin)
    finally:
        await origin.aclose()
    assert first[2] == second[2] == b"hello 0123456789"
    assert server.connections == 1  # the chunked framing left the connection clean


async def test_answer_framed_by_the_close_and_http10_are_not_reused(serve: Serve) -> None:
    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if server.connections == 1:
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of ")
                await writer.drain()
                writer.write(b"it until the end")
            else:
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        assert (await post(origin))[2] == b"all of it until the end"
        assert (await post(origin))[2] == b"ok"
        assert (await post(origin))[2] == b"ok"
    finally:
        await origin.aclose()
    assert server.connections == 3


async def test_connection_close_header_and_interim_answers(serve: Serve) -> None:
    def script(i: int) -> bytes:
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
        return interim + answer(b"[1]", extra="Connection: close\r\n")

    server = await serve(keep_answering(script))
    origin = Origin(server.url)
    try:
        for _ in range(2):
            status, headers, body = await post(origin)
            assert (status, body, headers["connection"]) == (200, b"[1]", "close")
    finally:
        await origin.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    "packed",
    [
        gzip.compress(b'{"generated_text": "hi"}'),
        # gzip allows a stream of several members (as a compressor flushed between
        # writes), and zero padding after them; the body is all of them, never the first
        gzip.compress(b'{"generated_text": ') + gzip.compress(b'"hi"}') + b"\0\0",
    ],
    ids=["one member", "members and padding"],
)
async def test_gzip_bodies_are_decoded(serve: Serve, packed: bytes) -> None:
    server = await serve(
        keep_answering(lambda i: answer(packed, extra="Content-Encoding: gzip\r\n"))
    )
    origin = Origin(server.url)
    try:
        assert (await post(origin))[2] == b'{"generated_text": "hi"}'
    finally:
        await origin.aclose()


async def test_an_error_answer_whose_body_does_not_decode_keeps_its_status(serve: Serve) -> None:
    # the status decides the error's class (here: fatal, never retried); a body that
    # does not decode only loses the server's message
    server = await serve(
        keep_answering(
            lambda i: answer(
                b"\x1f\x8bnot gzip",
                status="401 Unauthorized",
                extra="Content-Encoding: gzip\r\n",
            )
        )
    )
    transport = http.HTTPTransport(server.url, backend="b")
    try:
        with pytest.raises(AuthenticationError, match="does not decode as gzip"):
            await transport.post_json("/generate", {})
    finally:
        await transport.aclose()


async def test_transfer_codings_frame_the_answer_and_are_undone(serve: Serve) -> None:
    text = b'{"generated_text": "hi"}'
    packed = gzip.compress(text)
    answers = [
        # gzip under chunked: chunked frames it, the gzip is undone
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
        + b"%x\r\n%b\r\n0\r\n\r\n" % (len(packed), packed),
        # chunked and a Content-Length: chunked frames it; the connection is not reused
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        # chunked is not the last coding: the close frames it, whatever the length says
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 4\r\n\r\n" + packed,
    ]

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while len(server.requests) < len(answers):
                await server.read_request(reader)
                writer.write(answers[len(server.requests) - 1])
                await writer.drain()
                if len(server.requests) == 3:
                    return  # and close

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        got = [(await post(origin))[2] for _ in answers]
    finally:
        await origin.aclose()
    assert got == [text, b"hello", text]
    assert server.connections == 2


async def test_a_close_delimited_answer_broken_off_by_a_reset_is_not_an_answer(
    serve: Serve,
) -> None:
    # a reset is not the end of a body framed by the close: a success's body may be
    # cut short (an error); an error answer keeps its status (its body is a message)
    answers = [
        b'HTTP/1.1 200 OK\r\n\r\n{"generated_text": "hal',
        b"HTTP/1.1 413 Payload Too Large\r\n\r\ntoo large",
    ]
    reset = asyncio.Event()

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(answers[len(server.requests) - 1])
            await writer.drain()
            await reset.wait()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # a reset, not a clean end

        return handler

    async def until_reset() -> tuple[int, dict[str, str], bytes]:
        reset.clear()
        task = asyncio.create_task(post(origin))
        async with asyncio.timeout(10):
            while not any(conn.body for conn in origin._open):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # until the client holds part of the body
        reset.set()
        return await asyncio.wait_for(task, 10)

    server = await serve(make)
    origin = Origin(server.url)
    try:
        with pytest.raises(MalformedResponseError, match="mid-answer: ConnectionResetError"):
            await until_reset()
        status, _, body = await until_reset()
    finally:
        await origin.aclose()
    assert (status, body) == (413, b"too large")


async def _limit_holds(serve: Serve, answers: list[tuple[int, bytes, int]], refused: str) -> None:
    """Each answer ``(size, data, cut)`` goes in two writes split at ``cut``, one answer per
    request: read when ``size`` is within ``MAX_HEAD_BYTES``, else refused as ``refused``."""

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.read_request(reader)
                _, data, cut = answers[len(server.requests) - 1]
                writer.write(data[:cut])
                await writer.drain()
                writer.write(data[cut:])
                await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        for size, _, _ in answers:
            if size <= MAX_HEAD_BYTES:
                assert (await asyncio.wait_for(post(origin), 10))[2] == b"ok"
            else:
                with pytest.raises(MalformedResponseError, match=refused):
                    await asyncio.wait_for(post(origin), 10)
    finally:
        await origin.aclose()


async def test_the_head_limit_holds_exactly_however_the_head_arrives(serve: Serve) -> None:
    def head(size: int) -> bytes:  # a head of `size` bytes, its closing blank line included
        start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
        return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

    # whole, or all but the last byte of the head first
    answers = [
        (size, head(size) + b"ok", len(head(size)) - split)
        for size in (MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1)
        for split in (0, 1)
    ]
    await _limit_holds(serve, answers, "head is over the limit")


async def test_bodies_are_bounded_and_error_bodies_cut(serve: Serve) -> None:
    big = b"x" * 5000
    chunked_big = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%b\r\n" % (1000, b"y" * 1000) for _ in range(5))
        + b"0\r\n\r\n"
    )
    answers = [
        answer(big),  # declared too long: refused at once
        chunked_big,  # refused while it arrives
        answer(big, status="500 Internal Server Error"),  # an error body: cut
    ]
    server = await serve(keep_answering(lambda i: answers[i - 1]))
    origin = Origin(server.url)
    try:
        with pytest.raises(ResponseTooLargeError, match="5000 bytes is over the limit of 1000"):
            await post(origin, limit=1000)
        with pytest.raises(ResponseTooLargeError, match="over the limit of 1000"):
            await post(origin, limit=1000)
        status, _, body = await post(origin, limit=1000, errors=100)
    finally:
        await origin.aclose()
    assert (status, body) == (500, b"x" * 100)


_PACKED = gzip.compress(b'{"generated_text": "%b"}' % (bytes(range(48, 123)) * 4))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX", "not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10), "head is over the limit"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok", "unsupported"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly", "closed the connection mid-answer"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        # numbers are digits only (Python's int() also takes signs, underscores, "0x",
        # and non-ASCII digits; and refuses over 4300 digits with a ValueError)
        (b"HTTP/1.1 +20 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n",
            "bad chunk",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n",
            "bad chunk",
        ),
        # a compressed body that ends before its stream does was cut short
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n" + _PACKED[:40], "cut short"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 40\r\n\r\n"
            + _PACKED[:40],
            "cut short",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n" + _PACKED + b"junk", "decode"),
    ],
)
async def test_broken_answers_are_malformed(serve: Serve, raw: bytes, message: str) -> None:
    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(raw)
            await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        with pytest.raises(MalformedResponseError, match=message):
            await asyncio.wait_for(post(origin), 10)
    finally:
        await origin.aclose()


async def test_closed_before_answering_and_refused_are_connect_errors(serve: Serve) -> None:
    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)  # and close without a word

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        with pytest.raises(ConnectError, match="closed the connection before answering"):
            await post(origin)
    finally:
        await origin.aclose()
    # a port nobody listens on
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    refused = Origin(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectError, match=re.escape("connection to http://127.0.0.1")):
        await post(refused)
    await refused.aclose()


async def test_silence_is_a_timeout_but_a_trickle_is_not(serve: Serve) -> None:
    body = b"0123456789"
    release = asyncio.Event()

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if len(server.requests) == 1:
                await release.wait()  # silent until the test ends
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            for i in range(len(body)):  # each gap under the read timeout, the whole over it
                await asyncio.sleep(0.05)
                writer.write(body[i : i + 1])
                await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url, read_timeout=0.3)
    try:
        with pytest.raises(
            RequestTimeoutError, match=re.escape("no data from the server for 0.3 s")
        ):
            await asyncio.wait_for(post(origin), 10)
        assert (await asyncio.wait_for(post(origin), 10))[2] == body
    finally:
        release.set()
        await origin.aclose()


async def test_a_cancelled_request_never_leaves_its_connection_in_the_pool(serve: Serve) -> None:
    got_first = asyncio.Event()

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            if server.connections == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")  # half
                await writer.drain()
                got_first.set()
                await reader.read()  # until the client hangs up
                server.closed.set()
                return
            writer.write(answer(b"full"))
            await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        task = asyncio.create_task(post(origin))
        await got_first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 10)  # the client closed it
        assert (await post(origin))[2] == b"full"
    finally:
        await origin.aclose()
    assert server.connections == 2


async def test_idle_connections_expire_and_server_closed_ones_are_not_reused(serve: Serve) -> None:
    server = await serve(keep_answering(lambda i: answer(b"ok")))
    origin = Origin(server.url, keepalive_s=0.0)
    try:
        await post(origin)
        await post(origin)
        assert server.connections == 2  # the idle connection had expired
    finally:
        await origin.aclose()

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(answer(b"once"))  # keep-alive promised, then closed
            await writer.drain()

        return handler

    closing = await serve(make)
    origin = Origin(closing.url)
    try:
        await post(origin)
        idle = origin._idle[0]
        async with asyncio.timeout(10):
            while not idle.closed:  # noqa: ASYNC110  (the server's close reaches the client)
                await asyncio.sleep(0.01)
        assert (await post(origin))[2] == b"once"
    finally:
        await origin.aclose()
    assert closing.connections == 2


def test_headers_that_could_break_framing_are_refused_without_quoting_the_value() -> None:
    with pytest.raises(ValueError, match="'X-Key' holds a line break") as info:
        check_header("X-Key", "secret\r\nInjected: 1")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="not a valid HTTP token"):
        check_header("Bad Name", "v")
    with pytest.raises(ValueError, match="X-Key"):
        http.HTTPTransport("http://h", backend="b", headers={"X-Key": "a\nb"})
    head = build_head("GET", "/x", "h:1", {"Host": "evil", "Content-Length": "9", "A": "ü"})
    assert head == "GET /x HTTP/1.1\r\nHost: h:1\r\nA: ü\r\n".encode()


def test_origin_parses_hosts_ports_and_path_prefixes() -> None:
    assert Origin("http://example.org/base/").host_header == "example.org"
    assert Origin("http://example.org/base/").target("/v1/x") == "/base/v1/x"
    assert Origin("https://example.org:8443").host_header == "example.org:8443"
    assert Origin("http://[::1]:81").host_header == "[::1]:81"
    with pytest.raises(ValueError, match="not an http"):
        Origin("ftp://example.org")


async def test_the_transport_uses_the_lean_client_unless_the_session_is_the_callers(
    serve: Serve,
) -> None:
    server = await serve(
        keep_answering(
            lambda i: (
                answer(b'{"ok": %d}' % i, extra="X-Prompt-Tokens: 7\r\n")
                if i != 3
                else answer(b'{"error": "boom"}', status="500 Internal Server Error")
            )
        )
    )
    async with http.new_session() as session, aiohttp.ClientSession() as theirs:
        ours = http.HTTPTransport(server.url, backend="b", session=session)
        users = http.HTTPTransport(server.url, backend="b", session=theirs)
        assert ours._origin is not None and users._origin is None
        try:
            seen = {"x-prompt-tokens": ""}
            assert await ours.post_json("/generate", {"a": 1}, response_headers=seen) == {"ok": 1}
            assert seen == {"x-prompt-tokens": "7"}
            assert await users.post_json("/generate", {"a": 1}) == {"ok": 2}
            with pytest.raises(ServerError, match=r"\[b\] boom"):
                await ours.post_json("/generate", {})
        finally:
            await ours.aclose()
            await users.aclose()
    assert "User-Agent: ensemble-async\r\n" in server.requests[0][0]
    with pytest.raises(RuntimeError, match="closed"):
        await ours.post_json("/generate", {})


async def test_a_redirect_is_a_bad_request_naming_where(serve: Serve) -> None:
    server = await serve(
        keep_answering(
            lambda i: answer(b"", status="307 Temporary Redirect", extra="Location: /v2\r\n")
        )
    )
    transport = http.HTTPTransport(server.url, backend="b")
    try:
        with pytest.raises(BadRequestError, match="redirects POST /generate to /v2"):
            await transport.post_json("/generate", {})
    finally:
        await transport.aclose()


def test_header_lines_are_parsed_strictly_and_repeats_joined() -> None:
    from ensemble_async.wire import _parse_headers

    assert _parse_headers("Content-Type: a/b\r\nX-A:  v v  \r\nx-a: 2\r\nEmpty:") == {
        "content-type": "a/b",
        "x-a": "v v, 2",
        "empty": "",
    }
    # obsolete line folding: a line that starts with a space or tab continues the
    # value before it, read as one space
    assert _parse_headers("X-A: 1\r\n  2\r\n\t3\r\nB: 4") == {"x-a": "1 2 3", "b": "4"}
    # a bare LF ends a line as CRLF does (folding included)
    assert _parse_headers("A: 1\nB: 2\r\nC: 3\n 4") == {"a": "1", "b": "2", "c": "3 4"}
    for bad, line in [
        (" A: 1\r\nB: 2", " A: 1"),
        ("A: 1\r\na b: c", "a b: c"),
        ("A: 1\r\n: v", ": v"),
        ("A: 1\nB: 2\rC: 3", "B: 2\rC: 3"),  # a bare CR ends no line
    ]:
        with pytest.raises(MalformedResponseError, match=re.escape(repr(line))):
            _parse_headers(bad)


async def test_answer_heads_and_chunk_lines_ended_by_a_bare_lf_are_read(serve: Serve) -> None:
    # a lone LF ends a line as CRLF does (RFC 9112 lets a client take it; aiohttp does)
    answers = [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        # mixed line ends; the head ends at its first empty line, whatever follows
        b"HTTP/1.1 100 Continue\n\n"
        b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 6\n\r\nab\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-C: 3\r\n\nok",
        # chunk size lines, the line ends after chunks, and trailers, all with a bare LF
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"
        b"2;e=1\nok\n3\r\n, m\n1\n!\r\n0\nX-T: t\nX-U: u\n\n",
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n",
    ]

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while len(server.requests) < 2 * len(answers):
                await server.read_request(reader)
                raw = answers[(len(server.requests) - 1) % len(answers)]
                if len(server.requests) > len(answers):  # the second round: byte by byte
                    for i in range(len(raw)):
                        writer.write(raw[i : i + 1])
                        await writer.drain()
                else:
                    writer.write(raw)
                    await writer.drain()

        return handler

    server = await serve(make)
    origin = Origin(server.url)
    try:
        got = [await asyncio.wait_for(post(origin), 10) for _ in range(2 * len(answers))]
    finally:
        await origin.aclose()
    for n, (status, headers, body) in enumerate(got):
        assert status == 200
        assert body == [b"ok", b"ab\r\n\r\n", b"ok", b"ok, m!", b"ok"][n % len(answers)]
        if n % len(answers) == 1:
            assert (headers["x-a"], headers["x-b"]) == ("1", "2")
        if n % len(answers) == 2:
            assert headers["x-c"] == "3"
    assert server.connections == 1  # each answer was framed exactly


async def test_the_head_limit_holds_exactly_for_heads_ended_by_a_bare_lf(serve: Serve) -> None:
    def head(size: int, end: bytes) -> bytes:  # `size` bytes, the closing empty line included
        start = b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Pad: "
        return start + b"a" * (size - len(start) - len(end)) + end

    # whole, or all but the last byte of the head first
    answers = [
        (size, head(size, end) + b"ok", size - split)
        for size in (MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1)
        for end in (b"\n\n", b"\n\r\n", b"\r\n\n")
        for split in (0, 1)
    ]
    await _limit_holds(serve, answers, "head is over the limit")


async def test_a_rearmed_read_timer_is_cancelled_when_the_answer_completes(serve: Serve) -> None:
    # the timer looks again while data trickles in; once the answer is complete no
    # timer may be left holding the connection until it fires
    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
            for i in range(8):  # each gap under the read timeout, the whole over it
                await asyncio.sleep(0.05)
                writer.write(b"abcdefgh"[i : i + 1])
                await writer.drain()

        return handler

    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_scheduled"):
        pytest.skip("the event loop does not list its timers")
    server = await serve(make)
    origin = Origin(server.url, read_timeout=0.3)
    looks = 0
    silence = origin._silence

    def counted(conn: Any, waiter: Any) -> None:
        nonlocal looks
        looks += 1
        silence(conn, waiter)

    origin._silence = counted  # type: ignore[method-assign]
    try:
        assert (await asyncio.wait_for(post(origin), 10))[2] == b"abcdefgh"
        pending = [h for h in loop._scheduled if not h.cancelled() and h._callback is counted]
    finally:
        await origin.aclose()
    assert looks >= 1  # the first timer fired and armed another
    assert pending == []


async def test_an_error_answer_broken_off_keeps_its_status(serve: Serve) -> None:
    # the status decides what the caller does (a 401 is fatal, a 413 is not retried
    # as-is): an error answer cut short by a close or a reset keeps it, with whatever
    # body arrived; a success cut short is no answer
    chunked = b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nhalf of i"
    answers = [
        (b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 40\r\n\r\n{"error": "bad', False),
        (b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 40\r\n\r\ntoo", True),
        (chunked % b"503 Service Unavailable", False),
        (chunked % b"413 Payload Too Large", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nhalf", False),
        (chunked % b"200 OK", True),
    ]
    reset = asyncio.Event()

    def make(server: Scripted) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            raw, by_reset = answers[len(server.requests) - 1]
            writer.write(raw)
            await writer.drain()
            if by_reset:
                await reset.wait()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

        return handler

    async def one() -> tuple[int, dict[str, str], bytes]:
        reset.clear()
        task = asyncio.create_task(post(origin))
        async with asyncio.timeout(10):
            while not task.done() and not any(  # noqa: ASYNC110
                c.state == c._BODY and (c.buffer or c.body) for c in origin._open
            ):
                await asyncio.sleep(0.01)  # until the client holds part of the body
        reset.set()
        return await asyncio.wait_for(task, 10)

    server = await serve(make)
    origin = Origin(server.url)
    try:
        got = [(await one())[::2] for _ in range(4)]
        for _ in range(2):
            with pytest.raises(MalformedResponseError, match="closed the connection mid-answer"):
                await one()
    finally:
        await origin.aclose()
    assert got == [
        (401, b'{"error": "bad'),
        (413, b"too"),
        (503, b"half of i"),
        (413, b"half of i"),
    ]

    # through the transport: still an authentication error, never retried
    server = await serve(make)  # its first answer: the 401 broken off by a close
    transport = http.HTTPTransport(server.url, backend="b")
    try:
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(transport.post_json("/generate", {}), 10)
    finally:
        await transport.aclose()


async def test_the_trailer_limit_holds_exactly_however_the_trailers_arrive(serve: Serve) -> None:
    def trailers(size: int) -> bytes:  # trailer lines of `size` bytes, the empty line included
        start = b"X-Pad: "
        return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    # whole, or all but the last byte first
    answers = [
        (size, body + trailers(size), len(body) + size - split)
        for size in (MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1)
        for split in (0, 1)
    ]
    await _limit_holds(serve, answers, "trailers are over the limit")
