"""The one HTTP client for every request the server makes to a URL a client chose.

Input image URLs, ``webhookURL`` and ``uploadEndpoint`` all let a caller point this server at an
address of their choosing, from inside the operator's network: server-side request forgery (SSRF).
The failures other projects met in the wild shape the rules here:

* A1111 checks the address, then lets ``requests`` resolve the name again (a DNS rebinding window),
  follow redirects unchecked, and read an unbounded body. So: the name is resolved once, here, every
  address it resolves to is checked, and the connection goes to the checked address itself (the URL
  host is rewritten to the IP, ``Host`` and TLS SNI keep the name). No second lookup ever happens.
* frappe/press#7459: a public webhook host answered 302 to ``169.254.169.254`` and the response was
  echoed back. So: redirects are followed by hand, each hop checked like the first, and no response
  body of a refused or failed request ever reaches an error message.
* ``ipaddress.is_private`` misses ranges (100.64.0.0/10) and the stdlib tables were wrong before
  CVE-2024-4032; the check is ``not is_global`` plus multicast plus an explicit list of ranges that
  are never public, and IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by it.
* Numeric tricks (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``) are not parsed here:
  httpx rejects what it cannot parse, and ``getaddrinfo`` turns the rest into the address it would
  really connect to, which is what gets checked.

An operator can still reach private services on purpose: :class:`OutboundPolicy` ``allow`` names host
names and networks (the ``UPSCALE_OUTBOUND_ALLOW`` setting) that are let through although not public.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import httpx

from upscale_server import json_text
from upscale_server.errors import BlockedAddressError, ImageFetchError, ImageTooLargeError

log = logging.getLogger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port)`` -> the addresses ``host`` resolves to, as strings (``getaddrinfo`` by default).
Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]

#: The setting an operator uses to let the server reach a non-public host; named in every refusal.
ALLOW_SETTING = "UPSCALE_OUTBOUND_ALLOW"
USER_AGENT = "upscale-server"

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: A POST or PUT is only followed through redirects that keep the method and the body. A 301/302/303
#: would turn a webhook or an upload into a GET of some other page, which could "succeed" without the
#: result having gone anywhere.
_BODY_KEEPING_REDIRECTS = frozenset({307, 308})

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Named "private" in refusals (RFC 1918, unique local); other non-public ranges read "reserved".
_PRIVATE = tuple(ipaddress.ip_network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
#: Never public, whatever this Python's ``is_global`` says (its tables changed in 3.11.10/3.12.4 and
#: still lag the IANA registries). Checked in addition to ``is_global``, never instead of it.
_NEVER_PUBLIC: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)

_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
#: A last label made of digits (or 0x...) makes URL parsers read the whole name as an IPv4 address.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


# --------------------------------------------------------------------------- errors


class OutboundError(Exception):
    """A request that could not complete: DNS failure, connection error, timeout, too many redirects.

    Not a task error by itself: :meth:`OutboundClient.get_bytes` turns it into ``ImageFetchError``,
    upload and webhook code into their own errors. ``retryable`` is False when resending the same
    request would fail the same way (a redirect loop). ``reason`` is short, names no address, and
    never contains anything the remote server sent.
    """

    def __init__(self, host: str, reason: str, *, retryable: bool = True) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason
        self.retryable = retryable


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class OutboundPolicy:
    """What outbound requests may reach, and how long they may take.

    ``allow`` holds host names (``"localhost"``, ``"fixtures.internal"``: every address they resolve
    to is accepted except unspecified and multicast ones) and networks (``"10.0.0.0/8"``,
    ``"::1/128"``, a bare address means just that address) let through although not public.
    Entries are checked on construction: a bad one raises ``ValueError`` naming it.
    ``total_timeout`` bounds one whole call (resolution, every redirect hop, the body).
    """

    allow: tuple[str, ...] = ()
    max_redirects: int = 3
    connect_timeout: float = 10.0
    total_timeout: float = 30.0
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False, default=())
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be 0 or more, not {self.max_redirects}")
        if not self.connect_timeout > 0 or not self.total_timeout > 0:
            raise ValueError("connect_timeout and total_timeout must be positive")
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in self.allow:
            parsed = _parse_allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_hosts", frozenset(hosts))

    @classmethod
    def parse(
        cls,
        allow: Sequence[str] | str,
        *,
        max_redirects: int = 3,
        connect_timeout: float = 10.0,
        total_timeout: float = 30.0,
    ) -> OutboundPolicy:
        """A policy from settings: ``allow`` is a list, or one comma-separated string (a CLI flag)."""
        entries = allow.split(",") if isinstance(allow, str) else list(allow)
        cleaned = tuple(entry.strip() for entry in entries if entry.strip())
        return cls(cleaned, max_redirects=max_redirects, connect_timeout=connect_timeout, total_timeout=total_timeout)

    def allows_host(self, host: str) -> bool:
        return _normalise_host(host) in self._hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


def _normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def _parse_allow_entry(entry: str) -> IPNetwork | str:
    text = entry.strip().lower()
    where = f"{ALLOW_SETTING} entry {entry!r}"
    if not text:
        raise ValueError(f"{where} is empty")
    if "://" in text or "@" in text:
        raise ValueError(f"{where}: give a bare host name or a network (10.0.0.0/8), not a URL")
    if "/" in text or ":" in text:  # only a network can have these (a port is not supported)
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"{where} is not a network: {exc} (write it as address/prefix with no host bits set, "
                "e.g. 10.0.0.0/8 or fd00::/8; ports are not supported)"
            ) from exc
    with contextlib.suppress(ValueError):
        return ipaddress.ip_network(text, strict=True)  # a bare IPv4 address: that one address
    name = text.rstrip(".")
    if not _HOSTNAME.fullmatch(name) or len(name) > 253:
        raise ValueError(f"{where} is neither a host name nor a network (non-ASCII names must be in punycode)")
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        raise ValueError(f"{where} looks like an IP address but is not in dotted form (write e.g. 127.0.0.1/32)")
    return name


# --------------------------------------------------------------------------- addresses


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries: IPv4-mapped, NAT64 well-known prefix, or 6to4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address (e.g. ``"loopback"``), or None when it is.

    An IPv4-mapped or NAT64 address reaches the IPv4 address it embeds, so that one decides. A 6to4
    address is refused for its embedded address's reason, or as reserved: 6to4 is deprecated
    (RFC 7526) and Python's own tables disagree across versions about whether it is global.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = _classify(embedded)
            if reason is None and address.sixtofour is not None:
                return "reserved"
            return reason
    return _classify(address)


def _classify(address: IPAddress) -> str | None:
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (the cloud metadata range)"
    if address.is_multicast:
        return "multicast"
    if address in _CGNAT:
        return "shared (carrier-grade NAT)"
    if any(address in network for network in _PRIVATE):
        return "private"
    if not address.is_global or any(address in network for network in _NEVER_PUBLIC):
        return "reserved"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host`` (TCP), in its order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def origin(url: str | httpx.URL) -> str:
    """``scheme://host[:port]`` of ``url``: what logs show, since paths and queries carry tokens."""
    try:
        parsed = httpx.URL(url) if isinstance(url, str) else url
        return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"
    except (httpx.InvalidURL, UnicodeDecodeError):
        return "<invalid URL>"


