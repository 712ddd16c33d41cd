"""An ASGI guard in front of BentoML's request parsing: a request the service cannot take is answered at once,
with a 4xx/503 and a JSON message, before any body is parsed.

- 415 for a body that is not `application/json` (multipart without a boundary used to end in a 500),
- 413 for a body over `max_body` bytes, by its Content-Length or, for a chunked body, as it streams in,
- 503 with `Retry-After` while the model's queue holds `max_pending` texts or more (load shedding: a request
  that would wait behind a full queue is better retried than left to time out),
- 408 for a body not received within `body_timeout` seconds (a client that trickles its body holds a
  connection and a request slot for as long as it likes otherwise).

The guard reads the body of every guarded route itself, within the size limit and the deadline, and hands
BentoML the buffered body.

Routes in `answered_here` are answered by the guard itself once they pass (the service's single-text route:
BentoML's per-request machinery cost more than the model's share of a batched text).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

Send = Callable
Receive = Callable


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def reject(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    await respond(send, status, json.dumps({"error": message}).encode(), headers)


class Refused(Exception):
    """A request the guard answers with `status` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def within(awaitable: Awaitable, seconds: float):
    """`awaitable`'s result, or asyncio.TimeoutError after `seconds`. asyncio.timeout (3.11+) bounds it in this
    task with a timer only; Python 3.10 has wait_for alone, which starts a task per request."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class RequestGuard:
    def __init__(
        self,
        app,
        paths: tuple[str, ...],
        max_body: int,
        overloaded: Callable[[], bool],
        retry_after_s: int = 1,
        on_shed: Callable[[], None] | None = None,
        answered_here: dict[str, Callable] | None = None,
        body_timeout: float = 10.0,
    ):
        # path -> async (body bytes) -> (status, JSON bytes): routes the guard answers itself
        self.answered_here = answered_here or {}
        self.app = app
        self.paths = set(paths)
        self.max_body = max_body
        self.overloaded = overloaded
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/docs.json":
            return await self.app(scope, receive, _patched_spec(send, self.paths))
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            shown = media.decode("latin-1") or "none"
            return await reject(send, 415, f"unsupported media type {shown!r}: send a JSON body as application/json")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await reject(send, 413, self._too_large())
        if self.overloaded():
            if self.on_shed:
                self.on_shed()
            message = f"the model's queue is full; retry after {self.retry_after_s} s"
            return await reject(send, 503, message, {"Retry-After": str(self.retry_after_s)})
        try:
            body = await self._read_body(receive)
        except Refused as refused:
            return await reject(send, refused.status, str(refused))
        handler = self.answered_here.get(scope["path"])
        if handler is not None:
            status, payload = await handler(body)
            return await respond(send, status, payload)
        return await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return f"request body over {self.max_body} bytes; send fewer or shorter texts"

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, or Refused: 413 past the size limit (a chunked body has no Content-Length to check
        first), 408 past the deadline."""
        try:
            body = await within(self._read_limited(receive), self.body_timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
            raise Refused(408, f"request body not received within {self.body_timeout:g} s; send it at once") from None
        if body is None:
            raise Refused(413, self._too_large())
        return body

    async def _read_limited(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, original: Receive) -> Receive:
    """The buffered body first, then the connection's own messages (a real disconnect)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return await original()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


REJECTED = {
    "type": "object",
    "title": "Rejected",
    "required": ["error"],
    "properties": {"error": {"type": "string", "title": "Message"}},
}
REJECTIONS = {
    "408": "Request body not received within TOOLKIT_BODY_TIMEOUT_S",
    "413": "Request body over the service's limit (TOOLKIT_MAX_BODY_BYTES)",
    "415": "Body not sent as application/json",
    "503": "The model's queue is full (TOOLKIT_MAX_PENDING); retry after the Retry-After header's seconds",
}


def patch_openapi(spec: dict, paths: set[str]) -> dict:
    """What BentoML's generated document leaves out: the guard's answers, and validation details as they are."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Rejected"] = REJECTED
    if "InvalidArgument" in schemas:  # BentoML sends pydantic's list of errors, not a string
        schemas["InvalidArgument"]["properties"]["detail"] = {"title": "Error Detail", "description": "What failed"}
    for path in paths:
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        operation.setdefault("requestBody", {})["required"] = True
        responses = operation["responses"]
        for status, description in REJECTIONS.items():
            body = {"application/json": {"schema": {"$ref": "#/components/schemas/Rejected"}}}
            responses[status] = {"description": description, "content": body}
        responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}
    return spec


def _patched_spec(send: Send, paths: set[str]) -> Send:
    """Buffers the OpenAPI document BentoML sends and sends it patched."""
    start: dict = {}
    chunks: list[bytes] = []

    async def patched(message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(patch_openapi(json.loads(body), paths)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return patched
