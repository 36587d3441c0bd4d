"""Browsers may not drive the server from another site: the ``Origin`` and ``Host`` checks.

A web page the user visits can send requests to ``http://127.0.0.1:8000``: a ``text/plain`` POST needs
no CORS preflight, and a WebSocket handshake is never blocked by the browser. Both carry an ``Origin``
header, so a POST or WebSocket upgrade whose ``Origin`` is not the server's own (the same host and
port as its ``Host``, ``public_url``'s origin, or ``UPSCALE_ALLOWED_ORIGINS``) is refused. Clients
outside a browser (the SDKs, curl) send no ``Origin`` and pass.

DNS rebinding gets around that check: a page on the attacker's name, once the name resolves to
127.0.0.1, is same-origin with the server. Its requests still carry the attacker's name as ``Host``,
so a ``Host`` that is a name must be one the server is known by: ``localhost``, the bound host,
``public_url``'s host, ``UPSCALE_ALLOWED_HOSTS``, or the name the connection was accepted under. An IP
address as ``Host`` always passes (a browser sends one only to the address it really connects to). A
server bound to every interface (0.0.0.0, ::) answers to any name unless ``UPSCALE_ALLOWED_HOSTS`` is
set: it is reachable under names nobody listed, and should require keys anyway.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from upscale_server.api.context import RunwareJSONResponse
from upscale_server.config import Settings
from upscale_server.errors import HostNotAllowedError, OriginNotAllowedError, UpscaleError, error_item
from upscale_server.outbound import is_ip_literal
from upscale_server.protocol import envelope

#: Names every local server answers to.
LOCAL_NAMES = frozenset({"localhost"})
#: Bind addresses that listen on every interface.
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", ""})
#: Methods that change nothing: a browser's cross-site GET cannot read the answer anyway.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: WebSocket close code for a refused handshake (before accept the server answers HTTP 403).
POLICY_VIOLATION = 1008


class OriginGuard:
    """ASGI middleware that refuses requests a browser sent from another site (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        allowed_hosts = {_host_name(name) for name in settings.allowed_hosts}
        self.any_host = "*" in allowed_hosts or (settings.host.strip() in WILDCARD_BINDS and not allowed_hosts)
        self.hosts: set[str] = {*LOCAL_NAMES, *allowed_hosts, _host_name(settings.host)}
        self.any_origin = "*" in settings.allowed_origins
        self.origins = {_origin(origin) for origin in settings.allowed_origins if origin != "*"}
        if settings.public_url:
            self.hosts.add(_host_name(urlsplit(settings.public_url).netloc))
            self.origins.add(_origin(settings.public_url))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": refusal.code})
        else:
            body = envelope(errors=[error_item(refusal, task_type=None, task_uuid=None)])
            await RunwareJSONResponse(body, status_code=refusal.http_status)(scope, receive, send)

    def refusal(self, scope: Scope) -> UpscaleError | None:
        """Why this request is refused, or None when it may pass."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self._host_allowed(host, scope):
            return HostNotAllowedError(
                "This server does not answer to that Host name; its operator can add it to UPSCALE_ALLOWED_HOSTS."
            )
        origin = headers.get("origin")
        if origin is None or (scope["type"] == "http" and scope["method"] in SAFE_METHODS):
            return None
        if self.any_origin or _origin(origin) in self.origins or _same_site(origin, host):
            return None
        return OriginNotAllowedError(
            "Requests from a web page of another origin are refused; the server's operator can allow an origin "
            "with UPSCALE_ALLOWED_ORIGINS."
        )

    def _host_allowed(self, host: str, scope: Scope) -> bool:
        name = _host_name(host)
        if self.any_host or not name or is_ip_literal(name) or name in self.hosts:
            return True
        server = scope.get("server")
        return server is not None and name == str(server[0]).lower()  # the name the connection was accepted under


def _host_name(host: str) -> str:
    """The name of a ``Host`` value or bind address, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def _origin(url: str) -> str:
    """``scheme://host[:port]`` in lower case without a default port; '' when ``url`` has no host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return ""
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme.lower())
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{parts.scheme.lower()}://{host.lower()}{suffix}"


def _same_site(origin: str, host: str) -> bool:
    """Whether ``origin`` is the server's own: the host and port its client addressed (``Host``)."""
    normalised = _origin(origin)
    if not normalised or not host:
        return False
    scheme = normalised.partition("://")[0]
    return normalised == _origin(f"{scheme}://{host.strip()}")