def encode_json(payload: Mapping[str, object]) -> bytes:
    """``payload`` as the API itself encodes it (FastAPI's JSONResponse: compact UTF-8, no NaN)."""
    return json_text.dump_text(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class _Hop:
    """One checked request target: the logical URL and the addresses it may be sent to."""

    url: httpx.URL
    host: str
    addresses: tuple[str, ...]
    literal: bool


# --------------------------------------------------------------------------- the client


class OutboundClient:
    """Policy-enforcing HTTP for input URLs, webhooks and upload endpoints. Build one per server.

    ``transport`` and ``resolver`` are for tests. Requests go straight to the transport, not through
    ``httpx.AsyncClient``, so nothing happens that this class does not decide: no cookie jar (one
    keyed by the pinned IP would hand a host's cookies to another name on the same address), no
    proxy from the environment (a proxy would resolve the name again, undoing the check), no
    parsing of a ``Location`` it will not follow. Idle connections are not kept (a pooled TLS
    connection to an IP could otherwise serve a different name).
    """

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        self.policy = policy
        # Webhook POSTs and upload PUTs in flight at once (``request``); the others wait their turn, so
        # receivers that never answer hold a bounded number of sockets. Input downloads are not counted.
        self._deliveries = asyncio.Semaphore(max_deliveries) if max_deliveries is not None else None
        self._resolve = resolver or system_resolver
        self._transport = transport or httpx.AsyncHTTPTransport(
            retries=0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self._timeouts = httpx.Timeout(policy.total_timeout, connect=policy.connect_timeout).as_dict()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # ------------------------------------------------------------------------- public calls

    async def check_url(self, url: str, *, parameter: str) -> None:
        """Refuse ``url`` now (``BlockedAddressError``) if the policy would refuse it when contacted.

        For ``webhookURL``/``uploadEndpoint`` at task acceptance, so a refused URL fails before any
        work is done. A name that does not resolve yet is let through: the check made when the
        request is sent (which is the one that matters, redirects included) decides then.
        """
        try:
            async with asyncio.timeout(self.policy.total_timeout):
                await self._checked_hop(url, parameter=parameter)
        except (OutboundError, TimeoutError) as exc:
            log.debug("not checking %s for %s now: %s", origin(url), parameter, exc)

    async def get_bytes(self, url: str, *, max_bytes: int, parameter: str) -> bytes:
        """The body of ``url`` (GET), at most ``max_bytes`` long, within the policy's total timeout.

        Raises ``BlockedAddressError`` for a refused URL or redirect, ``ImageTooLargeError`` past
        ``max_bytes`` (the declared ``Content-Length`` is checked before reading, then the bytes as
        they arrive, undecoded), and ``ImageFetchError`` for a non-2xx status (named), a body with a
        ``Content-Encoding`` other than identity, an empty body, or any network failure or timeout.
        """
        too_large = f"The image at {parameter} is larger than this server accepts ({max_bytes} bytes)."
        try:
            async with self._deadline(url):
                # identity: images are compressed already. A response encoded anyway is refused, never
                # inflated: the byte cap then holds for what is in memory (no gzip bomb).
                headers = {"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
                response = await self._exchange("GET", url, content=None, headers=headers, parameter=parameter)
                try:
                    return await _read_capped(response, max_bytes=max_bytes, parameter=parameter, too_large=too_large)
                finally:
                    await response.aclose()
        except OutboundError as exc:
            raise ImageFetchError(
                f"Could not download {parameter} from {exc.host}: {exc.reason}.", parameter=parameter
            ) from exc

    async def put_bytes(self, url: str, data: bytes, *, content_type: str, parameter: str) -> httpx.Response:
        """PUT ``data`` as the raw request body (presigned upload URLs expect exactly this)."""
        return await self.request("PUT", url, content=data, content_type=content_type, parameter=parameter)

    async def request(
        self, method: str, url: str, *, content: bytes, content_type: str, parameter: str
    ) -> httpx.Response:
        """Send ``content`` once and return the final response (status and headers).

        The response body is not read: nothing a receiver sends can reach a log or an error, and a
        receiver cannot hold the call by trickling a body (``.content`` raises ``ResponseNotRead``).
        Raises ``BlockedAddressError`` for a refused URL or redirect and ``OutboundError`` when no
        response came (DNS, connection, timeout, redirect loop). Non-2xx statuses are returned. Waits
        for a free delivery slot first (``max_deliveries``); the timeout starts once it has one.
        """
        async with self._deliveries or contextlib.nullcontext():
            return await self._request(method, url, content=content, content_type=content_type, parameter=parameter)

    async def _request(
        self, method: str, url: str, *, content: bytes, content_type: str, parameter: str
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        async with self._deadline(url):
            response = await self._exchange(method, url, content=content, headers=headers, parameter=parameter)
            await response.aclose()
            return response

    # ------------------------------------------------------------------------- internals

    @contextlib.asynccontextmanager
    async def _deadline(self, url: str) -> AsyncIterator[None]:
        """The policy's total timeout around one call, and failures mapped to :class:`OutboundError`."""
        host = _host_for_messages(url)
        timeout = self.policy.total_timeout
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError as exc:
            raise OutboundError(host, f"no complete answer within {timeout:g} s") from exc
        except httpx.TimeoutException as exc:
            raise OutboundError(host, f"timed out ({exc.__class__.__name__})") from exc
        except httpx.RequestError as exc:  # read errors mid-body, decoding errors
            raise OutboundError(host, f"the connection failed ({exc.__class__.__name__})") from exc

    async def _exchange(
        self, method: str, url: str, *, content: bytes | None, headers: dict[str, str], parameter: str
    ) -> httpx.Response:
        """Send, following up to ``max_redirects`` redirects by hand; every hop is checked first."""
        hop = await self._checked_hop(url, parameter=parameter)
        for _ in range(self.policy.max_redirects + 1):
            response = await self._send_pinned(method, hop, content=content, headers=headers)
            location = response.headers.get("location")
            follow = _REDIRECTS if method in ("GET", "HEAD") else _BODY_KEEPING_REDIRECTS
            if response.status_code not in follow or not location:
                return response
            await response.aclose()  # a redirect's body is never read
            try:
                target = str(hop.url.join(location))  # relative to the name, not the pinned IP
            except httpx.InvalidURL as exc:
                raise BlockedAddressError(
                    f"Refused to follow the redirect from {hop.host} for '{parameter}': its Location is not a "
                    "valid URL.",
                    parameter=parameter,
                ) from exc
            hop = await self._checked_hop(target, parameter=parameter, redirected_from=hop.host)
        raise OutboundError(
            hop.host, f"more than {self.policy.max_redirects} redirects (a redirect loop?)", retryable=False
        )

    async def _checked_hop(self, url: str, *, parameter: str, redirected_from: str | None = None) -> _Hop:
        """Parse, resolve and check ``url``; raise ``BlockedAddressError`` before any connection."""
        via = f" (a redirect from {redirected_from})" if redirected_from else ""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise BlockedAddressError(
                f"Refused '{parameter}'{via}: it is not a valid URL (an IP address must be written in "
                "plain dotted form).",
                parameter=parameter,
            ) from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BlockedAddressError(
                f"Refused '{parameter}'{via}: only http and https URLs with a host are contacted.",
                parameter=parameter,
            )
        host = _normalise_host(parsed.host)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            raw_addresses = [host]
        else:
            try:
                raw_addresses = await self._resolve(host, port)
            except OSError as exc:  # socket.gaierror included
                raise OutboundError(host, "the host name does not resolve") from exc
            if not raw_addresses:
                raise OutboundError(host, "the host name does not resolve")
        host_allowed = literal is None and self.policy.allows_host(host)
        addresses = [
            self._checked_address(host, raw, host_allowed=host_allowed, parameter=parameter, via=via)
            for raw in raw_addresses
        ]
        return _Hop(parsed, host, tuple(dict.fromkeys(addresses)), literal is not None)

    def _checked_address(self, host: str, raw: str, *, host_allowed: bool, parameter: str, via: str) -> str:
        """The address to connect to for ``raw``; ``BlockedAddressError`` when the policy refuses it."""
        try:
            address = ipaddress.ip_address(raw)
        except ValueError as exc:
            raise OutboundError(host, "the resolver returned something that is not an address") from exc
        # An IPv4-mapped address is the IPv4 address: dial that, and let an allowed IPv4 network
        # cover it. NAT64 and 6to4 addresses are real IPv6 destinations and are dialled as given.
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        connect_to = str(mapped) if mapped is not None else raw
        if self.policy.allows_address(address) or (mapped is not None and self.policy.allows_address(mapped)):
            return connect_to
        reason = refusal_reason(address)
        if reason is None or (host_allowed and reason not in ("unspecified", "multicast")):
            return connect_to
        log.warning("refused %s for %s%s: %s resolves to %s (%s)", host, parameter, via, host, raw, reason)
        article = "an" if reason[0] in "aeiou" else "a"
        verb = "is" if is_ip_literal(host) else "resolves to"
        subject = f"it {verb} {article} {reason} address"
        raise BlockedAddressError(
            f"Refused to contact {host} for '{parameter}'{via}: {subject}, and this server only contacts "
            f"public internet addresses. The server's operator can allow it with {ALLOW_SETTING} "
            "(a host name, or a network such as 10.0.0.0/8).",
            parameter=parameter,
        )

    async def _send_pinned(
        self, method: str, hop: _Hop, *, content: bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        """Send to the checked addresses in turn (the next only when connecting failed), never the name."""
        request_headers = {"User-Agent": USER_AGENT, **headers, "Host": hop.url.netloc.decode("ascii")}
        if hop.url.username or hop.url.password:  # credentials in the URL (a webhook's usual way)
            token = base64.b64encode(f"{hop.url.username}:{hop.url.password}".encode()).decode("ascii")
            request_headers["Authorization"] = f"Basic {token}"
        extensions: dict[str, object] = {"timeout": self._timeouts}
        if hop.url.scheme == "https" and not hop.literal:
            extensions["sni_hostname"] = hop.host  # TLS names and verifies the host, not the IP
        last_error: httpx.TransportError | None = None
        for address in hop.addresses:
            pinned = hop.url.copy_with(host=address, username=None, password=None)
            request = httpx.Request(method, pinned, content=content, headers=request_headers, extensions=extensions)
            try:
                response = await self._transport.handle_async_request(request)
                response.request = request
                return response
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last_error = exc  # nothing was sent: trying the next checked address is safe
            except httpx.TransportError as exc:
                raise OutboundError(hop.host, f"the request failed ({exc.__class__.__name__})") from exc
        assert last_error is not None  # a hop always has at least one address
        raise OutboundError(hop.host, f"could not connect ({last_error.__class__.__name__})") from last_error


async def _read_capped(response: httpx.Response, *, max_bytes: int, parameter: str, too_large: str) -> bytes:
    """The body of a final GET response, refusing non-2xx, empty bodies and anything past ``max_bytes``."""
    host = response.request.headers.get("host", "")  # the name the URL gave, not the pinned address
    if not response.is_success:
        raise ImageFetchError(
            f"Could not download {parameter} from {host}: the server answered HTTP {response.status_code}.",
            parameter=parameter,
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The request asked for identity; decoding anyway would let a few KB inflate to gigabytes
        # before the size check sees them (each layer of "gzip, gzip" multiplies).
        raise ImageFetchError(
            f"Could not download {parameter} from {host}: the server sent it content-encoded ({encoding[:40]}); "
            "only unencoded (identity) bodies are accepted.",
            parameter=parameter,
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLargeError(too_large, parameter=parameter)
    received = bytearray()
    async for chunk in _raw_chunks(response):
        received += chunk
        if len(received) > max_bytes:
            raise ImageTooLargeError(too_large, parameter=parameter)
    if not received:
        raise ImageFetchError(
            f"Could not download {parameter} from {host}: the response body is empty.", parameter=parameter
        )
    return bytes(received)


async def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent, never content-decoded, so a byte cap holds for what is in memory. A response a
    transport has read already (an in-process test transport) yields what it holds."""
    if response.is_stream_consumed:
        yield response.content
        return
    async for chunk in response.aiter_raw():
        yield chunk


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address as written (v4 or v6, without brackets), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_for_messages(url: str) -> str:
    try:
        return _normalise_host(httpx.URL(url).host) or "<no host>"
    except httpx.InvalidURL:
        return "<invalid URL>"
