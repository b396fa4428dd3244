"""The only part of the SuperLink that faces the network: a proxy for the Fleet API alone.

Flower 1.42 serves its Fleet, Control and Runtime (ServerAppIo) APIs from one HTTP server
on one port, and the OSS Control API has no authentication: whoever reaches that port can
register node keys and ``flwr run`` code on the SuperLink host. ``stamen superlink`` therefore
binds Flower's server to loopback and puts this proxy on the operator's address. It
terminates TLS with the SuperLink's own certificate and forwards only ``POST /v1/fleet/*``
(what a SuperNode calls) and ``GET /health``; every other path gets 404 without reaching
Flower. Node authentication still happens in Flower: the signed headers pass through as-is.
"""

from __future__ import annotations

import contextlib
import posixpath
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
#: Hop-by-hop headers (RFC 9110 §7.6.1) and the ones httpx/uvicorn recompute.
_DROP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "te", "trailer"}


def upstream_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    """TLS to the loopback SuperLink: its chain must verify against the CA; the name is not
    checked, since the certificate names the public host and the peer is our own child on 127.0.0.1."""
    if ca_file is None:
        return False
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    return context


def create_proxy(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """A Starlette app forwarding Fleet calls to ``upstream`` (``https://127.0.0.1:PORT``)."""
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(120.0, connect=10.0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        # The decoded path, normalised: "/v1/fleet/%2e%2e/control/..." must not reach Control (httpx
        # would resolve the dot segments when it builds the upstream URL).
        if posixpath.normpath(path) != path or "\\" in path:
            return PlainTextResponse("not found: only the Fleet API is served here", status_code=404)
        if not (request.method == "POST" and path.startswith(FLEET_PREFIX)) and path != "/health":
            return PlainTextResponse("not found: only the Fleet API is served here", status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        sent = client.build_request(
            request.method, path, params=request.query_params, headers=headers, content=await request.body()
        )
        try:
            got = await client.send(sent, stream=True)
        except httpx.TransportError as exc:
            return PlainTextResponse(f"SuperLink unavailable: {exc}", status_code=503)
        try:
            body = b"".join([chunk async for chunk in got.aiter_raw()])
        finally:
            await got.aclose()
        kept = {k: v for k, v in got.headers.items() if k.lower() not in _DROP}
        return Response(body, status_code=got.status_code, headers=kept)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)
