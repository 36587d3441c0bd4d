"""OutboundClient: the SSRF policy, address pinning, redirects, and the image download limits.

Refused addresses are never contacted: loopback probes target a live local server and assert that
it saw nothing (so a broken guard would show up as a request, not as silence), and every other
refused class goes through a transport that fails the test if it is ever called, so no packet can
leave for 10.x, 169.254.x and the like even if the guard breaks. Public addresses are exercised
through ``httpx.MockTransport`` only.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import http_receiver
from tests.support.http_receiver import HttpReceiver, Reply, Serve, free_port, redirect
from upscale_server.errors import BlockedAddressError, ImageFetchError, ImageTooLargeError
from upscale_server.outbound import (
    ALLOW_SETTING,
    OutboundClient,
    OutboundError,
    OutboundPolicy,
    encode_json,
    refusal_reason,
)

T = TypeVar("T")
PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes" * 4
LIMIT = 64 * 1024
LOCAL = OutboundPolicy(allow=("127.0.0.1/32",))


# --------------------------------------------------------------------------- local HTTP servers

serve = http_receiver.serve  # serve(routes) -> a started HttpReceiver, closed after the test


def ok(body: bytes = PNG, content_type: str = "image/png") -> Reply:
    return http_receiver.ok(body, content_type)


# --------------------------------------------------------------------------- recording fakes


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records every request the client hands to the network layer, and only lets loopback through.

    With no ``inner`` transport, any call fails the test: for URLs that must be refused before a
    socket is opened. With one, requests to anything but a loopback IP literal still fail the test
    instead of going out, so even a broken guard (or a redirect it wrongly follows) can neither send
    a packet to 169.254.169.254 nor make the network layer look a name up.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.inner is None:
            raise AssertionError(f"a connection was attempted to {request.url}")
        try:
            loopback = ipaddress.ip_address(request.url.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise AssertionError(f"test safety: refused to connect to {request.url} (loopback only)")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


def real_transport() -> RecordingTransport:
    """The real network transport, restricted to loopback addresses."""
    return RecordingTransport(httpx.AsyncHTTPTransport(retries=0))


class FakeResolver:
    """Answers from a table (one list per host, or a list of lists for successive calls) and records calls."""

    def __init__(self, answers: dict[str, list[str] | list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.answers.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if answer and isinstance(answer[0], list):
            return list(answer.pop(0))
        return list(answer)  # type: ignore[arg-type]


def run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(make())


NO_ALLOW = OutboundPolicy()


def get(
    url: str,
    *,
    policy: OutboundPolicy = NO_ALLOW,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: FakeResolver | None = None,
    max_bytes: int = LIMIT,
) -> bytes:
    """``OutboundClient.get_bytes`` in a fresh event loop, the client closed afterwards."""

    async def go() -> bytes:
        client = OutboundClient(policy, transport=transport or real_transport(), resolver=resolver)
        try:
            return await client.get_bytes(url, max_bytes=max_bytes, parameter="inputs.image")
        finally:
            await client.aclose()

    return run(go)


def with_client(
    policy: OutboundPolicy,
    action: Callable[[OutboundClient], Awaitable[T]],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: FakeResolver | None = None,
) -> T:
    async def go() -> T:
        client = OutboundClient(policy, transport=transport or real_transport(), resolver=resolver)
        try:
            return await action(client)
        finally:
            await client.aclose()

    return run(go)


async def post_json(client: OutboundClient, url: str, payload: dict[str, object]) -> httpx.Response:
    """POST ``payload`` as JSON once, as the webhook sender does."""
    return await client.request(
        "POST", url, content=encode_json(payload), content_type="application/json", parameter="webhookURL"
    )


def assert_refused(exc: BlockedAddressError, *fragments: str) -> None:
    assert (exc.code, exc.http_status, exc.parameter) == ("unsupportedAddress", 400, "inputs.image")
    for fragment in fragments:
        assert fragment in exc.message, exc.message


# --------------------------------------------------------------------------- refused: loopback, live target


LOOPBACK_FORMS = [
    ("http://127.0.0.1:{port}/img", "127.0.0.1", "is a loopback address"),
    ("http://127.1:{port}/img", "127.1", "resolves to a loopback address"),
    ("http://0x7f000001:{port}/img", "0x7f000001", "resolves to a loopback address"),
    ("http://2130706433:{port}/img", "2130706433", "resolves to a loopback address"),
    ("http://0177.0.0.1:{port}/img", "inputs.image", "not a valid URL"),  # httpx refuses to parse it
    ("http://localhost:{port}/img", "localhost", "resolves to a loopback address"),
    ("http://LOCALHOST.:{port}/img", "localhost", "resolves to a loopback address"),
    ("http://127.0.0.1.:{port}/img", "127.0.0.1", "is a loopback address"),
    ("http://[::1]:{port}/img", "::1", "is a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/img", "::ffff:127.0.0.1", "is a loopback address"),
    ("http://[::ffff:7f00:1]:{port}/img", "::ffff:7f00:1", "is a loopback address"),
    ("http://[64:ff9b::7f00:1]:{port}/img", "64:ff9b::7f00:1", "is a loopback address"),  # NAT64 form
    ("http://[2002:7f00:1::]:{port}/img", "2002:7f00:1::", "is a loopback address"),  # 6to4 form
    ("http://public.example@127.0.0.1:{port}/img", "127.0.0.1", "is a loopback address"),  # userinfo trick
]


@pytest.mark.parametrize(("template", "named", "reason"), LOOPBACK_FORMS)
def test_loopback_forms_are_refused_before_any_connection(serve: Serve, template: str, named: str, reason: str) -> None:
    """Real getaddrinfo normalises the numeric tricks; the live server proves nothing was sent."""
    server = serve({"/img": ok()})
    transport = real_transport()
    with pytest.raises(BlockedAddressError) as caught:
        get(template.format(port=server.port), transport=transport)
    assert_refused(caught.value, named, reason)
    if "valid URL" not in reason:
        assert ALLOW_SETTING in caught.value.message
    assert transport.requests == []
    assert server.requests == []


def test_the_same_live_server_answers_when_allowed(serve: Serve) -> None:
    """The control for the test above: the server was reachable, so its silence there means a refusal."""
    server = serve({"/img": ok()})
    transport = real_transport()
    assert get(server.url("/img"), policy=LOCAL, transport=transport) == PNG
    assert len(server.requests) == 1 and len(transport.requests) == 1


# --------------------------------------------------------------------------- refused: other classes, no network


REFUSED_LITERALS = [
    ("http://10.0.0.5/img", "private"),
    ("http://172.16.0.1/img", "private"),
    ("http://172.31.255.254/img", "private"),
    ("http://192.168.1.1/img", "private"),
    ("http://100.64.0.1/img", "shared (carrier-grade NAT)"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/img", "link-local"),
    ("http://[fd00::1]/img", "private"),
    ("http://[::ffff:10.0.0.1]/img", "private"),
    ("http://[::ffff:169.254.169.254]/img", "link-local"),
    ("http://0.0.0.0/img", "unspecified"),
    ("http://[::]/img", "unspecified"),
    ("http://224.0.0.1/img", "multicast"),
    ("http://233.252.0.1/img", "multicast"),  # is_global is True for it: the multicast check catches it
    ("http://239.255.255.250/img", "multicast"),
    ("http://[ff02::1]/img", "multicast"),
    ("http://255.255.255.255/img", "reserved"),
    ("http://240.0.0.1/img", "reserved"),
    ("http://198.18.0.1/img", "reserved"),
    ("http://192.0.2.10/img", "reserved"),
    ("http://[2001:db8::1]/img", "reserved"),
    ("http://[2002:808:808::]/img", "reserved"),  # 6to4, even around a public address
    ("https://10.1.2.3:8443/img", "private"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED_LITERALS)
def test_non_public_literals_are_refused_without_connecting(url: str, reason: str) -> None:
    transport = RecordingTransport()  # fails the test on any call: no packet can leave
    resolver = FakeResolver({})
    with pytest.raises(BlockedAddressError) as caught:
        get(url, transport=transport, resolver=resolver)
    assert_refused(caught.value, reason, "Refused to contact", ALLOW_SETTING)
    assert transport.requests == []
    assert resolver.calls == []  # a literal is checked as written: nothing to resolve


@pytest.mark.parametrize(
    ("host", "records", "reason"),
    [
        ("internal.example", ["10.0.0.5"], "private"),
        ("metadata.example", ["169.254.169.254"], "link-local"),
        ("cgnat.example", ["100.64.12.34"], "shared"),
        ("v6.example", ["fd12:3456::1"], "private"),
        ("mapped.example", ["::ffff:192.168.0.10"], "private"),
        ("mixed.example", ["93.184.216.34", "10.0.0.5"], "private"),  # one bad record is enough
        ("mixed-first.example", ["10.0.0.5", "93.184.216.34"], "private"),
        ("multicast.example", ["224.0.0.251"], "multicast"),
    ],
)
def test_names_resolving_to_non_public_addresses_are_refused(host: str, records: list[str], reason: str) -> None:
    transport = RecordingTransport()
    resolver = FakeResolver({host: records})
    with pytest.raises(BlockedAddressError) as caught:
        get(f"http://{host}/img", transport=transport, resolver=resolver)
    assert_refused(caught.value, host, f"resolves to a {reason}", ALLOW_SETTING)
    assert all(record not in caught.value.message for record in records)  # the internal address is not leaked
    assert resolver.calls == [(host, 80)]
    assert transport.requests == []


# --------------------------------------------------------------------------- allowed, and pinned


def mock_png(seen: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG, headers={"Set-Cookie": "session=tenant-a; Path=/"})

    return httpx.MockTransport(answer)


def test_public_name_connects_to_the_checked_address_with_the_name_in_host() -> None:
    seen: list[httpx.Request] = []
    resolver = FakeResolver({"images.example": ["93.184.216.34"]})
    assert get("http://images.example/cat.png?sig=1", transport=mock_png(seen), resolver=resolver) == PNG
    (request,) = seen
    assert str(request.url) == "http://93.184.216.34/cat.png?sig=1"
    assert request.headers["host"] == "images.example"
    assert "sni_hostname" not in request.extensions


def test_https_pins_the_address_and_keeps_the_name_for_tls() -> None:
    seen: list[httpx.Request] = []
    resolver = FakeResolver({"images.example": ["2606:2800:220:1:248:1893:25c8:1946"]})
    assert get("https://images.example:8443/cat.png", transport=mock_png(seen), resolver=resolver) == PNG
    (request,) = seen
    assert request.url.host == "2606:2800:220:1:248:1893:25c8:1946" and request.url.port == 8443
    assert request.extensions["sni_hostname"] == "images.example"
    assert request.headers["host"] == "images.example:8443"
    assert resolver.calls == [("images.example", 8443)]


def test_url_credentials_become_basic_auth_for_that_host_only() -> None:
    """Webhook URLs carry credentials; they go in a header, never to a host a redirect names."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers["host"] == "a.example":
            return httpx.Response(307, headers={"Location": "http://b.example/next"})
        return httpx.Response(204)

    resolver = FakeResolver({"a.example": ["93.184.216.34"], "b.example": ["93.184.216.35"]})

    async def post(client: OutboundClient) -> int:
        response = await post_json(client, "http://hook%40user:p%3Ass@a.example/h", {})
        return response.status_code

    assert with_client(NO_ALLOW, post, transport=httpx.MockTransport(answer), resolver=resolver) == 204
    first, second = seen
    assert first.headers["authorization"] == "Basic " + base64.b64encode(b"hook@user:p:ss").decode()
    assert str(first.url) == "http://93.184.216.34/h"  # no userinfo left in the pinned URL
    assert "authorization" not in second.headers and second.url.host == "93.184.216.35"


