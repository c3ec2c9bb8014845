"""Pure-ASGI guards in front of the app: the request-body limit (413) and the API key (401).

With a key set, every path needs `Authorization: Bearer KEY` except OPEN_PATHS, whose callers cannot hold a
secret and which reveal only state: `/health` and `/ready` for Kubernetes probes and the container HEALTHCHECK
(a probe's headers are literals in the pod spec or the image, so a guarded probe would publish the key),
`/metrics` for Prometheus, `/load` for load-aware routers (a count `/metrics` shows anyway), and `/version`.
`/ready` runs a real one-token forward, so anyone can make the engine do that much; it stays open for the
probes' sake, and its cost is one token. The rest is guarded by default, so a new route is never open by
accident: the generation endpoints, `/v1/models`, `/tokenize` and `/detokenize` (they run the tokenizer and the
chat template on any input), `/docs` and `/openapi.json`. CORS preflights (OPTIONS) pass. The key is compared as
SHA-256 digests with `secrets.compare_digest` (constant time) and is never logged.

The body guard reads the whole body up to the limit before the app sees it, then replays it; later `receive()`
calls pass through, so the app can still wait for `http.disconnect`.
"""

from __future__ import annotations

import hashlib
import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import error_body


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/load", "/version"})  # why: the module docstring


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <api_key>`, on every path but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or _route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else b""  # the scheme is case-insensitive (RFC 9110)
        if not secrets.compare_digest(hashlib.sha256(given).digest(), self._digest):
            return await _send_json(send, 401, error_body(401, "Invalid or missing API key."),
                                    [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: behind a proxy's root_path, the part after it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: object = None) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.on_reject = on_reject

    async def _reject(self, send: Send) -> None:
        if callable(self.on_reject):
            self.on_reject()
        await _send_json(send, 413, error_body(413, f"Request body exceeds the limit of {self.limit} bytes."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._reject(send)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)
