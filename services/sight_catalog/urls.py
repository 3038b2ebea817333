"""Images fetched from URLs for ingest (:func:`url_items`, :func:`fetch_url`).

URLs are fetched over http or https only, from public addresses: a host that resolves to a loopback,
private, link-local (the cloud's metadata service), multicast or reserved address is refused, every
address it resolves to is checked, the connection goes to the checked address (no second lookup to rebind),
and each redirect is checked again. :attr:`Limits.allow_loopback` admits loopback, for tests and demos.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from services.errors import UserError
from services.sight_catalog.image_checks import FORMATS, RejectedError
from services.sight_catalog.sources import Fetched, Item, Limits

_CHUNK = 1 << 16
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``, one the host resolved to, all of them allowed)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


def parse_url_list(text: str) -> list[tuple[str, str | None]]:
    """Lines of ``URL`` or ``URL<TAB>sight`` (blank lines and ``#`` comments skipped)."""
    entries: list[tuple[str, str | None]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        url, _, sight = line.partition("\t")
        entries.append((url.strip(), sight.strip() or None))
    return entries


def url_items(urls: Iterable[str | tuple[str, str | None]]) -> list[Item]:
    """Each URL (or ``(url, sight)``) as an item, in order; each is checked and fetched when read."""
    items: list[Item] = []
    for entry in urls:
        url, sight = (entry, None) if isinstance(entry, str) else entry
        items.append(Item(url, sight, None, _url_reader(url)))
    return items


def _url_reader(url: str) -> Callable[[Limits], Fetched]:
    def read(limits: Limits) -> Fetched:
        try:
            return fetch_url(url, limits)
        except UserError as exc:
            raise RejectedError(str(exc)) from None

    return read


def refusal(address: str, *, allow_loopback: bool = False) -> str | None:
    """Why a URL may not reach ``address`` (loopback, private, link-local...), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address (where cloud metadata services answer)"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{ip} is not a public address"
    if ip.is_private:
        return f"{ip} is a private address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def check_url(url: str, *, allow_loopback: bool = False) -> Target:
    """``url`` checked for fetching (see the module): http or https, no credentials, a host whose every
    address is public. UserError saying why not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UserError(f"{url!r} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UserError(f"{url}: only http and https URLs are fetched, not {scheme or 'a bare path'}")
    host = parts.hostname
    if not host:
        raise UserError(f"{url}: names no host")
    if parts.username is not None or parts.password is not None:
        raise UserError(f"{url}: URLs with credentials are not fetched")
    port = port or (443 if scheme == "https" else 80)
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"{url}: cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in resolved))
    if not addresses:
        raise UserError(f"{url}: {host} resolves to no address")
    for address in addresses:
        reason = refusal(address, allow_loopback=allow_loopback)
        if reason is not None:
            named = "" if host == address else f" ({host} resolves to it)"
            raise UserError(f"{url}: refused, {reason}{named}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, host, port, path, addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    """Plain HTTP to a checked address, whatever the host's name resolves to now."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        """Connect to the checked address."""
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate must still name the host."""

    def __init__(self, target: Target, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._tls)
        self._address = target.address

    def connect(self) -> None:
        """Connect to the checked address and verify the host's certificate."""
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def fetch_url(url: str, limits: Limits | None = None) -> Fetched:
    """GET an image from ``url`` within ``limits`` (each hop checked, see :func:`check_url`);
    :class:`RejectedError` or UserError saying why not."""
    limits = limits or Limits()
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(limits.redirects + 1):
        target = check_url(url, allow_loopback=limits.allow_loopback)
        pinned = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        connection: http.client.HTTPConnection = pinned(target, limits.timeout_s)
        try:
            connection.request(
                "GET",
                target.path,
                headers={
                    "User-Agent": "tessera-sight-catalog/1",
                    "Accept": "image/jpeg, image/png, image/webp",
                    "Accept-Encoding": "identity",
                },
            )
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RejectedError(f"HTTP {response.status} without a Location")
                url = urljoin(url, location)
                continue
            return _read_response(response, limits, deadline)
        except (OSError, http.client.HTTPException) as exc:
            raise RejectedError(f"could not fetch it: {exc or type(exc).__name__}") from None
        finally:
            connection.close()
    raise RejectedError(f"more than {limits.redirects} redirects")


def _read_response(response: http.client.HTTPResponse, limits: Limits, deadline: float) -> Fetched:
    if response.status != 200:
        raise RejectedError(f"HTTP {response.status} {response.reason}")
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type and content_type not in FORMATS and content_type != "application/octet-stream":
        raise RejectedError(f"the server sent {content_type}, not a JPEG, PNG or WebP image")
    encoding = (response.getheader("Content-Encoding") or "identity").lower()
    if encoding != "identity":
        raise RejectedError(f"the server sent it {encoding}-encoded")
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        raise RejectedError(f"the file is {length} bytes, over the limit of {limits.max_bytes}")
    body = bytearray()
    while block := response.read(_CHUNK):
        body += block
        if len(body) > limits.max_bytes:
            raise RejectedError(f"the file is over the limit of {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise RejectedError(f"took longer than {limits.timeout_s:g} s")
    return Fetched(bytes(body), content_type if content_type in FORMATS else None)