def test_no_cookies_are_kept_between_requests() -> None:
    """A jar keyed by the pinned IP would send one host's cookies to another name on that address."""
    seen: list[httpx.Request] = []
    resolver = FakeResolver({"a.example": ["93.184.216.34"], "b.example": ["93.184.216.34"]})

    async def twice(client: OutboundClient) -> None:
        await client.get_bytes("http://a.example/1", max_bytes=LIMIT, parameter="inputs.image")
        await client.get_bytes("http://b.example/2", max_bytes=LIMIT, parameter="inputs.image")

    with_client(OutboundPolicy(), twice, transport=mock_png(seen), resolver=resolver)
    assert [request.headers.get("cookie") for request in seen] == [None, None]


def test_allow_by_name(serve: Serve) -> None:
    server = serve({"/img": ok()})
    resolver = FakeResolver({"fixtures.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]})
    policy = OutboundPolicy.parse(["fixtures.internal"])
    assert get(server.url("/img", "fixtures.internal"), policy=policy, resolver=resolver) == PNG
    assert server.requests[0].headers["host"] == f"fixtures.internal:{server.port}"
    with pytest.raises(BlockedAddressError):  # the name is allowed, not the address
        get(server.url("/img", "other.internal"), policy=policy, resolver=resolver)
    with pytest.raises(BlockedAddressError):
        get(server.url("/img"), policy=policy, resolver=resolver)
    assert len(server.requests) == 1


def test_allowed_name_still_refuses_unspecified_addresses() -> None:
    transport = RecordingTransport()
    resolver = FakeResolver({"fixtures.internal": ["0.0.0.0"]})
    with pytest.raises(BlockedAddressError, match="unspecified"):
        get("http://fixtures.internal/img", policy=OutboundPolicy.parse(["fixtures.internal"]),
            transport=transport, resolver=resolver)  # fmt: skip
    assert transport.requests == []


def test_allow_localhost_with_the_system_resolver(serve: Serve) -> None:
    server = serve({"/img": ok()})
    assert get(server.url("/img", "localhost"), policy=OutboundPolicy.parse("localhost")) == PNG


def test_allowed_network_covers_the_mapped_form(serve: Serve) -> None:
    server = serve({"/img": ok()})
    transport = real_transport()
    assert get(f"http://[::ffff:127.0.0.1]:{server.port}/img", policy=LOCAL, transport=transport) == PNG
    assert transport.requests[0].url.host == "127.0.0.1"  # dialled as the IPv4 address it is


def test_dns_rebinding_cannot_change_the_address(serve: Serve) -> None:
    """The second answer would be private: it is never asked for while fetching, only on the next fetch."""
    server = serve({"/img": ok()})
    resolver = FakeResolver({"rebind.example": [["127.0.0.1"], ["10.0.0.1"]]})
    transport = real_transport()
    url = server.url("/img", "rebind.example")
    assert get(url, policy=LOCAL, transport=transport, resolver=resolver) == PNG
    assert resolver.calls == [("rebind.example", server.port)]
    (request,) = transport.requests
    assert (request.url.host, request.headers["host"]) == ("127.0.0.1", f"rebind.example:{server.port}")
    assert server.requests[0].headers["host"] == f"rebind.example:{server.port}"

    with pytest.raises(BlockedAddressError, match="private"):  # a new fetch resolves again, and is checked again
        get(url, policy=LOCAL, transport=transport, resolver=resolver)
    assert len(transport.requests) == 1 and len(server.requests) == 1


def test_next_checked_address_is_tried_when_connecting_fails(serve: Serve) -> None:
    server = serve({"/img": ok()})
    resolver = FakeResolver({"dual.example": ["127.0.0.2", "127.0.0.1"]})  # nothing listens on .2
    transport = real_transport()
    policy = OutboundPolicy.parse(["127.0.0.0/8"])
    assert get(server.url("/img", "dual.example"), policy=policy, transport=transport, resolver=resolver) == PNG
    assert [request.url.host for request in transport.requests] == ["127.0.0.2", "127.0.0.1"]


# --------------------------------------------------------------------------- redirects


@pytest.fixture
def two_servers(serve: Serve) -> tuple[HttpReceiver, HttpReceiver, FakeResolver]:
    """A (``public-a.example``, allowed by name) and B (``internal-b.example``, not allowed), both local."""
    b = serve({"/secret": ok(b"internal secret")})
    a = serve(
        {
            "/img": ok(),
            "/to-b-by-name": redirect(b.url("/secret", "internal-b.example")),
            "/to-b-by-ip": redirect(b.url("/secret")),
            "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/iam/"),
            "/to-file": redirect("file:///etc/passwd"),
            "/relative": redirect("/img", 301),
            "/loop": redirect("/loop"),
            "/bad-location": redirect("http://[::1/"),
        }
    )
    resolver = FakeResolver({"public-a.example": ["127.0.0.1"], "internal-b.example": ["127.0.0.1"]})
    return a, b, resolver


A_POLICY = OutboundPolicy.parse(["public-a.example"])


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/to-b-by-name", "internal-b.example"),
        ("/to-b-by-ip", "127.0.0.1"),
        ("/to-metadata", "169.254.169.254"),
    ],
)
def test_redirect_to_a_refused_address_is_not_followed(
    two_servers: tuple[HttpReceiver, HttpReceiver, FakeResolver], path: str, named: str
) -> None:
    a, b, resolver = two_servers
    transport = real_transport()
    with pytest.raises(BlockedAddressError) as caught:
        get(a.url(path, "public-a.example"), policy=A_POLICY, transport=transport, resolver=resolver)
    assert_refused(caught.value, named, "a redirect from public-a.example")
    assert [request.url.port for request in transport.requests] == [a.port]  # only the first hop went out
    assert b.requests == [] and len(a.requests) == 1
    assert "secret" not in caught.value.message and "moved" not in caught.value.message


