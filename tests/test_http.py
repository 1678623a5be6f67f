"""ensemble_async.http: SSE framing and error mapping, against a tiny scripted server."""

from __future__ import annotations

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
