"""ensemble_async.http: SSE framing and error mapping, against a tiny scripted server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from ensemble_async import errors
from ensemble_async.http import HTTPTransport, error_message, iter_sse_data
from ensemble_async.secret import Secret


class Scripted:
    """Answers every POST with the next scripted reply: (status, headers, body chunks)."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], list[bytes]]] = []
        self.authorization: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.authorization = request.headers.get("Authorization")
        await request.read()
        status, headers, chunks = self.replies.pop(0)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[Scripted, str]]:
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/x", scripted.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield scripted, f"http://127.0.0.1:{port}"
    await runner.cleanup()


class Chunks:
    """Stands in for aiohttp's StreamReader: hands out the given chunks one by one."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def events(chunks: list[bytes]) -> list[str]:
    return [d async for d in iter_sse_data(cast(aiohttp.StreamReader, Chunks(chunks)))]


async def test_sse_over_http(server: tuple[Scripted, str]) -> None:
    scripted, url = server
    body = [b':\n\ndata:{"a":1}\n\n', b"data: [DONE]\n\n"]
    scripted.replies.append((200, {"Content-Type": "text/event-stream"}, body))
    transport = HTTPTransport(url, backend="b")
    try:
        got = [d async for d in transport.post_sse("/x", {})]
    finally:
        await transport.aclose()
    assert got == ['{"a":1}', "[DONE]"]


async def test_sse_with_and_without_space_and_comments() -> None:
    got = await events([b':\n\ndata:{"a":1}\n\n', b': keep-alive\n\ndata: {"b":2}\n\n'])
    assert got == ['{"a":1}', '{"b":2}']


async def test_sse_lines_split_across_chunks_and_crlf() -> None:
    got = await events([b"da", b"ta: one\r", b"\n\r\n", b"event: x\nid: 3\ndata:two\n", b"\n"])
    assert got == ["one", "two"]


async def test_sse_multiline_data_and_unterminated_tail() -> None:
    got = await events([b"data: a\ndata: b\n\n", b"data: last"])
    assert got == ["a\nb", "last"]


async def test_sse_long_event() -> None:
    big = "x" * 300_000
    got = await events([b"data:" + big[:100_000].encode(), big[100_000:].encode() + b"\n\n"])
    assert got == [big]


@pytest.mark.parametrize(
    ("status", "headers", "body", "cls"),
    [
        (429, {"Retry-After": "7"}, b'{"error":"slow","error_type":"x"}', "RateLimitedError"),
        (503, {}, b"maintenance", "OverloadedError"),
        (422, {}, b'{"error":{"message":"bad top_p"}}', "BadRequestError"),
        (400, {}, b'{"detail":"maximum context length exceeded"}', "ContextLengthError"),
        (401, {}, b"{}", "AuthenticationError"),
        (424, {}, b'{"error":"boom","error_type":"generation"}', "ServerError"),
    ],
)
async def test_status_mapping(
    server: tuple[Scripted, str], status: int, headers: dict[str, str], body: bytes, cls: str
) -> None:
    scripted, url = server
    scripted.replies.append((status, {"Content-Type": "application/json", **headers}, [body]))
    transport = HTTPTransport(url, backend="b", api_key=Secret("k-123"))
    with pytest.raises(errors.BackendError) as info:
        await transport.post_json("/x", {})
    await transport.aclose()
    assert type(info.value).__name__ == cls
    assert info.value.status == status and info.value.backend == "b"
    assert "k-123" not in str(info.value)
    assert scripted.authorization == "Bearer k-123"
    if status == 429:
        assert isinstance(info.value, errors.RateLimitedError) and info.value.retry_after == 7.0


async def test_non_json_body_is_malformed(server: tuple[Scripted, str]) -> None:
    scripted, url = server
    scripted.replies.append((200, {}, [b"<html>"]))
    transport = HTTPTransport(url, backend="b")
    with pytest.raises(errors.MalformedResponseError):
        await transport.post_json("/x", {})
    await transport.aclose()


def test_error_message_shapes() -> None:
    assert error_message('{"error": "bad", "error_type": "validation"}') == "bad (validation)"
    assert error_message('{"error": {"message": "nested"}}') == "nested"
    assert error_message('{"detail": "d"}') == "d"
    assert error_message("  plain text ") == "plain text"
    assert error_message("") == "empty error body"
    assert len(error_message("y" * 5000)) == 500


async def test_sse_line_over_the_limit_is_too_large_while_it_arrives() -> None:
    chunks = [b"data: " + b"x" * 100] + [b"y" * 100] * 1000  # no newline ever

    seen = 0

    class Counting(Chunks):
        async def iter_any(self) -> AsyncIterator[bytes]:
            nonlocal seen
            for chunk in self.chunks:
                seen += 1
                yield chunk

    reader = cast(aiohttp.StreamReader, Counting(chunks))
    with pytest.raises(errors.ResponseTooLargeError):
        [d async for d in iter_sse_data(reader, max_event_bytes=1000)]
    assert seen <= 11  # it stopped once the line passed 1000 bytes, not at the end


async def test_sse_event_of_many_lines_over_the_limit_is_too_large() -> None:
    chunks = [b"data: " + b"x" * 90 + b"\n"] * 20 + [b"\n"]
    reader = cast(aiohttp.StreamReader, Chunks(chunks))
    with pytest.raises(errors.ResponseTooLargeError):
        [d async for d in iter_sse_data(reader, max_event_bytes=1000)]
    assert len(await events(chunks)) == 1  # under the default limit it is one event


async def test_sse_long_line_in_one_byte_chunks() -> None:
    line = b"data: " + b"z" * 5000 + b"\r\n\r\n"
    got = await events([line[i : i + 1] for i in range(len(line))])
    assert got == ["z" * 5000]


async def test_bodies_are_bounded_while_read(server: tuple[Scripted, str]) -> None:
    scripted, url = server
    scripted.replies.append((500, {}, [b"E" * 4096] * 64))  # 256 KiB error body
    scripted.replies.append((200, {}, [b'{"a": "' + b"x" * 4096] * 64))
    scripted.replies.append((200, {}, [b'{"a": 1}']))
    http = HTTPTransport(url, backend="b", max_error_bytes=1024, max_response_bytes=64 * 1024)
    try:
        with pytest.raises(errors.ServerError) as info:
            await http.post_json("/x", {})
        assert info.value.message == "E" * 500  # read 1 KiB, cut to the message size
        with pytest.raises(errors.ResponseTooLargeError) as big:
            await http.post_json("/x", {})
        assert big.value.backend == "b"
        assert await http.post_json("/x", {}) == {"a": 1}  # the session goes on
    finally:
        await http.aclose()


async def test_the_transport_scrubs_bodies(server: tuple[Scripted, str]) -> None:
    scripted, url = server
    key = "sk-transport/secret-0123"
    echoed = json.dumps({"error": f"bad {key[:-1]}"}).replace("/", "\\/").encode()
    scripted.replies.append((401, {}, [echoed]))
    scripted.replies.append((200, {}, [b"<html>" + key.encode() + b"</html>"]))
    http = HTTPTransport(url, backend="b", api_key=Secret(key))
    try:
        with pytest.raises(errors.AuthenticationError, match=r"bad \*\*\*"):
            await http.post_json("/x", {})
        with pytest.raises(errors.MalformedResponseError) as info:
            await http.post_json("/x", {})
        assert "secret" not in str(info.value) and "***" in str(info.value)
    finally:
        await http.aclose()


@pytest.mark.parametrize(
    "url", ["http://user:s3cr3t-pw@127.0.0.1:9", "https://tok3n-only@example.invalid/v1"]
)
def test_a_base_url_with_credentials_is_refused_without_quoting_them(url: str) -> None:
    # they would be echoed in every connection error message
    with pytest.raises(ValueError, match="carries credentials") as caught:
        HTTPTransport(url, backend="b")
    assert "s3cr3t" not in str(caught.value) and "tok3n" not in str(caught.value)
    HTTPTransport("http://127.0.0.1:9/v1", backend="b")  # plain URLs are fine