def test_redirect_to_another_scheme_is_refused(two_servers: tuple[HttpReceiver, HttpReceiver, FakeResolver]) -> None:
    a, _, resolver = two_servers
    with pytest.raises(BlockedAddressError, match="only http and https"):
        get(a.url("/to-file", "public-a.example"), policy=A_POLICY, resolver=resolver)


def test_redirect_with_an_invalid_location_is_refused(
    two_servers: tuple[HttpReceiver, HttpReceiver, FakeResolver],
) -> None:
    a, _, resolver = two_servers
    with pytest.raises(BlockedAddressError, match="not a valid URL"):
        get(a.url("/bad-location", "public-a.example"), policy=A_POLICY, resolver=resolver)


def test_relative_redirect_is_joined_to_the_name_and_checked_again(
    two_servers: tuple[HttpReceiver, HttpReceiver, FakeResolver],
) -> None:
    a, _, resolver = two_servers
    assert get(a.url("/relative", "public-a.example"), policy=A_POLICY, resolver=resolver) == PNG
    assert [seen.path for seen in a.requests] == ["/relative", "/img"]
    assert {seen.headers["host"] for seen in a.requests} == {f"public-a.example:{a.port}"}
    assert resolver.calls == [("public-a.example", a.port)] * 2  # each hop resolved and checked


