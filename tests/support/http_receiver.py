"""One local HTTP receiver for every test that needs a real peer: webhooks, upload endpoints, input URLs.

:class:`HttpReceiver` is a ``ThreadingHTTPServer`` on a free 127.0.0.1 port, in a thread of its own. It
records every request (method, path with its query, lower-cased headers, body) and answers from a
script of routes: a path (without the query string) maps to a :class:`Reply`, to a sequence of replies
(the n-th request to that path gets the n-th reply, the last one repeats) or to a function of the
request and its number. A reply can be *held* on a ``threading.Event`` (``Reply(gate=...)``): the
receiver answers only once the test sets it, so "the peer is slow" is a state the test controls, never
a sleep. Closing the receiver hangs up on every held request without answering.

Tests wait on what the receiver saw (:meth:`HttpReceiver.wait_for`), never on elapsed time, and can
check the order in which requests arrived (:attr:`HttpReceiver.requests`) and were answered
(:attr:`HttpReceiver.answered`).

In a test module, make the fixtures visible by assigning them (an assignment, not an import, so the
linter does not read the test arguments as redefinitions)::

    from tests.support import http_receiver

    serve = http_receiver.serve  # serve(routes) -> a started HttpReceiver, closed after the test

    def test_webhook(serve):
        receiver = serve({"/hook": http_receiver.replies(500, 200)})
        ...  # point the code under test at receiver.url("/hook")
        first, second = receiver.wait_for(2)[:2]  # blocks until both attempts arrived
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from upscale_server.testing import free_port  # a port nothing listens on (connection refused)

__all__ = [
    "HttpReceiver",
    "Reply",
    "Request",
    "Responder",
    "Route",
    "Serve",
    "free_port",
    "held",
    "http_receiver",
    "ok",
    "redirect",
    "replies",
    "serve",
]

#: How long :meth:`HttpReceiver.wait_for` waits by default before failing the test (a guard, not a measure).
WAIT_TIMEOUT = 30.0
#: Size of the pieces a close-delimited body is written in.
_PIECE = 1024


@dataclass(frozen=True)
class Request:
    """One request the receiver got, as it arrived."""

    method: str
    path: str  # with the query string, as sent
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def route(self) -> str:
        """The path without its query string: what routes are looked up by."""
        return self.path.split("?", 1)[0]


@dataclass(frozen=True)
class Reply:
    """What the receiver answers.

    ``gate``: answer only once this event is set; if the receiver closes first, hang up without an
    answer. ``declared_length``: the ``Content-Length`` to announce instead of the body's real length
    (a peer that lies). ``close_delimited``: send no ``Content-Length`` at all and write the body in
    1 KiB pieces until it ends or the client hangs up (HTTP/1.0 style: the size is known only by reading).
    """

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    gate: threading.Event | None = None
    declared_length: int | None = None
    close_delimited: bool = False


#: ``responder(request, n)``: the reply to the n-th request (1-based) to this route.
Responder = Callable[[Request, int], Reply]
Route = Reply | Sequence[Reply] | Responder


def ok(body: bytes = b"", content_type: str | None = None) -> Reply:
    """200 with ``body`` (and a ``Content-Type`` when given)."""
    return Reply(200, body, {"Content-Type": content_type} if content_type else {})


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status, b"moved", {"Location": location})


def replies(*script: Reply | int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> tuple[Reply, ...]:
    """A scripted route: the n-th request gets the n-th entry (the last one repeats); an int is a status
    answered with ``body`` and ``headers``."""
    return tuple(Reply(entry, body, dict(headers or {})) if isinstance(entry, int) else entry for entry in script)


def held(gate: threading.Event, reply: Reply | None = None) -> Reply:
    """``reply`` (default: an empty 200), answered only once ``gate`` is set."""
    return dataclasses.replace(reply or Reply(), gate=gate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    receiver: HttpReceiver


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        receiver = self.server.receiver
        request = Request(self.command, self.path, headers, body)
        reply = receiver._arrived(request)
        if reply.gate is not None and not receiver._wait_open(reply.gate):
            self.close_connection = True  # closed while held: hang up without an answer
            return
        receiver._answering(request)  # before the first byte: a client cannot see an answer not yet recorded
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if not reply.close_delimited:
            self.send_header(
                "Content-Length", str(len(reply.body) if reply.declared_length is None else reply.declared_length)
            )
        self.end_headers()
        try:
            for start in range(0, len(reply.body), _PIECE):
                self.wfile.write(reply.body[start : start + _PIECE])
        except OSError:
            pass  # the client hung up (as it should at a size limit)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return


class HttpReceiver:
    """A recording, scripted HTTP server on 127.0.0.1 (see the module docstring). Started on creation."""

    def __init__(self, routes: Mapping[str, Route] | None = None, *, default: Route = Reply(404, b"no such route")):
        self.routes: dict[str, Route] = dict(routes or {})
        self.default = default
        self._requests: list[Request] = []
        self._answered: list[Request] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.receiver = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="http-receiver", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        """``http://HOST:PORT`` + ``path`` (``host`` may be a name the code under test resolves to 127.0.0.1)."""
        return f"http://{host}:{self.port}{path}"

    # ------------------------------------------------------------------ what it saw

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order (a copy)."""
        with self._changed:
            return list(self._requests)

    @property
    def answered(self) -> list[Request]:
        """The requests answered (or being answered) so far, in the order their answers started: a held request
        comes after those answered while it was held."""
        with self._changed:
            return list(self._answered)

    def wait_for(self, count: int = 1, *, path: str | None = None, timeout: float = WAIT_TIMEOUT) -> list[Request]:
        """Block until at least ``count`` requests (to the route ``path``, if given) have arrived; return them.

        Fails the test if they have not arrived after ``timeout`` seconds: a guard against a hang, not a
        measurement.
        """

        def matching() -> list[Request]:
            return [request for request in self._requests if path is None or request.route == path]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= count, timeout=timeout):
                pytest.fail(f"the receiver got {len(matching())} of {count} requests to {path or 'any path'}: "
                            f"{[(r.method, r.path) for r in self._requests]}")  # fmt: skip
            return matching()

    # ------------------------------------------------------------------ scripting

    def route(self, path: str, route: Route) -> None:
        """Add or replace the route for ``path`` (no query string)."""
        with self._changed:
            self.routes[path] = route

    def _arrived(self, request: Request) -> Reply:
        with self._changed:
            self._requests.append(request)
            number = sum(1 for seen in self._requests if seen.route == request.route)
            route = self.routes.get(request.route, self.default)
            self._changed.notify_all()
        if isinstance(route, Reply):
            return route
        if callable(route):
            return route(request, number)
        return route[min(number, len(route)) - 1]

    def _answering(self, request: Request) -> None:
        with self._changed:
            self._answered.append(request)
            self._changed.notify_all()

    def _wait_open(self, gate: threading.Event) -> bool:
        """Wait until ``gate`` is set (True) or the receiver closes (False)."""
        while not gate.wait(0.02):
            if self._closed.is_set():
                return False
        return True

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Stop serving; requests still held are hung up on."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Serve = Callable[..., HttpReceiver]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(routes=None, *, default=...)``: a started :class:`HttpReceiver`, closed at the end of the test."""
    started: list[HttpReceiver] = []

    def start(routes: Mapping[str, Route] | None = None, **options: object) -> HttpReceiver:
        started.append(HttpReceiver(routes, **options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


@pytest.fixture
def http_receiver(serve: Serve) -> HttpReceiver:
    """One started receiver with no routes yet (add them with :meth:`HttpReceiver.route`; others get 404)."""
    return serve()
