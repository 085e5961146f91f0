"""SSRF guard for outgoing HTTP requests (status callbacks, optional https media).

URLs come from producers, so a callback could otherwise be pointed at the cloud
metadata service, Redis, or anything else inside the cluster. `resolve_target`
resolves the host once and rejects the URL if any address it resolves to is not
public; `guarded_request` then connects to exactly that address (no second DNS
lookup, so no rebinding window), checks TLS against the original hostname, never
follows redirects, and reads a bounded response within one overall deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from api_client.errors import ServiceError
from api_client.schema import ErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata endpoints: refused even when private targets are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_READ_CHUNK = 64 * 1024


class ForbiddenURL(ServiceError):
    """The URL may not be fetched (scheme, userinfo, or a non-public address); do not retry."""

    code = ErrorCode.forbidden_url


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # the hostname as written (for SNI, certificate check and Host header)
    port: int
    ip: str  # the first vetted address; connect here, never re-resolve
    path_qs: str
    ips: tuple[str, ...] = field(default=())  # every vetted address, in resolver order


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    truncated: bool = False  # the body was cut at max_response_bytes


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one tunnels to (mapped, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def forbidden_reason(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it is allowed."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if ip.is_unspecified or ip.is_multicast:
        return "unspecified or multicast address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = forbidden_reason(embedded, allow_private=allow_private)
            return f"embeds {reason}" if reason else None
    if allow_private:
        return None
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return "private address"
    if ip.is_reserved or not ip.is_global:
        return "reserved or non-global address"
    return None


def _parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _is_legacy_ipv4_form(host: str) -> bool:
    """True for forms inet_aton accepts but that are not dotted quads: 2130706433, 0x7f.1, 0177.0.0.1."""
    if _parse_ip_literal(host) is not None:
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def resolve_target(url: str, *, allow_private: bool, allowed_schemes: tuple[str, ...] = ("https", "http")) -> Target:
    """Parse and resolve ``url``; raise ForbiddenURL unless every address it resolves to may be used.

    Plain http is accepted only with ``allow_private`` (development and tests); a DNS
    failure raises socket.gaierror (an OSError: transient, worth a retry).
    """
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise ForbiddenURL("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ForbiddenURL(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in allowed_schemes or scheme not in ("http", "https"):
        raise ForbiddenURL(f"scheme {scheme!r} is not allowed")
    if scheme == "http" and not allow_private:
        raise ForbiddenURL("plain http is not allowed; use https")
    if "@" in parts.netloc:
        raise ForbiddenURL("credentials in the URL are not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ForbiddenURL("URL has no host")
    if _is_legacy_ipv4_form(host):
        # These only exist to smuggle addresses past string checks; no real callback uses them.
        raise ForbiddenURL("non-canonical numeric host")
    port = port or (443 if scheme == "https" else 80)
    if port == 0:
        raise ForbiddenURL("port 0 is not allowed")

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    ips: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        ip = _parse_ip_literal(address)
        if ip is None:
            raise ForbiddenURL("resolver returned a non-IP address")
        reason = forbidden_reason(ip, allow_private=allow_private)
        if reason:
            raise ForbiddenURL(f"{host} resolves to a forbidden address ({reason})")
        if address not in ips:
            ips.append(address)
    if not ips:
        raise socket.gaierror(f"{host} did not resolve")
    path_qs = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme=scheme, host=host, port=port, ip=ips[0], path_qs=path_qs, ips=tuple(ips))


def _connect(target: Target, timeout_s: float, ssl_context: ssl.SSLContext | None) -> socket.socket:
    last_error: OSError | None = None
    for address in target.ips or (target.ip,):
        try:
            sock = socket.create_connection((address, target.port), timeout=timeout_s)
        except OSError as exc:
            last_error = exc
            continue
        if target.scheme != "https":
            return sock
        context = ssl_context or ssl.create_default_context()
        try:
            return context.wrap_socket(sock, server_hostname=target.host)
        except BaseException:
            sock.close()
            raise
    assert last_error is not None
    raise last_error


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def guarded_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout_s: float = 10.0,
    max_response_bytes: int = 64 * 1024,
    allow_private: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP request to a vetted address; 3xx are returned, not followed.

    ``timeout_s`` bounds the whole exchange (connect, send, headers, body); past it
    TimeoutError is raised. ``ssl_context`` exists for tests with a private CA.
    """
    target = resolve_target(url, allow_private=allow_private)
    deadline = time.monotonic() + timeout_s
    sock = _connect(target, timeout_s, ssl_context)
    # The socket is already connected (and wrapped), so http.client never resolves the host itself.
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    conn.sock = sock
    try:
        conn.putrequest(method, target.path_qs, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", _host_header(target))
        for name, value in (headers or {}).items():
            if name.lower() not in ("host", "content-length"):
                conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.putheader("Connection", "close")
        conn.endheaders(body or None)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        resp = conn.getresponse()
        chunks: list[bytes] = []
        received = 0
        truncated = False
        while not resp.isclosed():  # http.client closes it once the whole body is read
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"response not complete within {timeout_s}s")
            sock.settimeout(remaining_s)
            # read1 returns what has arrived, so a server dripping bytes cannot stretch the deadline.
            chunk = resp.read1(min(_READ_CHUNK, max_response_bytes - received + 1))
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            if received > max_response_bytes:
                truncated = True
                break
        data = b"".join(chunks)[:max_response_bytes]
        return Response(
            status=resp.status,
            headers={k.lower(): v for k, v in resp.getheaders()},
            body=data,
            truncated=truncated,
        )
    finally:
        conn.close()