def test_redirects_are_bounded(two_servers: tuple[HttpReceiver, HttpReceiver, FakeResolver]) -> None:
    a, _, resolver = two_servers
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        get(a.url("/loop", "public-a.example"), policy=A_POLICY, resolver=resolver)
    assert len(a.requests) == 4  # the first request and 3 redirects


def test_post_follows_only_method_keeping_redirects(serve: Serve) -> None:
    server = serve({"/hook": ok(b"", "text/plain")})
    server.routes["/found"] = redirect(server.url("/hook"), 302)
    server.routes["/temporary"] = redirect(server.url("/hook"), 307)

    async def post(client: OutboundClient) -> list[int]:
        statuses = []
        for path in ("/found", "/temporary"):
            response = await post_json(client, server.url(path), {"data": [1]})
            statuses.append(response.status_code)
        return statuses

    assert with_client(LOCAL, post) == [302, 200]
    assert [(seen.method, seen.path, seen.body) for seen in server.requests] == [
        ("POST", "/found", b'{"data":[1]}'),
        ("POST", "/temporary", b'{"data":[1]}'),
        ("POST", "/hook", b'{"data":[1]}'),
    ]


# --------------------------------------------------------------------------- download limits and failures


def test_size_cap_with_content_length(serve: Serve) -> None:
    # Announces one byte over the limit, sends 10: the client must give up on the header alone.
    server = serve({"/big": Reply(200, b"x" * 10, declared_length=LIMIT + 1)})
    with pytest.raises(ImageTooLargeError) as caught:
        get(server.url("/big"), policy=LOCAL)
    assert str(LIMIT) in caught.value.message and caught.value.parameter == "inputs.image"


