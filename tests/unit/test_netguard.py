"""SSRF guard: which URLs are refused, and how guarded_request talks to a local server."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker.io.netguard import ForbiddenURL, guarded_request, resolve_target

BIG = b"x" * (1024 * 1024)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers), b""))
        if self.path.startswith("/redirect"):
            self._send(302, b"", {"Location": "/ok"})
        elif self.path == "/big":
            self._send(200, BIG)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self._send(200, b"hello", {"X-Host-Seen": self.headers.get("Host", "")})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append((self.command, self.path, dict(self.headers), body))
        self._send(201, body[::-1])


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.seen = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    yield from _serve()


@pytest.fixture
def base(server) -> str:
    server.seen.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "https://172.16.5.4/hook",
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://0.0.0.0/hook",
        "https://[::]/hook",
        "https://localhost/hook",
        "https://100.64.0.1/hook",  # CGNAT
        "https://[fd12:3456::1]/hook",  # IPv6 ULA
        "https://[fe80::1]/hook",
        "https://169.254.1.1/hook",
        "https://224.0.0.1/hook",
        "https://240.0.0.1/hook",
        "https://[::ffff:10.0.0.1]/hook",  # IPv4-mapped private
        "https://[::ffff:127.0.0.1]/hook",
        "https://[64:ff9b::a00:1]/hook",  # NAT64 of 10.0.0.1
        "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "https://2130706433/hook",  # 127.0.0.1 in decimal
        "https://0x7f.1/hook",
        "https://0177.0.0.1/hook",
        "https://127.1/hook",
    ],
)
def test_non_public_targets_refused(url):
    with pytest.raises(ForbiddenURL):
        resolve_target(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0:8080/",
        "http://2130706433/",  # numeric tricks stay refused: no real receiver needs them
        "http://0x7f.1/",
    ],
)
def test_metadata_and_tricks_refused_even_when_private_allowed(url):
    with pytest.raises(ForbiddenURL):
        resolve_target(url, allow_private=True)


@pytest.mark.parametrize(
    "url,allow_private",
    [
        ("http://hooks.example.com/x", False),  # plain http only in development
        ("ftp://hooks.example.com/x", True),
        ("file:///etc/passwd", True),
        ("gopher://127.0.0.1:6379/_INFO", True),
        ("https://user:pw@hooks.example.com/x", False),
        ("https://hooks.example.com@127.0.0.1/x", True),
        ("https:///nohost", False),
        ("http://127.0.0.1/a b", True),
        ("http://127.0.0.1/a\r\nX-Injected: 1", True),
        ("https://hooks.example.com:99999/x", False),
    ],
)
def test_bad_url_shapes_refused_before_resolving(url, allow_private):
    with pytest.raises(ForbiddenURL):
        resolve_target(url, allow_private=allow_private)


def test_https_only_scheme_list():
    with pytest.raises(ForbiddenURL):
        resolve_target("http://127.0.0.1/", allow_private=True, allowed_schemes=("https",))


def test_public_literals_allowed():
    target = resolve_target("https://93.184.215.14/in/hook?a=1&b=2", allow_private=False)
    assert (target.scheme, target.host, target.port, target.ip) == ("https", "93.184.215.14", 443, "93.184.215.14")
    assert target.path_qs == "/in/hook?a=1&b=2"
    v6 = resolve_target("https://[2606:4700:4700::1111]:8443", allow_private=False)
    assert (v6.ip, v6.port, v6.path_qs) == ("2606:4700:4700::1111", 8443, "/")


def test_private_allowed_in_development():
    target = resolve_target("http://localhost:8080/cb", allow_private=True)
    assert target.ip == "127.0.0.1" and target.host == "localhost" and target.port == 8080


def test_local_server_only_with_allow_private(base, server):
    with pytest.raises(ForbiddenURL):
        guarded_request("GET", f"{base}/ok", timeout_s=2, allow_private=False)
    https_base = base.replace("http://", "https://")
    with pytest.raises(ForbiddenURL):
        guarded_request("GET", f"{https_base}/ok", timeout_s=2, allow_private=False)
    assert server.seen == []
    response = guarded_request("GET", f"{base}/ok?q=1", timeout_s=2, allow_private=True)
    assert (response.status, response.body, response.truncated) == (200, b"hello", False)
    assert response.headers["x-host-seen"] == base.removeprefix("http://")
    assert server.seen[0][1] == "/ok?q=1"


def test_host_header_uses_hostname_not_ip(server):
    port = server.server_address[1]
    response = guarded_request("GET", f"http://localhost:{port}/ok", timeout_s=2, allow_private=True)
    assert response.headers["x-host-seen"] == f"localhost:{port}"


def test_post_sends_headers_and_body(base, server):
    response = guarded_request(
        "POST", f"{base}/cb", headers={"X-Test": "1"}, body=b"abc", timeout_s=2, allow_private=True
    )
    assert (response.status, response.body) == (201, b"cba")
    method, path, headers, body = server.seen[0]
    assert (method, path, body, headers["X-Test"], headers["Content-Length"]) == ("POST", "/cb", b"abc", "1", "3")


def test_redirect_returned_not_followed(base, server):
    response = guarded_request("GET", f"{base}/redirect", timeout_s=2, allow_private=True)
    assert response.status == 302 and response.headers["location"] == "/ok"
    assert [s[1] for s in server.seen] == ["/redirect"]


def test_oversize_response_cut(base):
    response = guarded_request("GET", f"{base}/big", timeout_s=5, max_response_bytes=1000, allow_private=True)
    assert response.status == 200 and len(response.body) == 1000 and response.truncated


def test_slow_response_times_out(base):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        guarded_request("GET", f"{base}/drip", timeout_s=0.5, allow_private=True)
    assert time.monotonic() - started < 2.0


def test_connection_refused_is_oserror(base, server):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        guarded_request("GET", f"http://127.0.0.1:{port}/", timeout_s=1, allow_private=True)


# --- TLS: certificate and hostname are checked against the URL's host, not the IP --------------


def _make_tls(tmp: Path, dns_name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(name(dns_name)).issuer_name(ca.subject)
        .public_key(leaf_key.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "leaf.pem", tmp / "leaf.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    return server_ctx, client_ctx


def test_tls_verified_against_hostname(tmp_path):
    server_ctx, client_ctx = _make_tls(tmp_path, "localhost")
    for tls_server in _serve(server_ctx):
        url = f"https://localhost:{tls_server.server_address[1]}/ok"
        response = guarded_request("GET", url, timeout_s=3, allow_private=True, ssl_context=client_ctx)
        assert response.status == 200 and response.body == b"hello"
        # The default trust store does not know our test CA: verification really happens.
        with pytest.raises(ssl.SSLCertVerificationError):
            guarded_request("GET", url, timeout_s=3, allow_private=True)


def test_tls_wrong_hostname_rejected(tmp_path):
    server_ctx, client_ctx = _make_tls(tmp_path, "hooks.example.com")
    for tls_server in _serve(server_ctx):
        url = f"https://localhost:{tls_server.server_address[1]}/ok"
        with pytest.raises(ssl.SSLCertVerificationError):
            guarded_request("GET", url, timeout_s=3, allow_private=True, ssl_context=client_ctx)