def test_size_cap_without_content_length(serve: Serve) -> None:
    # HTTP/1.0 with no length: the size is only known by reading, and the client hangs up at the limit.
    server = serve({"/big": Reply(200, b"x" * (LIMIT + 64 * 1024), close_delimited=True)})
    with pytest.raises(ImageTooLargeError):
        get(server.url("/big"), policy=LOCAL)


def test_content_encoded_bodies_are_refused_never_inflated(serve: Serve) -> None:
    """A 'gzip, gzip' bomb: a few KB on the wire, megabytes once inflated twice. The client asks for
    identity and refuses an encoded answer without decoding it, so the cap holds for the bytes in memory."""
    bomb = gzip.compress(gzip.compress(b"\0" * (8 * 2**20)))
    assert len(bomb) < LIMIT
    server = serve({"/bomb": Reply(200, bomb, {"Content-Encoding": "gzip, gzip", "Content-Type": "image/png"})})
    with pytest.raises(ImageFetchError, match="content-encoded") as caught:
        get(server.url("/bomb"), policy=LOCAL)
    assert (caught.value.code, caught.value.parameter) == ("downloadFailed", "inputs.image")
    assert server.requests[0].headers["accept-encoding"] == "identity"


def test_identity_content_encoding_is_read_as_sent(serve: Serve) -> None:
    server = serve({"/img": Reply(200, PNG, {"Content-Encoding": "identity"})})
    assert get(server.url("/img"), policy=LOCAL) == PNG


def test_non_2xx_names_the_status_and_never_the_body(serve: Serve) -> None:
    server = serve({"/missing": Reply(404, b"AKIA-SECRET-BODY")})
    with pytest.raises(ImageFetchError) as caught:
        get(server.url("/missing"), policy=LOCAL)
    assert (caught.value.code, caught.value.parameter, caught.value.http_status) == (
        "downloadFailed",
        "inputs.image",
        400,
    )
    assert "HTTP 404" in caught.value.message and "AKIA" not in caught.value.message


def test_empty_body_is_a_fetch_error(serve: Serve) -> None:
    server = serve({"/empty": ok(b"")})
    with pytest.raises(ImageFetchError, match="empty"):
        get(server.url("/empty"), policy=LOCAL)


def test_timeout_gives_up_on_a_peer_that_never_answers(serve: Serve) -> None:
    """The receiver holds its answer until the test releases it: the client must give up first, on its own
    timeout. (A safety release after 30 s turns a client that ignores its timeout into a 200, so the
    test fails instead of hanging.)"""
    answer = threading.Event()
    server = serve({"/slow": http_receiver.held(answer, ok())})
    safety = threading.Timer(30, answer.set)
    safety.start()
    policy = OutboundPolicy(allow=("127.0.0.1/32",), total_timeout=0.5)
    try:
        with pytest.raises(ImageFetchError, match=r"within 0\.5 s"):
            get(server.url("/slow"), policy=policy)
        assert not answer.is_set(), "the client waited for the answer instead of timing out"
    finally:
        safety.cancel()
    assert [request.path for request in server.requests] == ["/slow"] and server.answered == []


def test_connection_refused_is_a_fetch_error() -> None:
    with pytest.raises(ImageFetchError, match="could not connect"):
        get(f"http://127.0.0.1:{free_port()}/img", policy=LOCAL)


def test_unresolvable_name_is_a_fetch_error() -> None:
    transport = RecordingTransport()
    with pytest.raises(ImageFetchError, match="does not resolve"):
        get("http://nowhere.example/img", transport=transport, resolver=FakeResolver({}))
    assert transport.requests == []


# --------------------------------------------------------------------------- check_url


def test_check_url_refuses_without_connecting_and_tolerates_unresolved_names() -> None:
    transport = RecordingTransport()
    resolver = FakeResolver({"hooks.example": ["93.184.216.34"], "inner.example": ["192.168.0.2"]})

    async def checks(client: OutboundClient) -> str:
        await client.check_url("https://hooks.example/h?token=x", parameter="webhookURL")
        await client.check_url("https://not-yet.example/h", parameter="webhookURL")  # resolves later, maybe
        with pytest.raises(BlockedAddressError) as caught:
            await client.check_url("https://inner.example/h", parameter="webhookURL")
        return caught.value.message

    message = with_client(OutboundPolicy(), checks, transport=transport, resolver=resolver)
    assert "inner.example" in message and "webhookURL" in message
    assert transport.requests == []


def test_request_raises_outbound_error_for_network_failures() -> None:
    async def post(client: OutboundClient) -> None:
        await post_json(client, f"http://127.0.0.1:{free_port()}/hook", {})

    with pytest.raises(OutboundError) as caught:
        with_client(LOCAL, post)
    assert caught.value.retryable and caught.value.host == "127.0.0.1"


# --------------------------------------------------------------------------- policy parsing


def test_policy_parse_accepts_names_networks_and_addresses() -> None:
    policy = OutboundPolicy.parse(" localhost , Fixtures.Internal. ,10.0.0.0/8, ::1/128, 192.168.1.7")
    assert policy.allows_host("LOCALHOST.") and policy.allows_host("fixtures.internal")
    assert not policy.allows_host("example.com")
    assert policy.allows_address(ipaddress.ip_address("10.9.8.7"))
    assert policy.allows_address(ipaddress.ip_address("::1"))
    assert policy.allows_address(ipaddress.ip_address("192.168.1.7"))
    assert not policy.allows_address(ipaddress.ip_address("192.168.1.8"))
    assert OutboundPolicy.parse([]) == OutboundPolicy()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("http://localhost", "not a URL"),
        ("10.0.0.1/8", "host bits set"),
        ("127.1", "dotted form"),
        ("0x7f000001", "dotted form"),
        ("[::1]", "is not a network"),
        ("host:8080", "ports are not supported"),
        ("bad host", "neither a host name nor a network"),
        ("bücher.example", "punycode"),
    ],
)
def test_policy_parse_rejects_bad_entries_clearly(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        OutboundPolicy.parse([entry])
    assert ALLOW_SETTING in str(caught.value) and repr(entry) in str(caught.value)


def test_policy_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_redirects"):
        OutboundPolicy(max_redirects=-1)
    with pytest.raises(ValueError, match="positive"):
        OutboundPolicy(total_timeout=0)


# --------------------------------------------------------------------------- address classification


@given(st.ip_addresses(v=4))
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_embed(address: ipaddress.IPv4Address) -> None:
    reason = refusal_reason(address)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80))
    assert refusal_reason(mapped) == refusal_reason(nat64) == reason
    assert refusal_reason(six_to_four) == (reason or "reserved")  # 6to4 is never contacted


@given(st.ip_addresses())
def test_only_global_unicast_addresses_pass(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if refusal_reason(address) is None:
        assert address.is_global and not address.is_multicast and not address.is_unspecified
